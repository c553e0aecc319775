"""SiLU, attention's softmax and the loss's cross entropy in a form MLX's CPU compiler turns into vector code.

On a CPU without Accelerate (Linux), MLX computes `exp` one element at a time
(`mx.exp`: ~15 ns per element here, ~0.3 ns for a multiply), so SiLU and the
attention softmax — a few million exponentials per block — took about half of a
training step's forward pass. MLX's `mx.compile` emits C++ loops for fused element-wise
graphs and builds them with `g++ -O3`; a loop of multiplies, adds, an integer
conversion and a shift is vectorized there, a call to `floor` or `exp` is not.

`exp` below is MLX's own (the Cephes polynomial of `mlx/backend/cpu/simd/math.h`),
with its rounding written as the 1.5·2²³ add-and-subtract and 2^n built by a shift, so
its loop vectorizes: the same values within 2 ulp (tested). SiLU and softmax get
their gradients from `mx.custom_function` (the rounding trick has no useful
derivative). `vectorized(model)` swaps them into the model's mlx-lm module while
the lora stage trains and the evaluate stage scores held-out rows; the model
computes the same function.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import mlx.core as mx

ROUND = 12582912.0  # 1.5 * 2**23: x + ROUND - ROUND is x rounded to the nearest integer, in plain float adds
LOG2E = 1.4426950408889634
EXP_MIN, EXP_MAX = -87.33654, 88.72283  # exp underflows below, overflows above (float32)
# The polynomial for 2**f, f in [-0.5, 0.5], highest power first (Cephes, as in MLX's simd::exp).
POLY = (1.535336188319500e-4, 1.339887440266574e-3, 9.618437357674640e-3, 5.550332471162809e-2,
        2.402264791363012e-1, 6.931472028550421e-1, 1.0)
MODEL_MODULES = ("llama", "qwen2", "qwen3")  # mlx-lm modules whose MLP calls `swiglu` and attention `scaled_dot_product_attention` (mistral is llama)


def exp(x: mx.array) -> mx.array:
    """exp(x) in float32 through operations MLX's CPU compiler vectorizes."""
    y = mx.clip(x, EXP_MIN, EXP_MAX) * LOG2E
    n = (y + ROUND) - ROUND
    f = y - n
    p = mx.array(POLY[0], mx.float32)
    for c in POLY[1:]:
        p = p * f + c
    scale = ((n.astype(mx.int32) + 127) * (1 << 23)).view(mx.float32)  # 2**n as its bit pattern
    return mx.where(x < EXP_MIN, 0.0, scale * p)


def _sigmoid(x: mx.array) -> mx.array:
    return 1.0 / (1.0 + exp(-x))


@mx.custom_function
def swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """silu(gate) * x, as mlx_lm.models.activations.swiglu."""
    return gate * _sigmoid(gate) * x


@swiglu.vjp
def _swiglu_vjp(primals: tuple[mx.array, mx.array], cotangent: mx.array, output: mx.array) -> tuple[mx.array, mx.array]:
    gate, x = primals
    s = _sigmoid(gate)
    silu = gate * s
    return cotangent * x * (s + silu * (1.0 - s)), cotangent * silu


@mx.custom_function
def softmax(scores: mx.array) -> mx.array:
    """Softmax over the last axis (float32 scores)."""
    e = exp(scores - mx.stop_gradient(scores.max(axis=-1, keepdims=True)))
    return e / e.sum(axis=-1, keepdims=True)


@softmax.vjp
def _softmax_vjp(primals: tuple[mx.array], cotangent: mx.array, output: mx.array) -> mx.array:
    return output * (cotangent - (cotangent * output).sum(axis=-1, keepdims=True))


def cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """Per-row cross entropy, as nn.losses.cross_entropy; on a CPU with this module's exp."""
    if mx.default_device() != mx.cpu or logits.dtype != mx.float32:
        import mlx.nn as nn

        return nn.losses.cross_entropy(logits, targets)
    return _cross_entropy(logits, targets)


@mx.custom_function
def _cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    peak = mx.stop_gradient(logits.max(axis=-1, keepdims=True))
    log_total = peak.squeeze(-1) + mx.log(exp(logits - peak).sum(axis=-1))
    return log_total - mx.take_along_axis(logits, targets[:, None], axis=-1).squeeze(-1)


@_cross_entropy.vjp
def _cross_entropy_vjp(primals: tuple[mx.array, mx.array], cotangent: mx.array, output: mx.array) -> tuple[mx.array, mx.array]:
    logits, targets = primals
    probs = softmax(logits)
    target = mx.arange(logits.shape[-1]) == targets[:, None]
    return cotangent[:, None] * (probs - target), mx.zeros_like(targets)


def scaled_dot_product_attention(queries: mx.array, keys: mx.array, values: mx.array, cache: Any, scale: float,
                                 mask: Any, sinks: Any = None) -> mx.array:
    """mlx_lm.models.base.scaled_dot_product_attention: what MLX's CPU fallback computes (scaled scores,
    causal, boolean or additive mask, softmax, weighted values), with this module's softmax."""
    if hasattr(cache, "bits") or sinks is not None or queries.dtype != mx.float32 or isinstance(mask, str) and mask != "causal":
        from mlx_lm.models.base import scaled_dot_product_attention as original

        return original(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)
    batch, heads, length, dim = queries.shape
    kv_heads, key_len = keys.shape[1], keys.shape[2]
    q = (queries * scale).reshape(batch, kv_heads, heads // kv_heads, length, dim)
    scores = q @ mx.expand_dims(keys, 2).swapaxes(-1, -2)  # (batch, kv_heads, groups, length, key_len)
    if isinstance(mask, str):
        mask = mx.arange(length)[:, None] + (key_len - length) >= mx.arange(key_len)[None]
    elif mask is not None and mask.ndim == 4:  # (batch or 1, heads or 1, length, key_len)
        mask = mask.reshape(mask.shape[0], kv_heads, -1, length, key_len) if mask.shape[1] == heads and heads > 1 \
            else mx.expand_dims(mask, 2)
    if mask is not None:
        scores = mx.where(mask, scores, -mx.inf) if mask.dtype == mx.bool_ else scores + mask
    out = softmax(scores) @ mx.expand_dims(values, 2)
    return out.reshape(batch, heads, length, -1)


def applies(model: Any) -> bool:
    """On a CPU, for a model from one of MODEL_MODULES."""
    module = type(model).__module__
    return mx.default_device() == mx.cpu and module.startswith("mlx_lm.models.") and module.rsplit(".", 1)[-1] in MODEL_MODULES


REPLACED = {"swiglu": swiglu, "scaled_dot_product_attention": scaled_dot_product_attention}  # what vectorized swaps in


@contextlib.contextmanager
def vectorized(model: Any) -> Iterator[None]:
    """Within: the model's mlx-lm module (llama, qwen2, qwen3) uses this module's SiLU and attention (CPU only)."""
    if not applies(model):
        yield
        return
    module = sys.modules[type(model).__module__]
    saved = {attr: getattr(module, attr) for attr in REPLACED if hasattr(module, attr)}
    for attr in saved:
        setattr(module, attr, REPLACED[attr])
    try:
        yield
    finally:
        for attr, original in saved.items():
            setattr(module, attr, original)
