"""Training batches grouped by length, and a loss that projects onto the vocabulary only where it looks.

Batches: mlx-lm 0.32 means to group rows of similar length (so little of a batch is
padding), but it sorts by `CacheDataset.itemlen`, which is the raw row's key count,
not its token count: its batches are file order, and on the demo data 27 % of the
positions a step computes are padding. Here rows are sorted by their token count, batches padded
to a multiple of 8, and the order of batches shuffled as mlx-lm shuffles them.

Loss:
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
PAD_BATCH_TO = 8  # a batch's width; mlx-lm pads to 32, which here pads a 129-token batch to 161


def supports(model: Any) -> bool:
    """The model's hidden states and head can be called apart (and its attention mask handed in, for packing)."""
    return getattr(model, "model_type", None) in SUPPORTED and hasattr(model, "args")


def applies(model: Any, mask_prompt: bool) -> bool:
    return mask_prompt and supports(model)


def scored_positions(batch_shape: tuple[int, int], lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices into (rows × targets) of the scored targets, and their 0/1 weights."""
    rows, width = batch_shape
    targets = width - 1
    index: list[int] = []
    for row, (offset, length) in enumerate(lengths.tolist()):
        first, last = max(offset - 1, 0), min(length, targets)  # default_loss: offset <= t + 1 <= length
        index.extend(range(row * targets + first, row * targets + last))
    return padded_positions(index)


def padded_positions(index: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The scored positions padded to a multiple of PAD_TO (position 0, weight 0), and their 0/1 weights."""
    count = len(index)
    padded = max(PAD_TO, -(-count // PAD_TO) * PAD_TO)
    weights = np.zeros(padded, np.float32)
    weights[:count] = 1.0
    return np.array(index + [0] * (padded - count), np.int32), weights


def tokens_and_offset(item: Any) -> tuple[list[int], int]:
    """A row of mlx-lm's datasets: (tokens, prompt length) with mask_prompt, else the tokens alone."""
    return item if isinstance(item, tuple) else (item, 0)


def token_length(item: Any) -> int:
    return len(tokens_and_offset(item)[0])


def batch_width(lengths: list[int], max_seq_length: int) -> int:
    """Inputs plus the shifted target: one more than the longest row, rounded up to PAD_BATCH_TO."""
    return min(1 + PAD_BATCH_TO * -(-max(lengths) // PAD_BATCH_TO), max_seq_length)


def batch_plan(lengths: list[int], batch_size: int, offset: int = 0, step: int = 1) -> list[list[int]]:
    """Row indices of each batch: rows sorted by token count, cut into consecutive batches (a rank takes every step-th row)."""
    if len(lengths) < batch_size:
        raise ValueError(f"Dataset must have at least batch_size={batch_size} examples but only has {len(lengths)}.")
    if batch_size % step != 0:
        raise ValueError("The batch size must be divisible by the number of workers")
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[i + offset: i + offset + batch_size: step] for i in range(0, len(order) - batch_size + 1, batch_size)]


def planned_batches(dataset: Any, batch_size: int, loop: bool = False, seed: int | None = None,
                    comm_group: Any = None, lengths: list[int] | None = None) -> Iterator[list[int]]:
    """The row indices of each batch in training order: the plan's batches shuffled with mlx-lm's draws."""
    offset, step = (comm_group.rank(), comm_group.size()) if comm_group is not None else (0, 1)
    if lengths is None:
        lengths = [token_length(dataset[i]) for i in range(len(dataset))]
    plan = batch_plan(lengths, batch_size, offset, step)
    if seed is not None:
        np.random.seed(seed)
    while True:
        for i in np.random.permutation(len(plan)):  # the same draws as mlx-lm: a seeded run shuffles batches alike
            yield plan[i]
        if not loop:
            break


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Row indices packed into sequences of at most `capacity` tokens: first fit, longest rows first."""
    bins: list[list[int]] = []
    room = np.zeros(len(lengths), np.int64)  # room left in each bin opened so far (at most one per row)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = min(lengths[i], capacity)
        fits = int(np.argmax(room[:len(bins)] >= n)) if bins else 0
        if not bins or room[fits] < n:  # no open bin has room: open one
            fits = len(bins)
            bins.append([])
            room[fits] = capacity
        bins[fits].append(i)
        room[fits] -= n
    return bins


def packed_batches(dataset: Any, batch_size: int, max_seq_length: int, loop: bool = False, seed: int | None = None,
                   comm_group: Any = None, *, packs: list[list[int]] | None = None) -> Iterator[tuple]:
    """train.packing: several rows per sequence, each attending only to itself (a block-diagonal causal mask).

    RoPE makes attention depend on the distance between positions, not on where a row starts, so a
    packed row computes what it computes alone; its targets are its own tokens (not the next row's
    first, nor mlx-lm's extra padding target past its end). Yields (batch, lengths, index, weights, mask).
    `packs`: pack_rows of the rows' sizes, when the caller has them already.
    """
    import mlx.core as mx

    rows = [tokens_and_offset(dataset[i]) for i in range(len(dataset))]
    sizes = [min(len(tokens), max_seq_length) for tokens, _ in rows]
    packs = packs if packs is not None else pack_rows(sizes, max_seq_length)
    totals = [sum(sizes[i] for i in pack) for pack in packs]
    for batch_packs in planned_batches(packs, batch_size, loop, seed, comm_group, lengths=totals):
        width = batch_width([totals[p] for p in batch_packs], max_seq_length + 1)
        array = np.zeros((len(batch_packs), width), np.int32)
        segment = np.zeros((len(batch_packs), width - 1), np.int32)  # 0: padding
        index: list[int] = []
        for r, p in enumerate(batch_packs):
            start = 0
            for k, i in enumerate(packs[p], 1):
                (tokens, offset), n = rows[i], sizes[i]
                array[r, start:start + n] = tokens[:n]
                segment[r, start:start + n] = k
                index.extend(r * (width - 1) + t for t in range(start + max(offset - 1, 0), start + n - 1))
                start += n
        positions, weights = padded_positions(index)
        causal = np.tril(np.ones((width - 1, width - 1), bool))
        mask = (segment[:, :, None] == segment[:, None, :]) & causal
        pairs = np.array([(0, totals[p]) for p in batch_packs])
        yield mx.array(array), mx.array(pairs), mx.array(positions), mx.array(weights), mx.array(mask[:, None])


def packed_for(train_set: Any, packs: list[list[int]], otherwise: Any) -> Any:
    """An iterate_batches that packs the training rows (into `packs`); validation keeps a row per sequence
    (a small set may not fill a batch of packs, and its loss stays comparable with unpacked runs)."""
    def batches(dataset: Any, *args: Any, **kwargs: Any) -> Iterator[tuple]:
        if dataset is train_set:
            return packed_batches(dataset, *args, packs=packs, **kwargs)
        return otherwise(dataset, *args, **kwargs)

    return batches


class PackedRows:
    """What a packed batch hands the model in place of mlx-lm's KV cache: its mask, and nothing kept.

    mlx-lm's models take no attention mask, but build it with `cache.make_mask` and rotate from
    `cache.offset`; this stand-in answers with the packed rows' block-diagonal mask and offset 0.
    """

    offset = 0

    def __init__(self, mask: Any):
        self.mask = mask

    def make_mask(self, *args: Any, **kwargs: Any) -> Any:
        return self.mask

    def update_and_fetch(self, keys: Any, values: Any) -> tuple[Any, Any]:
        return keys, values


def iterate_batches(dataset: Any, batch_size: int, max_seq_length: int, loop: bool = False, seed: int | None = None,
                    comm_group: Any = None, scored: bool = True) -> Iterator[tuple]:
    """mlx-lm's iterate_batches with length-sorted batches; with `scored`, each batch also carries the positions the loss scores."""
    import mlx.core as mx

    for indices in planned_batches(dataset, batch_size, loop, seed, comm_group):
        rows = [tokens_and_offset(dataset[j]) for j in indices]
        lengths = [min(len(tokens), max_seq_length) for tokens, _ in rows]
        array = np.zeros((len(rows), batch_width(lengths, max_seq_length)), np.int32)
        for j, (tokens, _) in enumerate(rows):
            array[j, :lengths[j]] = tokens[:lengths[j]]
        pairs = np.array([(offset, length) for (_, offset), length in zip(rows, lengths)])
        if scored:
            index, weights = scored_positions(array.shape, pairs)
            yield mx.array(array), mx.array(pairs), mx.array(index), mx.array(weights)
        else:
            yield mx.array(array), mx.array(pairs)


def position_losses(model: Any, inputs: Any, index: Any, targets: Any, mask: Any = None) -> Any:
    """The cross entropy of predicting targets at the flat positions `index` of inputs (rows × width).

    `mask`: packed rows' attention mask (packed_batches); a SUPPORTED model only.
    """
    import mlx.core as mx

    from lorad.cpu_ops import cross_entropy

    if supports(model):
        hidden = model.model(inputs, cache=None if mask is None else [PackedRows(mask)] * len(model.layers))
        hidden = hidden.reshape(-1, hidden.shape[-1])[index]
        logits = model.model.embed_tokens.as_linear(hidden) if model.args.tie_word_embeddings else model.lm_head(hidden)
    else:
        logits = model(inputs)
        logits = logits.reshape(-1, logits.shape[-1])[index]
    return cross_entropy(logits.astype(mx.float32), targets)


def loss(model: Any, batch: Any, lengths: Any, index: Any, weights: Any, mask: Any = None) -> tuple[Any, Any]:
    import mlx.core as mx

    inputs, targets = batch[:, :-1], batch[:, 1:]
    ce = position_losses(model, inputs, index, targets.reshape(-1)[index], mask) * weights
    ntoks = (weights > 0).sum()
    return ce.astype(mx.float32).sum() / ntoks, ntoks
