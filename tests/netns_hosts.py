"""Two hosts on one Linux machine: network namespaces joined by a veth pair, an sshd in each.

Each namespace has its own address (10.77.N.1 and 10.77.N.2), its own sshd listening only there,
and key-based login with a key made here; the file system is shared, so lorad's venv is at the
same path on both, as the README asks of real hosts. A test runs the daemon inside the first
namespace (`prefix(0)`); the daemon reaches the second only over SSH and the veth, so the remote
path (SSH checks, rsync, mlx.launch's ssh, the ring between two addresses) is the real one.
Nothing leaves the machine. `ip netns` needs root; `unavailable()` says why it cannot run.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

SSHD = "/usr/sbin/sshd"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def unavailable() -> str | None:
    """Why two namespaced hosts cannot be made here, or None."""
    for tool in ("ip", "ssh", "ssh-keygen", "rsync"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (the multi-host tests need iproute2, openssh-client and rsync)"
    if not os.path.exists(SSHD):
        return f"{SSHD} is missing (apt-get install openssh-server)"
    probe = f"lzprobe{os.getpid() % 100000}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"ip netns does not work here (needs root and network namespaces): {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


class TwoHosts:
    def __init__(self, workdir: Path):
        n = os.getpid() % 200 + 20
        tag = f"{os.getpid() % 100000}"
        self.dir = workdir
        self.ns = [f"lz{tag}a", f"lz{tag}b"]
        self.links = [f"lz{tag}va", f"lz{tag}vb"]
        self.addrs = [f"10.77.{n}.1", f"10.77.{n}.2"]
        self.bin = workdir / "bin"

    # --- set up and tear down ------------------------------------------------
    def up(self) -> TwoHosts:
        for ns in self.ns:
            _ip("netns", "add", ns)
        _ip("link", "add", self.links[0], "type", "veth", "peer", "name", self.links[1])
        for ns, link, addr in zip(self.ns, self.links, self.addrs):
            _ip("link", "set", link, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", link)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", link, "up")
        for name in ("key", "hostkey"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.dir / name)], check=True)
        shutil.copy(self.dir / "key.pub", self.dir / "authorized_keys")
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege-separation directory
        for i in range(2):
            self.start_sshd(i)
        (self.dir / "ssh_config").write_text(
            f"Host *\n  IdentityFile {self.dir / 'key'}\n  IdentitiesOnly yes\n  User root\n"
            f"  UserKnownHostsFile {self.dir / 'known_hosts'}\n  StrictHostKeyChecking accept-new\n  BatchMode yes\n")
        # ssh reads the config of the passwd user's home, not $HOME: a wrapper first on PATH points it at ours
        self.bin.mkdir(exist_ok=True)
        (self.bin / "ssh").write_text(f"#!/bin/sh\nexec {shutil.which('ssh')} -F {self.dir / 'ssh_config'} \"$@\"\n")
        (self.bin / "ssh").chmod(0o755)
        return self

    def down(self) -> None:
        for ns in self.ns:
            for pid in self.pids(ns):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            _ip("netns", "del", ns, check=False)  # takes its end of the veth pair, and so the pair, with it

    # --- what a test uses --------------------------------------------------------
    def prefix(self, i: int) -> list[str]:
        """A command prefix that runs a program on host i."""
        return ["ip", "netns", "exec", self.ns[i]]

    def env(self, base: dict[str, str]) -> dict[str, str]:
        return {**base, "PATH": f"{self.bin}{os.pathsep}{base.get('PATH', os.environ['PATH'])}"}

    def ssh(self, i: int, command: str, timeout: float = 15) -> subprocess.CompletedProcess[str]:
        """Run command on host i over SSH, from host 1 - i."""
        return subprocess.run([*self.prefix(1 - i), str(self.bin / "ssh"), self.addrs[i], command],
                              capture_output=True, text=True, timeout=timeout)

    def start_sshd(self, i: int) -> None:
        conf = self.dir / f"sshd{i}.conf"
        conf.write_text(
            f"ListenAddress {self.addrs[i]}\nHostKey {self.dir / 'hostkey'}\n"
            f"AuthorizedKeysFile {self.dir / 'authorized_keys'}\nPidFile {self.dir / f'sshd{i}.pid'}\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "UsePAM no\nStrictModes no\nClientAliveInterval 2\nClientAliveCountMax 3\n")
        subprocess.run([*self.prefix(i), SSHD, "-f", str(conf), "-E", str(self.dir / f"sshd{i}.log")], check=True)

    def pids(self, ns: str) -> list[int]:
        out = _ip("netns", "pids", ns, check=False)
        return [int(p) for p in out.stdout.split()]

    def processes(self, i: int) -> list[tuple[int, str, dict[str, str]]]:
        """(pid, command line, environment) of each process on host i."""
        out = []
        for pid in self.pids(self.ns[i]):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
                           .split("\0") if "=" in kv)
            except OSError:
                continue
            out.append((pid, cmd, env))
        return out

    def kill_rank(self, i: int) -> list[int]:
        """SIGKILL the lorad rank processes on host i."""
        pids = [pid for pid, cmd, env in self.processes(i) if "lorad.stagerun" in cmd and "MLX_RANK" in env]
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        return pids

    def kill_sshd(self, i: int) -> list[int]:
        """SIGKILL every sshd on host i: the listener and each session's (whose programs then get SIGHUP)."""
        pids = [pid for pid, _, _ in self.processes(i) if _comm(pid).startswith("sshd")]  # sshd, sshd-session
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        return pids

    def link(self, i: int, state: str) -> None:
        """`ip link set … up|down` on host i's end of the veth pair."""
        _ip("-n", self.ns[i], "link", "set", self.links[i], state)

    def wait_ssh(self, i: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while True:
            out = self.ssh(i, "true", timeout=10)
            if out.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"ssh to {self.addrs[i]} never worked: {out.stderr}")
            time.sleep(0.2)
