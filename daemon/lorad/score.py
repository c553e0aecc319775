"""Text-to-SQL execution scoring (`lorad score`).

The protocol of shared/reference/sql-eval-anchors.md: a fresh in-memory
database per row built from sql_context; gold and prediction run on the same
engine with timeouts that really interrupt; results compared as multisets
(in order only when the gold has a top-level ORDER BY), ignoring column order
and names, floats to 6 places; a gold that fails is excluded with its reason;
INSERT/UPDATE/DELETE/DDL compared by the resulting table contents.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

TIMEOUT_SECONDS = 5.0  # per statement: the context's, the gold's and the prediction's
MAX_ROWS = 10_000
MAX_VALUE_BYTES = 10_000_000  # the longest string or blob a row's SQL may build (randomblob(3e8) is an attack)
MEMORY_LIMIT = "512MB"  # DuckDB's memory for a row
MAX_MATCH_STEPS = 50_000  # column assignments tried when matching results (10 identical columns: 10! otherwise)
# DuckDB has no authorizer: statements that leave the row's own catalog, or touch files or settings
DUCKDB_REFUSED = re.compile(r"^\s*(ATTACH|DETACH|USE|INSTALL|LOAD|COPY|EXPORT|IMPORT|SET|RESET|PRAGMA|CHECKPOINT)\b",
                            re.IGNORECASE)
STATEMENT_START = re.compile(r"\b(WITH|SELECT|INSERT|UPDATE|DELETE|REPLACE|CREATE|DROP|ALTER)\b", re.IGNORECASE)
NONDETERMINISTIC = re.compile(r"\b(NOW|CURDATE|CURRENT_DATE|CURRENT_TIMESTAMP|CURRENT_TIME|RANDOM|RAND|GETDATE|SYSDATE)\b|"
                              r"date\(\s*'now'", re.IGNORECASE)
READ_ONLY = re.compile(r"^\s*(WITH|SELECT|VALUES|\()", re.IGNORECASE)


class QueryTimeout(Exception):
    pass


# --- SQL text ------------------------------------------------------------------

def split_statements(sql: str) -> list[str]:
    """Statements of a script, split on ';' outside quotes and comments."""
    out, buf, quote, i = [], [], None, 0
    while i < len(sql):
        ch = sql[i]
        if quote:
            buf.append(ch)
            if ch == quote:
                if i + 1 < len(sql) and sql[i + 1] == quote:  # '' escape
                    buf.append(sql[i + 1])
                    i += 1
                else:
                    quote = None
        elif ch in "'\"`":
            quote = ch
            buf.append(ch)
        elif sql.startswith("--", i):
            end = sql.find("\n", i)
            i = len(sql) if end < 0 else end
            continue
        elif ch == ";":
            stmt = "".join(buf).strip()
            if stmt:
                out.append(stmt)
            buf = []
        else:
            buf.append(ch)
        i += 1
    tail = "".join(buf).strip()
    if tail:
        out.append(tail)
    return out


def extract_sql(text: str | None) -> str | None:
    """The first SQL statement in a model's answer: fences and chatter removed."""
    if not text:
        return None
    fence = re.search(r"```(?:sql|sqlite|SQL)?\s*\n?(.*?)(?:```|$)", text, re.DOTALL)
    if fence and STATEMENT_START.search(fence.group(1)):
        text = fence.group(1)
    match = STATEMENT_START.search(text)
    if not match:
        return None
    statements = split_statements(text[match.start():])
    return statements[0] if statements else None


def has_top_level_order_by(sql: str) -> bool:
    """ORDER BY outside any parentheses (a subquery's ORDER BY does not order the result)."""
    depth, cleaned = 0, []
    for ch in re.sub(r"'(?:[^']|'')*'", "''", sql):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif depth == 0:
            cleaned.append(ch)
    return re.search(r"\bORDER\s+BY\b", "".join(cleaned), re.IGNORECASE) is not None


# --- engines -------------------------------------------------------------------

def _no_files(action: int, *args: Any) -> int:
    return sqlite3.SQLITE_DENY if action in (sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH) else sqlite3.SQLITE_OK


class SQLite:
    name = "sqlite"

    def connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(":memory:", isolation_level=None)
        con.set_authorizer(_no_files)  # model-written SQL must not create files (ATTACH, VACUUM INTO)
        if hasattr(con, "setlimit"):  # Python 3.11+: no string or blob beyond MAX_VALUE_BYTES
            con.setlimit(getattr(sqlite3, "SQLITE_LIMIT_LENGTH", 0), MAX_VALUE_BYTES)
        return con

    def close(self, con: sqlite3.Connection) -> None:
        con.close()

    def run_script(self, con: sqlite3.Connection, script: str, timeout: float = TIMEOUT_SECONDS) -> None:
        for stmt in split_statements(script):
            self.execute(con, stmt, timeout)

    def execute(self, con: sqlite3.Connection, sql: str, timeout: float) -> list[tuple] | None:
        deadline = time.monotonic() + timeout
        timed_out = [False]

        def check() -> int:
            if time.monotonic() > deadline:
                timed_out[0] = True
                return 1
            return 0

        con.set_progress_handler(check, 1000)
        try:
            cur = con.execute(sql)
            rows = cur.fetchmany(MAX_ROWS) if cur.description else None
        except sqlite3.OperationalError:
            if timed_out[0]:
                raise QueryTimeout() from None
            raise
        finally:
            con.set_progress_handler(None, 0)
        return rows

    def tables(self, con: sqlite3.Connection) -> list[str]:
        return [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]

    def errors(self) -> tuple[type[BaseException], ...]:
        return (sqlite3.Error, OverflowError, ValueError)


class DuckDB:
    name = "duckdb"

    def __init__(self) -> None:
        import duckdb

        self.duckdb = duckdb
        # model-written SQL must not read or write files (COPY, ATTACH 'x.db', read_csv, INSTALL)
        self.instance = duckdb.connect(":memory:", config={"enable_external_access": False,
                                                           "memory_limit": MEMORY_LIMIT})
        self.opened = itertools.count()
        self.catalogs: dict[int, str] = {}

    def connect(self):
        """An empty in-memory catalog of its own: as isolated as a new DuckDB, at a tenth of the cost."""
        con = self.instance.cursor()
        name = f"scratch{next(self.opened)}"
        con.execute(f"ATTACH ':memory:' AS {name}")
        con.execute(f"USE {name}")
        self.catalogs[id(con)] = name
        return con

    def close(self, con) -> None:
        name = self.catalogs.pop(id(con))
        try:
            con.execute("USE memory")
            con.execute(f"DETACH DATABASE IF EXISTS {name}")
        except self.duckdb.Error:
            pass  # a catalog that cannot be dropped is an empty leftover in memory, not a reason to stop
        finally:
            con.close()

    def run_script(self, con, script: str, timeout: float = TIMEOUT_SECONDS) -> None:
        for stmt in split_statements(script):
            self.execute(con, stmt, timeout)

    def execute(self, con, sql: str, timeout: float) -> list[tuple] | None:
        if DUCKDB_REFUSED.match(sql):
            raise self.duckdb.Error(f"not allowed in scoring: {sql.split()[0].upper()}")
        fired = [False]

        def interrupt() -> None:
            fired[0] = True
            con.interrupt()

        timer = threading.Timer(timeout, interrupt)
        timer.start()
        try:
            con.execute(sql)
            rows = con.fetchmany(MAX_ROWS) if con.description else None
        except self.duckdb.Error:
            if fired[0]:
                raise QueryTimeout() from None
            raise
        finally:
            timer.cancel()
        return rows

    def tables(self, con) -> list[str]:
        return [r[0] for r in con.execute("SELECT table_name FROM information_schema.tables "
                                          "WHERE table_catalog = current_database() ORDER BY table_name").fetchall()]

    def errors(self) -> tuple[type[BaseException], ...]:
        return (self.duckdb.Error, OverflowError, ValueError)


def engine(name: str):
    if name == "sqlite":
        return SQLite()
    if name == "duckdb":
        try:
            return DuckDB()
        except ImportError:
            raise SystemExit("lorad score --engine duckdb needs DuckDB: pip install 'lorad[duckdb]'") from None
    raise ValueError(f"unknown engine {name!r}")


# --- comparison ------------------------------------------------------------------

def _norm(value: Any) -> Any:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        f = float(value)
        return f if math.isnan(f) or math.isinf(f) else round(f, 6) + 0.0
    if hasattr(value, "__float__") and not isinstance(value, (str, bytes)):  # Decimal
        return round(float(value), 6) + 0.0
    if hasattr(value, "isoformat"):  # DuckDB dates
        return value.isoformat()
    return value


def _normalize(rows: list[tuple]) -> list[tuple]:
    return [tuple(_norm(v) for v in row) for row in rows]


def results_match(gold: list[tuple], pred: list[tuple], ordered: bool) -> bool:
    """Equal as multisets (or lists when ordered), for some matching of pred columns to gold columns."""
    if len(gold) != len(pred):
        return False
    if not gold:
        return True
    width = len(gold[0])
    if any(len(r) != width for r in pred):
        return False
    gold_cols = [Counter(r[i] for r in gold) for i in range(width)]
    pred_cols = [Counter(r[i] for r in pred) for i in range(width)]
    candidates = [[j for j in range(width) if pred_cols[j] == gold_cols[i]] for i in range(width)]
    if any(not c for c in candidates):
        return False
    target = gold if ordered else Counter(gold)
    steps = [0]

    def assign(i: int, used: list[int]) -> bool:
        """Depth-first over assignments of distinct pred columns to gold columns, within MAX_MATCH_STEPS."""
        if i == width:
            permuted = [tuple(r[j] for j in used) for r in pred]
            return (permuted if ordered else Counter(permuted)) == target
        for j in candidates[i]:
            steps[0] += 1
            if steps[0] > MAX_MATCH_STEPS:
                return False
            if j not in used and assign(i + 1, [*used, j]):
                return True
        return False

    return assign(0, [])


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _snapshot(db, con) -> dict[str, Counter]:
    return {t: Counter(_normalize(db.execute(con, f"SELECT * FROM {_quote_ident(t)}", TIMEOUT_SECONDS) or []))
            for t in db.tables(con)}


def score_row(row: Any, db, timeout: float = TIMEOUT_SECONDS) -> dict[str, Any]:
    """{match: bool | None, reason, pred_sql, gold_rows?}; match None means excluded. Never raises for odd input:
    every statement is bounded in time and memory, and whatever still goes wrong is a reason on the row."""
    if not isinstance(row, dict):
        return {"pred_sql": None, "match": None, "reason": "row_not_an_object"}
    for key in ("sql_context", "sql"):
        if row.get(key) is not None and not isinstance(row[key], str):
            return {"pred_sql": None, "match": None, "reason": f"{key}_not_text"}
    prediction = row.get("prediction")
    try:
        return _score_row(row.get("sql_context") or "", (row.get("sql") or "").strip(),
                          prediction if isinstance(prediction, str) else None, db, timeout)
    except Exception as e:  # noqa: BLE001 - an engine failure or a bug: this row is excluded, the rest are scored
        return {"pred_sql": None, "match": None, "reason": "scoring_error", "error": f"{type(e).__name__}: {e}"[:200]}


def _score_row(context: str, gold: str, prediction: str | None, db, timeout: float) -> dict[str, Any]:
    pred = extract_sql(prediction)
    result: dict[str, Any] = {"pred_sql": pred}
    if not gold:
        return {**result, "match": None, "reason": "no_gold"}
    if NONDETERMINISTIC.search(gold):
        return {**result, "match": None, "reason": "nondeterministic"}
    errors = db.errors()
    gold_stmt = (split_statements(gold) or [gold])[0]
    is_query = bool(READ_ONLY.match(gold_stmt))
    con = db.connect()
    try:
        try:
            db.run_script(con, context, timeout)
        except QueryTimeout:
            return {**result, "match": None, "reason": "context_timeout"}
        except errors:
            return {**result, "match": None, "reason": "context_error"}
        try:
            gold_rows = db.execute(con, gold_stmt, timeout)
        except QueryTimeout:
            return {**result, "match": None, "reason": "gold_timeout"}
        except errors:
            return {**result, "match": None, "reason": "gold_error"}
        gold_state = None if is_query else _snapshot(db, con)
    finally:
        db.close(con)
    result["gold_nonempty"] = bool(gold_rows) if is_query else None
    if pred is None:
        return {**result, "match": False, "reason": "no_sql", "valid": False}
    con = db.connect()
    try:
        db.run_script(con, context, timeout)
        try:
            pred_rows = db.execute(con, pred, timeout)
        except QueryTimeout:
            return {**result, "match": False, "reason": "pred_timeout", "valid": False}
        except errors as e:
            return {**result, "match": False, "reason": "pred_error", "error": str(e)[:200], "valid": False}
        if is_query:
            if pred_rows is None or not READ_ONLY.match(pred):
                return {**result, "match": False, "reason": "pred_not_a_query", "valid": True}
            ok = results_match(_normalize(gold_rows or []), _normalize(pred_rows), has_top_level_order_by(gold_stmt))
        else:
            try:
                ok = _snapshot(db, con) == gold_state
            except (QueryTimeout, *errors) as e:
                return {**result, "match": False, "reason": "pred_error", "error": str(e)[:200], "valid": False}
    finally:
        db.close(con)
    return {**result, "match": ok, "reason": "match" if ok else "mismatch", "valid": True}


def wilson(successes: int, n: int, z: float = 1.96) -> list[float] | None:
    """Wilson score 95 % interval for a proportion."""
    if n == 0:
        return None
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def summarize(rows: list[dict[str, Any]], engine_name: str) -> dict[str, Any]:
    scored = [r for r in rows if r["match"] is not None]
    matches = sum(1 for r in scored if r["match"])
    nonempty = [r for r in scored if r.get("gold_nonempty")]
    summary: dict[str, Any] = {
        "engine": engine_name,
        "n": len(rows),
        "scored": len(scored),
        "excluded": dict(Counter(r["reason"] for r in rows if r["match"] is None)),
        "matches": matches,
        "execution_accuracy": round(matches / len(scored), 4) if scored else None,
        "execution_accuracy_ci95": wilson(matches, len(scored)),
        "valid_sql_rate": round(sum(1 for r in scored if r.get("valid")) / len(scored), 4) if scored else None,
        "execution_accuracy_nonempty": round(sum(1 for r in nonempty if r["match"]) / len(nonempty), 4) if nonempty else None,
        "reasons": dict(Counter(r["reason"] for r in scored)),
    }
    groups: dict[str, list] = {}
    for r in scored:
        if r.get("sql_complexity"):
            groups.setdefault(r["sql_complexity"], []).append(r["match"])
    if groups:
        summary["by_complexity"] = {k: {"scored": len(v), "matches": sum(v), "execution_accuracy": round(sum(v) / len(v), 4)}
                                    for k, v in sorted(groups.items())}
    return summary


def score_rows(rows: Iterable[dict[str, Any]], engine_name: str = "sqlite",
               timeout: float = TIMEOUT_SECONDS) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    db = engine(engine_name)
    out = [{**(row if isinstance(row, dict) else {"row": row}), **score_row(row, db, timeout)} for row in rows]
    return summarize(out, engine_name), out


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as e:
                    raise SystemExit(f"{path}:{lineno}: not valid JSON: {e}") from None
    return rows


def main(pairs: str, engine_name: str = "sqlite", rows_out: str | None = None,
         echo: Callable[[str], None] = print) -> int:
    summary, rows = score_rows(read_jsonl(Path(pairs)), engine_name)
    if rows_out:
        Path(rows_out).write_text("".join(json.dumps(r, default=str) + "\n" for r in rows))
    echo(json.dumps(summary, indent=2))
    return 0
