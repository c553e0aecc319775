"""Make MLX fast where it runs: Metal on a Mac, CUDA where built, OpenBLAS on a Linux CPU.

`mlx[cpu]` on Linux links a reference BLAS (a 1024² matmul: ~0.7 s here).
Loading OpenBLAS (PyPI `cmeel-openblas`) with RTLD_GLOBAL before `import
mlx.core` makes MLX's cblas calls resolve to it (~15x faster). That OpenBLAS
needs libgfortran.so.5, which the mlx-cpu wheel already carries under a mangled
name; `blas_env()` points the dynamic loader at it, and must be in the
environment of the process before it starts (glibc reads LD_LIBRARY_PATH once).
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
import sysconfig
from pathlib import Path

MLX_STAGES = {"convert", "lora", "fuse", "gguf", "evaluate"}
# The share of MLX's memory limit that it may keep as freed buffers for reuse. Its CPU default is
# 32 MiB, less than one training step's activations, so every step handed its buffers back to the
# kernel and faulted fresh zeroed pages in (a fused element-wise op measured 3x slower, a LoRA step
# 1.13x). The cache never holds more than the peak of what was in use.
CPU_BUFFER_CACHE_SHARE = 0.25


def _site_dirs() -> list[Path]:
    paths = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    return [Path(p) for p in paths]


def openblas_path() -> Path | None:
    for site in _site_dirs():
        lib = site / "cmeel.prefix" / "lib" / "libopenblas.so.0"
        if lib.exists():
            return lib
    return None


def _mlx_cpu_libs() -> Path | None:
    for site in _site_dirs():
        d = site / "mlx_cpu.libs"
        if d.is_dir():
            return d
    return None


def blas_env(cache_dir: Path) -> dict[str, str]:
    """Environment additions that let OpenBLAS load in a child process (Linux + mlx[cpu] only)."""
    if not sys.platform.startswith("linux") or openblas_path() is None:
        return {}
    libs = _mlx_cpu_libs()
    if libs is None:
        return {}
    shim = Path(cache_dir) / "blas-libs"
    shim.mkdir(parents=True, exist_ok=True)
    wanted = {"libgfortran.so.5": "libgfortran-*.so.5*", None: "libquadmath-*.so*"}
    for link_name, pattern in wanted.items():
        for target in glob.glob(str(libs / pattern)):
            link = shim / (link_name or os.path.basename(target))
            if not link.exists() or os.path.realpath(link) != os.path.realpath(target):
                tmp = link.with_name(link.name + ".tmp")
                if tmp.is_symlink() or tmp.exists():
                    tmp.unlink()
                tmp.symlink_to(target)
                os.replace(tmp, link)
    current = os.environ.get("LD_LIBRARY_PATH", "")
    return {"LD_LIBRARY_PATH": f"{shim}:{current}" if current else str(shim)}


def load_openblas() -> str | None:
    """Load OpenBLAS globally before MLX; returns its path, or None when unavailable."""
    if "mlx.core" in sys.modules or not sys.platform.startswith("linux"):
        return None
    lib = openblas_path()
    if lib is None:
        return None
    try:
        ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return None
    return str(lib)


def openblas_core() -> str | None:
    """The kernel OpenBLAS picked for this CPU at run time (DYNAMIC_ARCH), e.g. 'SkylakeX' or 'Zen'.

    OpenBLAS honours OPENBLAS_CORETYPE when the user sets it; lorad never sets it.
    """
    lib = openblas_path()
    if lib is None or not sys.platform.startswith("linux"):
        return None
    try:
        handle = ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
        handle.openblas_get_corename.restype = ctypes.c_char_p
        name = handle.openblas_get_corename()
    except (OSError, AttributeError):
        return None
    return name.decode() if name else None


def prepare_backend(stage: str) -> dict[str, str] | None:
    """Pick the fastest BLAS before MLX loads; say which backend the stage will use."""
    if stage not in MLX_STAGES:
        return None
    blas = load_openblas()
    import mlx.core as mx

    if sys.platform == "darwin" and mx.metal.is_available():
        return {"device": "gpu", "backend": "metal", "blas": "accelerate"}
    if mx.cuda.is_available() if hasattr(mx, "cuda") else False:
        return {"device": "gpu", "backend": "cuda", "blas": "cublas"}
    mx.set_cache_limit(int(mx.get_memory_limit() * CPU_BUFFER_CACHE_SHARE))
    return {"device": "cpu", "backend": "cpu", "blas": f"openblas ({blas})" if blas else "reference (bundled with mlx[cpu])"}
