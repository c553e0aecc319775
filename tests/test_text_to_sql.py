"""The bundled text-to-SQL data and the evaluate stage."""

from __future__ import annotations

import json
from collections import Counter

import pytest

import tinymodel
from lorad.prompts import schema_of
from lorad.sqldata import COMPLEXITY_DESCRIPTIONS, DOMAINS, builtin_rows, generate, gold_ok
from test_stages import events, make_spec, run_stage

GRETEL_COLUMNS = ["id", "domain", "domain_description", "sql_complexity", "sql_complexity_description", "sql_task_type",
                  "sql_task_type_description", "sql_prompt", "sql_context", "sql", "sql_explanation"]


@pytest.fixture(scope="module")
def shipped() -> list[dict]:
    return builtin_rows()


def test_shipped_set_is_large_varied_and_gretel_shaped(shipped):
    assert len(shipped) >= 5000
    assert all(list(r) == GRETEL_COLUMNS for r in shipped)
    assert len({r["domain"] for r in shipped}) >= 20 and len(DOMAINS) >= 20
    complexities = Counter(r["sql_complexity"] for r in shipped)
    assert set(complexities) == set(COMPLEXITY_DESCRIPTIONS)
    dml = [r for r in shipped if r["sql_task_type"] == "data manipulation"]
    assert {r["sql"].split()[0] for r in dml} == {"INSERT", "UPDATE", "DELETE"}
    assert len({(r["sql_prompt"], r["sql_context"]) for r in shipped}) == len(shipped)  # no duplicates
    assert len({r["sql_prompt"] for r in shipped}) > 0.5 * len(shipped)  # varied phrasings and values


def test_every_shipped_gold_query_executes(shipped):
    for r in shipped:
        dml = r["sql_task_type"] == "data manipulation"
        assert gold_ok(r["sql_context"], r["sql"], dml), r["id"]


def test_generation_is_reproducible_from_the_seed(shipped):
    assert generate(200, seed=0) == shipped[:200]
    assert generate(50, seed=1) != generate(50, seed=0)


def test_schema_in_the_prompt_keeps_the_create_statements():
    ctx = ("CREATE TABLE t (a INT, b TEXT); INSERT INTO t (a, b) VALUES (1, 'x;y'); "
           "CREATE TABLE u (c INT); INSERT INTO u VALUES (2);")
    assert schema_of(ctx) == "CREATE TABLE t (a INT, b TEXT);\nCREATE TABLE u (c INT);"


def test_real_gretel_parquet_works_through_path(tmp_path, shipped):
    """The dataset's own files (snappy parquet, these 11 columns) need no change."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([{**r, "id": int(r["id"])} for r in shipped[:60]])
    pq.write_table(table.slice(0, 50), tmp_path / "synthetic_text_to_sql_train.snappy.parquet", compression="snappy")
    pq.write_table(table.slice(50, 10), tmp_path / "synthetic_text_to_sql_test.snappy.parquet", compression="snappy")
    run_stage("prepare", tmp_path / "job", tmp_path / "cache", make_spec("demo", f"path:{tmp_path}"))
    prepared = [e for e in events(tmp_path / "job") if e["event"] == "data_prepared"][0]
    counts = prepared["counts"]
    assert prepared["format"] == "gretel" and counts["test"] == 10 and counts["train"] + counts["valid"] == 50
    first = json.loads((tmp_path / "job/data/train.jsonl").read_text().splitlines()[0])
    assert first["prompt"].startswith("Database schema:\nCREATE TABLE") and "INSERT" not in first["prompt"]


def test_evaluate_on_a_tiny_model_writes_a_complete_eval_json(tmp_path, shipped):
    tiny = tinymodel.make_tiny_model(tmp_path / "tiny")
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in shipped[:40]))
    spec = make_spec(f"path:{tiny}", f"path:{data}", iters=2, max_seq_length=512)
    spec["data"]["test_fraction"] = 0.2
    spec["gguf"] = {"outtype": "f16"}
    spec["evaluate"] = {"limit": 6}
    job = tmp_path / "job"
    for stage in ("prepare", "convert", "lora", "fuse", "gguf", "evaluate"):
        artifacts = run_stage(stage, job, tmp_path / "cache", spec)
    assert {"eval", "eval_rows", "report"} <= set(artifacts)
    result = json.loads((job / "eval.json").read_text())
    assert result["engine"] == "sqlite" and result["rows"] == 6
    for model in ("base", "finetuned", "gguf"):
        s = result[model]
        assert s["n"] == 6 and s["scored"] + sum(s["excluded"].values()) == 6
        assert {"matches", "execution_accuracy", "execution_accuracy_ci95", "valid_sql_rate"} <= set(s)
    per_row = [json.loads(x) for x in (job / "eval_rows.jsonl").read_text().splitlines()]
    assert len(per_row) == 6 and all("prediction" in r["gguf"] and "match" in r["finetuned"] for r in per_row)
    report = (job / "report.md").read_text()
    assert "## Execution accuracy" in report and "fine-tuned GGUF (llama.cpp)" in report
    check = json.loads((job / "gguf_check.json").read_text())
    assert f"- `f16`: the same next token as MLX at {100 * check['top1_agreement']:.1f} %" in report
    chat = [e for e in events(job) if e["event"] == "gguf_chat"][-1]
    verdict = "stopped at the end of its turn" if chat["finish_reason"] == "stop" else "did NOT stop"
    assert f"- chat completion (the GGUF's own template) on the first held-out question {verdict}" in report
    assert (job / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    # a resumed evaluate reuses the answers it already has
    run_stage("evaluate", job, tmp_path / "cache", spec)
    assert json.loads((job / "eval.json").read_text())["finetuned"]["generation_seconds"] is None
