"""The trainer's knobs, each shown to change training the way it says (real MLX, tiny models)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tinymodel
from lorad.spec import check_bytes
from test_stages import make_spec, run_stage, write_rows

WORDS = ["city", "price", "name", "year"]


def rows(n: int = 24) -> list[dict]:
    return [{"prompt": f"show the {WORDS[i % 4]} of {i}", "completion": f"select {WORDS[i % 4]} from table;"} for i in range(n)]


def train(tmp_path: Path, name: str, data_rows: list[dict] | None = None, stop=lambda: False,
          model: dict | None = None, valid_rows: list[dict] | None = None, **train_args) -> Path:
    """Run prepare → convert → lora on a tiny model (made once per test) and return the job folder."""
    tiny = tmp_path / "tiny"
    if not tiny.exists():
        tinymodel.make_tiny_model(tiny, **(model or {}))
    data = tmp_path / "rows"
    if not data.exists():  # train.jsonl (and valid.jsonl): a folder's files are kept as the splits
        write_rows(data / "train.jsonl", data_rows or rows())
        write_rows(data / "valid.jsonl", valid_rows or rows(8))
    args = {"iters": 8, "batch_size": 2, "learning_rate": 1e-3, "eval_every": 1000, "save_every": 1000, "num_layers": 2,
            "max_seq_length": 64, **train_args}
    spec = make_spec(f"path:{tiny}", f"path:{data}", **args)
    spec["data"]["test_fraction"] = 0.0
    job = tmp_path / name
    for stage in ("prepare", "convert", "lora"):
        run_stage(stage, job, tmp_path / "cache", spec, stop=stop if stage == "lora" else (lambda: False))
    return job


def metrics(job: Path) -> list[dict]:
    return [json.loads(x) for x in (job / "adapters" / "metrics.jsonl").read_text().splitlines()]


def weights(path: Path) -> dict:
    import mlx.core as mx

    return mx.load(str(path))


def test_warmup_then_cosine_decay_sets_each_steps_learning_rate(tmp_path):
    job = train(tmp_path, "warm", iters=12, lr_schedule={"name": "cosine_decay", "warmup": 4})
    lrs = [m["learning_rate"] for m in metrics(job) if "learning_rate" in m]
    assert len(lrs) == 12, lrs
    # mlx-lm's warmup (build_schedule): updates 1–4 at 0, 1/4, 2/4, 3/4 of the peak, the peak at 5 and 6, then the cosine
    assert lrs[:6] == pytest.approx([0.0, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3], rel=1e-5, abs=1e-12)
    assert all(a > b for a, b in zip(lrs[5:], lrs[6:])) and lrs[-1] < 0.2 * 1e-3


def test_a_resumed_run_continues_the_schedule_where_it_stopped(tmp_path):
    def stop_after_five() -> bool:  # asked once iteration 5 is recorded
        path = tmp_path / "job/adapters/metrics.jsonl"
        return path.exists() and any(m.get("iteration", 0) >= 5 for m in metrics(tmp_path / "job"))

    from lorad.stages import Interrupted

    schedule = {"name": "linear_schedule", "warmup": 2}
    with pytest.raises(Interrupted):
        train(tmp_path, "job", iters=10, save_every=2, grad_accumulation_steps=2, lr_schedule=schedule, stop=stop_after_five)
    stopped = metrics(tmp_path / "job")
    assert stopped[-1]["iteration"] == 6  # the stop waited for the end of an accumulation (5 → 6)
    job = train(tmp_path, "job", iters=10, save_every=2, grad_accumulation_steps=2, lr_schedule=schedule)
    whole = train(tmp_path, "whole", iters=10, save_every=2, grad_accumulation_steps=2, lr_schedule=schedule)
    resumed = [m["learning_rate"] for m in metrics(job) if "learning_rate" in m]
    assert [m["iteration"] for m in metrics(job) if "learning_rate" in m] == list(range(1, 11))
    assert resumed == pytest.approx([m["learning_rate"] for m in metrics(whole) if "learning_rate" in m], rel=1e-6)


def initial_adapters(tiny: Path, seed: int) -> dict:
    """The adapters a job with this seed starts from (the stage seeds MLX before adding them)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from lorad.spec import apply_defaults
    from lorad.stages.lora import apply_adapters, load_for_training

    model, *_ = load_for_training(tiny, None)
    mx.random.seed(seed)
    apply_adapters(model, apply_defaults(make_spec("x", "x", num_layers=2))["train"])
    return dict(tree_flatten(model.trainable_parameters()))


def test_two_batches_of_two_accumulated_match_one_batch_of_four(tmp_path):
    """The same 4 rows (same scored-token count in each half): 3 updates of batch 4 = 3 updates of 2 × 2."""
    four = [{"prompt": f"show the {w} of 7", "completion": f"select {w} from table;"} for w in WORDS]
    from mlx_lm.utils import load_tokenizer

    tinymodel.make_tiny_model(tmp_path / "tiny")
    tok = load_tokenizer(tmp_path / "tiny")
    assert len({len(tok.encode(r["completion"])) for r in four}) == 1
    # SGD: the update is linear in the gradient, so equal gradients mean equal weights (Adam's first steps
    # divide by |g| and turn float-summation noise in near-zero gradients into ±lr)
    whole = train(tmp_path, "b4", four, batch_size=4, iters=3, save_every=3, optimizer="sgd", learning_rate=0.5)
    accumulated = train(tmp_path, "b2x2", four, batch_size=2, iters=6, save_every=6, grad_accumulation_steps=2,
                        optimizer="sgd", learning_rate=0.5)
    a, b = weights(whole / "adapters/checkpoint/adapters.safetensors"), weights(accumulated / "adapters/checkpoint/adapters.safetensors")
    import mlx.core as mx

    start = initial_adapters(tmp_path / "tiny", seed=0)  # both jobs: data.seed 0
    for key in a:
        update_a, update_b = a[key] - start[key], b[key] - start[key]
        scale = mx.abs(update_a).max().item()
        assert scale > 1e-3, key  # it trained
        assert mx.abs(update_a - update_b).max().item() < 1e-3 * scale, key  # within 0.1 % of the update


def test_gradient_checkpointing_lowers_peak_memory(tmp_path):
    long_rows = [{"prompt": " ".join(["show the city"] * 20) + f" {i}", "completion": " ".join(["select city from table;"] * 12)}
                 for i in range(16)]
    wider = {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 8,
             "num_key_value_heads": 8, "head_dim": 32}
    from mlx_lm.models.llama import TransformerBlock

    plain = train(tmp_path, "plain", long_rows, model=wider, iters=2, batch_size=8, num_layers=4, max_seq_length=256)
    unpatched = TransformerBlock.__call__  # mlx-lm checkpoints by patching the layer class: undo it for later tests
    try:
        checkpointed = train(tmp_path, "ckpt", long_rows, model=wider, iters=2, batch_size=8, num_layers=4,
                             max_seq_length=256, grad_checkpoint=True)
    finally:
        TransformerBlock.__call__ = unpatched  # type: ignore[method-assign]
    peak = {name: max(m["peak_memory_mb"] for m in metrics(job) if "peak_memory_mb" in m)
            for name, job in (("plain", plain), ("ckpt", checkpointed))}
    assert peak["ckpt"] < 0.9 * peak["plain"], peak


def test_adamw_weight_decay_and_lora_keys_and_seed_do_what_they_say(tmp_path):
    import mlx.core as mx

    adam = train(tmp_path, "adam", iters=1, save_every=1, seed=3)
    adamw = train(tmp_path, "adamw", iters=1, save_every=1, seed=3, optimizer="adamw", optimizer_config={"weight_decay": 0.1})
    a, w = weights(adam / "adapters/checkpoint/adapters.safetensors"), weights(adamw / "adapters/checkpoint/adapters.safetensors")
    start = initial_adapters(tmp_path / "tiny", seed=3)
    for key in a:  # AdamW = Adam plus p ← p·(1 − lr·wd): the first step differs by exactly lr·wd·p₀
        assert mx.allclose(w[key] - a[key], -1e-3 * 0.1 * start[key], atol=1e-7).item(), key
    same_seed = train(tmp_path, "adam-again", iters=1, save_every=1, seed=3)
    other_seed = train(tmp_path, "seed4", iters=1, save_every=1, seed=4)
    again, other = weights(same_seed / "adapters/checkpoint/adapters.safetensors"), weights(other_seed / "adapters/checkpoint/adapters.safetensors")
    assert all(mx.array_equal(a[k], again[k]).item() for k in a)
    assert not all(mx.array_equal(a[k], other[k]).item() for k in a)
    q_only = train(tmp_path, "q", iters=1, save_every=1, lora={"keys": ["self_attn.q_proj"]})
    keys = set(weights(q_only / "adapters/adapters.safetensors"))
    assert keys and all(".self_attn.q_proj." in k for k in keys) and len(keys) == 2 * 2  # a and b, 2 layers
    assert json.loads((q_only / "adapters/adapter_config.json").read_text())["lora_parameters"]["keys"] == ["self_attn.q_proj"]


def test_init_adapters_starts_where_an_earlier_job_ended(tmp_path):
    first = train(tmp_path, "first", iters=20, learning_rate=3e-3, eval_every=20)
    first_val = [m["val_loss"] for m in metrics(first) if "val_loss" in m]
    second = train(tmp_path, "second", iters=2, eval_every=1000, init_adapters=f"path:{first / 'adapters'}")
    second_val = [m["val_loss"] for m in metrics(second) if "val_loss" in m]
    assert first_val[-1] < first_val[0] - 0.3  # the first job learned something
    assert second_val[0] == pytest.approx(min(first_val), abs=1e-3)  # and the second starts from it
    from lorad.stages import StageFailed

    with pytest.raises(StageFailed, match="do not fit"):
        train(tmp_path, "rank4", iters=1, init_adapters=f"path:{first / 'adapters'}", lora={"rank": 4})


def test_spec_checks_the_knobs():
    head = b"version: 1\nname: n\nmodel: {source: demo}\ndata: {source: 'builtin:text-to-sql'}\n"
    ok = check_bytes(head + b"train: {optimizer: adamw, optimizer_config: {weight_decay: 0.01}, grad_accumulation_steps: 2,\n"
                            b"  save_every: 10, lr_schedule: {name: cosine_decay, warmup: 5}, grad_checkpoint: true, seed: 7,\n"
                            b"  learning_rate: 5e-4, lora: {keys: [self_attn.q_proj, self_attn.v_proj]}}\n")
    assert ok.ok, ok.problems
    bad = check_bytes(head + b"train: {grad_accumulation_steps: 4, save_every: 10}\n")
    assert [(p.path, p.line) for p in bad.problems] == [("$.train.save_every", 5)]
    assert "multiple of grad_accumulation_steps" in bad.problems[0].message
    decay = check_bytes(head + b"train: {lr_schedule: {name: exponential_decay}}\n")
    assert decay.problems[0].path == "$.train.lr_schedule.arguments"
    assert not check_bytes(head + b"train: {optimizer: lion}\n").ok


def test_validation_lands_on_the_checkpoint_iterations(tmp_path):
    """eval_every: 4 validates after steps 4 and 8 (mlx-lm alone: before them, on the weights of 3 and 7)."""
    job = train(tmp_path, "job", iters=8, eval_every=4, save_every=4)
    assert [m["iteration"] for m in metrics(job) if "val_loss" in m] == [0, 4, 8]
    from test_stages import events

    saved = [e["iteration"] for e in events(job) if e["event"] == "checkpoint_saved"]
    best = [e for e in events(job) if e["event"] == "val_loss" and e.get("best")]
    assert saved == [4, 8] and {e["iteration"] for e in best} <= {0, 4, 8}


def wandb_records(path: Path) -> list:
    """The records of a W&B run file (LevelDB's log format: 32 KiB blocks of CRC, length, type, payload)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, records, pos, pending = path.read_bytes(), [], 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):  # the rest of a block is padding
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_report_to_wandb_logs_every_metric_and_a_resumed_stage_continues_the_run(tmp_path, monkeypatch):
    from lorad.policy import Policy, to_env
    from lorad.reporting import run_id
    from lorad.stages import Interrupted

    monkeypatch.setenv("WANDB_MODE", "offline")  # the run stays on disk, in wandb's own format
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("LORAD_POLICY", to_env(Policy((tmp_path,), "http://127.0.0.1:9", report_to=("wandb",)))["LORAD_POLICY"])

    def stop_after_five() -> bool:
        path = tmp_path / "job/adapters/metrics.jsonl"
        return path.exists() and any(m.get("iteration", 0) >= 5 for m in metrics(tmp_path / "job"))

    knobs = {"iters": 10, "save_every": 5, "eval_every": 5, "report_to": ["wandb"], "project_name": "lorad-test"}
    with pytest.raises(Interrupted):
        train(tmp_path, "job", stop=stop_after_five, **knobs)
    job = train(tmp_path, "job", **knobs)
    runs = sorted((job / "adapters/wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 2  # the stopped stage and the resumed one
    logged: dict[int, dict] = {}
    for path in runs:
        records = wandb_records(path)
        [run] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        assert (run.run_id, run.project) == (run_id("job"), "lorad-test")
        config = {item.key: json.loads(item.value_json) for item in run.config.update}
        assert config["train"]["learning_rate"] == 1e-3
        for r in records:
            if r.WhichOneof("record_type") == "history":
                row = {i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                logged.setdefault(row["_step"], {}).update(row)
    recorded = {m["iteration"]: m for m in metrics(job)}
    assert sorted(k for k, v in logged.items() if "train_loss" in v) == list(range(1, 11))
    for it, row in logged.items():
        for key in ("train_loss", "val_loss", "learning_rate"):
            if key in recorded.get(it, {}) and key in row:
                assert row[key] == pytest.approx(recorded[it][key])
    assert "val_loss" in logged[10]


def test_report_to_needs_the_owners_leave(tmp_path, monkeypatch):
    from lorad import policy
    from lorad.spec import apply_defaults
    from lorad.stages import StageFailed

    spec = apply_defaults(make_spec("demo", "builtin:text-to-sql", report_to=["wandb", "swanlab"]))
    owner = policy.Policy((tmp_path,), "http://127.0.0.1:9", report_to=("swanlab",))
    [(where, message)] = policy.spec_problems(spec, owner)
    assert where == ["train", "report_to", 0] and "--allow-report-to wandb" in message
    monkeypatch.setenv("LORAD_POLICY", policy.to_env(owner)["LORAD_POLICY"])
    with pytest.raises(StageFailed, match="does not allow"):
        train(tmp_path, "job", report_to=["wandb"])
    assert not (tmp_path / "job/adapters/wandb").exists()
    with pytest.raises(policy.PolicyError, match="not one of"):
        policy.load(tmp_path, tmp_path / "inbox", allow_report=["mlflow"])


def test_packing_trains_on_packed_sequences_and_refuses_too_few(tmp_path):
    from lorad.stages import StageFailed

    job = train(tmp_path, "packed", iters=6, batch_size=2, max_seq_length=64, packing=True, eval_every=3)
    setup = [json.loads(x) for x in (job / "events.jsonl").read_text().splitlines() if '"training_setup"' in x]
    assert setup and setup[-1]["packing"] is True
    steps = [m for m in metrics(job) if "train_loss" in m]
    assert len(steps) == 6 and all(m["train_loss"] == m["train_loss"] for m in steps)  # no NaN
    assert [m["iteration"] for m in metrics(job) if "val_loss" in m] == [0, 3, 6]  # validation unpacked, on 8 rows
    with pytest.raises(StageFailed, match="fewer than batch_size 16"):
        train(tmp_path, "too-few", iters=2, batch_size=16, max_seq_length=64, packing=True)
