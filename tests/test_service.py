"""The launchd agent, the systemd unit, keeping the machine awake, and macOS privacy denials."""

from __future__ import annotations

import errno
import os
import plistlib
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

from conftest import spec_text, statuses, wait_for
from lorad import layout, service


def stand_in(bindir: Path, name: str, body: str = "") -> Path:
    """A recording stand-in for a system command: appends its arguments to <name>.calls."""
    bindir.mkdir(exist_ok=True)
    exe = bindir / name
    exe.write_text(f"#!/bin/sh\necho \"$@\" >> {bindir / (name + '.calls')}\n{body}")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return exe


def lorad(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lorad", *args], capture_output=True, text=True, env=env, timeout=60)


def test_launchd_plist_has_every_key(tmp_path):
    plan = service.launchd_plan(layout.resolve(tmp_path / "root", inbox=tmp_path / "Dropbox & co" / "inbox"),
                                tmp_path / "home", 501)
    plist = plistlib.loads(plan.content.encode())
    assert plan.path == tmp_path / "home/Library/LaunchAgents/dev.lorad.daemon.plist"
    assert plist["Label"] == "dev.lorad.daemon"
    args = plist["ProgramArguments"]
    assert args[0] == sys.executable and os.path.isabs(args[0]) and args[1:4] == ["-m", "lorad", "run"]
    assert args[args.index("--inbox") + 1] == str(tmp_path / "Dropbox & co" / "inbox")
    assert all(os.path.isabs(a) for a in args if "/" in a)
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    assert plist["ProcessType"] == "Interactive"
    assert plist["ExitTimeOut"] > 25 and plist["ThrottleInterval"] >= 10
    assert "/opt/homebrew/bin" in plist["EnvironmentVariables"]["PATH"].split(":")
    assert os.path.isabs(plist["StandardOutPath"]) and os.path.isabs(plist["StandardErrorPath"])
    assert plan.commands == [["launchctl", "bootout", "gui/501/dev.lorad.daemon"],
                             ["launchctl", "bootstrap", "gui/501", str(plan.path)]]
    if shutil.which("plutil"):
        (tmp_path / "a.plist").write_text(plan.content)
        assert subprocess.run(["plutil", "-lint", str(tmp_path / "a.plist")]).returncode == 0


def test_systemd_unit_has_every_key_and_verifies(tmp_path):
    lay = layout.resolve(tmp_path / "root", inbox=tmp_path / "My Sync" / "inbox")
    lay.make_dirs()
    plan = service.systemd_plan(lay, tmp_path / "home")
    text = plan.content
    for line in ("Type=notify", "WatchdogSec=120", "Restart=on-failure", "KillMode=mixed", "WantedBy=default.target",
                 f"WorkingDirectory={lay.state}"):
        assert line in text.splitlines()
    assert int(next(x for x in text.splitlines() if x.startswith("TimeoutStopSec=")).split("=")[1]) > 25
    assert f'--inbox "{tmp_path / "My Sync" / "inbox"}"' in text
    assert plan.path == tmp_path / "home/.config/systemd/user/lorad.service"
    assert any("loginctl enable-linger" in n for n in plan.notes)
    if shutil.which("systemd-analyze"):
        unit = tmp_path / "lorad.service"
        unit.write_text(text)
        out = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr


def test_install_and_uninstall_call_the_right_commands(tmp_path, lorad_env):
    bindir = tmp_path / "bin"
    stand_in(bindir, "launchctl")
    stand_in(bindir, "systemctl")
    env = {**lorad_env, "HOME": str(tmp_path / "home"), "PATH": f"{bindir}:{lorad_env['PATH']}"}
    root = tmp_path / "root"
    uid = os.getuid()

    out = lorad("install-agent", "--launchd", "--root", str(root), env=env)
    assert out.returncode == 0, out.stderr
    plist = tmp_path / "home/Library/LaunchAgents/dev.lorad.daemon.plist"
    assert plistlib.loads(plist.read_bytes())["Label"] == "dev.lorad.daemon" and (root / "inbox").is_dir()
    assert oct(plist.stat().st_mode & 0o777) == "0o644"
    assert lorad("restart-agent", "--launchd", env=env).returncode == 0
    assert lorad("uninstall-agent", "--launchd", env=env).returncode == 0
    assert not plist.exists()
    assert (bindir / "launchctl.calls").read_text().splitlines() == [
        f"bootout gui/{uid}/dev.lorad.daemon", f"bootstrap gui/{uid} {plist}",
        f"kickstart -k gui/{uid}/dev.lorad.daemon", f"bootout gui/{uid}/dev.lorad.daemon"]

    assert lorad("install-agent", "--systemd", "--root", str(root), env=env).returncode == 0
    unit = tmp_path / "home/.config/systemd/user/lorad.service"
    assert unit.exists()
    # the service's root is remembered: later commands need no --root (LORAD_ROOT still wins)
    (root / "outbox" / "j1").mkdir(parents=True)
    (root / "outbox" / "j1" / "status.json").write_text('{"job_id": "j1", "state": "queued"}')
    assert "j1" in lorad("status", env={k: v for k, v in env.items() if k != "LORAD_ROOT"}).stdout
    assert lorad("uninstall-agent", "--systemd", env=env).returncode == 0
    assert not unit.exists()
    assert (bindir / "systemctl.calls").read_text().splitlines() == [
        "--user daemon-reload", "--user enable --now lorad.service",
        "--user disable --now lorad.service", "--user daemon-reload"]

    dry = lorad("install-agent", "--launchd", "--dry-run", "--root", str(root / "x"), env=env)
    assert plistlib.loads(dry.stdout.encode())["Label"] == "dev.lorad.daemon"  # stdout is the file alone
    assert "launchctl bootstrap" in dry.stderr and "launchctl" not in dry.stdout
    assert not (root / "x").exists()
    dry = lorad("install-agent", "--systemd", "--dry-run", "--root", str(root / "x"), env=env)
    assert "[Unit]" in dry.stdout.splitlines() and "systemctl --user enable --now lorad.service" in dry.stderr
    if shutil.which("systemd-analyze"):
        (root / "x").mkdir(parents=True)
        unit = tmp_path / "lorad.service"
        unit.write_text(dry.stdout)  # `--dry-run > lorad.service` verifies as it is
        verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
        assert verify.returncode == 0, verify.stderr


def test_caffeinate_is_held_while_a_job_runs_and_released_after(tmp_path, start_daemon, rows_file, lorad_env):
    bindir = tmp_path / "bin"
    stand_in(bindir, "caffeinate", "trap 'exit 0' TERM\nwhile true; do sleep 0.1; done\n")
    root = tmp_path / "root"
    d = start_daemon(env={**lorad_env, "PATH": f"{bindir}:{lorad_env['PATH']}"},
                     LORAD_STAGE_HOOKS="prepare=stagehooks:slow_train", HOOK_STEPS="30")
    wait_for(lambda: (root / "inbox").is_dir())
    from test_daemon import drop

    drop(root / "inbox", "a.yaml", spec_text("a", rows_file))
    calls = bindir / "caffeinate.calls"  # the shell creates it for `>>` before echo writes the line: wait for the line
    wait_for(lambda: calls.exists() and calls.read_text().endswith("\n"), what="caffeinate started")
    assert (bindir / "caffeinate.calls").read_text().split() == ["-i", "-w", str(d.proc.pid)]
    running = lambda: subprocess.run(["pgrep", "-f", str(bindir / "caffeinate")], capture_output=True).returncode == 0
    assert running()
    wait_for(lambda: any(s["state"] == "succeeded" for s in statuses(root / "outbox").values()), timeout=30)
    wait_for(lambda: not running(), timeout=10, what="caffeinate released")
    assert "caffeinate_released" in d.log


def test_an_eperm_inbox_logs_one_clear_event(tmp_path, monkeypatch, capsys):
    from lorad.daemon import Daemon

    daemon = Daemon(layout.resolve(tmp_path / "root"))
    daemon.layout.make_dirs()
    real_scandir = os.scandir

    def denied(path):
        if Path(path) == daemon.layout.inbox:
            raise PermissionError(errno.EPERM, "Operation not permitted", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", denied)
    assert daemon._check_inbox_access() is False
    assert daemon._check_inbox_access() is False  # backs off: no second event
    err = capsys.readouterr().err.splitlines()
    events = [line for line in err if "inbox_permission_denied" in line]
    assert len(events) == 1
    assert os.path.realpath(sys.executable) in events[0] and "Full Disk Access" in events[0]
    monkeypatch.setattr(os, "scandir", real_scandir)
    assert daemon._check_inbox_access() is True


def test_sighup_does_not_stop_the_daemon(tmp_path, start_daemon, rows_file):
    from test_daemon import drop

    root = tmp_path / "root"
    d = start_daemon()
    wait_for(lambda: (root / "inbox").is_dir())
    d.signal(signal.SIGHUP)
    drop(root / "inbox", "a.yaml", spec_text("a", rows_file))
    wait_for(lambda: any(s["state"] == "succeeded" for s in statuses(root / "outbox").values()))
    assert d.proc.poll() is None


def test_systemd_hears_ready_status_watchdog_pings_and_stopping(tmp_path, start_daemon, rows_file):
    """Type=notify: sd_notify(3) datagrams arrive on $NOTIFY_SOCKET the way systemd receives them."""
    import json
    import socket
    import time

    from test_daemon import drop

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(tmp_path / "notify.sock"))
    listener.settimeout(0.2)
    heard: list[tuple[float, str]] = []

    def hear_until(predicate, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                heard.append((time.monotonic(), listener.recv(4096).decode()))
            except TimeoutError:
                continue
            if predicate(heard[-1][1]):
                return heard[-1][1]
        raise AssertionError(f"not heard within {timeout}s; heard {[m for _, m in heard]}")

    root = tmp_path / "root"
    d = start_daemon(NOTIFY_SOCKET=str(tmp_path / "notify.sock"), WATCHDOG_USEC="1000000",
                     LORAD_STAGE_HOOKS="prepare=stagehooks:slow_train", HOOK_STEPS="100")
    ready = hear_until(lambda m: "READY=1" in m)
    assert f"STATUS=watching {root / 'inbox'}" in ready.splitlines()
    drop(root / "inbox", "a.yaml", spec_text("a", rows_file))
    hear_until(lambda m: m.startswith("STATUS=running ") and m.endswith(": prepare (0 queued)"))
    stage_pid = json.loads((root / "state" / "running.json").read_text())["pid"]
    stage_env = Path(f"/proc/{stage_pid}/environ").read_bytes().split(b"\0")
    assert not [v for v in stage_env if v.startswith((b"NOTIFY_SOCKET=", b"WATCHDOG_"))]  # only the daemon talks
    pings_from = time.monotonic()
    hear_until(lambda m: time.monotonic() - pings_from >= 3.0)
    pings = [t for t, m in heard if m == "WATCHDOG=1" and t >= pings_from]
    # every 0.5 s (half of WATCHDOG_USEC) while a stage runs; systemd would restart us after a 1 s gap
    assert len(pings) >= 4 and max(b - a for a, b in zip(pings, pings[1:])) < 1.0, pings
    d.signal(signal.SIGTERM)
    stopping = hear_until(lambda m: "STOPPING=1" in m)
    assert "STATUS=stopping: prepare is checkpointing" in stopping.splitlines()
    assert d.wait() == 0
    listener.close()
