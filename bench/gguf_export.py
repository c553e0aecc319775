"""GGUF export time and peak memory for SmolLM2-135M, side by side in one run.

  - lorad (gguf-py, streaming) at f16 and q8_0
  - mlx-lm's own exporter (what `mlx_lm fuse --export-gguf` calls; f16 only)

Each export runs in its own process; peak RSS is that process's ru_maxrss.
The model is the demo base converted and fused (dequantized) by lorad's stages.

    .venv/bin/python bench/gguf_export.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "daemon"))

LORAD = """
import sys
from pathlib import Path
from lorad.gguf_export import write_gguf
write_gguf(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
"""
MLX_LM = """
import sys, json
from pathlib import Path
import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.utils import load
from mlx_lm.gguf import convert_to_gguf
model, tok, config = load(sys.argv[1], return_config=True)
convert_to_gguf(Path(sys.argv[1]), dict(tree_flatten(model.parameters())), config, sys.argv[2])
"""


def run(code: str, *args: str) -> tuple[float, float]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "daemon")}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if status != 0:
        raise SystemExit(f"export failed: {proc.stderr.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss / 1024  # KiB → MiB


PREPARE = """
import json, sys
from pathlib import Path
import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.utils import load
from lorad.outbox import event_logger
from lorad.spec import apply_defaults
from lorad.stages import StageContext, stage_function
from lorad.stages.lora import adapter_config, apply_adapters

work, cache = Path(sys.argv[1]) / "job", Path(sys.argv[1]) / "cache"
spec = apply_defaults({"version": 1, "name": "bench", "model": {"source": "demo"}, "data": {"source": "builtin:text-to-sql"}})
work.mkdir()
ctx = StageContext(spec=spec, work_dir=work, cache_dir=cache, log=event_logger(work, job_id="b", stage="convert"))
stage_function("convert")(ctx)
# fuse with untrained (zero-effect) adapters: the same fused model a job produces, without training first
base = Path(json.loads((work / "base_model.json").read_text())["path"])
model, _ = load(str(base))
apply_adapters(model, spec["train"])
(work / "adapters").mkdir()
mx.save_safetensors(str(work / "adapters" / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
(work / "adapters" / "adapter_config.json").write_text(json.dumps(adapter_config(spec["train"], base)))
stage_function("fuse")(StageContext(spec=spec, work_dir=work, cache_dir=cache, log=ctx.log))
"""


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run(PREPARE, str(tmp))  # in a child: this process stays small, so its children's peak RSS is their own
        fused = tmp / "job" / "fused"
        size = sum(p.stat().st_size for p in fused.glob("*.safetensors")) / 2**20
        print(f"fused model: {size:.0f} MiB of safetensors\n")
        rows = [
            ("lorad f16", run(LORAD, str(fused), str(tmp / "a.gguf"), "f16"), tmp / "a.gguf"),
            ("lorad q8_0", run(LORAD, str(fused), str(tmp / "b.gguf"), "q8_0"), tmp / "b.gguf"),
            ("mlx-lm --export-gguf f16", run(MLX_LM, str(fused), str(tmp / "c.gguf")), tmp / "c.gguf"),
        ]
        results = {}
        print(f"{'exporter':28s} {'seconds':>8s} {'peak RSS':>10s} {'file':>9s}")
        for name, (seconds, rss), path in rows:
            results[name] = {"seconds": round(seconds, 2), "peak_rss_mib": round(rss), "file_mib": round(path.stat().st_size / 2**20)}
            print(f"{name:28s} {seconds:8.2f} {rss:8.0f} MiB {results[name]['file_mib']:6d} MiB")
        print(json.dumps(results))


if __name__ == "__main__":
    main()
