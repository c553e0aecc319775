"""prepare: rows from a file, folder, the bundled set or the HF hub → data/{train,valid,test}.jsonl.

Output rows are what mlx-lm's datasets read: {"prompt", "completion"} (chat
templated at training time), {"messages"} or {"text"}. Gretel rows keep their
sql_context, sql and sql_complexity so that evaluate can execute them.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lorad.fsutil import atomic_write_text
from lorad.prompts import gretel_prompt
from lorad.stages import StageContext, StageFailed

SPLITS = ("train", "valid", "test")
SPLIT_ALIASES = {"train": "train", "valid": "valid", "validation": "valid", "val": "valid", "dev": "valid", "test": "test"}
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
GRETEL_KEYS = ("sql_prompt", "sql_context", "sql")


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL, JSON (a list, or {"data": [...]}), CSV or Parquet file."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except ValueError as e:
                    raise StageFailed(f"{path}:{lineno}: not valid JSON: {e}") from None
        return rows
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise StageFailed(f"{path}: not valid JSON: {e}") from None
        if isinstance(data, dict):
            data = next((v for v in data.values() if isinstance(v, list)), None)
        if not isinstance(data, list):
            raise StageFailed(f"{path}: expected a JSON list of rows")
        return data
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise StageFailed(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(FILE_SUFFIXES)}")


def readable_path(ref: str) -> Path:
    """A `path:` reference, checked against the daemon's policy right before it is read."""
    from lorad.policy import PolicyError, from_env

    policy = from_env()
    if policy is None:
        return Path(ref).expanduser()
    try:
        return policy.resolve_path(ref)
    except PolicyError as e:
        raise StageFailed(str(e)) from None


def load_source(source: str, cache_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """{split: rows}; a single file or unsplit source comes back as {"all": rows}."""
    kind, _, ref = source.partition(":")
    if kind == "builtin":
        from lorad.sqldata import builtin_rows

        return {"all": builtin_rows()}
    if kind == "path":
        path = readable_path(ref)
        if path.is_file():
            return {"all": read_rows(path)}
        if path.is_dir():
            found: dict[str, list[dict[str, Any]]] = {}
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in FILE_SUFFIXES)
            for p in files:
                split = next((SPLIT_ALIASES[k] for k in SPLIT_ALIASES if p.stem.lower() == k or p.stem.lower().startswith(k + "_")
                              or f"_{k}" in p.stem.lower() or f"-{k}" in p.stem.lower()), None)
                if split:
                    found.setdefault(split, []).extend(read_rows(p))
            if not found and files:
                return {"all": [r for p in files for r in read_rows(p)]}
            if not found:
                raise StageFailed(f"{path}: no {', '.join(FILE_SUFFIXES)} files in this folder")
            return found
        raise StageFailed(f"data.source {source!r}: no such file or folder")
    if kind == "hf":
        return _load_hf(ref, cache_dir)
    raise StageFailed(f"unknown data source {source!r}")


def _load_hf(dataset_id: str, cache_dir: Path) -> dict[str, list[dict[str, Any]]]:
    try:
        import datasets
    except ImportError:
        raise StageFailed("hf: data needs the `datasets` package") from None
    try:
        ds = datasets.load_dataset(dataset_id)
    except Exception as e:  # noqa: BLE001 - offline, missing, gated: all get the same advice
        raise StageFailed(
            f"could not load hf:{dataset_id} ({type(e).__name__}: {str(e)[:200]}). Offline or on a machine without "
            f"the hub, download its files elsewhere and use `data: {{source: 'path:/folder/with/train.jsonl'}}` "
            f"(JSONL, JSON, CSV or Parquet; train/valid/test files are used as splits)."
        ) from None
    return {SPLIT_ALIASES.get(name, name): split.to_list() for name, split in ds.items()}


def detect_format(row: dict[str, Any]) -> str:
    if all(k in row for k in GRETEL_KEYS):
        return "gretel"
    if "prompt" in row and "completion" in row:
        return "completions"
    if "messages" in row:
        return "chat"
    if "text" in row:
        return "text"
    raise StageFailed(f"cannot tell the data format from the first row's keys {sorted(row)[:12]}; "
                      "set data.format (gretel, completions, chat or text)")


def prepared_format(row: dict[str, Any]) -> str:
    """The format of a row this stage wrote (the inverse of to_training_row's shapes)."""
    if "prompt" in row and "completion" in row:
        return "gretel" if row.get("sql_context") is not None and row.get("sql") else "completions"
    if "messages" in row:
        return "chat"
    return "text"


def to_training_row(row: dict[str, Any], fmt: str, with_context: bool) -> dict[str, Any] | None:
    """One source row → one mlx-lm row, or None when it is empty."""
    if fmt == "gretel":
        question, sql = str(row.get("sql_prompt") or "").strip(), str(row.get("sql") or "").strip()
        if not question or not sql:
            return None
        out = {"prompt": gretel_prompt(question, str(row.get("sql_context") or ""), with_context), "completion": sql}
        for key in ("sql_context", "sql", "sql_complexity", "sql_task_type", "domain", "id"):
            if key in row:
                out[key] = row[key]
        return out
    if fmt == "completions":
        prompt, completion = str(row.get("prompt") or "").strip(), str(row.get("completion") or "").strip()
        return {"prompt": prompt, "completion": completion} if prompt and completion else None
    if fmt == "chat":
        messages = row.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) and m.get("content") for m in messages):
            return None
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
    text = str(row.get("text") or "").strip()
    return {"text": text} if text else None


def _key(row: dict[str, Any]) -> str:
    core = {k: row[k] for k in ("prompt", "completion", "messages", "text") if k in row}
    return hashlib.sha1(json.dumps(core, sort_keys=True).encode()).hexdigest()


def split_rows(rows: list[dict[str, Any]], valid_fraction: float, test_fraction: float, seed: int,
               min_valid: int = 1) -> dict[str, list]:
    """Deterministic shuffle by seed, then test, valid, train slices.

    valid gets at least min_valid rows (a batch: mlx-lm skips validation on fewer), test at least one.
    """
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    shuffled = [rows[i] for i in order]
    n = len(shuffled)
    n_test = max(1, round(n * test_fraction)) if test_fraction > 0 and n >= 3 else 0
    n_valid = max(min_valid, round(n * valid_fraction)) if valid_fraction > 0 and n >= 2 * min_valid + n_test else 0
    return {"test": shuffled[:n_test], "valid": shuffled[n_test:n_test + n_valid], "train": shuffled[n_test + n_valid:]}


def _length_stats(rows: Iterable[dict[str, Any]]) -> dict[str, float]:
    lengths = [len(json.dumps({k: r[k] for k in ("prompt", "completion", "messages", "text") if k in r})) for r in rows]
    if not lengths:
        return {}
    lengths.sort()
    return {"min": lengths[0], "median": statistics.median(lengths), "p95": lengths[int(0.95 * (len(lengths) - 1))],
            "max": lengths[-1], "mean": round(statistics.fmean(lengths), 1)}


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def run(ctx: StageContext) -> dict[str, str]:
    data = ctx.spec["data"]
    min_valid = ctx.spec["train"]["batch_size"]
    sources = load_source(data["source"], ctx.cache_dir)
    first = next((r for rows in sources.values() for r in rows), None)
    if first is None:
        raise StageFailed(f"data.source {data['source']!r} has no rows")
    fmt = data.get("format") or detect_format(first)
    stats: dict[str, Any] = {"format": fmt, "read": {k: len(v) for k, v in sources.items()}}
    seen: set[str] = set()
    cleaned: dict[str, list[dict[str, Any]]] = {}
    dropped = {"empty": 0, "duplicate": 0}
    for split, rows in sources.items():
        out = []
        for row in rows:
            converted = to_training_row(row, fmt, data.get("with_context", True)) if isinstance(row, dict) else None
            if converted is None:
                dropped["empty"] += 1
                continue
            key = _key(converted)
            if key in seen:
                dropped["duplicate"] += 1
                continue
            seen.add(key)
            out.append(converted)
        cleaned[split] = out
    if "all" in cleaned:
        rows = cleaned.pop("all")
        if data.get("limit"):
            rows = random.Random(data["seed"]).sample(rows, min(len(rows), data["limit"]))
        parts = split_rows(rows, data["valid_fraction"], data["test_fraction"], data["seed"], min_valid)
        for split in SPLITS:
            cleaned[split] = cleaned.get(split, []) + parts[split]
    elif data.get("limit"):
        cleaned["train"] = cleaned.get("train", [])[: data["limit"]]
    if not cleaned.get("train"):
        raise StageFailed("no training rows left after dropping empty and duplicate rows")
    if not cleaned.get("valid"):  # validation is what early stopping and best-checkpoint need
        parts = split_rows(cleaned["train"], data["valid_fraction"] or 0.05, 0.0, data["seed"], min_valid)
        cleaned["train"], cleaned["valid"] = parts["train"], parts["valid"]
    out_dir = ctx.path("data")
    out_dir.mkdir(exist_ok=True)
    artifacts = {}
    for split in SPLITS:
        write_jsonl(out_dir / f"{split}.jsonl", cleaned.get(split, []))
        artifacts[f"data_{split}"] = f"data/{split}.jsonl"
    stats.update(counts={s: len(cleaned.get(s, [])) for s in SPLITS}, dropped=dropped,
                 length_chars=_length_stats(cleaned["train"]))
    ctx.log.info("data_prepared", **stats)
    return artifacts
