"""Unattended means it survives: poison specs, full disks, torn state, killed stages, lost locks, NaN losses.

Every test runs the daemon as a real subprocess on real files; each checks that the daemon is still
alive, that the next good spec still runs, and that nothing already written is lost.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import tinymodel
from conftest import spec_text, statuses, wait_for
from lorad.spec import check_bytes
from test_daemon import drop, events

HOOKS_SLOW = "prepare=stagehooks:slow_train"
CANARY = "canary-7f3a9c-private"


def by_source(outbox: Path) -> dict[str, dict]:
    return {s["source"]: s for s in statuses(outbox).values()}


def good_spec_runs(root: Path, rows_file: Path, name: str = "good") -> dict:
    drop(root / "inbox", f"{name}.yaml", spec_text(name, rows_file))
    return wait_for(lambda: (by_source(root / "outbox").get(f"{name}.yaml") or {}).get("state") == "succeeded"
                    and by_source(root / "outbox")[f"{name}.yaml"], timeout=60, what=f"{name} succeeded")


POISON = {
    "nul.yaml": b"version: 1\nname: a\x00b\n",
    "cycle.yaml": b"version: 1\nx: &a [*a]\n",
    "deep.yaml": b"[" * 500,
    "deep-block.yaml": "".join("  " * i + f"k{i}:\n" for i in range(400)).encode(),
    "bomb.yaml": b"a: &a [x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
                 b"d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: [*d,*d,*d,*d,*d,*d,*d,*d,*d]\n",
    "binary.yaml": bytes(range(256)) * 4,
}


def test_poison_specs_are_rejected_and_the_daemon_survives_them_and_every_restart(tmp_path, start_daemon, rows_file):
    root = tmp_path / "root"
    inbox = root / "inbox"
    for name, data in POISON.items():
        inbox.mkdir(parents=True, exist_ok=True)
        (inbox / name).write_bytes(data)
    huge = inbox / "huge.yaml"
    with open(huge, "wb") as f:  # 300 MB, sparse: refused from fstat, never read
        f.truncate(300 << 20)
    canary = tmp_path / "private.txt"
    canary.write_text(f"version: 1\nname: {CANARY}\n")
    (inbox / "link.yaml").symlink_to(canary)
    os.mkfifo(inbox / "pipe.yaml")
    d = start_daemon()
    outbox = root / "outbox"
    wait_for(lambda: len(by_source(outbox)) == len(POISON) + 1, timeout=60, what="every poison file rejected")
    st = by_source(outbox)
    for name in POISON:
        assert st[name]["state"] == "rejected", (name, st[name])
        problem = st[name]["error"]["errors"][0]
        assert problem["message"] and problem["line"], (name, problem)
    assert "nested" in st["deep.yaml"]["error"]["errors"][0]["message"]
    assert "U+0000" in st["nul.yaml"]["error"]["errors"][0]["message"]
    assert st["huge.yaml"]["state"] == "rejected" and "limited to" in st["huge.yaml"]["error"]["message"]
    kept = root / "state" / "kept"
    assert [p.stat().st_size for p in kept.iterdir()] == [300 << 20], "a user's file is kept, not copied out"
    assert d.proc.poll() is None
    good_spec_runs(root, rows_file)
    # the symlink and the FIFO are never taken: not regular files (lstat); nothing blocked on the FIFO
    assert (inbox / "pipe.yaml").exists()
    for entry in outbox.rglob("*"):
        if entry.is_file():
            assert CANARY not in entry.read_text(errors="replace"), entry
    d.signal(signal.SIGTERM)
    assert d.wait() == 0
    d2 = start_daemon()  # a restart does not meet the poison again
    good_spec_runs(root, rows_file, "after-restart")
    assert d2.proc.poll() is None

    for name, data in POISON.items():
        (tmp_path / name).write_bytes(data)
    out = subprocess.run([sys.executable, "-m", "lorad", "validate", *POISON], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path)
    assert out.returncode == 1
    assert "Traceback" not in out.stdout + out.stderr
    assert all(f"{n}:" in out.stdout for n in POISON)


def test_claim_reads_the_opened_file_never_a_link_swapped_in(tmp_path):
    """The race the tracker cannot see: after its lstat, the name becomes a symlink or a FIFO."""
    from lorad.daemon import read_claimed

    canary = tmp_path / "passwd"
    canary.write_text(CANARY)
    link = tmp_path / "claimed.yaml"
    link.symlink_to(canary)
    data, why = read_claimed(link)
    assert data is None and "symbolic link" in why
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    data, why = read_claimed(fifo)  # returns at once: O_NONBLOCK, then fstat says FIFO
    assert data is None and "FIFO" in why


def test_spec_numbers_are_checked_and_yaml_1_1_floats_accepted():
    head = "version: 1\nname: n\nmodel: {source: demo}\ndata: {source: 'builtin:text-to-sql'}\n"
    assert not check_bytes((head + "train: {learning_rate: .nan}\n").encode()).ok
    assert not check_bytes((head + "train: {learning_rate: .inf}\n").encode()).ok
    assert not check_bytes((head + f"train: {{iters: {10**30}}}\n").encode()).ok
    assert not check_bytes((head + "train: {learning_rate: 2.0}\n").encode()).ok
    ok = check_bytes((head + "train: {learning_rate: 5e-4}\n").encode())
    assert ok.ok and ok.spec is not None and ok.spec["train"]["learning_rate"] == 5e-4


@pytest.fixture
def small_disk(tmp_path):
    """The root on a 96 MiB tmpfs (a real full disk: ENOSPC from the kernel)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(mnt: Path, leave: int = 0) -> Path:
    """Write zeros until only `leave` bytes are free (0: until the kernel says ENOSPC)."""
    filler = mnt / "filler"
    with open(filler, "wb") as f:
        for block in (1 << 20, 4096, 512):
            try:
                while shutil.disk_usage(mnt).free - block >= leave:
                    f.write(b"\0" * block)
                    f.flush()
            except OSError:
                pass
    return filler


def test_a_full_disk_defers_claims_keeps_every_status_whole_and_recovers(tmp_path, small_disk, start_daemon, rows_file):
    root = small_disk / "root"
    inbox = tmp_path / "inbox"  # the inbox on another disk, as a synced folder would be
    d = start_daemon("--inbox", str(inbox), root=root)
    wait_for(lambda: (root / "state" / "jobs.sqlite3").exists())
    drop(inbox, "first.yaml", spec_text("first", rows_file))
    wait_for(lambda: (by_source(root / "outbox").get("first.yaml") or {}).get("state") == "succeeded", timeout=30)
    first_status = next((root / "outbox").glob("*first*/status.json"))
    filler = _fill(small_disk)
    drop(inbox, "while-full.yaml", spec_text("while-full", rows_file))
    wait_for(lambda: '"disk_full": true' in d.log or "claim_deferred" in d.log, timeout=30, what="a disk-full claim")
    assert d.proc.poll() is None, d.log[-3000:]
    assert (inbox / "while-full.yaml").exists() or list((root / "state" / "claimed").glob("*.yaml")), "the spec was lost"
    json.loads(first_status.read_text())  # never torn: a failed rewrite leaves the old file whole
    leftovers = [p for p in (root / "outbox").rglob(".*.tmp")]
    assert not leftovers, leftovers
    filler.unlink()
    st = wait_for(lambda: by_source(root / "outbox").get("while-full.yaml"), timeout=60, what="entry after space came back")
    assert st["state"] in ("queued", "running", "succeeded", "failed")
    spec = next((root / "outbox").glob("*while-full*/spec.yaml")).read_text()
    assert spec == spec_text("while-full", rows_file), "the spec's bytes were not lost"
    assert d.proc.poll() is None


def test_a_stage_that_needs_more_disk_than_is_free_is_refused_before_it_starts(tmp_path, small_disk, start_daemon, rows_file):
    root = small_disk / "root"
    start_daemon("--inbox", str(tmp_path / "inbox"), root=root)
    wait_for(lambda: (root / "state" / "jobs.sqlite3").exists())
    _fill(small_disk, leave=16 << 20)
    drop(tmp_path / "inbox", "a.yaml", spec_text("a", rows_file))  # prepare reserves 64 MiB; 16 MiB are free
    st = wait_for(lambda: (by_source(root / "outbox").get("a.yaml") or {}).get("state") == "failed"
                  and by_source(root / "outbox")["a.yaml"], timeout=30)
    assert st["error"]["type"] == "DiskFull" and "MiB are free" in st["error"]["message"]
    assert "prepare" not in {k for k, v in st["stages"].items() if v.get("state") == "running"}


def test_torn_missing_and_edited_outbox_state_is_repaired_from_the_store(tmp_path, start_daemon, rows_file):
    root = tmp_path / "root"
    d = start_daemon(LORAD_STAGE_HOOKS=HOOKS_SLOW, HOOK_STEPS="30")
    drop(root / "inbox", "a.yaml", spec_text("a", rows_file))
    drop(root / "inbox", "b.yaml", spec_text("b", rows_file))
    wait_for(lambda: (by_source(root / "outbox").get("a.yaml") or {}).get("state") == "running"
             and "b.yaml" in by_source(root / "outbox"), timeout=30)
    job_a = root / "outbox" / by_source(root / "outbox")["a.yaml"]["job_id"]
    job_b = root / "outbox" / by_source(root / "outbox")["b.yaml"]["job_id"]
    (job_a / "status.json").write_text('{"job_')  # torn while the stage runs
    (job_b / "spec.yaml").write_text("version: 1\n")  # a co-writer edits a queued job's public copy
    wait_for(lambda: json.loads((job_b / "status.json").read_text())["state"] == "succeeded", timeout=60)
    assert json.loads((job_a / "status.json").read_text())["state"] == "succeeded"
    assert json.loads((job_b / "ckpt.json").read_text())["step"] == 30, "b ran from its stored spec, not the edited copy"
    d.signal(signal.SIGTERM)
    assert d.wait() == 0

    (job_a / "status.json").write_text("[]")
    shutil.rmtree(job_b)
    d2 = start_daemon()
    wait_for(lambda: (job_b / "status.json").exists(), timeout=20, what="deleted entry rebuilt")
    assert json.loads((job_a / "status.json").read_text())["state"] == "succeeded"
    assert json.loads((job_b / "status.json").read_text())["state"] == "succeeded"
    assert (job_b / "spec.yaml").read_text() == spec_text("b", rows_file)
    assert any(e["event"] == "outbox_repaired" for e in events(job_a))
    good_spec_runs(root, rows_file)
    assert d2.proc.poll() is None


def _stage_pid(job_dir: Path) -> int:
    return int(wait_for(lambda: (job_dir / "stage.pid").exists() and (job_dir / "stage.pid").read_text(), timeout=30))


def test_a_stage_killed_by_sigkill_is_retried_and_resumes_from_its_checkpoint(tmp_path, start_daemon, rows_file):
    root = tmp_path / "root"
    start_daemon(LORAD_STAGE_HOOKS=HOOKS_SLOW, HOOK_STEPS="40")
    drop(root / "inbox", "a.yaml", spec_text("a", rows_file))
    wait_for(lambda: by_source(root / "outbox").get("a.yaml"), timeout=30)
    job_dir = root / "outbox" / by_source(root / "outbox")["a.yaml"]["job_id"]
    pid = _stage_pid(job_dir)
    wait_for(lambda: (job_dir / "ckpt.json").exists() and json.loads((job_dir / "ckpt.json").read_text())["step"] >= 8)
    os.kill(pid, signal.SIGKILL)  # what the OOM killer does
    saved = json.loads((job_dir / "ckpt.json").read_text())["step"]
    st = wait_for(lambda: by_source(root / "outbox")["a.yaml"]["state"] == "succeeded" and by_source(root / "outbox")["a.yaml"],
                  timeout=60)
    assert st["attempts"] == 2
    requeued = [e for e in events(job_dir) if e["event"] == "job_requeued"]
    assert requeued and "SIGKILL" in requeued[0]["reason"] and "out of memory" in requeued[0]["reason"]
    resumed = [e for e in events(job_dir) if e["event"] == "hook_resume"]
    assert resumed and resumed[0]["step"] >= saved - 1
    from lorad.jobstore import JobStore

    store = JobStore(root / "state" / "jobs.sqlite3")
    moves = [(a, b) for a, b, _ in store.history(st["job_id"])]
    store.close()
    assert moves == [(None, "queued"), ("queued", "running"), ("running", "queued"), ("queued", "running"),
                     ("running", "succeeded")], moves


def test_after_the_last_attempt_a_job_stays_failed_across_restarts(tmp_path, start_daemon, rows_file, lorad_env):
    root = tmp_path / "root"
    d = start_daemon(LORAD_STAGE_HOOKS="prepare=stagehooks:die_of_signal", HOOK_SIGNAL=str(int(signal.SIGKILL)))
    drop(root / "inbox", "a.yaml", spec_text("a", rows_file))
    st = wait_for(lambda: (by_source(root / "outbox").get("a.yaml") or {}).get("state") == "failed"
                  and by_source(root / "outbox")["a.yaml"], timeout=60)
    assert "gave up after 3 attempts" in st["error"]["message"] and st["attempts"] == 3
    job_dir = root / "outbox" / st["job_id"]
    starts = sum(e["event"] == "stage_started" for e in events(job_dir))
    assert starts == 3
    d.signal(signal.SIGTERM)
    d.wait()
    start_daemon()
    good_spec_runs(root, rows_file)
    assert sum(e["event"] == "stage_started" for e in events(job_dir)) == starts, "a failed job was started again"
    assert by_source(root / "outbox")["a.yaml"]["state"] == "failed"
    # `lorad retry` is the way back: it resumes at the failed stage
    out = subprocess.run([sys.executable, "-m", "lorad", "retry", st["job_id"], "--root", str(root)],
                         capture_output=True, text=True, timeout=60, env=lorad_env)
    assert out.returncode == 0 and "retry requested" in out.stdout, out.stderr
    wait_for(lambda: sum(e["event"] == "stage_started" for e in events(job_dir)) > starts, timeout=30)


def test_deleting_the_lock_file_does_not_let_a_second_daemon_in(tmp_path, start_daemon, rows_file):
    root = tmp_path / "root"
    first = start_daemon(LORAD_STAGE_HOOKS=HOOKS_SLOW, HOOK_STEPS="60")
    wait_for(lambda: (root / "state" / "lock").exists())
    drop(root / "inbox", "a.yaml", spec_text("a", rows_file))
    wait_for(lambda: (by_source(root / "outbox").get("a.yaml") or {}).get("state") == "running", timeout=30)
    (root / "state" / "lock").unlink()
    second = start_daemon(LORAD_STAGE_HOOKS=HOOKS_SLOW, HOOK_STEPS="60")
    assert second.wait(timeout=20) == 3
    assert "already running" in second.log
    st = wait_for(lambda: by_source(root / "outbox")["a.yaml"]["state"] == "succeeded" and by_source(root / "outbox")["a.yaml"],
                  timeout=60)
    job_dir = root / "outbox" / st["job_id"]
    assert sum(e["event"] == "hook_start" for e in events(job_dir)) == 1, "the job ran twice"
    assert first.proc.poll() is None


# --- the real lora stage --------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return tinymodel.make_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


def _lora_spec(model: Path, rows: Path, name: str, **train: object) -> str:
    settings = {"iters": 40, "batch_size": 2, "num_layers": 2, "learning_rate": 1e-3, "max_seq_length": 64,
                "eval_every": 100, "save_every": 5, **train}
    lines = "".join(f"  {k}: {v}\n" for k, v in settings.items())
    return (f"version: 1\nname: {name}\nmodel: {{source: 'path:{model}'}}\n"
            f"data: {{source: 'path:{rows}', format: completions}}\ntrain:\n{lines}stages: [prepare, convert, lora]\n")


def _write_rows(path: Path, prompt_words: int = 2, n: int = 40) -> Path:
    path.write_text("".join(json.dumps({"prompt": " ".join(["select"] * prompt_words) + f" {i}",
                                        "completion": f"total {i} max min"}) + "\n" for i in range(n)))
    return path


def test_sigkill_during_real_lora_resumes_from_the_checkpoint_with_continuous_iterations(tmp_path, tiny_model, start_daemon):
    root = tmp_path / "root"
    rows = _write_rows(tmp_path / "rows.jsonl")
    start_daemon()
    drop(root / "inbox", "lora.yaml", _lora_spec(tiny_model, rows, "lora-kill", iters=120))
    job = wait_for(lambda: by_source(root / "outbox").get("lora.yaml"), timeout=60)
    job_dir = root / "outbox" / job["job_id"]
    wait_for(lambda: any(e["event"] == "checkpoint_saved" and e["iteration"] >= 10 for e in events(job_dir)),
             timeout=240, interval=0.02, what="a checkpoint at iteration 10")
    running = json.loads((root / "state" / "running.json").read_text())
    assert running["stage"] == "lora"
    os.killpg(running["pid"], signal.SIGKILL)
    saved = max(e["iteration"] for e in events(job_dir) if e["event"] == "checkpoint_saved")
    st = wait_for(lambda: by_source(root / "outbox")["lora.yaml"]["state"] in ("succeeded", "failed")
                  and by_source(root / "outbox")["lora.yaml"], timeout=300)
    assert st["state"] == "succeeded", st.get("error")
    evs = events(job_dir)
    resumed = [e for e in evs if e["event"] == "training_resumed"]
    assert resumed and resumed[0]["iteration"] >= saved
    assert json.loads((job_dir / "adapters" / "done.json").read_text())["iterations"] == 120
    metrics = [json.loads(x) for x in (job_dir / "adapters" / "metrics.jsonl").read_text().splitlines()]
    steps = [m["iteration"] for m in metrics if "train_loss" in m]
    assert sorted(set(steps)) == list(range(1, 121)), "an iteration was skipped"
    start = resumed[0]["iteration"]
    assert steps[-(120 - start):] == list(range(start + 1, 121)), "the resumed run did not continue the count"
    assert len(list((job_dir / "adapters").glob("*_adapters.safetensors"))) <= 3, "old snapshots are pruned"
    assert b"\x1b[" not in (job_dir / "logs" / "lora.log").read_bytes(), "ANSI codes in the stage log"


def test_rows_with_no_completion_left_are_dropped_or_refused_never_nan(tmp_path, tiny_model, start_daemon):
    root = tmp_path / "root"
    short = _write_rows(tmp_path / "short.jsonl", prompt_words=2, n=20)
    long = _write_rows(tmp_path / "long.jsonl", prompt_words=80, n=20)
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(short.read_text() + long.read_text())
    start_daemon()
    drop(root / "inbox", "all-long.yaml", _lora_spec(tiny_model, long, "all-long", max_seq_length=48, iters=4))
    drop(root / "inbox", "mixed.yaml", _lora_spec(tiny_model, mixed, "mixed", max_seq_length=48, iters=6))
    done = wait_for(lambda: all((by_source(root / "outbox").get(n) or {}).get("state") in ("succeeded", "failed")
                                for n in ("all-long.yaml", "mixed.yaml")) and by_source(root / "outbox"), timeout=300)
    refused = done["all-long.yaml"]
    assert refused["state"] == "failed" and "max_seq_length" in refused["error"]["message"]
    assert done["mixed.yaml"]["state"] == "succeeded", done["mixed.yaml"].get("error")
    job_dir = root / "outbox" / done["mixed.yaml"]["job_id"]
    dropped = [e for e in events(job_dir) if e["event"] == "rows_without_completion_dropped"]
    assert dropped and dropped[0]["dropped"] > 0
    losses = [json.loads(x)["train_loss"] for x in (job_dir / "adapters" / "metrics.jsonl").read_text().splitlines()
              if "train_loss" in json.loads(x)]
    assert losses and all(math.isfinite(x) for x in losses)


def test_a_nan_loss_stops_the_stage_with_its_likely_cause(tmp_path):
    from lorad.outbox import event_logger
    from lorad.spec import apply_defaults
    from lorad.stages import StageContext, StageFailed
    from lorad.stages.lora import Tracker

    spec = apply_defaults({"version": 1, "name": "n", "model": {"source": "demo"}, "data": {"source": "path:x"}})
    ctx = StageContext(spec=spec, work_dir=tmp_path, cache_dir=tmp_path, log=event_logger(tmp_path, job_id="n"))
    tracker = Tracker(ctx, model=None, optimizer=None, adapter_dir=tmp_path,
                      state={"iteration": 0, "best_val": None, "best_iteration": None, "evals_since_best": 0})
    with pytest.raises(StageFailed, match="became nan at iteration 3.*learning_rate"):
        tracker.on_train_loss_report({"iteration": 3, "train_loss": float("nan"), "iterations_per_second": 1.0,
                                      "tokens_per_second": 1.0, "peak_memory": 0.1, "learning_rate": 1e-4})


def test_a_resume_does_not_count_its_first_validation_toward_patience(tmp_path):
    """mlx-lm validates at the first step of every train() call (reported as iteration 0: the weights
    before that step); after a resume that re-measures the checkpoint."""
    from lorad.outbox import event_logger
    from lorad.spec import apply_defaults
    from lorad.stages import StageContext
    from lorad.stages.lora import EarlyStop, Tracker

    spec = apply_defaults({"version": 1, "name": "n", "model": {"source": "demo"}, "data": {"source": "path:x"},
                           "train": {"early_stopping": {"patience": 3}}})
    ctx = StageContext(spec=spec, work_dir=tmp_path, cache_dir=tmp_path, log=event_logger(tmp_path, job_id="n"))
    resumed = {"iteration": 40, "best_val": 1.0, "best_iteration": 20, "evals_since_best": 2}
    tracker = Tracker(ctx, model=None, optimizer=None, adapter_dir=tmp_path, state=resumed)
    tracker.on_val_loss_report({"iteration": 0, "val_loss": 1.5})  # the checkpoint again: not a new evaluation
    assert tracker.state["evals_since_best"] == 2
    with pytest.raises(EarlyStop):
        tracker.on_val_loss_report({"iteration": 10, "val_loss": 1.5})  # a real one: the third without progress


def test_half_written_temp_folders_are_removed_at_start(tmp_path, start_daemon):
    root = tmp_path / "root"
    leftover = root / "state" / "cache" / "models" / ".0123abcd.4242.tmp"  # convert killed mid-write
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"\0" * 4096)
    d = start_daemon()
    wait_for(lambda: not leftover.exists(), timeout=20, what="the temp folder removed")
    assert "temp_removed" in d.log


def test_a_stage_that_reports_a_retryable_error_is_retried_and_one_that_does_not_fails_at_once(tmp_path, start_daemon,
                                                                                              rows_file):
    """The lora stage's lost training host comes back as a reported, retryable error: the daemon's one
    retry path handles it; an ordinary reported failure is final."""
    def ended(root: Path, name: str) -> dict:
        def state():
            st = by_source(root / "outbox").get(name) or {}
            return st if st.get("state") in ("succeeded", "failed") else None
        return wait_for(state, timeout=60, what=f"{name} to end")

    roots = {case: tmp_path / case for case in ("once", "always", "plain")}
    start_daemon(root=roots["once"], LORAD_STAGE_HOOKS="prepare=stagehooks:retryable_then_fine", HOOK_FAILS="1")
    start_daemon(root=roots["always"], LORAD_STAGE_HOOKS="prepare=stagehooks:retryable_then_fine", HOOK_FAILS="9")
    start_daemon(root=roots["plain"], LORAD_STAGE_HOOKS="prepare=stagehooks:plain_failure")
    for root in roots.values():
        drop(root / "inbox", "a.yaml", spec_text("a", rows_file))
    once, always, plain = (ended(roots[c], "a.yaml") for c in ("once", "always", "plain"))
    assert once["state"] == "succeeded" and once["attempts"] == 2, once
    (requeued,) = [e for e in events(roots["once"] / "outbox" / once["job_id"]) if e["event"] == "job_requeued"]
    assert "training host 10.9.9.9 (rank 1) stopped answering (try 1)" in requeued["reason"]
    assert always["state"] == "failed" and always["attempts"] == 3, always
    assert always["error"]["type"] == "HostLost" and "gave up after 3 attempts" in always["error"]["message"]
    assert "(try 3)" in always["error"]["message"] and "retryable" not in always["error"]
    assert plain["state"] == "failed" and plain["error"]["message"] == "the data has no rows" and plain["attempts"] <= 1
    assert not [e for e in events(roots["plain"] / "outbox" / plain["job_id"]) if e["event"] == "job_requeued"]
