"""The training loss, computing the vocabulary projection only where the loss looks.

With `mask_prompt` only completion tokens are scored, yet mlx-lm's default loss
projects every position onto the whole vocabulary (SmolLM2: 576 × 49,152 per
token, about a fifth of a training step on a CPU) and then masks most of it
away. Here the batch iterator also hands over the flat positions that are
scored, and the loss gathers those hidden states before the head. The value and
the gradients are the same as `mlx_lm.tuner.trainer.default_loss`.

The position count is padded to a multiple of 32 (padding weighted 0) so that
mlx-lm's compiled step sees few distinct shapes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

# Models whose logits are exactly `head(model.model(inputs))`, as mlx-lm defines them.
SUPPORTED = {"llama", "mistral", "qwen2", "qwen3"}
PAD_TO = 32


def applies(model: Any, mask_prompt: bool) -> bool:
    return mask_prompt and getattr(model, "model_type", None) in SUPPORTED and hasattr(model, "args")


def scored_positions(batch_shape: tuple[int, int], lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices into (rows × targets) of the scored targets, and their 0/1 weights."""
    rows, width = batch_shape
    targets = width - 1
    index: list[int] = []
    for row, (offset, length) in enumerate(lengths.tolist()):
        first, last = max(offset - 1, 0), min(length, targets)  # default_loss: offset <= t + 1 <= length
        index.extend(range(row * targets + first, row * targets + last))
    count = len(index)
    padded = max(PAD_TO, -(-count // PAD_TO) * PAD_TO)
    weights = np.zeros(padded, np.float32)
    weights[:count] = 1.0
    return np.array(index + [0] * (padded - count), np.int32), weights


def iterate_batches(dataset: Any, batch_size: int, max_seq_length: int, **kwargs: Any) -> Iterator[tuple]:
    """mlx-lm's batches, each with the positions the loss scores."""
    import mlx.core as mx
    from mlx_lm.tuner.trainer import iterate_batches as mlx_iterate_batches

    for batch, lengths in mlx_iterate_batches(dataset, batch_size, max_seq_length, **kwargs):
        index, weights = scored_positions(batch.shape, np.array(lengths))
        yield batch, lengths, mx.array(index), mx.array(weights)


def loss(model: Any, batch: Any, lengths: Any, index: Any, weights: Any) -> tuple[Any, Any]:
    import mlx.core as mx
    import mlx.nn as nn

    inputs, targets = batch[:, :-1], batch[:, 1:]
    hidden = model.model(inputs)
    hidden = hidden.reshape(-1, hidden.shape[-1])[index]
    if model.args.tie_word_embeddings:
        logits = model.model.embed_tokens.as_linear(hidden)
    else:
        logits = model.lm_head(hidden)
    ce = nn.losses.cross_entropy(logits, targets.reshape(-1)[index]) * weights
    ntoks = (weights > 0).sum()
    return ce.astype(mx.float32).sum() / ntoks, ntoks
