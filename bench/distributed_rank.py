"""One rank of bench/distributed.py: LoRA steps as mlx-lm's trainer takes them, timed in two parts.

compute: forward + backward of this rank's share of the batch (mx.eval of the gradients);
wait: a one-number all_sum, so that the ranks start the next part together;
all_sum: `mlx.nn.average_gradients`, the call mlx-lm's trainer makes on more than one rank.
Run alone it is the 1-rank baseline; under mlx.launch, one rank per host.

    python bench/distributed_rank.py BASE DATA_DIR OUT.json --batch 4 --steps 8
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "daemon"))

from lorad import accel  # noqa: E402

accel.load_openblas()

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm.tuner.trainer import default_loss, iterate_batches  # noqa: E402

from lorad.outbox import event_logger  # noqa: E402
from lorad.spec import apply_defaults  # noqa: E402
from lorad.stages.lora import apply_adapters, load_datasets, load_for_training  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("base", type=Path)
    p.add_argument("data", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--batch", type=int, default=4, help="the global batch (split across ranks)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args()
    world = mx.distributed.init()
    log = event_logger(args.out.parent, f"rank{world.rank()}.jsonl", job_id="bench", stage="lora")
    train = apply_defaults({"version": 1, "name": "b", "model": {"source": "demo"}, "data": {"source": "builtin:x"},
                            "train": {"batch_size": args.batch, "num_layers": 8, "max_seq_length": 256}})["train"]
    model, tokenizer, _, _ = load_for_training(args.base, log)
    apply_adapters(model, train)
    train_set, _ = load_datasets(args.data, tokenizer, True, train["max_seq_length"], log)
    optimizer = optim.Adam(learning_rate=1e-5)
    step = nn.value_and_grad(model, default_loss)
    batches = iterate_batches(train_set, args.batch, train["max_seq_length"], loop=True, seed=0,
                              comm_group=world if world.size() > 1 else None)
    rows = []
    for i, (batch, lengths) in zip(range(args.warmup + args.steps), batches):
        t0 = time.perf_counter()
        (loss, ntoks), grads = step(model, batch, lengths)
        mx.eval(loss, grads)
        t1 = time.perf_counter()
        mx.eval(mx.distributed.all_sum(mx.array(1.0)))  # a barrier: the all_sum below then times the transfer,
        tb = time.perf_counter()  # not the wait for a slower rank
        grads = nn.average_gradients(grads)
        mx.eval(grads)
        t2 = time.perf_counter()
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)
        if i >= args.warmup:
            rows.append({"compute_s": t1 - t0, "wait_s": tb - t1, "all_sum_s": t2 - tb, "tokens": int(ntoks.item())})
    grad_bytes = sum(g.nbytes for _, g in tree_flatten(grads))
    if world.rank() == 0:
        args.out.write_text(json.dumps({"world_size": world.size(), "grad_bytes": grad_bytes,
                                        "grad_params": sum(g.size for _, g in tree_flatten(grads)), "steps": rows}))


if __name__ == "__main__":
    main()
