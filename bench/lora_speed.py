"""LoRA training speed on this machine, side by side in one run, on the same prepared data.

SmolLM2-135M-Instruct (the demo GGUF, Q4_1, trained on its dequantized float32 weights), LoRA
rank 8 / scale 20 / dropout 0 on q/k/v/o/gate/up/down of the last 8 layers, batch 4, max 256
tokens, loss on the completion only, Adam (with bias correction, as torch's) at 1e-4, seed 0:
  1. lorad's lora stage from this checkout (as the daemon runs it: its own process, OpenBLAS)
  2. the same stage from an earlier commit (--baseline, default: the last one before the speed work)
  3. transformers + PEFT, eager (bench/peft_lora.py under --torch-python), on exactly the
     batches lorad trains on, in the same order
  4. optionally (--mlx-lm) plain `mlx_lm.lora` on the dequantized float32 base with OpenBLAS,
     and with --qlora also its 4-bit QLoRA with stock mlx[cpu] (~20 min)

Time: steps 2..N of one run of N steps, each timed where it runs (lorad's stage records mlx-lm's
step timer in metrics.jsonl; an older commit's is derived from its recorded tokens/s; the PEFT
script times its own steps; plain mlx_lm.lora, which records neither, runs with 1 and with N steps
and the difference of the walls counts). Tokens per second counts the non-pad tokens (prompt and
completion) of those steps, taken from the batches each configuration really trains on. Model FLOP/s is
the work those tokens need (`step_flops`) over the same time, and the GEMM peak is a 2048² float32
matmul measured in this run by MLX (OpenBLAS) and by torch. The loss of each step of 1 and 3
(same batches, same base) is compared.

    .venv/bin/python bench/lora_speed.py --torch-python /path/to/venv/bin/python [--iters 30]
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
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "daemon"))

from lorad import accel  # noqa: E402
from lorad.outbox import event_logger  # noqa: E402
from lorad.spec import apply_defaults  # noqa: E402
from lorad.stages import StageContext, stage_function  # noqa: E402

BASELINE = "315376f"  # lorad before the trainer's speed work (issue #16)
SEED, BATCH, LAYERS, MAX_SEQ, LR = 0, 4, 8, 256, 1e-4
LOSS_TOLERANCE = 0.10  # lorad's and PEFT's loss at each step: same batches, same base; the LoRA A matrices are drawn by different RNGs


def spec(iters: int, defaults: bool = True) -> dict:
    """The bench job; without defaults, as written for the stage (an earlier commit knows fewer keys)."""
    raw = {
        "version": 1, "name": "bench", "model": {"source": "demo"},
        "data": {"source": "builtin:text-to-sql", "limit": 400, "valid_fraction": 0.02, "test_fraction": 0.02},
        "train": {"iters": iters, "batch_size": BATCH, "num_layers": LAYERS, "seed": SEED,
                  # torch's Adam: MLX's defaults to no bias correction, whose first steps are 3x larger
                  "optimizer": "adam", "optimizer_config": {"bias_correction": True},
                  "lora": {"rank": 8, "scale": 20.0, "dropout": 0.0}, "learning_rate": LR,
                  "max_seq_length": MAX_SEQ, "eval_every": 10**6, "save_every": 10**6},
    }
    return apply_defaults(raw) if defaults else raw


def prepare(work: Path, cache: Path) -> Path:
    """prepare + convert once; returns the 4-bit MLX base (converted from the GGUF, groups of 32)."""
    s = spec(1)
    for name in ("prepare", "convert"):
        ctx = StageContext(spec=s, work_dir=work, cache_dir=cache, log=event_logger(work, job_id="bench", stage=name))
        stage_function(name)(ctx)
    return Path(json.loads((work / "base_model.json").read_text())["path"])


def timed(cmd: list[str], env: dict[str, str], cwd: Path) -> float:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}")
    return time.perf_counter() - t0


def lorad_run(template: Path, cache: Path, iters: int, env: dict[str, str]) -> dict[str, list[float]]:
    """The stage's own record of each step: its loss and its seconds (mlx-lm's step timer, validation excluded)."""
    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "job"
        shutil.copytree(template, job, ignore=shutil.ignore_patterns("adapters", "events.jsonl"))
        (job / "spec.yaml").write_text(yaml.safe_dump(spec(iters, defaults=False)))
        (job / "status.json").write_text(json.dumps({"job_id": "bench"}))
        try:
            timed([sys.executable, "-m", "lorad.stagerun", str(job), "lora", "--cache", str(cache)], env, REPO)
        except SystemExit:
            print((job / "events.jsonl").read_text()[-3000:] if (job / "events.jsonl").exists() else "(no events.jsonl)", file=sys.stderr)
            raise
        rows = [json.loads(x) for x in (job / "adapters/metrics.jsonl").read_text().splitlines()]
        steps = [r for r in rows if "train_loss" in r]
        return {"losses": [r["train_loss"] for r in steps], "seconds": [r.get("step_seconds") for r in steps],
                "scored_per_second": [r["tokens_per_second"] for r in steps]}


def mlx_lm_run(model: Path, data: Path, iters: int, env: dict[str, str]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        return timed([sys.executable, "-m", "mlx_lm", "lora", "--model", str(model), "--train", "--data", str(data),
                      "--batch-size", str(BATCH), "--num-layers", str(LAYERS), "--iters", str(iters), "--learning-rate",
                      str(LR), "--max-seq-length", str(MAX_SEQ), "--mask-prompt", "--steps-per-eval", str(10**6),
                      "--seed", str(SEED), "--save-every", str(10**6), "--adapter-path", str(Path(tmp) / "adapters")],
                     env, Path(tmp))


def scored(batch: dict[str, Any]) -> int:
    """Targets mlx-lm's default_loss scores in a batch: offset <= t + 1 <= length, t < width - 1."""
    return sum(min(length, batch["width"] - 1) - max(offset, 1) + 1 for offset, length in batch["pairs"])


def training_rows(base: Path, data: Path) -> Any:
    """The training rows as the lora stage reads them (tokenized, with prompt lengths)."""
    from mlx_lm.utils import load_tokenizer

    from lorad.stages.lora import load_datasets

    train_set, _ = load_datasets(data, load_tokenizer(str(base)), True, MAX_SEQ)
    assert len(train_set) == len((data / "train.jsonl").read_text().splitlines()), "rows were dropped: indices would shift"
    return train_set


def batches(train_set: Any, n: int, mlx_lm_order: bool) -> list[dict[str, Any]]:
    """The first n batches a seeded run trains on: row indices, (prompt, length) pairs, width; lorad's or mlx-lm's order."""
    import numpy as np
    from mlx_lm.tuner.trainer import iterate_batches as mlx_lm_batches

    from lorad.completion_loss import batch_width, planned_batches, token_length

    np.random.seed(SEED)
    out = []
    if mlx_lm_order:
        for _, (array, pairs) in zip(range(n), mlx_lm_batches(train_set, BATCH, MAX_SEQ, loop=True)):
            out.append({"rows": None, "pairs": np.array(pairs).tolist(), "width": array.shape[1]})
        return out
    for _, rows in zip(range(n), planned_batches(train_set, BATCH, loop=True)):
        pairs = [[train_set[j][1], min(token_length(train_set[j]), MAX_SEQ)] for j in rows]
        out.append({"rows": rows, "pairs": pairs, "width": batch_width([length for _, length in pairs], MAX_SEQ)})
    return out


def step_flops(config: dict[str, Any], pairs: list[list[int]], trained_layers: int) -> float:
    """The work one step needs on its non-pad tokens (multiply-adds × 2).

    Forward of every block (its linear layers, and causal attention: 4 × position × width per
    token); for the trained blocks also their input gradients (the linear layers once more,
    attention twice more); the vocabulary head forward and its input gradient on the scored
    positions only. Frozen weights need no weight gradients; the LoRA matrices' own work is small and left out.
    """
    d, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    head_dim = config.get("head_dim", d // config["num_attention_heads"])
    q_width, kv_width = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    linear = 2 * (d * q_width + 2 * d * kv_width + q_width * d + 3 * d * inter)
    total = 0.0
    for offset, length in pairs:
        attention = sum(4 * p * q_width for p in range(1, length + 1))
        block = linear * length + attention
        total += layers * block + trained_layers * (linear * length + 2 * attention)
        scored = length - max(offset, 1)
        total += 2 * 2 * config["vocab_size"] * d * scored
    return total


def mlx_gemm_flops(env: dict[str, str]) -> float:
    code = ("import lorad.accel as a; a.load_openblas(); import mlx.core as mx, time; x = mx.random.normal((2048, 2048)); "
            "mx.eval(x @ x); t = time.perf_counter(); [mx.eval(x @ x) for _ in range(10)]; "
            "print(10 * 2 * 2048**3 / (time.perf_counter() - t))")
    return float(subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True).stdout)


def worktree(rev: str, where: Path) -> Path:
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "--force", str(where), rev], check=True,
                   capture_output=True)
    return where / "daemon"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--baseline", default=BASELINE, help="the commit whose lora stage is 'before'; '' to skip")
    parser.add_argument("--torch-python", help="a Python with torch, transformers, peft and gguf (skipped without)")
    parser.add_argument("--mlx-lm", action="store_true", help="also plain mlx_lm.lora on the float32 base with OpenBLAS")
    parser.add_argument("--qlora", action="store_true", help="also mlx_lm.lora QLoRA 4-bit on stock mlx[cpu] (~20 min)")
    args = parser.parse_args()
    n = args.iters
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        cache, work = tmp / "cache", tmp / "work"
        base4 = prepare(work, cache)
        data = work / "data"
        config = json.loads((base4 / "config.json").read_text())
        stock = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "LD_LIBRARY_PATH")}
        stock["PYTHONPATH"] = str(REPO / "daemon")
        lorad_env = {**stock, **accel.blas_env(cache)}  # what the daemon gives a stage process
        gemm = {"mlx (OpenBLAS)": mlx_gemm_flops(lorad_env)}
        train_set = training_rows(base4, data)
        ours, theirs = batches(train_set, n, mlx_lm_order=False), batches(train_set, n, mlx_lm_order=True)
        losses: dict[str, list[float]] = {}

        def record(name: str, seconds: list[float], run_batches: list[dict[str, Any]], **extra: Any) -> None:
            """Steps 2..n: the first step carries one-off work (MLX's first compile, PyTorch's warm-up)."""
            timed_batches, time_s = run_batches[1:], sum(seconds[1:])
            tokens = sum(length for b in timed_batches for _, length in b["pairs"])
            flops = sum(step_flops(config, b["pairs"], LAYERS) for b in timed_batches)
            results[name] = {"it_per_s": round(len(timed_batches) / time_s, 4), "tokens_per_s": round(tokens / time_s, 1),
                             "model_gflop_per_s": round(flops / time_s / 1e9, 1), **extra}
            print(f"{name:42s} {len(timed_batches) / time_s:.3f} it/s  {tokens / time_s:6.1f} tokens/s  "
                  f"{flops / time_s / 1e9:5.1f} GFLOP/s  {extra}", flush=True)

        def stage(name: str, env: dict[str, str], run_batches: list[dict[str, Any]]) -> None:
            run = lorad_run(work, cache, n, env)
            losses[name] = run["losses"]
            seconds = [s if s is not None else scored(b) / rate  # a commit before step_seconds: from mlx-lm's tokens/s
                       for s, b, rate in zip(run["seconds"], run_batches, run["scored_per_second"])]
            positions = sum(len(b["pairs"]) * (b["width"] - 1) for b in run_batches[1:])
            tokens = sum(length - 1 for b in run_batches[1:] for _, length in b["pairs"])
            record(name, seconds, run_batches, padding=round(1 - tokens / positions, 3))

        stage("lorad (this checkout)", lorad_env, ours)
        if args.baseline:
            old = worktree(args.baseline, tmp / "baseline")
            stage(f"lorad at {args.baseline}", {**lorad_env, "PYTHONPATH": str(old)}, theirs)
        if args.torch_python:
            plan = tmp / "plan.json"
            plan.write_text(json.dumps([b["rows"] for b in ours]))
            gguf = Path(json.loads((work / "base_model.json").read_text())["gguf"])
            out = subprocess.run([args.torch_python, str(REPO / "bench/peft_lora.py"), str(gguf), str(data), str(plan),
                                  "--num-layers", str(LAYERS), "--max-seq", str(MAX_SEQ), "--lr", str(LR)],
                                 env=stock, check=True, capture_output=True, text=True)
            peft = json.loads(out.stdout.strip().splitlines()[-1])
            gemm["torch"] = peft["gemm_flops"]
            mismatched = [i for i, b in enumerate(ours) if sum(x for _, x in b["pairs"]) != peft["tokens"][i]]
            assert not mismatched, f"PEFT tokenized batches {mismatched} differently"
            losses["transformers + PEFT, eager"] = peft["losses"]
            record("transformers + PEFT, eager", peft["step_seconds"], ours, torch=peft["torch"])
        if args.mlx_lm or args.qlora:
            dequant = tmp / "smollm2-f32"
            subprocess.run([sys.executable, "-m", "mlx_lm", "convert", "--model", str(base4), "--mlx-path", str(dequant),
                            "--dequantize", "--dtype", "float32"], env=stock, check=True, capture_output=True)
            blas = {**lorad_env, "LD_PRELOAD": str(accel.openblas_path())}
            runs = {"mlx_lm.lora fp32 + OpenBLAS": (dequant, blas)} if args.mlx_lm else {}
            if args.qlora:
                runs["mlx_lm.lora QLoRA 4-bit, stock mlx[cpu]"] = (base4, stock)
            for name, (model, env) in runs.items():
                one, many = mlx_lm_run(model, data, 1, env), mlx_lm_run(model, data, n, env)
                record(name, [one] + [(many - one) / (n - 1)] * (n - 1), theirs)  # no step timer: wall(n) - wall(1)
        subprocess.run(["git", "-C", str(REPO), "worktree", "prune"], check=False)
    peak = max(gemm.values())
    print("GEMM peak (2048² float32): " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in gemm.items()))
    ours_name = "lorad (this checkout)"
    for name, r in results.items():
        r["fraction_of_gemm_peak"] = round(r["model_gflop_per_s"] * 1e9 / peak, 3)
        if name != ours_name:
            print(f"lorad vs {name}: {results[ours_name]['tokens_per_s'] / r['tokens_per_s']:.2f}x tokens/s")
    if "transformers + PEFT, eager" in losses:
        a, b = losses[ours_name], losses["transformers + PEFT, eager"]
        worst = max(abs(x - y) / y for x, y in zip(a, b))
        print(f"loss per step, lorad vs PEFT (same batches): worst relative difference {worst:.4f} "
              f"({'within' if worst <= LOSS_TOLERANCE else 'OUTSIDE'} {LOSS_TOLERANCE})")
        results["loss_curves"] = {"lorad": a, "peft": b, "worst_relative_difference": round(worst, 4)}
    results["gemm_peak_gflop_per_s"] = {k: round(v / 1e9, 1) for k, v in gemm.items()}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
