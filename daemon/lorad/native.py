"""Native code built on the user's machine, built to run on any machine of its kind.

llama-cpp-python ships as source on PyPI, and llama.cpp's CMake default is
`GGML_NATIVE=ON` (`-march=native`): a build on a CPU that *reports* AMX or
AVX-512 uses them, and dies of SIGILL on a CPU (or a VM) that does not enable
them. pip's wheel cache keys on the package version, not on CMAKE_ARGS, so a
native wheel built once is silently reused by later installs.

So lorad builds llama-cpp-python itself (`lorad install-llama`, which `make`
runs): explicit portable flags, `pip wheel --no-cache-dir`, and the wheel kept
under a folder named by a hash of (version, flags, platform, Python), so a
wheel is only ever reused by an install that asked for the same build.

MLX's CPU wheel and cmeel's OpenBLAS are prebuilt by their projects; OpenBLAS
is a DYNAMIC_ARCH build that picks its kernels at run time (and honours a
user's OPENBLAS_CORETYPE); `lorad doctor` reports which kernel it chose.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

LLAMA_CPP_PYTHON = "0.3.36"  # the version the test suite runs against (constraints.txt pins the rest)

# x86-64: AVX2/FMA/F16C/BMI2 is every x86-64 CPU of the last decade (Haswell, Zen 1);
# AVX-512 and AMX are off: reported is not enabled (VMs), and they are rare on desktops.
_X86_64 = ["-DGGML_NATIVE=OFF", "-DGGML_SSE42=ON", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON",
           "-DGGML_F16C=ON", "-DGGML_BMI2=ON", "-DGGML_AVX_VNNI=OFF", "-DGGML_AVX512=OFF",
           "-DGGML_AVX512_VBMI=OFF", "-DGGML_AVX512_VNNI=OFF", "-DGGML_AVX512_BF16=OFF",
           "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]
# Apple Silicon: every M-series chip has dotprod and fp16; Metal does the heavy work.
_APPLE_ARM64 = ["-DGGML_NATIVE=OFF", "-DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16", "-DGGML_METAL=ON"]
_LINUX_ARM64 = ["-DGGML_NATIVE=OFF", "-DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16"]
_COMMON = ["-DGGML_CCACHE=OFF", "-DLLAVA_BUILD=OFF"]  # lorad needs no vision tower; the build is 2x shorter

# Instructions a portable x86-64 build must not contain (AMX tiles; the VM in the field faults on them).
FORBIDDEN_X86 = re.compile(r"\b(tilezero|ldtilecfg|sttilecfg|tileloadd|tilestored|tdpbf16ps|tdpbssd|tilerelease)\b")


def cmake_args(system: str | None = None, machine: str | None = None) -> list[str]:
    """The CMAKE_ARGS lorad builds llama.cpp with on this kind of machine."""
    system = system or platform.system()
    machine = (machine or platform.machine()).lower()
    if machine in ("x86_64", "amd64"):
        arch = _X86_64
    elif machine in ("arm64", "aarch64"):
        arch = _APPLE_ARM64 if system == "Darwin" else _LINUX_ARM64
    else:
        arch = ["-DGGML_NATIVE=OFF"]
    return arch + _COMMON


def build_key(version: str = LLAMA_CPP_PYTHON, args: list[str] | None = None) -> str:
    """What makes two builds interchangeable: version, flags, platform and Python ABI."""
    args = args if args is not None else cmake_args()
    ident = json.dumps([version, args, sysconfig.get_platform(), sys.implementation.cache_tag])
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def wheel_dir(version: str = LLAMA_CPP_PYTHON, args: list[str] | None = None) -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "lorad" / "wheels" / f"llama-cpp-python-{version}-{build_key(version, args)}"


def installed_llama() -> tuple[str | None, str | None]:
    """(version, the file it was installed from) of the llama-cpp-python this Python sees."""
    from importlib import metadata

    try:
        dist = metadata.distribution("llama-cpp-python")
    except metadata.PackageNotFoundError:
        return None, None
    origin = None
    text = dist.read_text("direct_url.json")
    if text:
        origin = json.loads(text).get("url")
    return dist.version, origin


def llama_cpu_library() -> Path | None:
    """The llama.cpp CPU backend library that llama-cpp-python loads (None when not installed)."""
    for site in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        lib_dir = Path(site) / "llama_cpp" / "lib"
        for pattern in ("libggml-cpu*.so*", "libggml-cpu*.dylib", "libggml*.so*"):
            found = sorted(lib_dir.glob(pattern))
            if found:
                return found[0]
    return None


def forbidden_instructions(lib: Path, limit: int = 5) -> list[str] | None:
    """Up to `limit` AMX instructions found in lib's code; None when objdump is missing or fails."""
    objdump = shutil.which("objdump")
    if objdump is None or platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        proc = subprocess.Popen([objdump, "-d", "--no-show-raw-insn", str(lib)], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
    except OSError:
        return None
    hits: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        if FORBIDDEN_X86.search(line):
            hits.append(line.strip())
            if len(hits) >= limit:
                break
    proc.kill()
    proc.wait()
    return hits


def build_wheel(version: str = LLAMA_CPP_PYTHON, python: str = sys.executable, echo=print) -> Path:
    """Build (or find) the portable llama-cpp-python wheel; returns its path."""
    args = cmake_args()
    out = wheel_dir(version, args)
    wheels = sorted(out.glob("llama_cpp_python-*.whl"))
    if wheels:
        return wheels[-1]
    out.mkdir(parents=True, exist_ok=True)
    echo(f"lorad: building llama-cpp-python {version} for any {platform.machine()} machine "
         f"(CMAKE_ARGS={' '.join(args)}); this takes a few minutes")
    env = {**os.environ, "CMAKE_ARGS": " ".join(args), "FORCE_CMAKE": "1"}
    env.pop("PIP_FIND_LINKS", None)  # no prebuilt wheel may stand in for this build
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run([python, "-m", "pip", "wheel", "--no-cache-dir", "--no-deps", "--no-binary", "llama-cpp-python",
                    "-w", str(tmp), f"llama-cpp-python=={version}"], env=env, check=True)
    built = sorted(tmp.glob("llama_cpp_python-*.whl"))
    if not built:
        raise RuntimeError(f"pip built no llama-cpp-python wheel in {tmp}")
    dest = out / built[-1].name
    os.replace(built[-1], dest)  # the keyed folder only ever holds a finished wheel
    shutil.rmtree(tmp, ignore_errors=True)
    return dest


def install_llama(version: str = LLAMA_CPP_PYTHON, python: str = sys.executable, echo=print) -> int:
    """Install the portable build into `python`'s environment unless it is already there."""
    wanted_dir = wheel_dir(version)
    have_version, origin = installed_llama()
    if have_version == version and origin and str(wanted_dir) in origin:
        echo(f"lorad: llama-cpp-python {version} (portable build {wanted_dir.name}) already installed")
        return 0
    if have_version:
        echo(f"lorad: replacing llama-cpp-python {have_version} from {origin or 'a pip build with unknown flags'}")
    wheel = build_wheel(version, python, echo)
    pip = [python, "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["--no-deps", "--force-reinstall", "--no-index", str(wheel)], check=True)
    subprocess.run(pip + [str(wheel)], check=True)  # its own dependencies (numpy, jinja2, ...), if missing
    lib = llama_cpu_library()
    bad = forbidden_instructions(lib) if lib else None
    if bad:
        echo(f"lorad: {lib} contains AMX instructions ({bad[0]}); this build is not portable")
        return 1
    echo(f"lorad: installed {wheel.name} from {wheel.parent}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lorad.native")
    parser.add_argument("command", choices=["install-llama", "cmake-args", "wheel-dir"])
    args = parser.parse_args(argv)
    if args.command == "cmake-args":
        print(" ".join(cmake_args()))
        return 0
    if args.command == "wheel-dir":
        print(wheel_dir())
        return 0
    return install_llama()


if __name__ == "__main__":
    sys.exit(main())
