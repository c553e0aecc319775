"""Rows per second of `lorad score` (SQLite and DuckDB) on the bundled text-to-SQL rows.

Half the predictions are the gold query, half a plausible wrong one, so both
match and mismatch paths run. Target (issue #7): ≥ 500 rows/s on SQLite.

    .venv/bin/python bench/score.py [--rows 3000]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "daemon"))

from lorad.score import score_rows  # noqa: E402
from lorad.sqldata import builtin_rows  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=3000)
    args = parser.parse_args()
    rows = builtin_rows()[: args.rows]
    pairs = [{**r, "prediction": r["sql"] if i % 2 == 0 else r["sql"].replace("DESC", "ASC").replace(">", "<")}
             for i, r in enumerate(rows)]
    results = {}
    for engine in ("sqlite", "duckdb"):
        t0 = time.perf_counter()
        summary, _ = score_rows(pairs, engine)
        seconds = time.perf_counter() - t0
        results[engine] = {"rows": len(pairs), "seconds": round(seconds, 2), "rows_per_second": round(len(pairs) / seconds, 1),
                           "execution_accuracy": summary["execution_accuracy"]}
        print(f"{engine:7s} {len(pairs)} rows in {seconds:.2f}s = {len(pairs) / seconds:,.0f} rows/s "
              f"(EX {summary['execution_accuracy']})", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
