"""convert: the spec's model source → an MLX model folder in the shared cache.

Converted bases are cached under cache/models/<key>, keyed by the source (and
its file's size and mtime) and the quantize options, so a second job on the
same base converts nothing. A folder is built under a temp name and renamed
into place, so a crash never leaves a half-written base behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from lorad.models import ModelNotFound, demo_gguf, hf_snapshot, ollama_gguf
from lorad.stages import StageContext, StageFailed
from lorad.stages.prepare import readable_path

CONVERT_VERSION = 1  # bump when the conversion itself changes


def resolve_source(source: str) -> Path:
    """A local .gguf file or model folder for the spec's model.source."""
    kind, _, ref = source.partition(":")
    try:
        if kind == "demo":
            return demo_gguf()
        if kind == "ollama":
            return ollama_gguf(ref)
        if kind == "hf":
            return hf_snapshot(ref)
    except ModelNotFound as e:
        raise StageFailed(str(e)) from None
    path = readable_path(ref)
    if not path.exists():
        raise StageFailed(f"model.source {source!r}: no such file or folder")
    if path.is_file() and not _is_gguf(path):
        raise StageFailed(f"model.source {source!r}: not a GGUF file (expected a .gguf file or a model folder)")
    if path.is_dir() and not (path / "config.json").exists():
        raise StageFailed(f"model.source {source!r}: the folder has no config.json (expected an HF or MLX model folder)")
    return path.resolve()


def cache_key(local: Path, quantize: dict[str, Any] | None) -> str:
    st = local.stat()
    ident = {"path": str(local), "size": st.st_size, "mtime": st.st_mtime_ns, "quantize": quantize, "v": CONVERT_VERSION}
    if local.is_dir():
        ident["files"] = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in local.iterdir() if p.is_file())
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def build_base(local: Path, dest: Path, quantize: dict[str, Any] | None, log: Any) -> dict[str, Any]:
    from lorad.gguf_import import convert_gguf

    if _is_gguf(local):
        summary = convert_gguf(local, dest)
    else:
        from mlx_lm.utils import load, quantize_model, save

        model, tokenizer, config = load(str(local), return_config=True)
        summary = {"architecture": config.get("model_type"), "from": "folder"}
        if quantize and "quantization" not in config:
            model, config = quantize_model(model, config, quantize["group_size"], quantize["bits"])
            summary["quantized_bits"] = quantize["bits"]
        save(dest, local, model, tokenizer, config)
        return summary
    if quantize and not summary.get("quantized_bits"):
        from mlx_lm.utils import load, quantize_model, save

        model, tokenizer, config = load(str(dest), return_config=True)
        model, config = quantize_model(model, config, quantize["group_size"], quantize["bits"])
        requant = dest.with_name(dest.name + ".q")
        save(requant, dest, model, tokenizer, config)
        shutil.rmtree(dest)
        os.replace(requant, dest)
        summary["quantized_bits"] = quantize["bits"]
    return summary


def run(ctx: StageContext) -> dict[str, str]:
    model = ctx.spec["model"]
    local = resolve_source(model["source"])
    quantize = model.get("quantize")
    if quantize:
        quantize = {"bits": quantize.get("bits", 4), "group_size": quantize.get("group_size", 64)}
    if local.is_dir() and not quantize and _is_mlx_loadable(local):
        base = local  # an HF/MLX folder mlx-lm loads as it is: nothing to convert
        ctx.log.info("base_ready", base=str(base), source=model["source"], converted=False)
    else:
        key = cache_key(local, quantize)
        base = ctx.cache_dir / "models" / key
        if (base / "config.json").exists():
            ctx.log.info("base_cached", base=str(base), source=model["source"], key=key)
        else:
            tmp = base.with_name(f".{key}.{os.getpid()}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            t0 = time.time()
            try:
                summary = build_base(local, tmp, quantize, ctx.log)
                (tmp / "lorad-source.json").write_text(json.dumps({"source": model["source"], "local": str(local),
                                                                   "quantize": quantize, **summary}, default=str))
                base.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, base)
            except ValueError as e:
                raise StageFailed(str(e)) from None
            finally:  # a half-written base (disk full, killed) never stays behind
                shutil.rmtree(tmp, ignore_errors=True)
            ctx.log.info("base_converted", base=str(base), source=model["source"], key=key,
                         seconds=round(time.time() - t0, 2), **{k: v for k, v in summary.items() if k != "from"})
    record = {"path": str(base), "source": model["source"]}
    if _is_gguf(local) and not quantize:
        record["gguf"] = str(local)  # the same weights as llama.cpp runs them (evaluate uses it for the base)
    ctx.path("base_model.json").write_text(json.dumps(record))
    return {"base_model": "base_model.json"}


def _is_gguf(path: Path) -> bool:
    """By magic, not name: Ollama's blobs have no .gguf suffix."""
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _is_mlx_loadable(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) and (folder / "config.json").exists()


def base_path(ctx: StageContext) -> Path:
    """The base model folder convert chose (for later stages)."""
    ref = ctx.path("base_model.json")
    if not ref.exists():
        raise StageFailed("no base model: run the convert stage first")
    return Path(json.loads(ref.read_text())["path"])
