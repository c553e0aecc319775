"""Data-parallel LoRA on MLX's ring backend: two ranks on 127.0.0.1, and the errors users hit first."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import tinymodel
from conftest import statuses
from test_daemon import drop
from test_stages import ROWS, write_rows


def spec(name: str, model: Path, data: Path, extra: str = "") -> str:
    return (f"version: 1\nname: {name}\nmodel: {{source: 'path:{model}'}}\n"
            f"data: {{source: 'path:{data}', seed: 0}}\n"
            "train:\n  iters: 12\n  batch_size: 4\n  learning_rate: 0.002\n  num_layers: 2\n  eval_every: 6\n"
            f"  save_every: 6\n  max_seq_length: 64\n{extra}stages: [prepare, convert, lora]\n")


def last_losses(job: Path, n: int = 4) -> float:
    rows = [json.loads(x) for x in (job / "adapters/metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in rows if "train_loss" in r]
    return sum(losses[-n:]) / n


def test_two_rank_ring_job_matches_one_rank(tmp_path, lorad_env):
    tiny = tinymodel.make_tiny_model(tmp_path / "tiny")
    data = write_rows(tmp_path / "rows.jsonl", [ROWS["completions"](i) for i in range(64)])
    root = tmp_path / "root"
    drop(root / "inbox", "one.yaml", spec("one", tiny, data))
    drop(root / "inbox", "two.yaml", spec("two", tiny, data,
                                          "  distributed: {hosts: [localhost, localhost], backend: ring}\n"))
    out = subprocess.run([sys.executable, "-m", "lorad", "run", "--once", "--root", str(root), "--allow-read", str(root.parent)],
                         env=lorad_env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    by_name = {s["name"]: s for s in statuses(root / "outbox").values()}
    assert by_name["one"]["state"] == "succeeded", by_name["one"].get("error")
    assert by_name["two"]["state"] == "succeeded", by_name["two"].get("error")
    one, two = (root / "outbox" / by_name[n]["job_id"] for n in ("one", "two"))
    events = [json.loads(x) for x in (two / "events.jsonl").read_text().splitlines()]
    assert [e for e in events if e["event"] == "distributed_launch"][0]["world_size"] == 2
    assert [e for e in events if e["event"] == "training_setup"][0]["world_size"] == 2
    assert any(e["event"] == "progress" and e.get("world_size") == 2 for e in events)
    throughput = [e for e in events if e["event"] == "rank_throughput"][0]
    assert set(throughput["ranks"]) == {"0", "1"}
    assert (two / "logs/lora.rank1.jsonl").exists() and (two / "hostfile.json").exists()
    assert json.loads((two / "adapters/done.json").read_text())["world_size"] == 2
    # the same global batch on two ranks ends where one rank does
    a, b = last_losses(one), last_losses(two)
    assert abs(a - b) <= 0.25 * a, (a, b)


def test_batch_not_divisible_by_hosts_is_a_clear_validation_error(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(spec("x", tmp_path, tmp_path, "  distributed: {hosts: [a, b, c]}\n"))
    out = subprocess.run([sys.executable, "-m", "lorad", "validate", str(path)], capture_output=True, text=True)
    assert out.returncode == 1
    assert f"{path}:7:15: $.train.batch_size: train.batch_size 4 is not divisible by the number of hosts (3)" in out.stdout


def test_a_host_that_does_not_answer_is_named_at_submit(tmp_path, lorad_env):
    path = tmp_path / "s.yaml"
    path.write_text(spec("x", tmp_path, tmp_path, "  distributed: {hosts: [localhost, 127.0.0.2]}\n"))
    out = subprocess.run([sys.executable, "-m", "lorad", "submit", str(path), "--root", str(tmp_path / "r")],
                         capture_output=True, text=True, env=lorad_env, timeout=60)
    assert out.returncode == 1
    assert "host '127.0.0.2' does not answer over SSH" in out.stderr
    assert not (tmp_path / "r" / "inbox").exists() or not list((tmp_path / "r" / "inbox").iterdir())
