"""The install works on any machine: portable llama.cpp, a wheel that carries its resources, `lorad doctor`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from conftest import REPO
from lorad import native
from lorad.doctor import FAIL, OK, WARN, llama_generates
from lorad.models import demo_gguf

llama_installed = pytest.mark.skipif(native.installed_llama()[0] is None, reason="llama-cpp-python is not installed")


def lorad(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, exe: list[str] | None = None,
          timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*(exe or [sys.executable, "-m", "lorad"]), *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


@llama_installed
@pytest.mark.skipif(not shutil.which("objdump"), reason="objdump (binutils) is not installed")
def test_llama_cpu_library_has_no_amx_and_is_not_a_native_build():
    lib = native.llama_cpu_library()
    assert lib is not None and lib.exists()
    assert native.forbidden_instructions(lib) == [], f"{lib} contains AMX instructions"
    # what llama.cpp itself says it was compiled with: a -march=native build on an AVX-512/AMX machine
    # (this one, and CI's) lists AVX512 and AMX; the portable build stops at AVX2
    info = subprocess.run([sys.executable, "-c", "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"],
                          capture_output=True, text=True, timeout=60)
    assert info.returncode == 0, info.stderr
    features = {part.split("=")[0].strip() for part in info.stdout.split("|") if part.strip().endswith("= 1")}
    assert {"AVX", "AVX2", "FMA", "F16C"} <= {f.split(":")[-1].strip() for f in features}, info.stdout
    assert not any("AVX512" in f or "AMX" in f for f in features), info.stdout


def test_forbidden_instruction_scan_finds_amx(tmp_path):
    """The scan itself can fail: an object file with AMX tile instructions is caught."""
    if not shutil.which("objdump") or not shutil.which("cc") or sysconfig.get_platform() != "linux-x86_64":
        pytest.skip("needs objdump and a C compiler on x86-64 Linux")
    src = tmp_path / "amx.c"
    src.write_text("void f(void) { __asm__ volatile (\"tilezero %tmm4\\n\\ttilerelease\"); }\n")
    obj = tmp_path / "amx.o"
    subprocess.run(["cc", "-c", "-mamx-tile", str(src), "-o", str(obj)], check=True)
    hits = native.forbidden_instructions(obj)
    assert hits and "tilezero" in hits[0]


@llama_installed
def test_llama_generates_with_the_demo_model_in_a_subprocess():
    code, message = llama_generates(demo_gguf())
    assert code == 0, message
    assert "generated" in message


def test_portable_flags_never_ask_for_the_build_cpu():
    for system, machine in (("Linux", "x86_64"), ("Linux", "aarch64"), ("Darwin", "arm64")):
        args = native.cmake_args(system, machine)
        assert "-DGGML_NATIVE=OFF" in args
        assert not any("march=native" in a for a in args)
    x86 = native.cmake_args("Linux", "x86_64")
    assert "-DGGML_AVX2=ON" in x86 and "-DGGML_AMX_TILE=OFF" in x86 and "-DGGML_AVX512=OFF" in x86
    assert "-DGGML_METAL=ON" in native.cmake_args("Darwin", "arm64")
    # a different build is a different wheel folder: pip's cache cannot hand one for another
    assert native.build_key(args=x86) != native.build_key(args=x86 + ["-DGGML_NATIVE=ON"])
    assert native.build_key(version="0.3.35", args=x86) != native.build_key(version="0.3.36", args=x86)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(REPO)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    return next(out.glob("lorad-*.whl"))


def test_the_wheel_carries_every_resource(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for resource in ("jobspec.schema.json", "demo.yaml", "text_to_sql.jsonl.gz", "dev.lorad.daemon.plist", "lorad.service"):
        assert f"lorad/resources/{resource}" in names, resource


def test_the_wheel_installs_and_runs_outside_the_repository(wheel, tmp_path):
    """A fresh venv holding only the wheel's lorad; its dependencies come from the test venv by a plain path entry
    (a .pth line adds the folder, and runs none of the .pth files in it, so the checkout's editable lorad stays out)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)  # what pip does with a pure wheel, minus the console script
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    work = tmp_path / "elsewhere"
    (work / "jobspecs").mkdir(parents=True)
    shutil.copy(REPO / "jobspecs" / "demo.yaml", work / "jobspecs" / "demo.yaml")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LORAD_ROOT")}
    exe = [str(venv / "bin" / "python"), "-m", "lorad"]

    where = subprocess.run([exe[0], "-c", "import lorad; print(lorad.__file__)"], capture_output=True, text=True, cwd=work, env=env)
    assert where.stdout.startswith(str(site)), where.stdout + where.stderr

    out = lorad("validate", "jobspecs/demo.yaml", cwd=work, env=env, exe=exe)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout + out.stderr
    out = lorad("install-agent", "--systemd", "--dry-run", "--root", str(work / "root"), cwd=work, env=env, exe=exe)
    assert out.returncode == 0 and "[Unit]" in out.stdout, out.stderr

    (work / "job.yaml").write_text("version: 1\nname: wheel-prepare\nmodel: {source: demo}\n"
                                   "data: {source: 'builtin:text-to-sql', limit: 50}\nstages: [prepare]\n")
    out = lorad("submit", "job.yaml", "--root", str(work / "root"), cwd=work, env=env, exe=exe)
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip()
    out = lorad("run", "--once", "--root", str(work / "root"), cwd=work, env=env, exe=exe)
    assert out.returncode == 0, out.stderr[-2000:]
    status = json.loads((work / "root" / "outbox" / job_id / "status.json").read_text())
    assert status["state"] == "succeeded", status.get("error")
    rows = (work / "root" / "outbox" / job_id / "data" / "train.jsonl").read_text().splitlines()
    assert len(rows) > 30 and "sql" in json.loads(rows[0]) or "completion" in json.loads(rows[0])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _doctor(root: Path, *extra: str, env: dict[str, str] | None = None) -> tuple[int, dict[str, dict]]:
    out = lorad("doctor", "--json", "--root", str(root), "--ollama-host", f"http://127.0.0.1:{_free_port()}", *extra, env=env)
    checks = json.loads(out.stdout)
    by_name = {c["name"]: c for c in checks}
    return out.returncode, by_name


@llama_installed
def test_doctor_passes_on_a_healthy_machine_and_says_ollama_is_missing(tmp_path):
    code, checks = _doctor(tmp_path / "root")
    assert code == 0, checks
    assert checks["mlx"]["status"] in (OK, WARN) and "GFLOP/s" in checks["mlx"]["detail"]
    assert checks["llama.cpp"]["status"] == OK and "generated" in checks["llama.cpp"]["detail"]
    for folder in ("inbox", "outbox", "state", "disk", "policy"):
        assert checks[folder]["status"] == OK, checks[folder]
    assert str(tmp_path / "root" / "inbox" / "data") in checks["policy"]["detail"]
    assert checks["ollama"]["status"] == WARN and "ollama" in checks["ollama"]["fix"]
    human = lorad("doctor", "--root", str(tmp_path / "root"), "--ollama-host", f"http://127.0.0.1:{_free_port()}")
    assert "fix:" in human.stdout and "llama.cpp" in human.stdout


def test_doctor_reports_a_llama_cpp_that_crashes(tmp_path):
    """A stand-in libllama.so that executes an illegal instruction when loaded, as an AMX build does on a VM without AMX."""
    if not shutil.which("cc"):
        pytest.skip("needs a C compiler")
    lib_dir = tmp_path / "badllama"
    lib_dir.mkdir()
    src = tmp_path / "bad.c"
    src.write_text("__attribute__((constructor)) static void boom(void) { __builtin_trap(); }\n")
    subprocess.run(["cc", "-shared", "-fPIC", str(src), "-o", str(lib_dir / "libllama.so")], check=True)
    code, checks = _doctor(tmp_path / "root", env={**os.environ, "LLAMA_CPP_LIB_PATH": str(lib_dir)})
    if native.installed_llama()[0] is None:
        assert checks["llama.cpp"]["status"] == FAIL and "not installed" in checks["llama.cpp"]["detail"]
        return
    check = checks["llama.cpp"]
    assert code == 1
    assert check["status"] == FAIL and "SIGILL" in check["detail"] and "another CPU" in check["detail"]
    assert "lorad install-llama" in check["fix"]


def test_doctor_reports_an_unwritable_outbox(tmp_path):
    blocker = tmp_path / "outbox-is-a-file"
    blocker.write_text("not a folder")
    code, checks = _doctor(tmp_path / "root", "--outbox", str(blocker / "outbox"))
    assert code == 1
    assert checks["outbox"]["status"] == FAIL and str(blocker) in checks["outbox"]["detail"]
    assert checks["outbox"]["fix"]
    assert checks["inbox"]["status"] == OK


def test_a_stage_killed_by_sigill_says_why(tmp_path, start_daemon, rows_file):
    from conftest import spec_text, statuses, wait_for

    root = tmp_path / "root"
    start_daemon(LORAD_STAGE_HOOKS="prepare=stagehooks:die_of_signal", HOOK_SIGNAL=str(int(signal.SIGILL)))
    wait_for(lambda: (root / "inbox").is_dir())
    (root / "inbox" / ".a.tmp").write_text(spec_text("a", rows_file))
    os.replace(root / "inbox" / ".a.tmp", root / "inbox" / "a.yaml")
    done = wait_for(lambda: [s for s in statuses(root / "outbox").values() if s["state"] == "failed"], timeout=60)
    error = done[0]["error"]
    assert "SIGILL" in error["message"] and "another CPU" in error["message"]
    assert "lorad doctor" in error["hint"]
    events = (root / "outbox" / done[0]["job_id"] / "events.jsonl").read_text()
    assert "another CPU" in events
