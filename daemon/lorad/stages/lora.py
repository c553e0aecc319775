"""lora: LoRA, DoRA or full fine-tuning with mlx-lm's trainer, resumable and observable.

mlx-lm's `train()` does the stepping; our TrainingCallback adds what it lacks:
progress in status.json, checkpoints with the optimizer state and iteration
(so a SIGTERM or crash resumes where it stopped), the best adapters by
validation loss (not just the last), and early stopping with patience.

Writes adapters/ as `mlx_lm.lora` does (adapters.safetensors = the best,
adapter_config.json, NNNNNNN_adapters.safetensors), plus adapters/checkpoint/
(resume state) and adapters/metrics.jsonl (every loss reported).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from lorad import completion_loss
from lorad.fsutil import atomic_write_json
from lorad.outbox import read_events
from lorad.stages import Interrupted, StageContext, StageFailed
from lorad.stages.convert import base_path

CHECKPOINT = "checkpoint"
KEEP_SNAPSHOTS = 3  # NNNNNNN_adapters.safetensors files kept (an iters: 10**6, save_every: 1 job must not fill the disk)


class EarlyStop(Exception):
    pass


def load_for_training(base: Path, log: Any, train_dequantized: bool | None = None):
    """Load the base; on a CPU train on a dequantized copy when it fits (QLoRA there is ~20x slower)."""
    import mlx.core as mx
    from mlx_lm.utils import dequantize_model, load

    model, tokenizer, config = load(str(base), return_config=True)
    quantized = "quantization" in config
    if train_dequantized is None:
        on_cpu = mx.default_device() == mx.cpu
        params = sum(v.size for _, v in _flat(model.parameters()))
        fits = params * 4 * 4 < _total_memory()  # fp32 weights + activations and grads, with room to spare
        train_dequantized = quantized and on_cpu and fits
    if quantized and train_dequantized:
        model = dequantize_model(model)
        log.info("base_dequantized_for_training", reason="QLoRA on a CPU is slow; the full base fits in memory")
    if mx.default_device() == mx.cpu and not (quantized and not train_dequantized):
        model.set_dtype(mx.float32)  # BLAS has no fp16/bf16 GEMM: half precision on a CPU is ~10x slower
    return model, tokenizer, config, quantized and not train_dequantized


def _flat(tree: Any) -> list:
    from mlx.utils import tree_flatten

    return tree_flatten(tree)


def _total_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 16 << 30


def apply_adapters(model: Any, train: dict[str, Any]) -> None:
    """Freeze the model and add trainable LoRA/DoRA layers (or unfreeze blocks for full)."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model.freeze()
    num_layers = train["num_layers"]
    if num_layers > len(model.layers):
        raise StageFailed(f"train.num_layers is {num_layers} but the model has {len(model.layers)} layers")
    if num_layers == -1:
        num_layers = len(model.layers)
    if train["method"] == "full":
        for layer in model.layers[-num_layers:]:
            layer.unfreeze()
    else:
        linear_to_lora_layers(model, num_layers, dict(train["lora"]), use_dora=train["method"] == "dora")


OPTIMIZERS = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD", "adafactor": "Adafactor", "muon": "Muon"}


def learning_rate(train: dict[str, Any]) -> Any:
    """The constant learning_rate, or mlx-lm's schedule (warmup, then the named decay) over the optimizer's updates."""
    schedule = train.get("lr_schedule")
    if not schedule:
        return train["learning_rate"]
    from mlx_lm.tuner.utils import build_schedule

    lr, warmup = train["learning_rate"], schedule.get("warmup", 0)
    after = max(1, train["iters"] // train["grad_accumulation_steps"] - warmup)
    defaults = {"cosine_decay": [lr, after, 0.0], "linear_schedule": [lr, 0.0, after]}
    config = {"name": schedule["name"], "arguments": schedule.get("arguments") or defaults[schedule["name"]],
              "warmup": warmup, "warmup_init": schedule.get("warmup_init", 0.0)}
    return build_schedule(config)


def build_optimizer(train: dict[str, Any]) -> Any:
    import mlx.optimizers as optim

    cls = getattr(optim, OPTIMIZERS[train["optimizer"]])
    try:
        return cls(learning_rate=learning_rate(train), **train.get("optimizer_config", {}))
    except TypeError as e:
        raise StageFailed(f"train.optimizer_config does not fit {train['optimizer']}: {e}") from None


def load_init_adapters(model: Any, ref: str) -> Path:
    """train.init_adapters: earlier adapters as the starting point; every tensor must fit this model's adapters."""
    import mlx.core as mx

    from lorad.stages.prepare import readable_path

    path = readable_path(ref[len("path:"):])
    if path.is_dir():
        path = path / "adapters.safetensors"
    if not path.is_file():
        raise StageFailed(f"train.init_adapters: no adapters at {path}")
    weights = mx.load(str(path))
    own = dict(_flat(model.trainable_parameters()))
    wrong = [k for k, v in weights.items() if k not in own or own[k].shape != v.shape]
    if wrong or not weights:
        raise StageFailed(f"train.init_adapters {path}: {len(wrong)} of {len(weights)} tensors do not fit this model's "
                          f"adapters (e.g. {wrong[:2]}); use the same method, rank, keys and num_layers as the job that made them")
    model.load_weights(list(weights.items()), strict=False)
    return path


def adapter_config(train: dict[str, Any], base: Path) -> dict[str, Any]:
    """adapter_config.json in mlx-lm's shape, so mlx_lm.fuse and mlx_lm.load(adapter_path=...) accept it."""
    num_layers = train["num_layers"]
    return {
        "model": str(base),
        "fine_tune_type": train["method"],
        "num_layers": num_layers,
        "lora_parameters": dict(train["lora"]),
        "batch_size": train["batch_size"],
        "iters": train["iters"],
        "learning_rate": train["learning_rate"],
        "max_seq_length": train["max_seq_length"],
        "mask_prompt": train["mask_prompt"],
    }


def plan_packing(model: Any, train_set: Any, train: dict[str, Any]) -> list[list[int]]:
    """The training rows' packs; train.packing needs a model whose mask can be handed in, and enough packs for a batch."""
    if not completion_loss.supports(model):
        raise StageFailed(f"train.packing works for {', '.join(sorted(completion_loss.SUPPORTED))} models; this one is "
                          f"{getattr(model, 'model_type', 'unknown')}: turn packing off")
    sizes = [min(completion_loss.token_length(train_set[i]), train["max_seq_length"]) for i in range(len(train_set))]
    packs = completion_loss.pack_rows(sizes, train["max_seq_length"])
    if len(packs) < train["batch_size"]:
        raise StageFailed(f"train.packing: the {len(sizes)} training rows fill {len(packs)} sequences of max_seq_length "
                          f"{train['max_seq_length']} tokens, fewer than batch_size {train['batch_size']}; lower "
                          f"batch_size or turn packing off")
    return packs


def reported_config(spec: dict[str, Any]) -> dict[str, Any]:
    """What report_to shows as the run's settings: the spec's model, data and train sections (no paths beyond them)."""
    return {"name": spec["name"], "model": spec["model"], "data": spec["data"], "train": spec["train"]}


def is_text_data(data_dir: Path) -> bool:
    """Plain-text rows have no prompt to mask: every token is trained on (mlx-lm refuses mask_prompt there)."""
    from lorad.stages.prepare import prepared_format

    try:
        with open(data_dir / "train.jsonl", encoding="utf-8") as f:
            first = json.loads(f.readline() or "{}")
    except (OSError, ValueError):
        return False
    return isinstance(first, dict) and "text" in first and prepared_format(first) == "text"


def load_datasets(data_dir: Path, tokenizer: Any, mask_prompt: bool, max_seq_length: int | None = None, log: Any = None):
    """mlx-lm's datasets, without the rows whose completion `max_seq_length` cuts away entirely.

    Such a row has no token to score: a batch of them divides a zero loss by zero tokens (NaN), and
    one NaN poisons every weight after it.
    """
    from mlx_lm.tuner.datasets import CacheDataset, create_dataset

    cfg = SimpleNamespace(mask_prompt=mask_prompt)

    def read_split(name: str) -> Any:  # mlx-lm's datasets; an empty split file (test_fraction: 0) is no split
        path = data_dir / f"{name}.jsonl"
        rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
        return create_dataset(rows, tokenizer, cfg) if rows else []

    try:
        train, valid = read_split("train"), read_split("valid")
    except ValueError as e:
        raise StageFailed(f"cannot read {data_dir}: {e}") from None
    if not train:
        raise StageFailed(f"{data_dir}/train.jsonl is empty or missing: run the prepare stage")
    sets = []
    for split, data in (("train", train), ("valid", valid)):
        cached = CacheDataset(data) if data else None
        if cached is not None and max_seq_length:
            cached, dropped = _scored_rows(cached, max_seq_length)
            if dropped and log is not None:
                log.warning("rows_without_completion_dropped", split=split, dropped=dropped, kept=len(cached),
                            max_seq_length=max_seq_length,
                            hint="their prompt fills train.max_seq_length; raise it to train on them")
            if split == "train" and not len(cached):
                raise StageFailed(f"train.max_seq_length is {max_seq_length} tokens, and every training row's prompt "
                                  f"is at least that long: no completion token is left to learn from. Raise "
                                  "train.max_seq_length (see the tokens_max of training_setup in events.jsonl).")
        sets.append(cached if cached is None or len(cached) else None)
    return sets[0], sets[1]


def _scored_rows(dataset: Any, max_seq_length: int) -> tuple[Any, int]:
    """The rows with at least one completion token inside the first max_seq_length tokens."""
    from mlx_lm.tuner.datasets import CacheDataset

    class Subset(CacheDataset):
        def __init__(self, parent: Any, keep: list[int]):
            self._parent, self._keep = parent, keep

        def itemlen(self, idx: int) -> int:
            return self._parent.itemlen(self._keep[idx])

        def __getitem__(self, idx: int) -> Any:
            return self._parent[self._keep[idx]]

        def __len__(self) -> int:
            return len(self._keep)

    keep = []
    for i in range(len(dataset)):
        tokens, offset = completion_loss.tokens_and_offset(dataset[i])
        if offset < min(len(tokens), max_seq_length):
            keep.append(i)
    if len(keep) == len(dataset):
        return dataset, 0
    return Subset(dataset, keep), len(dataset) - len(keep)


def optimizer_fingerprint(optimizer: Any) -> dict[str, float]:
    """Step count and a checksum of the optimizer's moments: lets a resume prove it continued, not restarted."""
    import mlx.core as mx

    flat = _flat(optimizer.state)
    total = sum(float(mx.sum(mx.abs(v.astype(mx.float32)))) for k, v in flat if k.endswith((".m", ".v")) or k in ("m", "v"))
    step = next((int(v.item()) for k, v in flat if k == "step"), 0)
    return {"optimizer_step": step, "optimizer_checksum": round(total, 6)}


def save_checkpoint(adapter_dir: Path, model: Any, optimizer: Any, state: dict[str, Any]) -> None:
    """adapters + optimizer state + counters, written to a temp folder and renamed into place."""
    import mlx.core as mx

    tmp = adapter_dir / f".{CHECKPOINT}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    mx.save_safetensors(str(tmp / "adapters.safetensors"), dict(_flat(model.trainable_parameters())))
    mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(_flat(optimizer.state)))
    (tmp / "state.json").write_text(json.dumps(state))
    final = adapter_dir / CHECKPOINT
    old = adapter_dir / f".{CHECKPOINT}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(adapter_dir: Path, model: Any, optimizer: Any) -> dict[str, Any] | None:
    import mlx.core as mx
    from mlx.utils import tree_unflatten

    ckpt = adapter_dir / CHECKPOINT
    if not (ckpt / "state.json").exists():
        return None
    model.load_weights(str(ckpt / "adapters.safetensors"), strict=False)
    optimizer.init(model.trainable_parameters())
    optimizer.state = tree_unflatten(list(mx.load(str(ckpt / "optimizer.safetensors")).items()))
    return json.loads((ckpt / "state.json").read_text())


class FirstOnly:
    """The validation set as mlx-lm's train() sees it: there for its first validation (the starting
    weights), empty once that is reported, so its own pre-step validations (at eval_every − 1 and
    before the last step) do not run; Tracker validates after the steps instead."""

    def __init__(self, dataset: Any):
        self.dataset, self.used = dataset, False

    def __len__(self) -> int:
        return 0 if self.used else len(self.dataset)

    def __getitem__(self, idx: int) -> Any:
        return self.dataset[idx]


class Tracker:
    """The TrainingCallback: progress, checkpoints, best adapters, early stopping, stop requests."""

    def __init__(self, ctx: StageContext, model: Any, optimizer: Any, adapter_dir: Path, state: dict[str, Any],
                 world_size: int = 1, main: bool = True):
        self.ctx, self.model, self.optimizer, self.adapter_dir = ctx, model, optimizer, adapter_dir
        self.train = ctx.spec["train"]
        self.state = state  # iteration, best_val, best_iteration, evals_since_best
        self.offset = state["iteration"]
        self.world_size, self.main = world_size, main  # only rank 0 writes files
        self.t0 = time.monotonic()
        self.metrics = open(adapter_dir / "metrics.jsonl", "a") if main else None
        self.validate: Callable[[], float] | None = None  # set by run(): validation on the current weights
        self.validation_set: FirstOnly | None = None
        self.reporters: list[Any] = []  # train.report_to (rank 0 only)

    def _due(self, it: int, every: int) -> bool:
        return it % every == 0 or it == self.train["iters"]

    def _record(self, row: dict[str, Any]) -> None:
        if self.metrics:
            self.metrics.write(json.dumps(row) + "\n")
            self.metrics.flush()
        for reporter in self.reporters:
            reporter.log_metrics({k: v for k, v in row.items() if k != "iteration"}, step=row["iteration"])

    def _stop_requested(self) -> bool:
        """Every rank must stop at the same step, or the others hang in the next all-reduce."""
        import mlx.core as mx

        stop = self.ctx.should_stop()
        if self.world_size > 1:
            stop = mx.distributed.all_sum(mx.array(int(stop)), stream=mx.cpu).item() > 0
        return stop

    def on_train_loss_report(self, info: dict[str, Any]) -> None:
        it = self.offset + info["iteration"]
        if not math.isfinite(float(info["train_loss"])):
            raise StageFailed(
                f"the training loss became {float(info['train_loss'])} at iteration {it}; the weights after it are "
                f"garbage, so training stopped (the last good checkpoint is kept). Likely causes: learning_rate "
                f"{self.train['learning_rate']} is too high for this model, or rows with nothing to score "
                f"(see rows_without_completion_dropped in events.jsonl)")
        self.state["iteration"] = it
        iters = self.train["iters"]
        done_here = info["iteration"]
        elapsed = time.monotonic() - self.t0
        eta = elapsed / done_here * (iters - it) if done_here else None
        progress = {
            "iteration": it, "iters": iters, "train_loss": round(float(info["train_loss"]), 5),
            "val_loss": self.state.get("last_val"), "iterations_per_second": round(info["iterations_per_second"], 4),
            "tokens_per_second": round(info["tokens_per_second"], 1), "eta_seconds": round(eta, 1) if eta is not None else None,
            "peak_memory_gb": round(info["peak_memory"], 3), "learning_rate": float(info["learning_rate"]),
        }
        if self.world_size > 1:
            progress.update(world_size=self.world_size,
                            tokens_per_second_per_rank=round(info["tokens_per_second"] / self.world_size, 1))
        self._record({"iteration": it, "train_loss": progress["train_loss"], "tokens_per_second": progress["tokens_per_second"],
                      "step_seconds": round(1 / info["iterations_per_second"], 4),  # one step a report
                      "learning_rate": progress["learning_rate"], "peak_memory_mb": round(1000 * info["peak_memory"], 1)})
        self.ctx.report_progress(progress)
        if self.validate is not None and self._due(it, self.train["eval_every"]):
            # after the step, so validations land on the checkpoints' iterations (mlx-lm's own run before
            # step eval_every, on the weights of step eval_every − 1)
            self.on_val_loss_report({"iteration": info["iteration"], "val_loss": self.validate()})
        if it % self.train["save_every"] == 0:
            self.save(it)
        if it % self.train["grad_accumulation_steps"] == 0 and self._stop_requested():  # only between updates
            self.save(it)
            raise Interrupted(f"stopped at iteration {it}; checkpoint saved")

    def on_val_loss_report(self, info: dict[str, Any]) -> None:
        import mlx.core as mx

        if self.validation_set is not None:
            self.validation_set.used = True  # mlx-lm's first validation is done: the later ones are Tracker's
        it = self.offset + info["iteration"]
        val = float(info["val_loss"])
        if not math.isfinite(val):
            raise StageFailed(f"the validation loss became {val} at iteration {it}; training stopped")
        self.state["last_val"] = round(val, 5)
        self._record({"iteration": it, "val_loss": round(val, 5)})
        if self.offset and info["iteration"] == 0:
            # mlx-lm validates at the first step of every train() call: after a resume that is the
            # checkpoint's own weights again, not a new evaluation, so it does not count toward patience
            self.ctx.log.info("val_loss", iteration=it, val_loss=round(val, 5), resumed=True)
            return
        best = self.state.get("best_val")
        min_delta = self.train["early_stopping"].get("min_delta", 0.0)
        if best is None or val < best - min_delta:
            self.state.update(best_val=val, best_iteration=it, evals_since_best=0)
            if self.main:
                mx.save_safetensors(str(self.adapter_dir / "best.safetensors"), dict(_flat(self.model.trainable_parameters())))
            self.ctx.log.info("val_loss", iteration=it, val_loss=round(val, 5), best=True)
        else:
            self.state["evals_since_best"] = self.state.get("evals_since_best", 0) + 1
            self.ctx.log.info("val_loss", iteration=it, val_loss=round(val, 5), best=False,
                              evals_since_best=self.state["evals_since_best"])
            if self.state["evals_since_best"] >= self.train["early_stopping"]["patience"]:
                raise EarlyStop(it)

    def save(self, it: int) -> None:
        import mlx.core as mx

        if not self.main:
            return
        save_checkpoint(self.adapter_dir, self.model, self.optimizer, dict(self.state, iteration=it))
        mx.save_safetensors(str(self.adapter_dir / f"{it:07d}_adapters.safetensors"), dict(_flat(self.model.trainable_parameters())))
        for old in sorted(self.adapter_dir.glob("[0-9]" * 7 + "_adapters.safetensors"))[:-KEEP_SNAPSHOTS]:
            old.unlink(missing_ok=True)
        self.ctx.log.info("checkpoint_saved", iteration=it, **optimizer_fingerprint(self.optimizer))


def run(ctx: StageContext) -> dict[str, str]:
    dist = ctx.spec["train"].get("distributed")
    if dist and "MLX_RANK" not in os.environ:
        return run_distributed(ctx, dist)
    return train_here(ctx, dist)


def train_here(ctx: StageContext, dist: dict[str, Any] | None) -> dict[str, str]:
    """Train in this process: alone (dist None), or as one rank under mlx.launch."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm.tuner.trainer import TrainingArgs, evaluate, train

    from lorad import cpu_ops

    spec_train = ctx.spec["train"]
    watchdog = None
    if dist:  # a rank under mlx.launch: a vanished host would hang it in the ring's connect or all_sum
        from lorad.distributed import StallWatchdog, ring_address

        watchdog = StallWatchdog(dist["step_timeout"], ctx.log).start()
    world = mx.distributed.init() if dist else None
    world_size, main = (world.size(), world.rank() == 0) if world else (1, True)
    if world is not None:
        ctx.log.info("rank_started", rank=world.rank(), world_size=world_size, host=socket.gethostname(),
                     ring_address=ring_address(world.rank()))
    base = base_path(ctx)
    adapter_dir = ctx.path("adapters")
    adapter_dir.mkdir(exist_ok=True)
    if (adapter_dir / "adapters.safetensors").exists() and (adapter_dir / "done.json").exists():
        ctx.log.info("lora_already_done")
        return {"adapters": "adapters"}
    model, tokenizer, config, qlora = load_for_training(base, ctx.log)
    if watchdog is not None:
        watchdog.beat()
    seed = spec_train.get("seed", ctx.spec["data"].get("seed", 0))
    mx.random.seed(seed)  # the adapters' initial weights
    apply_adapters(model, spec_train)
    if spec_train.get("init_adapters"):
        ctx.log.info("init_adapters_loaded", path=str(load_init_adapters(model, spec_train["init_adapters"])))
    trainable = sum(v.size for _, v in _flat(model.trainable_parameters()))
    total = sum(v.size for _, v in _flat(model.parameters()))
    mask_prompt = spec_train["mask_prompt"] and not is_text_data(ctx.path("data"))
    train_set, valid_set = load_datasets(ctx.path("data"), tokenizer, mask_prompt, spec_train["max_seq_length"], ctx.log)
    lengths = sorted(len(train_set[i][0]) for i in range(min(len(train_set), 2000)))
    packing = spec_train["packing"]
    packs = plan_packing(model, train_set, spec_train) if packing else []
    sparse_head = completion_loss.applies(model, mask_prompt) or packing
    ctx.log.info("training_setup", method=spec_train["method"], qlora=qlora, trainable_params=trainable, world_size=world_size,
                 loss="completion positions only" if sparse_head else "mlx-lm default", packing=packing,
                 vectorized_cpu_ops=cpu_ops.applies(model),
                 total_params=total, train_rows=len(train_set), valid_rows=len(valid_set) if valid_set else 0,
                 tokens_median=lengths[len(lengths) // 2], tokens_max=lengths[-1],
                 truncated_rows=sum(n > spec_train["max_seq_length"] for n in lengths))
    if main:
        (adapter_dir / "adapter_config.json").write_text(json.dumps(adapter_config(spec_train, base), indent=2))

    optimizer = build_optimizer(spec_train)
    state = load_checkpoint(adapter_dir, model, optimizer)
    if state:
        ctx.log.info("training_resumed", iteration=state["iteration"], best_val=state.get("best_val"),
                     **optimizer_fingerprint(optimizer))
    else:
        state = {"iteration": 0, "best_val": None, "best_iteration": None, "evals_since_best": 0}
        if main:
            (adapter_dir / "metrics.jsonl").unlink(missing_ok=True)
    mx.random.seed(seed + state["iteration"])  # batch order and dropout: a resume does not replay the same batches
    np.random.seed(seed + state["iteration"])
    remaining = spec_train["iters"] - state["iteration"]
    tracker = Tracker(ctx, model, optimizer, adapter_dir, state, world_size, main)
    if main and spec_train["report_to"] and remaining > 0:
        from lorad.reporting import open_reporters

        tracker.reporters = open_reporters(spec_train["report_to"], spec_train["project_name"], ctx.work_dir.name,
                                           ctx.spec["name"], adapter_dir, reported_config(ctx.spec), ctx.log)
    stopped_early = False
    if remaining > 0:
        args = TrainingArgs(
            batch_size=spec_train["batch_size"], iters=remaining,
            val_batches=25, steps_per_report=1, steps_per_eval=10**9,  # mlx-lm validates the starting weights; Tracker the rest
            steps_per_save=10**9, max_seq_length=spec_train["max_seq_length"],
            adapter_file=str(adapter_dir / ".last.safetensors"),
            grad_accumulation_steps=spec_train["grad_accumulation_steps"], grad_checkpoint=spec_train["grad_checkpoint"],
        )
        if valid_set is not None and len(valid_set) < args.batch_size:
            valid_set = None
        try:
            mx.reset_peak_memory()  # the reported peak is training's, not the loading's (or an earlier run's)
            batches: Callable[..., Any] = partial(completion_loss.iterate_batches, scored=sparse_head)
            if packing:
                batches = completion_loss.packed_for(train_set, packs, otherwise=batches)
            if watchdog is not None:
                batches = watchdog.wrap(batches)
                watchdog.beat()  # loading is done; each batch fetched from here beats
            loss_fns: dict[str, Any] = {"iterate_batches": batches, **({"loss": completion_loss.loss} if sparse_head else {})}
            if valid_set is not None:
                validation = FirstOnly(valid_set)
                valid_set = validation

                def validate() -> float:
                    value = evaluate(model=model, dataset=validation.dataset, batch_size=args.batch_size,
                                     num_batches=args.val_batches, max_seq_length=args.max_seq_length, **loss_fns)
                    model.train()
                    return value

                tracker.validate, tracker.validation_set = validate, validation
            with cpu_ops.vectorized(model):
                train(model=model, optimizer=optimizer, train_dataset=train_set, val_dataset=valid_set,
                      args=args, training_callback=tracker, **loss_fns)
        except EarlyStop as e:
            stopped_early = True
            ctx.log.info("early_stopping", iteration=int(str(e.args[0])), best_iteration=state["best_iteration"],
                         best_val=state["best_val"], patience=spec_train["early_stopping"]["patience"])
        finally:
            for reporter in tracker.reporters:
                reporter.finish()
    summary = {"iterations": state["iteration"], "best_iteration": state["best_iteration"], "best_val_loss": state["best_val"],
               "stopped_early": stopped_early, "qlora": qlora, "world_size": world_size}
    if not main:
        ctx.log.info("training_finished", **summary)
        return {}
    final = dict(_flat(model.trainable_parameters()))
    best = adapter_dir / "best.safetensors"
    if best.exists():
        shutil.copyfile(best, adapter_dir / ".adapters.tmp")
        os.replace(adapter_dir / ".adapters.tmp", adapter_dir / "adapters.safetensors")
    else:
        mx.save_safetensors(str(adapter_dir / "adapters.safetensors"), final)
    (adapter_dir / ".last.safetensors").unlink(missing_ok=True)
    atomic_write_json(adapter_dir / "done.json", summary)
    ctx.report_progress({"iteration": state["iteration"], "iters": spec_train["iters"], "final": True})
    ctx.log.info("training_finished", **summary)
    return {"adapters": "adapters"}


def run_distributed(ctx: StageContext, dist: dict[str, Any]) -> dict[str, str]:
    """Run this stage once per host under mlx.launch and wait; rank 0 (this machine) writes the outputs.

    Each attempt trains on the listed hosts that answer now, if there are min_hosts of them; a
    host lost before or during training is a HostLost error, which the daemon retries (resuming
    from rank 0's checkpoint), so a host that comes back joins the next attempt."""
    import subprocess

    from lorad import distributed
    from lorad.policy import PolicyError, from_env

    hosts, backend = dist["hosts"], dist["backend"]
    min_hosts = dist.get("min_hosts", len(hosts))
    adapter_dir = ctx.path("adapters")
    adapter_dir.mkdir(exist_ok=True)
    policy = from_env()
    try:
        for host in hosts:
            if policy is not None:
                policy.check_train_host(host)
    except PolicyError as e:
        raise StageFailed(str(e)) from None
    try:
        answering, lost = distributed.probe_hosts(hosts)
        use = distributed.choose_hosts(hosts, answering, ctx.spec["train"]["batch_size"], min_hosts)
        if lost:
            ctx.log.warning("hosts_missing", missing=lost, training_on=use, min_hosts=min_hosts)
        if len(use) == 1:  # the others are lost: no ring to build, train here as one rank
            ctx.log.info("distributed_launch", world_size=1, hosts=use, backend="none: one host, trained in this process")
            return train_here(ctx, None)
        hostfile, ranks = distributed.write_hostfile(ctx.work_dir, use, backend, distributed.forwarded_env())
        distributed.copy_to_hosts(use, [ctx.path("data"), base_path(ctx), ctx.path("spec.yaml"), adapter_dir])
        cmd = distributed.launch_command(ctx.work_dir, ctx.cache_dir, hostfile, backend, len(use))
        bin_dir = distributed.ssh_wrapper(ctx.cache_dir / "bin")
    except distributed.HostUnreachable as e:
        raise HostLost(f"{e}; {_checkpoint_note(ctx)}") from None
    except distributed.HostError as e:
        raise StageFailed(str(e)) from None
    ctx.log.info("distributed_launch", world_size=len(use), hosts=use, backend=backend, hostfile="hostfile.json",
                 ranks=ranks)
    launch_log = ctx.path("logs", "lora.launch.log")
    launch_log.parent.mkdir(exist_ok=True)
    logs = [launch_log, *_rank_logs(ctx, len(use))]
    start = [path.stat().st_size if path.exists() else 0 for path in logs]  # this attempt's part begins here
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    with open(launch_log, "ab") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env)
        while proc.poll() is None:  # SIGTERM reaches the local ranks too (one process group): they checkpoint
            time.sleep(0.2)
    distributed.fetch_rank_logs(use, ctx.work_dir)
    rank_events = [read_events(path, offset) for path, offset in zip(logs[1:], start[1:])]
    _log_rank_throughput(ctx, rank_events)
    if proc.returncode == 0 and (adapter_dir / "done.json").exists():
        return {"adapters": "adapters"}
    if ctx.should_stop():
        raise Interrupted("distributed training stopped; checkpoint saved by rank 0")
    with open(launch_log, "rb") as f:
        f.seek(start[0])
        tail = f.read().decode(errors="replace")
    lost_host = _lost_host(ctx, use, distributed.ranks_ended(tail), rank_events)
    if lost_host:
        raise HostLost(f"{lost_host}; {_checkpoint_note(ctx)}")
    raise StageFailed(f"distributed training failed (mlx.launch exit {proc.returncode}); see logs/lora.launch.log:\n{tail[-1500:]}")


class HostLost(StageFailed):
    """A training host did not answer, or stopped answering mid-training: a later attempt may succeed."""

    retryable = True


def _checkpoint_note(ctx: StageContext) -> str:
    state = ctx.path("adapters", CHECKPOINT, "state.json")
    try:
        iteration = json.loads(state.read_text())["iteration"]
    except (OSError, ValueError, KeyError):
        return "no checkpoint yet: the next attempt starts training over"
    return f"the checkpoint at iteration {iteration} is kept and the next attempt resumes from it"


PEER_LOST = ("connection to a peer was lost", "closed by the peer", "Too many send/recv errors")  # the ring's words


def _rank_logs(ctx: StageContext, world_size: int) -> list[Path]:
    """Each rank's event log: rank 0 writes the job's own, the others logs/lora.rank<N>.jsonl."""
    return [ctx.path("events.jsonl") if rank == 0 else ctx.path("logs", f"lora.rank{rank}.jsonl") for rank in range(world_size)]


def _lost_host(ctx: StageContext, hosts: list[str], ended: dict[int, str], rank_events: list[list[dict[str, Any]]]) -> str | None:
    """Why training stopped, naming the host, when a host was lost (not a bug in training); else None.

    Lost: a host no longer answers SSH; or a remote rank ended by a signal or SSH's 255 while the
    others failed only because their peer vanished (the ring says so) or their watchdog saw no step.
    rank_events: each rank's events from this attempt."""
    from lorad import distributed

    failures, stalled = {}, []
    for rank, events in enumerate(rank_events):
        for e in events:
            if e.get("event") == "distributed_stalled":
                stalled.append(rank)
            elif e.get("event") == "stage_failed" and e.get("error_type") != "HostLost":
                failures[rank] = str(e.get("message", ""))
    if any(not any(words in message for words in PEER_LOST) for message in failures.values()):
        return None  # a rank failed for its own reason (a bug, bad data), said in its log
    try:
        _, unreachable = distributed.probe_hosts(hosts, timeout=5)
    except distributed.HostError:
        unreachable = {}
    if unreachable:
        names = ", ".join(f"{h} (rank {hosts.index(h)})" for h in unreachable)
        return f"training host {names} stopped answering during training: {next(iter(unreachable.values()))}"
    gone = {rank: why for rank, why in ended.items() if rank and why != "exited with code 0"}
    if gone:
        rank, why = next(iter(gone.items()))
        return f"training host {hosts[rank]} (rank {rank}) was lost during training: its rank {why}"
    if stalled or failures:
        return (f"training stopped on rank {(stalled or list(failures))[0]}: "
                + (f"no training step for {ctx.spec['train']['distributed']['step_timeout']} s" if stalled
                   else "the connection to a peer was lost")
                + " (a host or the link between them stopped answering)")
    return None


def _log_rank_throughput(ctx: StageContext, rank_events: list[list[dict[str, Any]]]) -> None:
    """Mean iterations/s and tokens/s each rank measured in this attempt (rank 0 from events.jsonl)."""
    import statistics

    world_size = len(rank_events)
    per_rank = {}
    for rank, events in enumerate(rank_events):
        rows = [e for e in events if e.get("event") == "progress" and e.get("stage") == "lora"
                and e.get("iterations_per_second")][1:]
        if rows:
            per_rank[rank] = {"iterations_per_second": round(statistics.fmean(r["iterations_per_second"] for r in rows), 4),
                              "tokens_per_second": round(statistics.fmean(r["tokens_per_second"] for r in rows) / world_size, 1)}
    ctx.log.info("rank_throughput", world_size=world_size, ranks=per_rank)
