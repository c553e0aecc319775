"""Installing lorad as a background service: a launchd user agent (macOS) or a systemd user unit (Linux).

The unit files are templates shipped in lorad/resources (linked from launchd/); this module fills them with absolute
paths, writes them, and drives launchctl/systemctl (launchctl 2.0 verbs:
bootstrap, bootout, kickstart). --dry-run prints the file and the commands.
"""

from __future__ import annotations

import os
import plistlib
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

from lorad import resources
from lorad.layout import Layout, installed_root_file

LABEL = "dev.lorad.daemon"
UNIT = "lorad.service"


@dataclass
class Plan:
    path: Path
    content: str
    commands: list[list[str]]
    notes: list[str]


def _fill(template: str, values: dict[str, str], xml: bool) -> str:
    for key, value in values.items():
        template = template.replace("{{" + key + "}}", escape(value) if xml and key != "extra_args" else value)
    return template


def _values(layout: Layout) -> dict[str, str]:
    return {"python": sys.executable, "root": str(layout.root), "state": str(layout.state), "inbox": str(layout.inbox)}


def _extra_args(layout: Layout) -> list[str]:
    """--inbox/--outbox when they are not the root's own folders (e.g. an inbox in Dropbox)."""
    extra = []
    if layout.inbox != layout.root / "inbox":
        extra += ["--inbox", str(layout.inbox)]
    if layout.outbox != layout.root / "outbox":
        extra += ["--outbox", str(layout.outbox)]
    return extra


def _systemd_quote(arg: str) -> str:
    """ExecStart splits on spaces; systemd.service(5) takes C-style double-quoted words."""
    if not any(c.isspace() or c in '"\\' for c in arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def launchd_plan(layout: Layout, home: Path, uid: int) -> Plan:
    values = _values(layout)
    extra_xml = "".join(f"\n    <string>{escape(a)}</string>" for a in _extra_args(layout))
    logs = home / "Library" / "Logs" / "lorad"
    template = resources.read_text(resources.LAUNCHD_PLIST)
    content = _fill(template, {**values, "label": LABEL, "logs": str(logs), "extra_args": extra_xml}, xml=True)
    plistlib.loads(content.encode())  # a template edit that breaks the plist fails here, not in launchd
    path = unit_path("launchd", home)
    domain = f"gui/{uid}"
    return Plan(path, content, [
        ["launchctl", "bootout", f"{domain}/{LABEL}"],
        ["launchctl", "bootstrap", domain, str(path)],
    ], [f"logs: {logs}/lorad.err.log (daemon) and {layout.outbox}/<job>/events.jsonl (jobs)",
        f"restart: launchctl kickstart -k {domain}/{LABEL}",
        "if macOS blocks the inbox (Desktop, Documents, iCloud Drive), grant Full Disk Access to "
        f"{os.path.realpath(sys.executable)} in System Settings → Privacy & Security"])


def _allowed_addresses(layout: Layout) -> str:
    """Loopback, plus the addresses of the Ollama servers and training hosts the root's policy lists."""
    import socket
    from urllib.parse import urlsplit

    from lorad import policy as policy_mod

    addresses = ["localhost"]
    try:
        trust = policy_mod.load(layout.root, layout.inbox)
    except policy_mod.PolicyError:
        return " ".join(addresses)
    names = [urlsplit(h).hostname or "" for h in (trust.ollama_host, *trust.ollama_hosts)]
    names += [h.rsplit("@", 1)[-1] for h in trust.train_hosts]
    for name in dict.fromkeys(n for n in names if n and n not in policy_mod.LOCAL_HOSTS):
        try:
            addresses += sorted({str(info[4][0]) for info in socket.getaddrinfo(name, None)})
        except OSError:
            pass  # not resolvable now: blocked until `lorad install-agent` is run again
    return " ".join(dict.fromkeys(addresses))


def systemd_plan(layout: Layout, home: Path) -> Plan:
    template = resources.read_text(resources.SYSTEMD_UNIT)
    values = {k: _systemd_quote(v) if k in ("python", "root") else v for k, v in _values(layout).items()}
    extra = "".join(f" {_systemd_quote(a)}" for a in _extra_args(layout))
    writable = [layout.root, layout.inbox, layout.outbox, home / ".cache"]
    values["writable"] = " ".join(dict.fromkeys(_systemd_quote(f"-{p}") for p in writable))  # '-': may not exist yet
    values["ip_allow"] = _allowed_addresses(layout)
    content = _fill(template, {**values, "extra_args": extra}, xml=False)
    path = unit_path("systemd", home)
    user = os.environ.get("USER") or "$USER"
    return Plan(path, content, [
        ["systemctl", "--user", "daemon-reload"],
        ["systemctl", "--user", "enable", "--now", UNIT],
    ], [f"to keep lorad running when you are logged out: loginctl enable-linger {user}",
        f"logs: journalctl --user -u {UNIT} -f (daemon) and {layout.outbox}/<job>/events.jsonl (jobs)",
        f"restart: systemctl --user restart {UNIT}"])


def _run(cmd: list[str], allow_fail: bool = False) -> int:
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0 and not allow_fail:
        raise SystemExit(f"lorad: `{' '.join(cmd)}` failed ({out.returncode}): {(out.stderr or out.stdout).strip()}")
    return out.returncode


def unit_path(kind: str, home: Path) -> Path:
    if kind == "launchd":
        return home / "Library" / "LaunchAgents" / f"{LABEL}.plist"
    return home / ".config" / "systemd" / "user" / UNIT


def is_active(kind: str) -> bool | None:
    """Whether the installed service runs now; None when the service manager cannot be asked."""
    cmd = (["launchctl", "print", f"gui/{os.getuid()}/{LABEL}"] if kind == "launchd"
           else ["systemctl", "--user", "is-active", "--quiet", UNIT])
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if kind == "launchd":
        return out.returncode == 0 and "state = running" in out.stdout
    if out.returncode == 0:
        return True
    return False if out.returncode in (3, 4) else None  # 3 inactive, 4 no such unit; else no user bus


def default_kind() -> str:
    return "launchd" if sys.platform == "darwin" else "systemd"


def install(layout: Layout, kind: str, dry_run: bool, echo=print) -> int:
    home = Path.home()
    plan = launchd_plan(layout, home, os.getuid()) if kind == "launchd" else systemd_plan(layout, home)
    if dry_run:  # the file alone on stdout (`--dry-run > file` lints clean), the steps on stderr
        sys.stdout.write(plan.content)
        sys.stdout.flush()
        steps = [f"# write the above to {plan.path}, then:", *(" ".join(cmd) for cmd in plan.commands),
                 *(f"# {note}" for note in plan.notes)]
        print("\n".join(steps), file=sys.stderr)
        return 0
    layout.make_dirs()
    if kind == "launchd":
        (home / "Library" / "Logs" / "lorad").mkdir(parents=True, exist_ok=True)
    plan.path.parent.mkdir(parents=True, exist_ok=True)
    plan.path.write_text(plan.content)
    plan.path.chmod(0o644)
    root_file = installed_root_file()
    root_file.parent.mkdir(parents=True, exist_ok=True)
    root_file.write_text(f"{layout.root}\n")
    if kind == "launchd":
        _run(plan.commands[0], allow_fail=True)  # not loaded yet is fine
        if _run(plan.commands[1], allow_fail=True) != 0:  # bootstrap right after bootout can fail with EIO once
            time.sleep(1)
            _run(plan.commands[1])
    else:
        for cmd in plan.commands:
            _run(cmd)
    echo(f"installed {plan.path}")
    for note in plan.notes:
        echo(note)
    return 0


def uninstall(kind: str, dry_run: bool, echo=print) -> int:
    home = Path.home()
    path = unit_path(kind, home)
    if kind == "launchd":
        commands = [["launchctl", "bootout", f"gui/{os.getuid()}/{LABEL}"]]
    else:
        commands = [["systemctl", "--user", "disable", "--now", UNIT], ["systemctl", "--user", "daemon-reload"]]
    if dry_run:
        for cmd in commands[:1]:
            echo(" ".join(cmd))
        echo(f"rm {path}")
        for cmd in commands[1:]:
            echo(" ".join(cmd))
        return 0
    _run(commands[0], allow_fail=True)
    path.unlink(missing_ok=True)
    installed_root_file().unlink(missing_ok=True)
    for cmd in commands[1:]:
        _run(cmd, allow_fail=True)
    echo(f"removed {path}")
    return 0


def restart(kind: str, echo=print) -> int:
    cmd = (["launchctl", "kickstart", "-k", f"gui/{os.getuid()}/{LABEL}"] if kind == "launchd"
           else ["systemctl", "--user", "restart", UNIT])
    _run(cmd)
    echo("restarted")
    return 0
