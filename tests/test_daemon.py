"""The daemon as a real subprocess on a real folder, receiving real signals."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from conftest import spec_text, statuses, wait_for

HOOKS_SLOW = "prepare=stagehooks:slow_train"


def drop(inbox: Path, name: str, text: str) -> Path:
    """What a sync tool or a careful script does: write elsewhere, rename into place."""
    inbox.mkdir(parents=True, exist_ok=True)
    tmp = inbox.parent / f".{name}.partial"
    tmp.write_text(text)
    os.rename(tmp, inbox / name)
    return inbox / name


def events(job_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (job_dir / "events.jsonl").read_text().splitlines()]


def only_job(outbox: Path) -> tuple[str, dict]:
    st = statuses(outbox)
    assert len(st) == 1, st.keys()
    return next(iter(st.items()))


def test_rename_into_place_runs_to_succeeded(tmp_path, start_daemon, rows_file):
    root = tmp_path / "root"
    d = start_daemon()
    wait_for(lambda: (root / "inbox").is_dir(), what="inbox created")
    drop(root / "inbox", "job.yaml", spec_text("renamed", rows_file))
    wait_for(lambda: any(s["state"] == "succeeded" for s in statuses(root / "outbox").values()), what="job succeeded")
    job_id, st = only_job(root / "outbox")
    job_dir = root / "outbox" / job_id
    assert st["source"] == "job.yaml" and st["name"] == "renamed"
    assert st["stages"]["prepare"]["state"] == "succeeded" and st["stages"]["prepare"]["seconds"] >= 0
    assert (job_dir / "spec.yaml").read_text() == spec_text("renamed", rows_file)
    assert len((job_dir / "data" / "train.jsonl").read_text().splitlines()) > 30
    assert st["artifacts"]["data_train"] == "data/train.jsonl"
    evs = events(job_dir)
    assert {"timestamp", "level", "event", "job_id"} <= set(evs[0])
    assert all(e["job_id"] == job_id for e in evs)
    assert any(e["event"] == "data_prepared" and e["stage"] == "prepare" for e in evs)
    assert [p.name for p in (root / "inbox").iterdir()] == [".lorad"], "the claimed file must leave the inbox"
    assert d.proc.poll() is None


def test_slow_in_place_write_waits_until_the_file_settles(tmp_path, start_daemon, rows_file):
    root = tmp_path / "root"
    start_daemon()
    wait_for(lambda: (root / "inbox").is_dir())
    text = spec_text("slow", rows_file)
    chunks = [text[i:i + 20] for i in range(0, len(text), 20)]
    last_write = [0.0]
    with open(root / "inbox" / "slow.yaml", "w") as f:  # an editor or `cp` writing in place, slowly
        for chunk in chunks:
            f.write(chunk)
            f.flush()
            last_write[0] = time.time()
            assert not statuses(root / "outbox"), "claimed while still being written"
            time.sleep(0.3)
    wait_for(lambda: statuses(root / "outbox"), what="outbox entry")
    job_id, st = only_job(root / "outbox")
    claimed_at = os.stat(root / "outbox" / job_id / "spec.yaml").st_mtime
    assert claimed_at - last_write[0] >= 0.9, "claimed before the file had settled (--settle 1.0)"
    wait_for(lambda: only_job(root / "outbox")[1]["state"] == "succeeded")


def test_sync_tool_and_editor_files_never_become_jobs(tmp_path, start_daemon, rows_file):
    root = tmp_path / "root"
    inbox = root / "inbox"
    inbox.mkdir(parents=True)
    good = spec_text("real", rows_file)
    ignored = [
        ".job.yaml.swp", ".job.yaml.swo", "job.yaml~", "4913", "#job.yaml#", ".#job.yaml",
        "job.yaml___jb_tmp___", "~$job.yaml", "job.yaml.crdownload", "job.yaml.part", "job.yaml.download",
        ".DS_Store", "._job.yaml", "Icon\r", "Thumbs.db", ".syncthing.job.yaml.tmp", "~syncthing~job.yaml.tmp",
        "job.yaml.!sync", "job.yaml.SyncPart", ".SyncTemp", ".job.yaml.icloud", "job.yaml.rsls",
        "desktop.ini", "job.json", "job.yaml.tmp",
    ]
    conflicts = [
        "job (Jane's conflicted copy 2026-01-02).yaml",
        "job.sync-conflict-20260102-101010-ABCDEFG.yaml",
        "job 2.yaml",
        "job (1).yml",
    ]
    for name in ignored + conflicts:
        (inbox / name).write_text(good)
    (inbox / ".dropbox.cache").mkdir()
    (inbox / ".dropbox.cache" / "job.yaml").write_text(good)
    drop(inbox, "job.yaml", good)
    start_daemon()
    wait_for(lambda: len(statuses(root / "outbox")) == 1 + len(conflicts), what="entries")
    wait_for(lambda: any(s["state"] == "succeeded" for s in statuses(root / "outbox").values()))
    time.sleep(2.5)  # a rescan later, still nothing else
    st = statuses(root / "outbox")
    assert len(st) == 1 + len(conflicts)
    by_source = {s["source"]: s for s in st.values()}
    assert by_source["job.yaml"]["state"] == "succeeded"
    for name in conflicts:
        assert by_source[name]["state"] == "rejected"
        assert by_source[name]["error"]["type"] == "SyncConflict"
        assert (root / "outbox" / by_source[name]["job_id"] / "spec.yaml").read_text() == good
    assert sorted(os.listdir(inbox)) == sorted(ignored + [".dropbox.cache", ".lorad"])


def test_bad_specs_are_rejected_with_their_bytes_kept(tmp_path, start_daemon, rows_file):
    root = tmp_path / "root"
    start_daemon()
    wait_for(lambda: (root / "inbox").is_dir())
    broken_yaml = b"version: 1\nname: [oops\n"
    invalid = b"version: 1\nname: Bad Name\nmodel: {source: demo}\ndata: {source: 'path:/x', limt: 3}\ntrain: {iters: 0}\n"
    drop(root / "inbox", "broken.yaml", broken_yaml.decode())
    drop(root / "inbox", "invalid.yaml", invalid.decode())
    drop(root / "inbox", "good.yaml", spec_text("good", rows_file))
    wait_for(lambda: len(statuses(root / "outbox")) == 3)
    wait_for(lambda: any(s["state"] == "succeeded" for s in statuses(root / "outbox").values()), what="good job ran")
    by_source = {s["source"]: s for s in statuses(root / "outbox").values()}
    b, i = by_source["broken.yaml"], by_source["invalid.yaml"]
    assert b["state"] == i["state"] == "rejected"
    assert (root / "outbox" / b["job_id"] / "spec.yaml").read_bytes() == broken_yaml
    assert (root / "outbox" / i["job_id"] / "spec.yaml").read_bytes() == invalid
    assert b["error"]["errors"][0]["line"] == 3 and "YAML syntax" in b["error"]["errors"][0]["message"]
    paths = {e["path"] for e in i["error"]["errors"]}
    assert paths == {"$.name", "$.data.limt", "$.train.iters"}
    assert all(e["line"] for e in i["error"]["errors"])


def test_200_specs_at_once_make_200_entries_in_order(tmp_path, start_daemon, rows_file):
    root = tmp_path / "root"
    inbox = root / "inbox"
    inbox.mkdir(parents=True)
    names = [f"job{i:03d}.yaml" for i in range(200)]
    for name in names:  # dropped while the daemon is down: the startup scan must find them all
        drop(inbox, name, spec_text(name[:-5], rows_file))
    d = start_daemon(LORAD_STAGE_HOOKS=HOOKS_SLOW, HOOK_STEPS="100000")
    wait_for(lambda: len(statuses(root / "outbox")) == 200, timeout=120, what="200 entries")
    time.sleep(2.5)  # another rescan: still no duplicates
    st = statuses(root / "outbox")
    assert len(st) == 200
    by_created = sorted(st.values(), key=lambda s: s["created_at"])
    assert [s["source"] for s in by_created] == names
    assert sorted(st) == [s["job_id"] for s in by_created], "job ids sort in arrival order"
    states = [s["state"] for s in by_created]
    assert states[0] == "running" and states[1:] == ["queued"] * 199, "one job at a time, FIFO"
    assert os.listdir(inbox) == [".lorad"]
    d.signal(signal.SIGTERM)
    assert d.wait() == 0


def _running_job(root: Path) -> tuple[str, dict]:
    def running():
        for job_id, s in statuses(root / "outbox").items():
            if s["state"] == "running" and (s.get("progress") or {}).get("iteration", 0) >= 3:
                return job_id, s
        return None

    return wait_for(running, what="a running stage with progress")


def _start_training(root: Path, start_daemon, rows_file: Path):
    """A daemon running the checkpointing stand-in stage, a few steps in: (daemon, job folder, stage pid)."""
    d = start_daemon(LORAD_STAGE_HOOKS=HOOKS_SLOW, HOOK_STEPS="60")
    wait_for(lambda: (root / "inbox").is_dir())
    drop(root / "inbox", "train.yaml", spec_text("train", rows_file))
    job_id, _ = _running_job(root)
    job_dir = root / "outbox" / job_id
    return d, job_dir, int((job_dir / "stage.pid").read_text())


def test_sigterm_checkpoints_the_stage_and_the_next_start_resumes(tmp_path, start_daemon, rows_file):
    d, job_dir, stage_pid = _start_training(tmp_path / "root", start_daemon, rows_file)
    t0 = time.monotonic()
    d.signal(signal.SIGTERM)
    assert d.wait(timeout=30) == 0
    assert time.monotonic() - t0 < 30
    st = json.loads((job_dir / "status.json").read_text())
    assert st["state"] == "queued" and st["stages"]["prepare"]["state"] == "interrupted"
    saved = json.loads((job_dir / "ckpt.json").read_text())["step"]
    assert 3 <= saved < 60
    wait_for(lambda: not os.path.exists(f"/proc/{stage_pid}"), timeout=5, what="stage process gone")
    start_daemon(LORAD_STAGE_HOOKS=HOOKS_SLOW, HOOK_STEPS="60")
    wait_for(lambda: json.loads((job_dir / "status.json").read_text())["state"] == "succeeded", timeout=30)
    resumed = [e for e in events(job_dir) if e["event"] == "hook_resume"]
    assert resumed and resumed[0]["step"] == saved


def test_sigkill_of_the_daemon_then_restart_resumes_the_job(tmp_path, start_daemon, rows_file):
    d, job_dir, stage_pid = _start_training(tmp_path / "root", start_daemon, rows_file)
    d.signal(signal.SIGKILL)
    d.wait()
    # the orphaned stage is told to stop (parent-death signal) and checkpoints
    wait_for(lambda: not os.path.exists(f"/proc/{stage_pid}"), timeout=10, what="orphaned stage stopped")
    saved = json.loads((job_dir / "ckpt.json").read_text())["step"]
    assert json.loads((job_dir / "status.json").read_text())["state"] == "running"
    start_daemon(LORAD_STAGE_HOOKS=HOOKS_SLOW, HOOK_STEPS="60")
    wait_for(lambda: json.loads((job_dir / "status.json").read_text())["state"] == "succeeded", timeout=30)
    st = json.loads((job_dir / "status.json").read_text())
    assert st["attempts"] == 2
    assert any(e["event"] == "job_requeued" for e in events(job_dir))
    resumed = [e for e in events(job_dir) if e["event"] == "hook_resume"]
    assert resumed and resumed[0]["step"] >= saved - 1


def test_a_second_daemon_on_the_same_root_refuses(tmp_path, start_daemon):
    root = tmp_path / "root"
    first = start_daemon()
    wait_for(lambda: (root / "state" / "lock").exists() and (root / "state" / "lock").read_text().strip())
    second = start_daemon()
    assert second.wait(timeout=20) == 3
    assert "already running" in second.log
    assert int((root / "state" / "lock").read_text()) == first.proc.pid
    assert first.proc.poll() is None


def test_a_crashing_stage_fails_the_job_and_the_daemon_lives(tmp_path, start_daemon, rows_file):
    root = tmp_path / "root"
    d = start_daemon(LORAD_STAGE_HOOKS="prepare=stagehooks:abort")
    wait_for(lambda: (root / "inbox").is_dir())
    drop(root / "inbox", "a.yaml", spec_text("a", rows_file))
    wait_for(lambda: any(s["state"] == "failed" for s in statuses(root / "outbox").values()))
    _, st = only_job(root / "outbox")
    assert st["error"]["type"] == "StageCrashed" and "SIGABRT" in st["error"]["message"]
    assert st["stages"]["prepare"]["state"] == "failed"
    assert d.proc.poll() is None
    d.signal(signal.SIGTERM)
    assert d.wait() == 0
    d2 = start_daemon(LORAD_STAGE_HOOKS="prepare=stagehooks:raise_error")
    drop(root / "inbox", "b.yaml", spec_text("b", rows_file))
    wait_for(lambda: sum(s["state"] == "failed" for s in statuses(root / "outbox").values()) == 2)
    failed_b = [s for s in statuses(root / "outbox").values() if s["source"] == "b.yaml"][0]
    assert failed_b["error"]["type"] == "ValueError" and "bug" in failed_b["error"]["message"]
    assert "Traceback" in failed_b["error"]["traceback"]
    assert d2.proc.poll() is None


def test_once_drains_and_exits_zero(tmp_path, start_daemon, rows_file):
    root = tmp_path / "root"
    for i in range(3):
        drop(root / "inbox", f"j{i}.yaml", spec_text(f"j{i}", rows_file))
    drop(root / "inbox", "bad.yaml", "version: 1\n")
    d = start_daemon("--once")
    assert d.wait(timeout=60) == 0
    st = statuses(root / "outbox")
    assert sorted(s["state"] for s in st.values()) == ["rejected", "succeeded", "succeeded", "succeeded"]


def test_cancel_a_running_and_a_queued_job(tmp_path, start_daemon, rows_file, lorad_env):
    import subprocess
    import sys

    root = tmp_path / "root"
    start_daemon(LORAD_STAGE_HOOKS=HOOKS_SLOW, HOOK_STEPS="100000")
    wait_for(lambda: (root / "inbox").is_dir())
    drop(root / "inbox", "first.yaml", spec_text("first", rows_file))
    drop(root / "inbox", "second.yaml", spec_text("second", rows_file))
    running_id, _ = _running_job(root)
    queued_id = wait_for(lambda: next((j for j, s in statuses(root / "outbox").items() if s["state"] == "queued"), None))

    def cancel(ref: str) -> str:
        out = subprocess.run([sys.executable, "-m", "lorad", "cancel", ref, "--root", str(root)],
                             env=lorad_env, capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        return out.stdout

    assert "cancel requested" in cancel("second")  # by name
    wait_for(lambda: statuses(root / "outbox")[queued_id]["state"] == "cancelled")
    cancel(running_id[:22])  # by unique prefix
    wait_for(lambda: statuses(root / "outbox")[running_id]["state"] == "cancelled", timeout=30)
    assert (root / "outbox" / running_id / "ckpt.json").exists(), "artifacts kept"
