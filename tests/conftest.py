from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from lorad import accel

# The suite's own MLX work runs as the daemon's stages do: on OpenBLAS, loaded before MLX (the
# Makefile puts its libgfortran on LD_LIBRARY_PATH). Without it a 135M model crawls on MLX's
# reference BLAS.
accel.load_openblas()

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def wait_for(predicate: Callable[[], object], timeout: float = 30.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def spec_text(name: str = "job", data_path: Path | None = None, stages: str = "[prepare]", extra: str = "") -> str:
    return (
        f"version: 1\nname: {name}\nmodel:\n  source: demo\ndata:\n  source: path:{data_path}\n"
        f"  format: completions\nstages: {stages}\n{extra}"
    )


def statuses(outbox: Path) -> dict[str, dict]:
    out = {}
    if outbox.exists():
        for d in sorted(outbox.iterdir()):
            try:
                out[d.name] = json.loads((d / "status.json").read_text())
            except (OSError, ValueError):
                pass
    return out


class DaemonProc:
    def __init__(self, root: Path, args: list[str], env: dict[str, str], prefix: tuple[str, ...] = ()):
        self.root = root
        self.stderr_path = root.parent / f"daemon-{time.monotonic_ns()}.log"
        self.stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(  # prefix: e.g. `ip netns exec NS`, which execs the daemon in place
            [*prefix, sys.executable, "-m", "lorad", "run", "--root", str(root), *args],
            env=env, stdout=self.stderr, stderr=subprocess.STDOUT,
        )

    @property
    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 35.0) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=35)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()


@pytest.fixture
def lorad_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("LORAD_ROOT", None)
    return env


@pytest.fixture
def start_daemon(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, lorad_env: dict[str, str]):
    procs: list[DaemonProc] = []

    def start(*args: str, root: Path | None = None, env: dict[str, str] | None = None,
              allow_read: tuple[Path, ...] | None = None, prefix: tuple[str, ...] = (), **env_extra: str) -> DaemonProc:
        """A daemon on root; specs may read the test session's folders (models and rows the tests make);
        allow_read=() keeps the default policy."""
        if allow_read is None:
            allow_read = (tmp_path_factory.getbasetemp(),)
        e = dict(env or lorad_env)
        e.update(env_extra)
        trust = [a for p in allow_read for a in ("--allow-read", str(p))]
        d = DaemonProc(root or tmp_path / "root",
                       ["--settle", "1.0", "--rescan-interval", "2", "--retry-backoff", "0.5", *trust, *args], e, prefix)
        procs.append(d)
        return d

    yield start
    for d in procs:
        d.stop()


@pytest.fixture
def rows_file(tmp_path: Path) -> Path:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}?", "completion": f"a{i}"}) + "\n" for i in range(40)))
    return path
