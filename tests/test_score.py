"""`lorad score` on hand-made cases, one per rule, on SQLite and DuckDB."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from lorad.score import engine as score_engine
from lorad.score import extract_sql, has_top_level_order_by, score_rows, wilson

CTX = ("CREATE TABLE sales (id INT, region TEXT, amount REAL); "
       "INSERT INTO sales VALUES (1, 'North', 10.5), (2, 'South', 20.25), (3, 'North', 5.0), (4, 'East', 7.125);")


def one(pred: str, gold: str, ctx: str = CTX, engine: str = "sqlite", **kw) -> dict:
    summary, rows = score_rows([{"sql_context": ctx, "sql": gold, "prediction": pred}], engine, **kw)
    return rows[0]


@pytest.mark.parametrize("engine", ["sqlite", "duckdb"])
class TestRules:
    def test_order_ignored_without_order_by(self, engine):
        r = one("SELECT region FROM sales WHERE amount > 6 ORDER BY region DESC",
                "SELECT region FROM sales WHERE amount > 6", engine=engine)
        assert r["match"] is True

    def test_order_matters_with_top_level_order_by(self, engine):
        gold = "SELECT id FROM sales ORDER BY amount DESC"
        assert one("SELECT id FROM sales ORDER BY amount DESC", gold, engine=engine)["match"] is True
        assert one("SELECT id FROM sales ORDER BY amount ASC", gold, engine=engine)["match"] is False

    def test_multiset_not_set(self, engine):
        gold = "SELECT region FROM sales"  # North twice
        assert one("SELECT DISTINCT region FROM sales", gold, engine=engine)["match"] is False

    def test_column_order_and_names_ignored(self, engine):
        r = one("SELECT SUM(amount) AS total, region AS r FROM sales GROUP BY region",
                "SELECT region, SUM(amount) FROM sales GROUP BY region", engine=engine)
        assert r["match"] is True

    def test_floats_rounded_to_6_places_and_ints_equal_floats(self, engine):
        assert one("SELECT 10.5 + 0.0000001", "SELECT 10.5", engine=engine)["match"] is True
        assert one("SELECT 10.501", "SELECT 10.5", engine=engine)["match"] is False
        assert one("SELECT COUNT(*) * 1.0 FROM sales", "SELECT COUNT(*) FROM sales", engine=engine)["match"] is True

    def test_nulls_compare_equal(self, engine):
        assert one("SELECT NULL", "SELECT NULL", engine=engine)["match"] is True

    def test_gold_that_fails_is_excluded_with_a_reason(self, engine):
        r = one("SELECT 1", "SELECT nope FROM sales", engine=engine)
        assert r["match"] is None and r["reason"] == "gold_error"
        r = one("SELECT 1", "SELECT 1", ctx="CREATE TABLE broken (", engine=engine)
        assert r["match"] is None and r["reason"] == "context_error"

    def test_prediction_errors_are_wrong(self, engine):
        r = one("SELECT nope FROM sales", "SELECT id FROM sales", engine=engine)
        assert r["match"] is False and r["reason"] == "pred_error" and r["valid"] is False

    def test_dml_compared_by_table_state(self, engine):
        gold = "UPDATE sales SET amount = amount * 2 WHERE region = 'North'"
        same = "UPDATE sales SET amount = 2 * amount WHERE region IN ('North')"
        assert one(same, gold, engine=engine)["match"] is True
        assert one("UPDATE sales SET amount = amount * 2", gold, engine=engine)["match"] is False

    def test_a_prediction_that_drops_a_table_is_wrong(self, engine):
        r = one("DROP TABLE sales", "DELETE FROM sales WHERE id = 1", engine=engine)
        assert r["match"] is False
        r = one("DROP TABLE sales", "SELECT id FROM sales", engine=engine)
        assert r["match"] is False and r["reason"] == "pred_not_a_query"

    def test_model_written_sql_cannot_create_or_read_files(self, engine, tmp_path):
        attempts = [f"ATTACH DATABASE '{tmp_path}/a.db' AS a", f"VACUUM INTO '{tmp_path}/v.db'"] if engine == "sqlite" else [
            f"ATTACH '{tmp_path}/a.db' AS a", f"COPY sales TO '{tmp_path}/c.csv'", "SELECT * FROM read_csv('/etc/hostname')"]
        db = score_engine(engine)
        for sql in attempts:
            con = db.connect()
            db.run_script(con, CTX)
            with pytest.raises(db.errors()):
                db.execute(con, sql, timeout=5)
            db.close(con)
        assert all(one(sql, "SELECT id FROM sales", engine=engine)["match"] is False for sql in attempts)
        assert list(tmp_path.iterdir()) == []

    def test_each_row_starts_from_an_empty_database(self, engine):
        rows = [{"sql_context": CTX + " CREATE TABLE leftover (x INT);", "sql": "DELETE FROM sales",
                 "prediction": "DELETE FROM sales"},
                {"sql_context": CTX, "sql": "SELECT COUNT(*) FROM sales", "prediction": "SELECT COUNT(*) FROM leftover"},
                {"sql_context": CTX, "sql": "SELECT COUNT(*) FROM sales", "prediction": "SELECT 4"}]
        _, out = score_rows(rows, engine)
        assert [r["reason"] for r in out] == ["match", "pred_error", "match"]

    def test_runaway_recursive_cte_times_out(self, engine):
        runaway = "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT COUNT(*) FROM r"
        t0 = time.monotonic()
        r = one(runaway, "SELECT COUNT(*) FROM sales", engine=engine, timeout=1.0)
        assert r["match"] is False and r["reason"] == "pred_timeout"
        assert time.monotonic() - t0 < 4
        r = one("SELECT 1", runaway, engine=engine, timeout=1.0)
        assert r["match"] is None and r["reason"] == "gold_timeout"


def test_sql_is_extracted_from_fences_and_chatter():
    assert extract_sql("Sure! Here is the query:\n```sql\nSELECT a FROM t;\n```\nIt selects a.") == "SELECT a FROM t"
    assert extract_sql("The answer is SELECT a FROM t WHERE b = 'x;y'; and then more") == "SELECT a FROM t WHERE b = 'x;y'"
    assert extract_sql("SELECT 1; SELECT 2;") == "SELECT 1"
    assert extract_sql("I don't know.") is None
    r = one("```\nSELECT region FROM sales WHERE id = 2\n```", "SELECT region FROM sales WHERE id = 2")
    assert r["match"] is True


def test_nondeterministic_gold_is_excluded():
    r = one("SELECT 1", "SELECT * FROM sales WHERE amount > 0 AND date('now') > '2020-01-01'")
    assert r["match"] is None and r["reason"] == "nondeterministic"


def test_top_level_order_by_ignores_subqueries():
    assert not has_top_level_order_by("SELECT * FROM (SELECT a FROM t ORDER BY a) x")
    assert has_top_level_order_by("SELECT a FROM (SELECT a FROM t) x ORDER BY a")


def test_summary_has_counts_interval_and_breakdown(tmp_path):
    rows = [
        {"sql_context": CTX, "sql": "SELECT id FROM sales", "prediction": "SELECT id FROM sales", "sql_complexity": "basic SQL"},
        {"sql_context": CTX, "sql": "SELECT id FROM sales", "prediction": "SELECT region FROM sales", "sql_complexity": "basic SQL"},
        {"sql_context": CTX, "sql": "SELECT SUM(amount) FROM sales", "prediction": "SELECT SUM(amount) FROM sales",
         "sql_complexity": "aggregation", "extra": 1},
        {"sql_context": CTX, "sql": "SELECT broken", "prediction": "SELECT 1", "sql_complexity": "aggregation"},
    ]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = subprocess.run([sys.executable, "-m", "lorad", "score", str(pairs), "--rows", str(tmp_path / "rows.jsonl")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    s = json.loads(out.stdout)
    assert (s["n"], s["scored"], s["matches"], s["excluded"]) == (4, 3, 2, {"gold_error": 1})
    assert s["execution_accuracy"] == round(2 / 3, 4) and s["valid_sql_rate"] == 1.0
    assert s["execution_accuracy_ci95"] == wilson(2, 3)
    assert s["by_complexity"]["basic SQL"] == {"scored": 2, "matches": 1, "execution_accuracy": 0.5}
    per_row = [json.loads(x) for x in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [r["match"] for r in per_row] == [True, False, True, None] and per_row[2]["extra"] == 1


def test_wilson_interval():
    lo, hi = wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)


ODD_ROWS = [
    ["not", "an", "object"],
    {"sql_context": "CREATE TABLE t (x INT);", "sql": "SELECT 1", "prediction": 42},
    {"sql_context": "CREATE TABLE t (x INT);", "sql": 7, "prediction": "SELECT 1"},
    {"sql_context": {"a": 1}, "sql": "SELECT 1", "prediction": "SELECT 1"},
    {"sql_context": "CREATE TABLE t (x INT);", "sql": "INSERT INTO t VALUES (1)", "prediction": 'CREATE TABLE "a""b"(x)'},
    {"sql_context": "CREATE TABLE t (" + ", ".join(f"c{i} INT" for i in range(10)) + "); INSERT INTO t VALUES ("
                    + ", ".join("1" for _ in range(10)) + ");",
     "sql": "SELECT * FROM t", "prediction": "SELECT * FROM t"},  # 10 identical columns: 10! assignments
    {"sql_context": "CREATE TABLE t AS WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x FROM c;",
     "sql": "SELECT 1", "prediction": "SELECT 1"},  # a context that never ends
    {"sql_context": "CREATE TABLE t (x INT);", "sql": "SELECT 1", "prediction": "SELECT randomblob(300000000)"},
    {"sql_context": "CREATE TABLE t (x INT);", "sql": "SELECT length(randomblob(300000000))", "prediction": "SELECT 1"},
]
ODD_DUCKDB = [
    {"sql_context": "ATTACH ':memory:' AS other; USE other; CREATE TABLE t (x INT);", "sql": "SELECT 1",
     "prediction": "SELECT 1"},
    {"sql_context": "CREATE TABLE t (x INT);", "sql": "SELECT 1", "prediction": "DETACH scratch0"},
    {"sql_context": "CREATE TABLE t (x INT);", "sql": "SELECT 1", "prediction": "SET memory_limit='100GB'"},
    {"sql_context": "CREATE TABLE t (x INT); INSERT INTO t VALUES (1);", "sql": "SELECT x FROM t", "prediction": "SELECT x FROM t"},
]


@pytest.mark.parametrize("engine_name", ["sqlite", "duckdb"])
def test_odd_rows_never_crash_and_each_row_is_bounded(tmp_path, engine_name):
    """Every odd row is excluded or wrong with a reason; the run stays within seconds and memory per row."""
    if engine_name == "duckdb":
        pytest.importorskip("duckdb")
    rows = ODD_ROWS + (ODD_DUCKDB if engine_name == "duckdb" else [])
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "rows.jsonl"
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "lorad", "score", str(pairs), "--engine", engine_name,
                             "--rows", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.monotonic() - t0
    stderr = proc.stderr.read() if proc.stderr else ""
    assert os.waitstatus_to_exitcode(status) == 0, stderr
    summary = json.loads(proc.stdout.read() if proc.stdout else "{}")
    scored = [json.loads(x) for x in out.read_text().splitlines()]
    assert summary["n"] == len(rows) == len(scored)
    reasons = [r["reason"] for r in scored]
    assert reasons[0] == "row_not_an_object"
    assert reasons[1] == "no_sql" and reasons[2] == "sql_not_text" and reasons[3] == "sql_context_not_text"
    assert reasons[4] in ("mismatch", "pred_error")  # the quoted table name is compared, not a crash
    assert scored[5]["match"] is True  # the identical columns match, quickly
    assert reasons[6] in ("context_timeout", "context_error")
    assert reasons[7] in ("pred_error", "pred_timeout") and reasons[8] in ("gold_error", "gold_timeout", "match")
    if engine_name == "duckdb":
        assert reasons[9] == "context_error" and {reasons[10], reasons[11]} <= {"pred_error", "no_sql"}
        assert scored[12]["match"] is True, "a later row is not affected by the earlier ones"
    assert seconds < 5 * len(rows), seconds
    assert usage.ru_maxrss * 1024 < 1200 << 20, f"peak RSS {usage.ru_maxrss / 1024:.0f} MiB"
