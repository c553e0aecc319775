"""Disk space as a resource: what a stage will write, checked before it starts.

The estimates are deliberately generous upper bounds from sizes already on disk
(the converted base model, the data), so a stage is refused up front with a
clear error instead of dying half-way with ENOSPC and a torn file.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path
from typing import Any

MARGIN_BYTES = 64 << 20  # logs, status rewrites, checkpoints' metadata
GGUF_BYTES_PER_PARAM = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 1.07, "q4_0": 0.57, "q4_1": 0.63}


class DiskFull(Exception):
    """Not enough free space for a stage (raised before it starts, or mapped from ENOSPC)."""


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC or EDQUOT anywhere in an exception's chain (also SQLite's 'database or disk is full')."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "disk is full" in str(seen) or "No space left on device" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _base_folder(job_dir: Path) -> Path | None:
    ref = job_dir / "base_model.json"
    try:
        return Path(json.loads(ref.read_text())["path"])
    except (OSError, ValueError, KeyError):
        return None


def _params(base: Path | None) -> int | None:
    """An upper bound on the parameter count of an MLX/HF folder: its weight bytes at the smallest dtype they may hold."""
    if base is None or not base.is_dir():
        return None
    weights = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    try:
        quantized = "quantization" in json.loads((base / "config.json").read_text())
    except (OSError, ValueError):
        quantized = False
    return int(weights / (0.5 if quantized else 2.0))  # 4-bit (scales make it a little more) or 16-bit


def _source_bytes(spec: dict[str, Any]) -> int:
    """Size of a local model source (the demo GGUF, a path: file or folder); 0 when not local or unknown."""
    source = str((spec.get("model") or {}).get("source", ""))
    try:
        if source == "demo":
            from lorad.models import demo_gguf

            return demo_gguf().stat().st_size
        if source.startswith("path:"):
            path = Path(source[len("path:"):]).expanduser()
            return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.glob("*.safetensors"))
    except Exception:  # noqa: BLE001 - an estimate: the stage reports a missing source itself
        return 0
    return 0


def stage_need(stage: str, spec: dict[str, Any], job_dir: Path) -> int:
    """Bytes `stage` will write at most, from what earlier stages left in job_dir."""
    base = _base_folder(job_dir)
    params = _params(base) or 0
    if stage == "prepare":
        return MARGIN_BYTES
    if stage == "convert":  # a GGUF source → a dequantized or re-saved folder: up to 4 bytes a weight of a q4 file
        return _source_bytes(spec) * 8 + MARGIN_BYTES
    if stage == "lora":  # adapters and a few checkpoints: small next to the model
        return max(params // 50, 0) + MARGIN_BYTES
    if stage == "fuse":  # fp16 weights, or fp32 on a CPU
        return params * 4 + MARGIN_BYTES
    if stage == "gguf":  # an f16 intermediate for llama.cpp's quantizer, then the final file
        outtype = spec.get("gguf", {}).get("outtype", "f16")
        per_param = GGUF_BYTES_PER_PARAM.get(outtype, 2.0)
        return int(params * (per_param + (2.0 if outtype not in GGUF_BYTES_PER_PARAM else 0))) + MARGIN_BYTES
    return MARGIN_BYTES


def check_free(stage: str, need: int, where: Path) -> None:
    free = shutil.disk_usage(where).free
    if free < need:
        raise DiskFull(f"not enough disk space for the {stage} stage: it needs about {need / 2**20:.0f} MiB, "
                       f"{free / 2**20:.0f} MiB are free under {where}. Free some space, then `lorad retry` the job.")
