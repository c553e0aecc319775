"""fuse: adapters merged into the base → fused/, a folder `mlx_lm.load` opens.

Mirrors `mlx_lm.fuse` (the same calls), dequantizing when asked so that the
GGUF export gets full-precision weights and no leftover scales/biases.
"""

from __future__ import annotations

import json
import os
import shutil

from lorad.stages import StageContext, StageFailed
from lorad.stages.convert import base_path


def run(ctx: StageContext) -> dict[str, str]:
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.utils import dequantize_model, load, load_adapters, save

    adapter_dir = ctx.path("adapters")
    if not (adapter_dir / "adapters.safetensors").exists():
        raise StageFailed("no adapters to fuse: run the lora stage first")
    out = ctx.path("fused")
    if (out / "config.json").exists() and (out / ".complete").exists():
        ctx.log.info("fuse_already_done")
        return {"fused": "fused"}
    base = base_path(ctx)
    dequantize = ctx.spec["fuse"]["dequantize"]
    method = json.loads((adapter_dir / "adapter_config.json").read_text())["fine_tune_type"]
    model, tokenizer, config = load(str(base), return_config=True)
    was_quantized = "quantization" in config
    if method == "full" and was_quantized:
        model = dequantize_model(model)  # full weights were trained on the dequantized base
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    model = load_adapters(model, str(adapter_dir))
    fused = [(name, module.fuse(dequantize=dequantize)) for name, module in model.named_modules() if hasattr(module, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    if dequantize:
        model = dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
        leftovers = [k for k, _ in tree_flatten(model.parameters()) if k.endswith((".scales", ".biases"))]
        if leftovers:
            raise StageFailed(f"dequantized model still has quantized tensors: {leftovers[:3]}")
    tmp = out.with_name(".fused.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save(tmp, str(base), model, tokenizer, config, donate_model=False)
    (tmp / ".complete").write_text("")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    ctx.log.info("fused", path=str(out), dequantized=dequantize, base_quantized=was_quantized, method=method,
                 layers_fused=len(fused))
    return {"fused": "fused"}
