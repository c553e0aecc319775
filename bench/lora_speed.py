"""LoRA training speed on this machine, side by side in one run, on the same prepared data.

SmolLM2-135M-Instruct (the demo GGUF), batch 4, 8 layers, rank 8:
  1. lorad's lora stage (as the daemon runs it: its own process, OpenBLAS, dequantized fp32 base on a CPU)
  2. plain `mlx_lm.lora` QLoRA on the 4-bit model with stock mlx[cpu] (the tutorial's path)
  3. plain `mlx_lm.lora` on a dequantized float32 base with OpenBLAS preloaded (the best by hand)

Each configuration runs twice, with 1 and with N iterations; iterations per second
= (N - 1) / (wall(N) - wall(1)), so start-up and model loading cancel out.
Targets (issue #3): lorad ≥ 10x configuration 2 and ≥ 0.9x configuration 3.

    .venv/bin/python bench/lora_speed.py [--iters 8] [--skip QLoRA]   (the QLoRA run alone takes ~20 min)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "daemon"))

from lorad import accel  # noqa: E402
from lorad.outbox import event_logger  # noqa: E402
from lorad.spec import apply_defaults  # noqa: E402
from lorad.stages import StageContext, stage_function  # noqa: E402


def spec(iters: int) -> dict:
    return apply_defaults({
        "version": 1, "name": "bench", "model": {"source": "demo"},
        "data": {"source": "builtin:text-to-sql", "limit": 400, "valid_fraction": 0.02, "test_fraction": 0.02},
        "train": {"iters": iters, "batch_size": 4, "num_layers": 8, "lora": {"rank": 8, "scale": 20.0, "dropout": 0.0},
                  "learning_rate": 1e-4, "max_seq_length": 256, "eval_every": 10**6, "save_every": 10**6},
    })


def prepare(work: Path, cache: Path) -> Path:
    """prepare + convert once; returns the 4-bit MLX base (converted from the GGUF, groups of 32)."""
    s = spec(1)
    for name in ("prepare", "convert"):
        ctx = StageContext(spec=s, work_dir=work, cache_dir=cache, log=event_logger(work, job_id="bench", stage=name))
        stage_function(name)(ctx)
    return Path(json.loads((work / "base_model.json").read_text())["path"])


def timed(cmd: list[str], env: dict[str, str], cwd: Path) -> float:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    return time.perf_counter() - t0


def lorad_run(template: Path, cache: Path, iters: int, env: dict[str, str]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "job"
        shutil.copytree(template, job, ignore=shutil.ignore_patterns("adapters", "events.jsonl"))
        import yaml

        s = spec(iters)
        (job / "spec.yaml").write_text(yaml.safe_dump({k: s[k] for k in ("version", "name", "model", "data", "train")}))
        (job / "status.json").write_text(json.dumps({"job_id": "bench"}))
        return timed([sys.executable, "-m", "lorad.stagerun", str(job), "lora", "--cache", str(cache)], env, REPO)


def mlx_lm_run(model: Path, data: Path, iters: int, env: dict[str, str]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        return timed([sys.executable, "-m", "mlx_lm", "lora", "--model", str(model), "--train", "--data", str(data),
                      "--batch-size", "4", "--num-layers", "8", "--iters", str(iters), "--learning-rate", "1e-4",
                      "--max-seq-length", "256", "--mask-prompt", "--steps-per-eval", str(10**6),
                      "--save-every", str(10**6), "--adapter-path", str(Path(tmp) / "adapters")], env, Path(tmp))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--skip", action="append", default=[], help="skip configurations whose name contains this")
    args = parser.parse_args()
    n = args.iters
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache, work = tmp / "cache", tmp / "work"
        base4 = prepare(work, cache)
        data = work / "data"
        stock = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "LD_LIBRARY_PATH")}
        stock["PYTHONPATH"] = str(REPO / "daemon")
        blas = {**stock, **accel.blas_env(cache), "LD_PRELOAD": str(accel.openblas_path())}
        dequant = tmp / "smollm2-f32"
        subprocess.run([sys.executable, "-m", "mlx_lm", "convert", "--model", str(base4), "--mlx-path", str(dequant),
                        "--dequantize", "--dtype", "float32"], env=stock, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        lorad_env = {**stock, **accel.blas_env(cache)}  # what the daemon gives a stage process
        configs = {
            "lorad lora stage": lambda it: lorad_run(work, cache, it, lorad_env),
            "mlx_lm.lora QLoRA 4-bit, stock mlx[cpu]": lambda it: mlx_lm_run(base4, data, it, stock),
            "mlx_lm.lora dequantized fp32 + OpenBLAS": lambda it: mlx_lm_run(dequant, data, it, blas),
        }
        results = {}
        for name, run in configs.items():
            if any(s in name for s in args.skip):
                continue
            one, many = run(1), run(n)
            results[name] = {"iters_per_second": round((n - 1) / (many - one), 4), "wall_1": round(one, 1), "wall_n": round(many, 1)}
            print(f"{name:45s} {results[name]['iters_per_second']:.4f} it/s  (wall {one:.0f}s for 1 it, {many:.0f}s for {n})", flush=True)
    lorad = results["lorad lora stage"]["iters_per_second"]
    for name in list(results)[1:]:
        print(f"lorad vs {name}: {lorad / results[name]['iters_per_second']:.2f}x")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
