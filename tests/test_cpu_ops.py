"""cpu_ops computes what MLX computes, values and gradients, only in a form that vectorizes."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.models.base import scaled_dot_product_attention as mlx_lm_attention

import tinymodel
from lorad import cpu_ops


def relative(a: mx.array, b: mx.array) -> float:
    return (mx.abs(a - b) / mx.maximum(mx.abs(b), 1e-30)).max().item()


def test_exp_matches_mx_exp_to_float_precision_and_at_the_edges():
    mx.random.seed(0)
    x = mx.concatenate([mx.clip(mx.random.normal((200_000,)) * 30, -87.0, 88.0), mx.linspace(-87.0, 88.0, 10_001)])
    assert relative(cpu_ops.exp(x), mx.exp(x)) < 4e-7  # 2 ulp near 1 is 2.4e-7
    edges = mx.array([0.0, -mx.inf, -1000.0, -87.5, 1000.0, mx.inf, float("nan")])
    got = cpu_ops.exp(edges).tolist()
    assert got[:4] == [1.0, 0.0, 0.0, 0.0] and got[4] == got[5] == math.inf and math.isnan(got[6])


def test_swiglu_value_and_gradients_match_silu():
    mx.random.seed(1)
    gate, x, w = mx.random.normal((4, 33, 96)) * 4, mx.random.normal((4, 33, 96)), mx.random.normal((96,))

    def total(f):
        return mx.value_and_grad(lambda g, u: (f(g, u) * w).sum(), argnums=(0, 1))(gate, x)

    (got, got_grads), (ref, ref_grads) = total(cpu_ops.swiglu), total(lambda g, u: nn.silu(g) * u)
    assert abs(got.item() - ref.item()) < 1e-5 * abs(ref.item())
    for g, r in zip(got_grads, ref_grads):
        assert mx.allclose(g, r, rtol=1e-5, atol=1e-6).item()


@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 4)])
def test_attention_value_and_gradients_match_mlx_lm(heads, kv_heads):
    mx.random.seed(2)
    q, k, v = (mx.random.normal((2, h, 37, 64)) for h in (heads, kv_heads, kv_heads))
    w = mx.random.normal((2, heads, 37, 64))

    def output_and_grads(attention, mask):
        out = attention(q, k, v, None, 0.125, mask)
        return out, mx.grad(lambda *a: (attention(*a, None, 0.125, mask) * w).sum(), argnums=(0, 1, 2))(q, k, v)

    for mask in ("causal", None):
        (got, got_grads), (ref, ref_grads) = output_and_grads(cpu_ops.scaled_dot_product_attention, mask), output_and_grads(mlx_lm_attention, mask)
        assert mx.allclose(got, ref, rtol=1e-5, atol=1e-6).item(), mask
        for g, r in zip(got_grads, ref_grads):
            assert mx.allclose(g, r, rtol=1e-4, atol=1e-5).item(), mask
    causal = cpu_ops.scaled_dot_product_attention(q, k, v, None, 0.125, "causal")
    assert mx.allclose(causal[:, :, 0], mx.repeat(v[:, :, 0], heads // kv_heads, axis=1), atol=1e-6).item()  # the first query sees only the first key


def test_cross_entropy_value_and_gradients_match_mlx():
    mx.random.seed(3)
    logits, targets, w = mx.random.normal((40, 5000)) * 5, mx.random.randint(0, 5000, (40,)), mx.random.uniform(shape=(40,))

    def total(f):
        return mx.value_and_grad(lambda z: (f(z, targets) * w).sum())(logits)

    (got, got_grad), (ref, ref_grad) = total(cpu_ops.cross_entropy), total(nn.losses.cross_entropy)
    assert abs(got.item() - ref.item()) < 1e-5 * abs(ref.item())
    assert mx.allclose(got_grad, ref_grad, rtol=1e-4, atol=1e-7).item()


def test_patch_reaches_only_the_models_module_and_is_undone(tmp_path):
    import mlx_lm.models.llama as llama
    import mlx_lm.models.qwen2 as qwen2
    from mlx_lm.utils import load

    model, _ = load(str(tinymodel.make_tiny_model(tmp_path / "llama", "llama")))
    before = (llama.swiglu, llama.scaled_dot_product_attention, qwen2.swiglu)
    with cpu_ops.vectorized(model):
        assert (llama.swiglu, llama.scaled_dot_product_attention) == (cpu_ops.swiglu, cpu_ops.scaled_dot_product_attention)
        assert qwen2.swiglu is before[2]
        inputs = mx.array([[1, 2, 3, 4, 5, 6]])
        patched = model(inputs)
    assert (llama.swiglu, llama.scaled_dot_product_attention, qwen2.swiglu) == before
    assert mx.allclose(patched, model(inputs), rtol=1e-4, atol=1e-5).item()
