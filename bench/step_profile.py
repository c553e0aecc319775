"""Where a LoRA step's time goes on this CPU: one SmolLM2-135M block's operations, timed one by one.

The shapes are the bench's (batch 4, SEQ positions, hidden 576, MLP 1536, 9 query and 3 key/value
heads); every operation runs alone and is evaluated, as MLX's CPU stream runs them in order. Prints
milliseconds per operation and per block, and the element-wise rate next to NumPy's and the GEMM
rate next to the 2048² peak, so a change of thread settings, MLX or BLAS shows where it lands.

    .venv/bin/python bench/step_profile.py [--seq 128]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "daemon"))

from lorad import accel  # noqa: E402

HIDDEN, MLP, HEADS, KV_HEADS, HEAD_DIM, VOCAB, BATCH = 576, 1536, 9, 3, 64, 49152, 4


def ms(fn: Callable[[], Any], repeat: int = 20) -> float:
    import mlx.core as mx

    mx.eval(fn())
    start = time.perf_counter()
    for _ in range(repeat):
        mx.eval(fn())
    return (time.perf_counter() - start) / repeat * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    blas = accel.load_openblas()
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np

    tokens = BATCH * args.seq
    x, h = mx.random.normal((tokens, HIDDEN)), mx.random.normal((tokens, MLP))
    w = {name: mx.random.normal(shape) for name, shape in {
        "q/o": (HIDDEN, HIDDEN), "k/v": (KV_HEADS * HEAD_DIM, HIDDEN), "gate/up": (MLP, HIDDEN), "down": (HIDDEN, MLP)}.items()}
    q = mx.random.normal((BATCH, HEADS, args.seq, HEAD_DIM))
    kv = mx.random.normal((BATCH, KV_HEADS, args.seq, HEAD_DIM))
    ones = mx.ones((HIDDEN,))
    gemms = {"q, o projections (x2)": (lambda: x @ w["q/o"].T, 2), "k, v projections (x2)": (lambda: x @ w["k/v"].T, 2),
             "gate, up projections (x2)": (lambda: x @ w["gate/up"].T, 2), "down projection": (lambda: h @ w["down"].T, 1)}
    others = {"SiLU(gate) * up": (lambda: nn.silu(h) * h, 1),
              "attention (causal SDPA)": (lambda: mx.fast.scaled_dot_product_attention(q, kv, kv, scale=HEAD_DIM**-0.5,
                                                                                       mask="causal"), 1),
              "RoPE on q and k": (lambda: mx.fast.rope(q, HEAD_DIM, traditional=False, base=1e5, scale=1.0, offset=0), 2),
              "RMSNorm (x2)": (lambda: mx.fast.rms_norm(x, ones, 1e-5), 2), "residual adds (x2)": (lambda: x + x, 2)}
    rows = [(name, ms(fn) * times) for name, (fn, times) in {**gemms, **others}.items()]
    gemm_ms = sum(t for name, t in rows[:len(gemms)])
    block = sum(t for _, t in rows)
    print(f"one block's forward, {BATCH} x {args.seq} positions (BLAS: {blas or 'reference'}):")
    for name, t in rows:
        print(f"  {name:28s} {t:7.2f} ms  {100 * t / block:4.1f} %")
    print(f"  {'total':28s} {block:7.2f} ms  (GEMMs {100 * gemm_ms / block:.0f} %)")
    gemm_flops = 2 * tokens * HIDDEN * (2 * HIDDEN + 2 * KV_HEADS * HEAD_DIM + 3 * MLP)
    big = mx.random.normal((2048, 2048))
    peak = max(2 * 2048**3 / (ms(lambda: big @ big, 10) / 1000) for _ in range(3))  # the best of three: a busy moment is not the peak
    print(f"GEMMs of a block: {gemm_flops / gemm_ms / 1e6:.0f} GFLOP/s; 2048² peak {peak / 1e9:.0f} GFLOP/s")
    exp_ms = ms(lambda: mx.exp(h))
    array = np.array(h)
    start = time.perf_counter()
    for _ in range(20):
        np.exp(array)
    numpy_ms = (time.perf_counter() - start) / 20 * 1000
    print(f"exp: MLX {1e6 * exp_ms / h.size:.1f} ns/element (one thread), NumPy {1e6 * numpy_ms / h.size:.1f} ns/element")
    head = mx.random.normal((VOCAB, HIDDEN))
    scored = mx.random.normal((BATCH * 24, HIDDEN))  # ~24 completion tokens a row
    targets = mx.zeros((BATCH * 24,), mx.int32)
    print(f"vocabulary head + cross-entropy on {BATCH * 24} scored positions: "
          f"{ms(lambda: nn.losses.cross_entropy(scored @ head.T, targets).sum()):.1f} ms")


if __name__ == "__main__":
    main()
