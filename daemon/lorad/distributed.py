"""Data-parallel LoRA across machines with MLX's own engine: `mlx.launch` + `mx.distributed`.

lorad does not build its own: it writes a hostfile into the job folder, runs the
lora stage once per host under `mlx.launch` (ring or MPI), and mlx-lm's trainer
averages gradients across ranks. Rank 0 runs on this machine and writes
checkpoints, progress and events; every other rank logs to
logs/lora.rank<N>.jsonl, which is copied back when training ends.

Every host needs lorad at the same path (the same venv) and the job's data and
base model at the same paths; lorad copies those with rsync before launching.

A host can vanish mid-step. mx.distributed's all_sum then waits forever, so each
rank runs a `StallWatchdog` that exits when no batch has been fetched for
`step_timeout` seconds, and SSH gets keep-alives; the lora stage then names the
host and asks the daemon to retry (resuming from rank 0's checkpoint) on the
hosts that answer, if there are at least `min_hosts` of them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

LOCAL_NAMES = {"localhost", "127.0.0.1", "::1"}
STALLED_EXIT = 76  # a rank's exit status when its watchdog ended it (no step for step_timeout seconds)
SSH_OPTIONS = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=5",
               "-o", "ServerAliveCountMax=3"]  # a dead link ends the session in ~15 s, not at TCP's timeout
# (ssh keeps the first value it is given for an option: a caller's own -o goes before these)
FORWARDED_ENV = re.compile(r"^(LORAD_|HF_|OPENBLAS_|OMP_|LD_LIBRARY_PATH$|PYTHONPATH$)")
NOT_FORWARDED = {"LORAD_RUN_DIR"}  # the daemon's private run folder: rank 0 inherits it, other hosts lack it
RANK_ENDED = re.compile(r"Node with rank (\d+) (?:exited with code (-?\d+)|was killed)")


class HostError(Exception):
    pass


class HostUnreachable(HostError):
    """The host does not answer over SSH now; it may later."""


def address_of(host: str) -> str:
    """The name or address in an SSH destination (`user@host` → `host`)."""
    return host.rpartition("@")[2]


def _lookup(name: str) -> str | None:
    """The IPv4 address name resolves to, or None (odd names included: they never reach ssh)."""
    if not name or name.startswith("-"):
        return None
    try:
        return socket.gethostbyname(name)
    except (OSError, UnicodeError, ValueError):
        return None


def is_local(host: str) -> bool:
    """This machine: its names, or an address bound to one of its interfaces.

    Loopback addresses other than 127.0.0.1 are not counted, though Linux answers on all of 127/8:
    they are how an SSH tunnel or a test names another host."""
    name = address_of(host)
    if name in LOCAL_NAMES or name == socket.gethostname():
        return True
    addr = _lookup(name)
    if addr is None:
        return False
    if addr.startswith("127.") or addr == "0.0.0.0":
        return False
    with socket.socket() as s:
        try:
            s.bind((addr, 0))
        except OSError:
            return False
    return True


def check_batch(batch_size: int, hosts: list[str]) -> str | None:
    if batch_size % len(hosts):
        return (f"train.batch_size {batch_size} is not divisible by the number of hosts ({len(hosts)}): "
                "each rank trains on batch_size / hosts rows per step")
    return None


def check_host(host: str, python: str = sys.executable, timeout: int = 8) -> str:
    """lorad's version on host over SSH. HostUnreachable when it does not answer, HostError when it
    answers without lorad."""
    if host.startswith("-"):
        raise HostError(f"host {host!r} is not a host name")
    if is_local(host):
        from lorad import __version__

        return __version__
    cmd = ["ssh", "-o", f"ConnectTimeout={timeout}", *SSH_OPTIONS, "--", host,
           f"{python} -c 'import lorad; print(lorad.__version__)'"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 5)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise HostUnreachable(f"host {host!r} does not answer over SSH ({e})") from None
    if out.returncode == 255:
        raise HostUnreachable(f"host {host!r} does not answer over SSH: {out.stderr.strip() or 'connection failed'}; "
                              "set up key-based SSH (ssh-copy-id) and check the name or address")
    if out.returncode != 0:
        raise HostError(f"host {host!r} answers, but lorad is not installed at {python} there: "
                        f"{out.stderr.strip()[-300:]}")
    return out.stdout.strip()


def check_hosts(hosts: list[str], min_hosts: int | None = None) -> None:
    """At least min_hosts (default: all) hosts answer, and every one that answers runs this lorad."""
    answering, lost = probe_hosts(hosts)
    if len(answering) < (len(hosts) if min_hosts is None else min_hosts):
        raise HostUnreachable(next(iter(lost.values())))


def probe_hosts(hosts: list[str], timeout: int = 8) -> tuple[list[str], dict[str, str]]:
    """(the hosts that answer now, in order; {host: why not} for those that do not).

    A host that answers with another lorad version, or none, is an error the user must fix:
    HostError, not a lost host."""
    from lorad import __version__

    answering, lost = [], {}
    for host in dict.fromkeys(hosts):
        try:
            version = check_host(host, timeout=timeout)
        except HostUnreachable as e:
            lost[host] = str(e)
            continue
        if version != __version__:
            raise HostError(f"host {host!r} runs lorad {version}, this machine {__version__}: install the same version")
        answering.append(host)
    return [h for h in hosts if h in answering], lost


def choose_hosts(hosts: list[str], answering: list[str], batch_size: int, min_hosts: int) -> list[str]:
    """The hosts this attempt trains on: this machine first (rank 0 writes the outputs), then the
    answering others, as many as divide the batch. HostUnreachable when fewer than min_hosts remain."""
    local = {h: is_local(h) for h in answering}
    ordered = sorted((h for h in hosts if h in answering), key=lambda h: not local[h])
    if ordered and not local[ordered[0]]:
        raise HostError(f"none of the hosts {hosts} is this machine: rank 0 runs here and writes the job's outputs; "
                        "add this machine's name or address to train.distributed.hosts")
    count = len(ordered)
    while count >= min_hosts and count and batch_size % count:
        count -= 1
    if count < max(min_hosts, 1):
        missing = [h for h in hosts if h not in answering]
        raise HostUnreachable(f"only {len(ordered)} of {len(hosts)} training hosts answer (not {', '.join(missing)}); "
                              f"train.distributed.min_hosts is {min_hosts}")
    return ordered[:count]


def _route_source(remote_ip: str) -> str:
    """This machine's address on the route to remote_ip (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((remote_ip, 9))
        return str(s.getsockname()[0])


def _resolve(host: str) -> str:
    addr = _lookup(address_of(host))
    if addr is None:
        raise HostError(f"cannot resolve host {address_of(host)!r} to an address for the ring")
    return addr


def hostfile(hosts: list[str], backend: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """mlx.launch's JSON hostfile, ranks in the order given (this machine first).

    All-local jobs run on 127.0.0.1 (mlx.launch starts those without SSH). Otherwise each rank
    gets the address the others reach it on: a remote host's resolved address; for this machine,
    its listed address, or the one on the route to the first remote host."""
    local = [is_local(h) for h in hosts]  # each a name lookup and a bind: once per host
    if all(local):
        entries = [{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]} for _ in hosts]
    else:
        remote_ips = [_resolve(h) for h, here in zip(hosts, local) if not here]
        entries = []
        for host, here in zip(hosts, local):
            if here:
                listed = _resolve(host)
                ip = listed if not listed.startswith("127.") else _route_source(remote_ips[0])
                entries.append({"ssh": "127.0.0.1", "ips": [ip]})
            else:
                entries.append({"ssh": host, "ips": [_resolve(host)]})
    envs = [f"{k}={v}" for k, v in sorted((env or {}).items())]
    return {"backend": backend, "envs": envs, "hosts": entries}


def forwarded_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The parts of this process's environment every rank needs (policy, stage hooks, hub, BLAS)."""
    environ = dict(os.environ) if environ is None else environ
    return {k: v for k, v in environ.items() if FORWARDED_ENV.match(k) and k not in NOT_FORWARDED}


def _rsync(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["rsync", "-e", " ".join(["ssh", *SSH_OPTIONS]), *args], capture_output=True, text=True)


def copy_to_hosts(hosts: list[str], paths: list[Path]) -> None:
    """Put the prepared data and the base model at the same paths on every remote host.

    rsync sends only what is missing or changed, keeps a partial file for the next try, and
    checks each file it sends; a second, checksum-only pass then proves that what is there
    matches this machine's copy, including files it did not send."""
    for host in dict.fromkeys(h for h in hosts if not is_local(h)):
        if host.startswith("-"):
            raise HostError(f"host {host!r} is not a host name")
        for path in paths:
            if not path.exists():
                continue
            src, dst = (f"{path}/", f"{host}:{path}/") if path.is_dir() else (str(path), f"{host}:{path}")
            out = _rsync(["-a", "--partial", "--mkpath", "--", src, dst])
            if out.returncode != 0:
                raise HostError(f"copying {path} to {host} failed: {out.stderr.strip()[-300:]}")
            check = _rsync(["-a", "--checksum", "--dry-run", "--itemize-changes", "--", src, dst])
            differs = [line for line in check.stdout.splitlines() if line[:2] in (">f", "<f")]
            if check.returncode != 0 or differs:
                raise HostError(f"the copy of {path} on {host} does not match this machine's: "
                                f"{(check.stderr.strip() or ', '.join(differs))[-300:]}")


def fetch_rank_logs(hosts: list[str], job_dir: Path, stage: str = "lora") -> None:
    """Copy each remote rank's log back into the job's logs/ (best effort: a lost host keeps its log)."""
    for rank, host in enumerate(hosts):
        if rank and not is_local(host):
            log = job_dir / "logs" / f"{stage}.rank{rank}.jsonl"
            _rsync(["-a", "--", f"{host}:{log}", str(log)])


def ranks_ended(launch_log: str) -> dict[int, str]:
    """{rank: 'exited with code N' | 'was killed'} from mlx.launch's warnings (its own exit status is 0 either way)."""
    out = {}
    for m in RANK_ENDED.finditer(launch_log):
        out[int(m.group(1))] = f"exited with code {m.group(2)}" if m.group(2) is not None else "was killed"
    return out


def free_port_base(count: int) -> int:
    """A port p such that p .. p+count-1 were free a moment ago (the ring listens on them)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + count < 65000 and all(_free(base + i) for i in range(count)):
            return base
    raise HostError("no free ports for the ring backend")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def ssh_wrapper(bin_dir: Path) -> Path:
    """An `ssh` for mlx.launch to find first on PATH: the user's ssh with lorad's keep-alives and
    no password prompts (mlx.launch runs plain `ssh`, which waits out a dead link for hours)."""
    real = shutil.which("ssh", path=os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                                                    if Path(p) != bin_dir))
    if real is None:
        raise HostError("ssh is not installed: training on other hosts needs an SSH client")
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "ssh"
    tmp = bin_dir / ".ssh.tmp"
    tmp.write_text(f"#!/bin/sh\nexec {real} {' '.join(SSH_OPTIONS)} \"$@\"\n")
    tmp.chmod(stat.S_IRWXU)
    os.replace(tmp, script)
    return bin_dir


def launch_command(job_dir: Path, cache_dir: Path, hostfile_path: Path, backend: str, world: int) -> list[str]:
    launcher = Path(sys.executable).parent / "mlx.launch"
    exe = str(launcher) if launcher.exists() else shutil.which("mlx.launch")
    if exe is None:
        raise HostError("mlx.launch is not installed (it comes with mlx)")
    return [exe, "--hostfile", str(hostfile_path), "--backend", backend, "--python", sys.executable,
            "--starting-port", str(free_port_base(world)), "--cwd", str(job_dir),
            "-m", "lorad.stagerun", str(job_dir), "lora", "--cache", str(cache_dir)]


def write_hostfile(job_dir: Path, hosts: list[str], backend: str,
                   env: dict[str, str] | None = None) -> tuple[Path, list[dict[str, Any]]]:
    """(the hostfile's path, its ranks)."""
    path = job_dir / "hostfile.json"
    content = hostfile(hosts, backend, env)
    path.write_text(json.dumps(content, indent=2))
    return path, content["hosts"]


def ring_address(rank: int) -> str | None:
    """The ring address this rank listens on, from the hostfile mlx.launch hands it (MLX_HOSTFILE)."""
    try:
        with open(os.environ["MLX_HOSTFILE"]) as f:
            return ",".join(json.load(f)[rank])
    except (KeyError, OSError, ValueError, IndexError, TypeError):
        return None


class StallWatchdog:
    """Ends this rank when no batch was fetched for `timeout` seconds.

    A rank whose peer vanished waits in all_sum forever (mx.distributed has no timeout); exiting
    lets mlx.launch end the others and the lora stage name the lost host. Rank 0's checkpoints stay."""

    def __init__(self, timeout: float, log: Any, exit: Callable[[int], None] = os._exit):
        self.timeout, self.log, self._exit = timeout, log, exit
        self.last = time.monotonic()
        self._thread = threading.Thread(target=self._watch, name="lorad-stall-watchdog", daemon=True)

    def start(self) -> StallWatchdog:
        self._thread.start()
        return self

    def beat(self) -> None:
        self.last = time.monotonic()

    def wrap(self, iterate: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
        """An iterate_batches that beats at every batch (training and validation)."""
        def beating(*args: Any, **kwargs: Any) -> Iterator[Any]:
            for batch in iterate(*args, **kwargs):
                self.beat()
                yield batch
                self.beat()
        return beating

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, self.timeout / 4))
            idle = time.monotonic() - self.last
            if idle > self.timeout:
                self.log.error("distributed_stalled", seconds=round(idle, 1), step_timeout=self.timeout,
                               message=f"no training step for {idle:.0f} s: another host stopped answering "
                                       "(all_sum waits for it forever); this rank exits")
                self._exit(STALLED_EXIT)
                return
