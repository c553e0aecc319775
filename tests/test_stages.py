"""prepare, convert, lora, fuse on real MLX with tiny random models (and the real SmolLM2 GGUF)."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import pytest

import tinymodel
from conftest import wait_for
from lorad.outbox import event_logger
from lorad.spec import apply_defaults
from lorad.stages import StageContext, StageFailed, stage_function

ROWS = {
    "gretel": lambda i: {"sql_prompt": f"How many rows have id {i}?", "sql_context": f"CREATE TABLE t{i} (id INT);",
                         "sql": f"SELECT COUNT(*) FROM t{i} WHERE id = {i};", "sql_complexity": "aggregation"},
    "completions": lambda i: {"prompt": f"select {i} from table", "completion": f"total {i} max min"},
    "chat": lambda i: {"messages": [{"role": "user", "content": f"show {i}"}, {"role": "assistant", "content": f"value {i}"}]},
    "text": lambda i: {"text": f"select name from table where id {i};"},
}


def events(job: Path) -> list[dict]:
    return [json.loads(x) for x in (job / "events.jsonl").read_text().splitlines()]


def run_stage(name: str, job: Path, cache: Path, spec: dict, stop=lambda: False) -> dict:
    job.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(spec=apply_defaults(spec), work_dir=job, cache_dir=cache,
                       log=event_logger(job, job_id=job.name, stage=name), should_stop=stop)
    return stage_function(name)(ctx)


def make_spec(model: str, data: str, **train) -> dict:
    base_train = {"iters": 6, "batch_size": 2, "eval_every": 3, "save_every": 3, "num_layers": 2,
                  "learning_rate": 1e-3, "max_seq_length": 64}
    base_train.update(train)
    return {"version": 1, "name": "t", "model": {"source": model}, "data": {"source": data, "seed": 0},
            "train": base_train}


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    return tinymodel.make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


# --- prepare -------------------------------------------------------------

@pytest.mark.parametrize("fmt", list(ROWS))
@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_prepare_reads_every_format_from_every_file_type(tmp_path, fmt, suffix):
    if suffix == ".csv" and fmt == "chat":
        pytest.skip("CSV has no nested messages")
    rows = [ROWS[fmt](i) for i in range(30)]
    rows += [rows[0], rows[1]]  # duplicates
    rows.append({k: "" for k in rows[0]} if fmt != "chat" else {"messages": []})  # an empty row
    src = write_rows(tmp_path / f"rows{suffix}", rows)
    run_stage("prepare", tmp_path / "job", tmp_path / "cache", make_spec("demo", f"path:{src}"))
    out = {s: [json.loads(x) for x in (tmp_path / "job" / "data" / f"{s}.jsonl").read_text().splitlines()]
           for s in ("train", "valid", "test")}
    assert sum(map(len, out.values())) == 30
    prepared = [e for e in events(tmp_path / "job") if e["event"] == "data_prepared"][0]
    assert prepared["format"] == fmt and prepared["dropped"] == {"empty": 1, "duplicate": 2}
    assert len(out["valid"]) >= 2  # at least one batch for validation
    first = out["train"][0]
    if fmt == "gretel":
        assert "CREATE TABLE" in first["prompt"] and first["completion"].startswith("SELECT")
        assert first["sql_context"] and first["sql_complexity"] == "aggregation"
    else:
        assert set(first) == {"completions": {"prompt", "completion"}, "chat": {"messages"}, "text": {"text"}}[fmt]


def test_prepare_split_is_deterministic_by_seed_and_keeps_folder_splits(tmp_path):
    rows = [ROWS["completions"](i) for i in range(50)]
    src = write_rows(tmp_path / "rows.jsonl", rows)
    for job in ("a", "b"):
        run_stage("prepare", tmp_path / job, tmp_path / "cache", make_spec("demo", f"path:{src}"))
    assert (tmp_path / "a/data/test.jsonl").read_text() == (tmp_path / "b/data/test.jsonl").read_text()
    folder = tmp_path / "splits"
    write_rows(folder / "train.jsonl", rows[:40])
    write_rows(folder / "validation.parquet", rows[40:45])
    write_rows(folder / "test.csv", rows[45:])
    run_stage("prepare", tmp_path / "c", tmp_path / "cache", make_spec("demo", f"path:{folder}"))
    counts = [e for e in events(tmp_path / "c") if e["event"] == "data_prepared"][0]["counts"]
    assert counts == {"train": 40, "valid": 5, "test": 5}


def test_hf_data_offline_says_how_to_use_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(StageFailed, match="path:"):
        run_stage("prepare", tmp_path / "job", tmp_path / "cache", make_spec("demo", "hf:nobody/no-such-dataset"))


# --- convert -------------------------------------------------------------

def test_gguf_round_trip_gives_the_same_logits(tmp_path, tiny):
    import mlx.core as mx

    from lorad.gguf_export import write_gguf

    gguf = tmp_path / "tiny.gguf"
    write_gguf(tiny, gguf, "f32")
    run_stage("convert", tmp_path / "job", tmp_path / "cache", make_spec(f"path:{gguf}", "path:x"))
    base = Path(json.loads((tmp_path / "job" / "base_model.json").read_text())["path"])
    assert base.parent == tmp_path / "cache" / "models"
    diff = mx.abs(tinymodel.logits(base) - tinymodel.logits(tiny)).max().item()
    assert diff < 1e-4, diff  # q/k rows un-permuted, tokenizer rebuilt from GGUF metadata
    # a second job on the same base converts nothing
    run_stage("convert", tmp_path / "job2", tmp_path / "cache", make_spec(f"path:{gguf}", "path:x"))
    assert any(e["event"] == "base_cached" for e in events(tmp_path / "job2"))


def test_ollama_source_reads_the_blob_through_the_manifest(tmp_path, tiny, monkeypatch):
    import mlx.core as mx

    from lorad.gguf_export import write_gguf

    store = tmp_path / "ollama-models"
    gguf = tmp_path / "tiny.gguf"
    write_gguf(tiny, gguf, "f16")
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    (store / "blobs").mkdir(parents=True)
    shutil.copyfile(gguf, store / "blobs" / f"sha256-{digest}")
    manifest = store / "manifests" / "registry.ollama.ai" / "library" / "tiny" / "v1"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                                    "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": "sha256:0", "size": 2},
                                    "layers": [{"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:1", "size": 1},
                                               {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}",
                                                "size": gguf.stat().st_size}]}))
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    run_stage("convert", tmp_path / "job", tmp_path / "cache", make_spec("ollama:tiny:v1", "path:x"))
    base = Path(json.loads((tmp_path / "job" / "base_model.json").read_text())["path"])
    diff = mx.abs(tinymodel.logits(base) - tinymodel.logits(tiny)).max().item()
    assert diff < 0.02, diff  # f16 blob
    with pytest.raises(StageFailed, match="ollama pull"):
        run_stage("convert", tmp_path / "job3", tmp_path / "cache", make_spec("ollama:missing", "path:x"))


def test_convert_quantizes_for_qlora_and_uses_folders_as_they_are(tmp_path, tiny):
    run_stage("convert", tmp_path / "plain", tmp_path / "cache", make_spec(f"path:{tiny}", "path:x"))
    assert json.loads((tmp_path / "plain/base_model.json").read_text())["path"] == str(tiny)
    spec = make_spec(f"path:{tiny}", "path:x")
    spec["model"]["quantize"] = {"bits": 4, "group_size": 32}
    run_stage("convert", tmp_path / "q", tmp_path / "cache", spec)
    base = Path(json.loads((tmp_path / "q/base_model.json").read_text())["path"])
    assert json.loads((base / "config.json").read_text())["quantization"]["bits"] == 4


def test_demo_model_converts_and_answers_sensibly(tmp_path):
    from mlx_lm import generate, load

    run_stage("convert", tmp_path / "job", tmp_path / "cache", make_spec("demo", "path:x"))
    base = json.loads((tmp_path / "job/base_model.json").read_text())["path"]
    model, tok = load(base)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, tokenize=False)
    answer = generate(model, tok, prompt, max_tokens=16)
    assert "Paris" in answer, answer


# --- lora and fuse ---------------------------------------------------------

@pytest.mark.parametrize("method", ["lora", "dora", "full"])
@pytest.mark.parametrize("fmt", ["completions", "chat", "text"])
def test_every_method_trains_and_fuses(tmp_path, tiny, method, fmt):
    import mlx.core as mx

    src = write_rows(tmp_path / "rows.jsonl", [ROWS[fmt](i) for i in range(24)])
    spec = make_spec(f"path:{tiny}", f"path:{src}", method=method, mask_prompt=fmt != "text")
    job = tmp_path / "job"
    for stage in ("prepare", "convert", "lora", "fuse"):
        run_stage(stage, job, tmp_path / "cache", spec)
    cfg = json.loads((job / "adapters/adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == method and (job / "adapters/adapters.safetensors").exists()
    assert (job / "adapters/0000003_adapters.safetensors").exists()
    done = json.loads((job / "adapters/done.json").read_text())
    assert done["iterations"] == 6 and done["best_iteration"] is not None
    metrics = [json.loads(x) for x in (job / "adapters/metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics if "train_loss" in m] == [1, 2, 3, 4, 5, 6]
    diff = mx.abs(tinymodel.logits(job / "fused") - tinymodel.logits(tiny)).max().item()
    assert diff > 1e-4, "fusing changed nothing"
    assert "quantization" not in json.loads((job / "fused/config.json").read_text())


def tiny_lora_model(tmp_path: Path, arch: str, n_rows: int) -> tuple:
    """A tiny model with LoRA on 2 layers, in training mode, and n_rows prompt/completion rows of varied lengths."""
    from lorad.stages.lora import apply_adapters, load_datasets, load_for_training

    model_dir = tinymodel.make_tiny_model(tmp_path / arch, arch)
    rows = [{"prompt": f"select {i} from table " * (1 + i % 4), "completion": f"total {i} max min " * (1 + i % 3)}
            for i in range(n_rows)]
    write_rows(tmp_path / "data/train.jsonl", rows)
    model, tokenizer, _, _ = load_for_training(model_dir, log=None, train_dequantized=True)
    apply_adapters(model, apply_defaults(make_spec("demo", "x", num_layers=2))["train"])
    model.train()
    train_set, _ = load_datasets(tmp_path / "data", tokenizer, mask_prompt=True)
    return model, train_set


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # an untied head and a tied one
def test_completion_loss_equals_mlx_lm_default_loss_and_its_gradients(tmp_path, arch):
    """The sparse head and cpu_ops are only faster: same loss and same LoRA gradients as mlx-lm's default_loss."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.trainer import default_loss

    from lorad import completion_loss, cpu_ops

    model, train_set = tiny_lora_model(tmp_path, arch, 16)
    assert completion_loss.applies(model, mask_prompt=True) and not completion_loss.applies(model, mask_prompt=False)
    compared, truncated = 0, 0
    for max_seq in (512, 40):  # 40 cuts some completions short, so they run to the last target
        for batch, lengths, index, weights in completion_loss.iterate_batches(train_set, 4, max_seq):
            truncated += sum(n == max_seq for n in lengths[:, 1].tolist())
            (ref, ref_n), ref_grad = nn.value_and_grad(model, default_loss)(model, batch, lengths)
            with cpu_ops.vectorized(model):  # and the vectorized SiLU, softmax and cross entropy
                (got, got_n), got_grad = nn.value_and_grad(model, completion_loss.loss)(model, batch, lengths, index, weights)
            assert got_n.item() == ref_n.item() and index.size % 32 == 0 and weights.sum().item() == ref_n.item()
            assert abs(got.item() - ref.item()) < 1e-5 * abs(ref.item()), (got.item(), ref.item())
            for (name, g), (_, r) in zip(tree_flatten(got_grad), tree_flatten(ref_grad)):
                assert mx.allclose(g, r, rtol=1e-4, atol=1e-6).item(), name
            compared += 1
    assert compared == 8 and truncated > 0


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_rows_compute_what_each_row_computes_alone(tmp_path, arch):
    """train.packing: rows share a sequence but not attention; each row's loss and gradients are its own."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from lorad import completion_loss, cpu_ops

    model, train_set = tiny_lora_model(tmp_path, arch, 12)
    max_seq = 128

    def alone(model):  # every row by itself, mlx-lm's own ops, its own tokens as targets
        total = mx.array(0.0)
        for i in range(len(train_set)):
            tokens, offset = completion_loss.tokens_and_offset(train_set[i])
            x = mx.array([tokens[:max_seq]])
            start = max(offset - 1, 0)
            total = total + nn.losses.cross_entropy(model(x[:, :-1])[0][start:], x[0, start + 1:]).sum()
        return total

    def packed(model):
        total = mx.array(0.0)
        for batch in completion_loss.packed_batches(train_set, 1, max_seq):
            value, count = completion_loss.loss(model, *batch)
            total = total + value * count
        return total

    packs = list(completion_loss.packed_batches(train_set, 1, max_seq))
    assert len(packs) < len(train_set) * 2 / 3 and all(b[0].shape[1] <= max_seq + 1 for b in packs)
    ref, ref_grad = nn.value_and_grad(model, alone)(model)
    with cpu_ops.vectorized(model):
        got, got_grad = nn.value_and_grad(model, packed)(model)
    assert abs(got.item() - ref.item()) < 1e-5 * abs(ref.item()), (got.item(), ref.item())
    for (name, g), (_, r) in zip(tree_flatten(got_grad), tree_flatten(ref_grad)):  # sums over ~1,000 tokens: relative to the largest
        assert mx.abs(g - r).max().item() <= 1e-5 * mx.abs(r).max().item(), name
    assert sorted(i for pack in completion_loss.pack_rows([30, 50, 20, 96, 10], 96) for i in pack) == [0, 1, 2, 3, 4]
    assert completion_loss.pack_rows([30, 50, 20, 96, 10], 96) == [[3], [1, 0, 4], [2]]


def test_batches_group_rows_by_token_count_and_pad_less_than_mlx_lm(tmp_path):
    """mlx-lm 0.32 sorts rows by their key count (so its batches mix lengths); lorad's are sorted by tokens."""
    import random
    from types import SimpleNamespace

    import numpy as np
    from mlx_lm.tuner.trainer import iterate_batches as mlx_lm_batches

    from lorad import completion_loss
    from lorad.stages.lora import load_datasets, load_for_training

    model_dir = tinymodel.make_tiny_model(tmp_path / "llama", "llama")
    rows = [{"prompt": "word " * random.Random(i).randrange(2, 60), "completion": f"answer {i}"} for i in range(48)]
    write_rows(tmp_path / "data/train.jsonl", rows)
    _, tokenizer, _, _ = load_for_training(model_dir, log=None, train_dequantized=True)
    train_set, _ = load_datasets(tmp_path / "data", tokenizer, mask_prompt=True)
    lengths = [completion_loss.token_length(train_set[i]) for i in range(len(train_set))]

    def padding(batches) -> int:
        return sum(int(batch.shape[0] * (batch.shape[1] - 1) - (np.array(pairs)[:, 1] - 1).sum()) for batch, pairs, *_ in batches)

    np.random.seed(7)
    ours = list(completion_loss.iterate_batches(train_set, 4, 512, scored=False))
    np.random.seed(7)
    theirs = list(mlx_lm_batches(train_set, 4, 512))
    plan = completion_loss.batch_plan(lengths, 4)
    np.random.seed(7)
    expected = [plan[i] for i in np.random.permutation(len(plan))]
    assert [sorted(np.array(p)[:, 1].tolist()) for _, p in ours] == [sorted(lengths[j] for j in b) for b in expected]
    assert sorted(j for b in plan for j in b) == list(range(48))  # each row once an epoch
    assert all((batch.shape[1] - 1) % completion_loss.PAD_BATCH_TO == 0 for batch, _ in ours)
    assert padding(ours) * 3 < padding(theirs), (padding(ours), padding(theirs))

    ranks = [list(completion_loss.iterate_batches(train_set, 4, 512, seed=3, scored=False,
                                                  comm_group=SimpleNamespace(rank=lambda r=r: r, size=lambda: 2)))
             for r in (0, 1)]
    for (_, pa), (_, pb), whole in zip(*ranks, [plan[i] for i in np.random.RandomState(3).permutation(len(plan))]):
        assert sorted(np.array(pa)[:, 1].tolist() + np.array(pb)[:, 1].tolist()) == sorted(lengths[j] for j in whole)


def test_qlora_base_fuses_dequantized(tmp_path, tiny):
    src = write_rows(tmp_path / "rows.jsonl", [ROWS["completions"](i) for i in range(24)])
    spec = make_spec(f"path:{tiny}", f"path:{src}")
    spec["model"]["quantize"] = {"bits": 8, "group_size": 32}
    job = tmp_path / "job"
    for stage in ("prepare", "convert", "lora", "fuse"):
        run_stage(stage, job, tmp_path / "cache", spec)
    from mlx.utils import tree_flatten
    from mlx_lm import load

    model, _ = load(str(job / "fused"))
    assert not [k for k, _ in tree_flatten(model.parameters()) if k.endswith(".scales")]


def test_early_stopping_stops_early_and_keeps_the_best(tmp_path, tiny):
    src = write_rows(tmp_path / "rows.jsonl", [ROWS["completions"](i) for i in range(40)])
    # a learning rate this high makes validation loss climb after the first steps
    spec = make_spec(f"path:{tiny}", f"path:{src}", iters=200, eval_every=2, save_every=100, learning_rate=0.5,
                     early_stopping={"patience": 2})
    job = tmp_path / "job"
    for stage in ("prepare", "convert", "lora"):
        run_stage(stage, job, tmp_path / "cache", spec)
    done = json.loads((job / "adapters/done.json").read_text())
    assert done["stopped_early"] and done["iterations"] < 50
    assert (job / "adapters/adapters.safetensors").read_bytes() == (job / "adapters/best.safetensors").read_bytes()
    stop = [e for e in events(job) if e["event"] == "early_stopping"][0]
    assert stop["best_iteration"] == done["best_iteration"] < stop["iteration"]


def test_lora_resumes_after_sigterm_at_the_saved_iteration_with_its_optimizer_state(tmp_path, tiny, start_daemon):
    import signal

    from conftest import statuses
    from test_daemon import drop

    src = write_rows(tmp_path / "rows.jsonl", [ROWS["completions"](i) for i in range(40)])
    root = tmp_path / "root"
    spec = (f"version: 1\nname: resume\nmodel: {{source: 'path:{tiny}'}}\ndata: {{source: 'path:{src}'}}\n"
            "train: {iters: 1000, batch_size: 2, eval_every: 1000, save_every: 5, num_layers: 2, learning_rate: 0.001}\n"
            "stages: [prepare, convert, lora]\n")
    d = start_daemon()
    wait_for(lambda: (root / "inbox").is_dir())
    drop(root / "inbox", "resume.yaml", spec)

    def progressed():
        for job_id, s in statuses(root / "outbox").items():
            if s.get("stage") == "lora" and (s.get("progress") or {}).get("iteration", 0) >= 12:
                return job_id
        return None

    job_id = wait_for(progressed, timeout=120, what="training past iteration 12")
    job = root / "outbox" / job_id
    d.signal(signal.SIGTERM)
    assert d.wait(timeout=30) == 0
    saved = [e for e in events(job) if e["event"] == "checkpoint_saved"][-1]
    state = json.loads((job / "adapters/checkpoint/state.json").read_text())
    assert state["iteration"] >= 12 and state["iteration"] == saved["iteration"]
    assert json.loads((job / "status.json").read_text())["stages"]["lora"]["state"] == "interrupted"
    start_daemon()
    resumed = wait_for(lambda: [e for e in events(job) if e["event"] == "training_resumed"], timeout=60)[0]
    assert resumed["iteration"] == saved["iteration"]
    assert resumed["optimizer_step"] == saved["optimizer_step"] == saved["iteration"]
    assert resumed["optimizer_checksum"] == pytest.approx(saved["optimizer_checksum"], rel=1e-6)
    s = wait_for(lambda: json.loads((job / "status.json").read_text())["state"] in ("succeeded", "failed") and
                 json.loads((job / "status.json").read_text()), timeout=300)
    assert s["state"] == "succeeded", s.get("error")
    iterations = [json.loads(x)["iteration"] for x in (job / "adapters/metrics.jsonl").read_text().splitlines()
                  if "train_loss" in json.loads(x)]
    assert iterations[-1] == 1000 and iterations.count(saved["iteration"] + 1) >= 1


def test_prepare_builtin_text_to_sql(tmp_path):
    spec = make_spec("demo", "builtin:text-to-sql")
    spec["data"].update(limit=300, test_fraction=0.1)
    run_stage("prepare", tmp_path / "job", tmp_path / "cache", spec)
    counts = [e for e in events(tmp_path / "job") if e["event"] == "data_prepared"][0]["counts"]
    assert counts["test"] == 30 and sum(counts.values()) == 300
    row = json.loads((tmp_path / "job/data/test.jsonl").read_text().splitlines()[0])
    assert {"prompt", "completion", "sql_context", "sql", "sql_complexity"} <= set(row)


def test_hf_model_source_uses_the_local_hub_cache(tmp_path, tiny, monkeypatch):
    """hf:<repo> resolves through the Hugging Face cache first (as laid out by huggingface_hub), offline."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--lorad--tiny" / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny, snapshot)
    (cache / "models--lorad--tiny" / "refs").mkdir()
    (cache / "models--lorad--tiny" / "refs" / "main").write_text(snapshot.name)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run_stage("convert", tmp_path / "job", tmp_path / "cache", make_spec("hf:lorad/tiny", "path:x"))
    assert json.loads((tmp_path / "job/base_model.json").read_text())["path"] == str(snapshot)
    with pytest.raises(StageFailed, match="path:"):
        run_stage("convert", tmp_path / "job2", tmp_path / "cache", make_spec("hf:lorad/missing", "path:x"))
