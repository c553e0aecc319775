"""Pickup latency and idle CPU of the daemon, native events vs --force-polling, in one run.

Latency: a spec renamed into the inbox → its outbox entry (status.json) exists.
Idle CPU: the daemon's user+system CPU over 30 s with nothing to do.
Targets (issue #2): median latency ≤ 1 s; idle CPU ≤ 0.5 % of one core.

    .venv/bin/python bench/daemon.py [--drops 20] [--idle 30]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(mode: list[str], drops: int, idle: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "root"
        rows = Path(tmp) / "rows.jsonl"
        rows.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(20)))
        proc = subprocess.Popen([sys.executable, "-m", "lorad", "run", "--root", str(root), "--allow-read", tmp, *mode],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while not (root / "inbox").is_dir():
                time.sleep(0.05)
            time.sleep(1.0)
            latencies = []
            for i in range(drops):
                tmpfile = Path(tmp) / f"spec{i}.yaml"
                tmpfile.write_text(f"version: 1\nname: bench{i}\nmodel: {{source: demo}}\n"
                                   f"data: {{source: 'path:{rows}'}}\nstages: [prepare]\n")
                before = set(os.listdir(root / "outbox"))
                t0 = time.perf_counter()
                os.rename(tmpfile, root / "inbox" / f"spec{i}.yaml")
                while True:
                    new = set(os.listdir(root / "outbox")) - before
                    if new and (root / "outbox" / next(iter(new)) / "status.json").exists():
                        break
                    time.sleep(0.002)
                latencies.append(time.perf_counter() - t0)
                time.sleep(1.0)  # let the job run before the next drop
            time.sleep(5.0)  # jobs done, the daemon idles
            c0, t0 = cpu_seconds(proc.pid), time.monotonic()
            time.sleep(idle)
            c1, t1 = cpu_seconds(proc.pid), time.monotonic()
        finally:
            proc.terminate()
            proc.wait(timeout=40)
    return {
        "latency_median_s": round(statistics.median(latencies), 4),
        "latency_p90_s": round(sorted(latencies)[int(0.9 * (len(latencies) - 1))], 4),
        "latency_max_s": round(max(latencies), 4),
        "idle_cpu_percent_of_core": round(100 * (c1 - c0) / (t1 - t0), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--drops", type=int, default=20)
    parser.add_argument("--idle", type=float, default=30.0)
    args = parser.parse_args()
    results = {
        "native events": measure([], args.drops, args.idle),
        "--force-polling": measure(["--force-polling"], args.drops, args.idle),
    }
    print(f"{'mode':18s} {'median':>8s} {'p90':>8s} {'max':>8s} {'idle CPU':>9s}")
    for mode, r in results.items():
        print(f"{mode:18s} {r['latency_median_s']:7.3f}s {r['latency_p90_s']:7.3f}s {r['latency_max_s']:7.3f}s "
              f"{r['idle_cpu_percent_of_core']:8.3f}%")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
