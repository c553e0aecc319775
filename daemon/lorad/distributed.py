"""Data-parallel LoRA across machines with MLX's own engine: `mlx.launch` + `mx.distributed`.

lorad does not build its own: it writes a hostfile into the job folder, runs the
lora stage once per host under `mlx.launch` (ring or MPI), and mlx-lm's trainer
averages gradients across ranks. Rank 0 writes checkpoints, progress and
events; every other rank logs to logs/lora.rank<N>.jsonl.

Every host needs lorad at the same path (the same venv) and the job's data and
base model at the same paths; lorad copies those with rsync before launching.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

LOCAL_NAMES = {"localhost", "127.0.0.1", "::1"}


class HostError(Exception):
    pass


def is_local(host: str) -> bool:
    return host in LOCAL_NAMES or host == socket.gethostname()


def check_batch(batch_size: int, hosts: list[str]) -> str | None:
    if batch_size % len(hosts):
        return (f"train.batch_size {batch_size} is not divisible by the number of hosts ({len(hosts)}): "
                "each rank trains on batch_size / hosts rows per step")
    return None


def check_host(host: str, python: str = sys.executable, timeout: int = 8) -> str:
    """lorad's version on host over SSH; HostError naming the host when it does not answer."""
    if is_local(host):
        from lorad import __version__

        return __version__
    if host.startswith("-"):
        raise HostError(f"host {host!r} is not a host name")
    cmd = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={timeout}", "--", host,
           f"{python} -c 'import lorad; print(lorad.__version__)'"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 5)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise HostError(f"host {host!r} does not answer over SSH ({e})") from None
    if out.returncode == 255:
        raise HostError(f"host {host!r} does not answer over SSH: {out.stderr.strip() or 'connection failed'}; "
                        "set up key-based SSH (ssh-copy-id) and check the name or address")
    if out.returncode != 0:
        raise HostError(f"host {host!r} answers, but lorad is not installed at {python} there: "
                        f"{out.stderr.strip()[-300:]}")
    return out.stdout.strip()


def check_hosts(hosts: list[str]) -> None:
    from lorad import __version__

    for host in dict.fromkeys(hosts):
        version = check_host(host)
        if version != __version__:
            raise HostError(f"host {host!r} runs lorad {version}, this machine {__version__}: install the same version")


def hostfile(hosts: list[str], backend: str) -> dict[str, Any]:
    """mlx.launch's JSON hostfile. All-local jobs run on 127.0.0.1 (mlx.launch starts those without SSH)."""
    all_local = all(is_local(h) for h in hosts)
    entries = []
    for host in hosts:
        if all_local:
            entries.append({"ssh": "127.0.0.1", "ips": ["127.0.0.1"]})
        else:
            name = socket.gethostname() if is_local(host) else host
            try:
                ip = socket.gethostbyname(name)
            except OSError:
                raise HostError(f"cannot resolve host {name!r} to an address for the ring") from None
            entries.append({"ssh": "127.0.0.1" if is_local(host) else host, "ips": [ip]})
    return {"backend": backend, "envs": [], "hosts": entries}


def copy_to_hosts(hosts: list[str], paths: list[Path]) -> None:
    """Put the prepared data and the base model at the same paths on every remote host."""
    for host in dict.fromkeys(h for h in hosts if not is_local(h)):
        for path in paths:
            if host.startswith("-"):
                raise HostError(f"host {host!r} is not a host name")
            cmd = ["rsync", "-a", "--mkpath", "--", f"{path}/" if path.is_dir() else str(path),
                   f"{host}:{path}{'/' if path.is_dir() else ''}"]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                raise HostError(f"copying {path} to {host} failed: {out.stderr.strip()[-300:]}")


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


def launch_command(job_dir: Path, cache_dir: Path, hostfile_path: Path, backend: str, world: int) -> list[str]:
    launcher = Path(sys.executable).parent / "mlx.launch"
    exe = str(launcher) if launcher.exists() else shutil.which("mlx.launch")
    if exe is None:
        raise HostError("mlx.launch is not installed (it comes with mlx)")
    return [exe, "--hostfile", str(hostfile_path), "--backend", backend, "--python", sys.executable,
            "--starting-port", str(free_port_base(world)), "--cwd", str(job_dir),
            "-m", "lorad.stagerun", str(job_dir), "lora", "--cache", str(cache_dir)]


def write_hostfile(job_dir: Path, hosts: list[str], backend: str) -> Path:
    path = job_dir / "hostfile.json"
    path.write_text(json.dumps(hostfile(hosts, backend), indent=2))
    return path
