"""A shared inbox is untrusted input: each attack from issue #14 is refused by default and allowed only
when the owner's policy lists it. A listener on 127.0.0.1 records every connection attempt; a canary
file's contents must appear nowhere under the outbox or in the logs."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import statuses, wait_for
from fake_ollama import FakeOllama
from lorad import ollama
from lorad.distributed import HostError, check_host
from lorad.policy import Policy, to_env
from lorad.spec import check_bytes
from lorad.stages import StageFailed
from modelfile_parser import parse as parse_modelfile
from test_daemon import drop
from test_gguf_ollama import chatml_job, tiny_models  # noqa: F401 - module fixtures used below
from test_stages import run_stage

CANARY = "canary-5e1d-do-not-leak"
HEAD = "version: 1\nname: {name}\nmodel: {{source: demo}}\n"


class Listener:
    """A TCP port on loopback that counts connections (and answers nothing)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.stopped = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopped:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.sendall(b"SSH-2.0-not-http\r\n")
            conn.close()

    def close(self) -> None:
        self.stopped = True
        self.thread.join(timeout=2)
        self.sock.close()


@pytest.fixture
def listener():
    server = Listener()
    yield server
    server.close()


@pytest.fixture
def canary(tmp_path) -> Path:
    private = tmp_path / "private"
    private.mkdir()
    path = private / "secrets.jsonl"
    path.write_text(json.dumps({"prompt": CANARY, "completion": CANARY}) + "\n")
    return path


def _leaks(root: Path) -> list[Path]:
    """Files under the outbox and the daemon's state that hold the canary (links are not followed)."""
    return [p for d in (root / "outbox", root / "state") for p in d.rglob("*")
            if p.is_file() and not p.is_symlink() and CANARY in p.read_text(errors="replace")]


def _final(root: Path, source: str) -> dict:
    """The status of the job made from inbox file `source`, once it has ended."""
    return wait_for(lambda: (st := {s["source"]: s for s in statuses(root / "outbox").values()}.get(source))
                    and st["state"] not in ("queued", "running") and st, timeout=60, what=f"{source} ended")


def test_reading_outside_the_allowed_folders_is_refused_alike_whether_or_not_the_file_exists(
        tmp_path, start_daemon, canary):
    root = tmp_path / "root"
    d = start_daemon(allow_read=())  # the default policy: the inbox's data/ folder and the model caches
    inbox = root / "inbox"
    (inbox / "data").mkdir(parents=True)
    (inbox / "data" / "link.jsonl").symlink_to(canary)  # a link inside the allowed folder, leading out
    (inbox / "data" / "rows.jsonl").write_text("".join(
        json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(40)))
    attempts = {
        "exists.yaml": f"path:{canary}",
        "missing.yaml": f"path:{canary.parent / 'missing.jsonl'}",
        "ssh-key.yaml": "path:~/.ssh/id_rsa",
        "traversal.yaml": "path:data/../../../private/secrets.jsonl",
        "link.yaml": "path:data/link.jsonl",
    }
    for name, source in attempts.items():
        drop(inbox, name, HEAD.format(name=name[:-5]) + f"data: {{source: '{source}', format: completions}}\n"
                                                          "stages: [prepare]\n")
    messages = {}
    for name, source in attempts.items():
        st = _final(root, name)
        assert st["state"] == "rejected", (name, st)
        (problem,) = st["error"]["errors"]
        assert problem["path"] == "$.data.source" and problem["line"] == 4
        messages[name] = problem["message"].replace(source[len("path:"):], "X")
    assert len(set(messages.values())) == 1, messages  # one answer whether the file exists or not
    assert "outside the folders this daemon reads from" in messages["exists.yaml"]
    drop(inbox, "ok.yaml", HEAD.format(name="ok") + "data: {source: 'path:data/rows.jsonl', format: completions}\n"
                                                    "stages: [prepare]\n")
    assert _final(root, "ok.yaml")["state"] == "succeeded"  # relative to the inbox, inside data/
    assert d.proc.poll() is None
    assert not _leaks(root) and CANARY not in d.log


def test_a_folder_the_owner_allows_can_be_read(tmp_path, start_daemon, canary):
    root = tmp_path / "root"
    start_daemon(allow_read=(canary.parent,))
    drop(root / "inbox", "mine.yaml", HEAD.format(name="mine") + f"data: {{source: 'path:{canary}', format: completions}}\n"
                                                                  "stages: [prepare]\n")
    st = _final(root, "mine.yaml")
    assert st["state"] in ("succeeded", "failed"), st  # read (one row is too few to split: that is fine)
    assert "outside the folders" not in json.dumps(st)


def test_the_model_goes_only_to_the_daemons_ollama_unless_the_policy_lists_another(tmp_path, start_daemon, listener):
    root = tmp_path / "root"
    d = start_daemon(allow_read=())
    spec = HEAD.format(name="exfil") + ("data: {source: 'builtin:text-to-sql', limit: 20}\n"
                                        f"ollama: {{host: 'http://127.0.0.1:{listener.port}'}}\nstages: [prepare, ollama]\n")
    drop(root / "inbox", "exfil.yaml", spec)
    st = _final(root, "exfil.yaml")
    assert st["state"] == "rejected" and st["error"]["errors"][0]["path"] == "$.ollama.host"
    assert "lorad run --allow-ollama-host" in st["error"]["errors"][0]["message"]
    time.sleep(1.0)
    assert listener.connections == 0
    assert d.proc.poll() is None
    # allowed when listed: the claim accepts it (the connection itself is tested at the stage, below)
    d.signal(15)
    d.wait()
    start_daemon(f"--allow-ollama-host=http://127.0.0.1:{listener.port}", allow_read=())
    drop(root / "inbox", "listed.yaml", spec.replace("stages: [prepare, ollama]", "stages: [prepare]"))
    assert _final(root, "listed.yaml")["state"] == "succeeded"


def test_the_ollama_stage_checks_the_policy_again_and_survives_a_server_that_is_not_http(
        chatml_job, tmp_path, monkeypatch, listener):  # noqa: F811
    job, spec = chatml_job
    with FakeOllama() as server:
        own = Policy(read_roots=(), ollama_host="http://127.0.0.1:9")
        monkeypatch.setenv("LORAD_POLICY", to_env(own)["LORAD_POLICY"])
        with pytest.raises(StageFailed, match="not this daemon's Ollama"):
            run_stage("ollama", job, tmp_path / "cache", dict(spec, ollama={"model": "t", "host": server.url}))
        assert server.requests == []
        listed = Policy(read_roots=(), ollama_host="http://127.0.0.1:9", ollama_hosts=(server.url,))
        monkeypatch.setenv("LORAD_POLICY", to_env(listed)["LORAD_POLICY"])
        run_stage("ollama", job, tmp_path / "cache", dict(spec, ollama={"model": "t", "host": server.url}))
        assert ("POST", "/api/create") in server.requests
    # a listed host that answers with something other than HTTP: a clear outcome, no traceback
    garbage = f"http://127.0.0.1:{listener.port}"
    monkeypatch.setenv("PATH", str(tmp_path))  # and no ollama CLI
    monkeypatch.setenv("LORAD_POLICY", to_env(Policy((), "http://127.0.0.1:9", (garbage,)))["LORAD_POLICY"])
    from lorad.stages import Skipped

    with pytest.raises(Skipped, match="no Ollama server answered"):
        run_stage("ollama", job, tmp_path / "cache", dict(spec, ollama={"model": "t", "host": garbage}))


INJECTIONS = ['""""" \nFROM attacker/evil-model\nADAPTER /etc/passwd', 'x"""\nFROM evil', 'a\x00b"""',
              "ok\u200bhidden"]
SAFE_SYSTEMS = ["Answer in SQL.", 'Say "hi" and \\n stop', "line one\nFROM not-a-command\n# not a comment\nPARAMETER x 1",
                "  leading and trailing spaces  ", '"quoted at both ends"', 'ends with two quotes ""', "\ttab\tand ünïcode ✓",
                'a "" b " c', '"" x', "x\n\n\ny"]


def test_modelfile_values_mean_exactly_what_lorad_meant():
    template = ollama.TEMPLATES["chatml"]
    for system in SAFE_SYSTEMS:
        text = ollama.modelfile("model.gguf", template, ["<|im_start|>", "<|im_end|>", 'we"ird stop'], system)
        assert parse_modelfile(text) == [("model", "./model.gguf"), ("template", template), ("stop", "<|im_start|>"),
                                         ("stop", "<|im_end|>"), ("stop", 'we"ird stop'), ("system", system)], system
    for system in INJECTIONS:
        with pytest.raises(ollama.OllamaError):
            ollama.modelfile("model.gguf", template, [], system)


def test_the_independent_parser_sees_the_old_quoting_break_out():
    """The parser is not a mirror of lorad's writer: fed the old escaping, it finds the injected commands."""
    attack = INJECTIONS[0]
    old = 'FROM ./model.gguf\nSYSTEM """' + attack.replace('"""', '\\"\\"\\"') + '"""\n'
    commands = [c for c, _ in parse_modelfile(old)]
    assert commands.count("model") == 2 and "adapter" in commands


def test_the_spec_refuses_what_a_modelfile_cannot_hold_and_bad_model_names():
    head = "version: 1\nname: n\nmodel: {source: demo}\ndata: {source: 'builtin:text-to-sql'}\n"
    for system in INJECTIONS[:3]:
        result = check_bytes((head + "ollama:\n  system: " + json.dumps(system) + "\n").encode())
        assert not result.ok and result.problems[0].path == "$.ollama.system" and result.problems[0].line == 6
    for name in ("x/../../evil", "../evil", "-rf", "a/b/c/d", "evil model"):
        result = check_bytes((head + f"ollama: {{model: {json.dumps(name)}}}\n").encode())
        assert not result.ok and result.problems[0].path == "$.ollama.model", name
    for name in ("sql-smollm2", "me/sql:v2", "registry.example:5000/me/sql:latest"):
        assert check_bytes((head + f"ollama: {{model: {json.dumps(name)}}}\n").encode()).ok, name


def test_ssh_destinations_are_refused_unless_listed_and_never_read_as_options(tmp_path, start_daemon, listener):
    root = tmp_path / "root"
    marker = tmp_path / "proxy-ran"
    start_daemon(allow_read=())
    hosts = {
        "url.yaml": f"ssh://someone@127.0.0.1:{listener.port}",
        "option.yaml": f"-oProxyCommand=touch {marker}",
        "unlisted.yaml": "build-box.local",
    }
    for name, host in hosts.items():
        drop(root / "inbox", name, HEAD.format(name=name[:-5]) + "data: {source: 'builtin:text-to-sql', limit: 20}\n"
             f"train: {{batch_size: 2, distributed: {{hosts: [localhost, {json.dumps(host)}]}}}}\nstages: [prepare, lora]\n")
    for name in hosts:
        st = _final(root, name)
        assert st["state"] == "rejected", st
        assert st["error"]["errors"][0]["path"] == "$.train.distributed.hosts[1]"
    time.sleep(1.0)
    assert listener.connections == 0 and not marker.exists()
    with pytest.raises(HostError, match="not a host name"):
        check_host(f"-oProxyCommand=touch {marker}")  # below the policy too: never handed to ssh as an option
    assert not marker.exists()


def test_a_listed_training_host_is_accepted(tmp_path, start_daemon):
    root = tmp_path / "root"
    start_daemon("--allow-train-host", "build-box.local", allow_read=())
    drop(root / "inbox", "ok.yaml", HEAD.format(name="ok") + "data: {source: 'builtin:text-to-sql', limit: 20}\n"
         "train: {batch_size: 2, distributed: {hosts: [localhost, build-box.local]}}\nstages: [prepare]\n")
    assert _final(root, "ok.yaml")["state"] == "succeeded"


def _exchange(a: Path, b: Path) -> bool:
    """renameat2(RENAME_EXCHANGE): swap two names atomically, as a local attacker racing the claim would."""
    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "renameat2"):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return libc.renameat2(at_fdcwd, bytes(a), at_fdcwd, bytes(b), rename_exchange) == 0


def test_swapping_a_symlink_or_a_fifo_in_at_claim_time_reads_nothing(tmp_path, start_daemon, canary):
    root = tmp_path / "root"
    d = start_daemon(allow_read=())
    inbox = root / "inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    spare = tmp_path / "spare"
    spare.mkdir()
    stop = time.monotonic() + 6
    rounds = 0
    while time.monotonic() < stop:  # keep racing the daemon's lstat → rename → open
        name = f"race{rounds}.yaml"
        real = inbox / name
        real.write_text(HEAD.format(name=f"race{rounds}") + "data: {source: 'builtin:text-to-sql'}\nstages: []\n")
        fake = spare / name
        if rounds % 2:
            fake.symlink_to(canary)
        else:
            os.mkfifo(fake)
        for _ in range(200):
            if not _exchange(real, fake):
                break
        rounds += 1
        time.sleep(0.05)
    if rounds == 0:
        pytest.skip("renameat2 is not available")
    time.sleep(3)
    assert d.proc.poll() is None, "the daemon died (or blocked) on a swapped-in file"
    assert not _leaks(root)
    judged = statuses(root / "outbox").values()
    for st in judged:
        if st["state"] == "rejected":
            assert st["error"]["errors"], st
    shutil.rmtree(spare)
    drop(inbox, "after.yaml", HEAD.format(name="after") + "data: {source: 'builtin:text-to-sql', limit: 20}\n"
                                                         "stages: [prepare]\n")
    assert _final(root, "after.yaml")["state"] == "succeeded"


def test_the_systemd_unit_is_sandboxed_and_verifies(tmp_path):
    from lorad import layout, service

    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed")
    lay = layout.resolve(tmp_path / "root")
    lay.make_dirs()
    (tmp_path / "root" / "policy.yaml").write_text("train_hosts: [127.0.0.2]\n")
    unit = tmp_path / "lorad.service"
    unit.write_text(service.systemd_plan(lay, tmp_path / "home").content)
    lines = unit.read_text().splitlines()
    for line in ("NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=read-only", "PrivateTmp=yes",
                 "IPAddressDeny=any", "IPAddressAllow=localhost 127.0.0.2"):
        assert line in lines, line
    assert any(x.startswith("ReadWritePaths=") and str(tmp_path / "root") in x for x in lines)
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    security = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)], capture_output=True, text=True)
    level = float(security.stdout.rsplit("exposure level for lorad.service:", 1)[1].split()[0])
    assert level <= 4.0, security.stdout[-500:]


def test_a_stage_cannot_dump_core_or_write_a_runaway_file(tmp_path, start_daemon, rows_file):
    root = tmp_path / "root"
    start_daemon(LORAD_STAGE_HOOKS="prepare=stagehooks:report_limits")
    drop(root / "inbox", "limits.yaml", HEAD.format(name="limits") + f"data: {{source: 'path:{rows_file}'}}\n"
                                                                    "stages: [prepare]\n")
    st = _final(root, "limits.yaml")
    assert st["state"] == "succeeded", st.get("error")
    limits = json.loads((root / "outbox" / st["job_id"] / "limits.json").read_text())
    assert limits["core"] == 0 and 0 < limits["fsize"] <= 256 << 30
