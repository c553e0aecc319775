"""A synced inbox that real sync tools cannot fool (issue #12).

Plain-write cases first (a writer that pauses with the file open, re-deliveries, names that look like
conflict copies, a newer version of the same file, cancel files), then the real tools: rsync (normal
and --inplace --bwlimit), rclone copy and a unison two-way sync. Every spec must run exactly once, on
its complete bytes; every status.json must follow schemas/status.schema.json.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from conftest import spec_text, statuses, wait_for
from lorad import resources
from test_daemon import drop

HOOKS_SLOW = "prepare=stagehooks:slow_train"


def big_spec(name: str, rows_file: Path, pad: int = 4000) -> str:
    """A spec whose first 100 bytes are a valid spec on their own: a cut there would still run."""
    return spec_text(name, rows_file) + "# " + "x" * pad + "\nevaluate: {limit: 7}\n"


def by_source(root: Path) -> dict[str, dict]:
    return {s["source"]: s for s in statuses(root / "outbox").values()}


def ended(root: Path, source: str, timeout: float = 60) -> dict:
    return wait_for(lambda: (st := by_source(root).get(source)) and st["state"] not in ("queued", "running") and st,
                    timeout=timeout, what=f"{source} ended")


def assert_statuses_follow_the_schema(root: Path) -> None:
    validator = Draft202012Validator(json.loads(resources.read_text(resources.STATUS_SCHEMA)))
    for status in statuses(root / "outbox").values():
        errors = [e.message for e in validator.iter_errors(status)]
        assert not errors, (status["job_id"], errors)


def ran_on(root: Path, status: dict) -> str:
    return (root / "outbox" / status["job_id"] / "spec.yaml").read_text()


def test_a_writer_that_pauses_with_the_file_open_is_waited_for(tmp_path, start_daemon, rows_file):
    root = tmp_path / "root"
    start_daemon()
    wait_for(lambda: (root / "inbox").is_dir())
    text = big_spec("paused", rows_file)
    src = tmp_path / "paused.yaml"
    src.write_text(text)
    # the reproduction: 100 bytes, 3 s of silence (longer than --settle 1.0), then the rest
    subprocess.run(["bash", "-c", f"(head -c 100 {src}; sleep 3; tail -c +101 {src}) > {root / 'inbox' / 'x.yaml'}"],
                   check=True, timeout=30)
    st = ended(root, "x.yaml")
    assert ran_on(root, st) == text, "claimed before the writer finished"
    time.sleep(2.5)
    assert len(statuses(root / "outbox")) == 1
    assert_statuses_follow_the_schema(root)


def test_identical_bytes_again_are_a_duplicate_unless_asked_to_rerun(tmp_path, start_daemon, rows_file, lorad_env):
    root = tmp_path / "root"
    start_daemon()
    text = spec_text("same", rows_file)
    drop(root / "inbox", "a.yaml", text)
    first = ended(root, "a.yaml")
    assert first["state"] == "succeeded"
    drop(root / "inbox", "a.yaml", text)  # Syncthing's "Revert Local Changes", a repeated rclone sync
    drop(root / "inbox", "copy.yaml", text)
    wait_for(lambda: sum(s["state"] == "duplicate" for s in statuses(root / "outbox").values()) == 2, timeout=30)
    for st in statuses(root / "outbox").values():
        if st["state"] == "duplicate":
            assert st["error"]["duplicate_of"] == first["job_id"] and "rerun: true" in st["error"]["message"]
    drop(root / "inbox", "again.yaml", text + "rerun: true\n")
    assert ended(root, "again.yaml")["state"] == "succeeded"
    spec = tmp_path / "s.yaml"
    spec.write_text(text)
    out = subprocess.run([sys.executable, "-m", "lorad", "submit", "--rerun", str(spec), "--root", str(root)],
                         capture_output=True, text=True, env=lorad_env, timeout=60)
    job_id = out.stdout.strip()
    assert wait_for(lambda: (by_source(root).get(f"{job_id}.yaml") or {}).get("state") == "succeeded", timeout=30)
    assert_statuses_follow_the_schema(root)


def test_names_that_look_like_conflict_copies_are_judged_by_evidence(tmp_path, start_daemon, rows_file):
    root = tmp_path / "root"
    start_daemon()
    for name in ("llama 3.yaml", "sql 2024.yaml", "model (2).yml"):  # no llama.yaml, sql.yaml, model.yml
        drop(root / "inbox", name, spec_text(name.split()[0], rows_file))
    for name in ("llama 3.yaml", "sql 2024.yaml", "model (2).yml"):
        assert ended(root, name)["state"] == "succeeded", name
    drop(root / "inbox", "job.yaml", spec_text("job", rows_file))
    ended(root, "job.yaml")
    drop(root / "inbox", "job 2.yaml", spec_text("job", rows_file, extra="rerun: true\n"))  # iCloud's copy
    st = ended(root, "job 2.yaml")
    assert st["state"] == "rejected" and st["error"]["type"] == "SyncConflict" and st["error"]["lost_to"] == "job.yaml"
    assert "rerun: true" in ran_on(root, st), "the losing edit's bytes are kept"


def test_a_newer_version_of_the_same_file_supersedes_one_still_in_its_early_stages(tmp_path, start_daemon, rows_file):
    root = tmp_path / "root"
    start_daemon(LORAD_STAGE_HOOKS=HOOKS_SLOW, HOOK_STEPS="50")
    drop(root / "inbox", "job.yaml", spec_text("v1", rows_file))
    wait_for(lambda: (by_source(root).get("job.yaml") or {}).get("state") == "running", timeout=30)
    first = by_source(root)["job.yaml"]["job_id"]
    drop(root / "inbox", "job.yaml", spec_text("v2", rows_file))  # the same name, edited: last write wins
    drop(root / "inbox", "other.yaml", spec_text("other", rows_file))  # queued behind v2
    wait_for(lambda: (by_source(root).get("other.yaml") or {}).get("state") == "queued", timeout=30)
    drop(root / "inbox", "other.yaml", spec_text("other-v2", rows_file))  # supersedes a queued job
    done = wait_for(lambda: len(statuses(root / "outbox")) == 4
                    and all(s["state"] not in ("queued", "running") for s in statuses(root / "outbox").values())
                    and statuses(root / "outbox"), timeout=60)
    states = {s["name"]: s for s in done.values()}
    assert states["v1"]["state"] == "superseded" and states["v1"]["error"]["superseded_by"] == states["v2"]["job_id"]
    assert states["v1"]["job_id"] == first
    assert states["v2"]["state"] == "succeeded"
    assert states["other"]["state"] == "superseded" and states["other-v2"]["state"] == "succeeded"
    assert_statuses_follow_the_schema(root)


def test_a_cancel_file_dropped_into_the_inbox_cancels_that_job(tmp_path, start_daemon, rows_file):
    root = tmp_path / "root"
    start_daemon(LORAD_STAGE_HOOKS=HOOKS_SLOW, HOOK_STEPS="100")
    drop(root / "inbox", "long.yaml", spec_text("long", rows_file))
    job_id = wait_for(lambda: (by_source(root).get("long.yaml") or {}).get("state") == "running"
                      and by_source(root)["long.yaml"]["job_id"], timeout=30)
    (root / "inbox" / f"{job_id}.cancel").write_text("")
    assert ended(root, "long.yaml")["state"] == "cancelled"
    assert not (root / "inbox" / f"{job_id}.cancel").exists()


# --- the real tools ---------------------------------------------------------------------

def need(tool: str) -> None:
    if not shutil.which(tool):
        pytest.skip(f"{tool} is not installed (.ci/run installs it from Debian's packages)")


def daemon_and_source(tool: str, tmp_path: Path, start_daemon) -> tuple[Path, Path]:
    """(the daemon's root, a folder to sync from), with the daemon watching its inbox."""
    need(tool)
    root = tmp_path / "root"
    start_daemon()
    wait_for(lambda: (root / "inbox").is_dir())
    src = tmp_path / "src"
    src.mkdir()
    return root, src


@pytest.mark.sync_tools
def test_rsync_normal_and_inplace_with_a_bandwidth_limit(tmp_path, start_daemon, rows_file):
    root, src = daemon_and_source("rsync", tmp_path, start_daemon)
    (src / "normal.yaml").write_text(big_spec("normal", rows_file))
    (src / "inplace.yaml").write_text(big_spec("inplace", rows_file, pad=6000))
    subprocess.run(["rsync", "-a", str(src / "normal.yaml"), f"{root / 'inbox'}/"], check=True, timeout=30)
    # --inplace writes into the final name at 2 KB/s: ~3 s with the file open, growing
    subprocess.run(["rsync", "-a", "--inplace", "--bwlimit=2", str(src / "inplace.yaml"), f"{root / 'inbox'}/"],
                   check=True, timeout=60)
    for name in ("normal.yaml", "inplace.yaml"):
        st = ended(root, name)
        assert st["state"] == "succeeded" and ran_on(root, st) == (src / name).read_text(), name
    time.sleep(2.5)
    assert len(statuses(root / "outbox")) == 2


@pytest.mark.sync_tools
def test_rclone_copy(tmp_path, start_daemon, rows_file):
    root, src = daemon_and_source("rclone", tmp_path, start_daemon)
    for i in range(3):
        (src / f"r{i}.yaml").write_text(big_spec(f"r{i}", rows_file))
    subprocess.run(["rclone", "copy", "--config", "/dev/null", str(src), str(root / "inbox")], check=True, timeout=60)
    for i in range(3):
        st = ended(root, f"r{i}.yaml")
        assert st["state"] == "succeeded" and ran_on(root, st) == (src / f"r{i}.yaml").read_text()
    # a repeated `rclone copy` of the same folder: the same bytes again are duplicates, not new jobs
    subprocess.run(["rclone", "copy", "--config", "/dev/null", str(src), str(root / "inbox")], check=True, timeout=60)
    wait_for(lambda: sum(s["state"] == "duplicate" for s in statuses(root / "outbox").values()) == 3, timeout=30)


@pytest.mark.sync_tools
def test_unison_two_way_sync_keeps_working_after_lorad_empties_the_inbox(tmp_path, start_daemon, rows_file):
    need("unison")
    root = tmp_path / "root"
    laptop = tmp_path / "laptop"  # the user's replica; the inbox is the other
    laptop.mkdir()
    env = {"HOME": str(tmp_path / "unison-home"), "PATH": "/usr/bin:/bin"}
    (tmp_path / "unison-home").mkdir()
    start_daemon()
    wait_for(lambda: (root / "inbox" / ".lorad").exists(), what="the placeholder")

    def sync() -> subprocess.CompletedProcess:
        return subprocess.run(["unison", str(laptop), str(root / "inbox"), "-batch", "-auto", "-times"],
                              capture_output=True, text=True, env=env, timeout=60)

    assert sync().returncode == 0  # first contact: the placeholder reaches the laptop
    (laptop / "job.yaml").write_text(big_spec("unison", rows_file))
    assert sync().returncode == 0
    st = ended(root, "job.yaml")
    assert st["state"] == "succeeded"
    out = sync()  # lorad took the only spec: the replica is not empty, so unison carries on
    assert out.returncode == 0, out.stdout + out.stderr
    assert "completely emptied" not in out.stdout + out.stderr
    assert not (laptop / "job.yaml").exists(), "the claim's deletion reached the laptop"
    assert (laptop / ".lorad").exists()


# --- Syncthing: two real instances on 127.0.0.1, the second one's folder is the daemon's inbox --------

@pytest.fixture
def syncthing(tmp_path):
    need("syncthing")
    from syncthing_pair import SyncthingPair

    with SyncthingPair(tmp_path, tmp_path / "laptop", tmp_path / "root" / "inbox") as pair:
        yield pair


def _atomic_save(folder: Path, name: str, text: str) -> None:
    tmp = folder / f".{name}.saving"
    tmp.write_text(text)
    tmp.rename(folder / name)


@pytest.mark.sync_tools
def test_syncthing_atomic_saves_run_once_and_their_deletion_reaches_the_sender(tmp_path, syncthing, start_daemon, rows_file):
    root = tmp_path / "root"
    laptop = syncthing.a.folder
    start_daemon()
    texts = {f"s{i}.yaml": big_spec(f"s{i}", rows_file) for i in range(5)}
    for name, text in texts.items():
        _atomic_save(laptop, name, text)
        time.sleep(0.3)
    for name, text in texts.items():
        st = ended(root, name, timeout=60)
        assert st["state"] == "succeeded" and ran_on(root, st) == text
    # the claim is a deletion on the inbox side: Syncthing carries it back within seconds, not at the
    # next hourly rescan (the daemon waits --rename-delay after Syncthing's rename before taking a file)
    t0 = time.monotonic()
    wait_for(lambda: not any((laptop / n).exists() for n in texts), timeout=40, what="deletions reached the laptop")
    deletion_seconds = time.monotonic() - t0
    assert deletion_seconds < 40
    assert len(statuses(root / "outbox")) == len(texts)
    assert_statuses_follow_the_schema(root)


@pytest.mark.sync_tools
def test_syncthing_slow_two_part_save_ends_in_one_job_on_the_whole_file(tmp_path, syncthing, start_daemon, rows_file):
    root = tmp_path / "root"
    laptop = syncthing.a.folder
    start_daemon(LORAD_STAGE_HOOKS=HOOKS_SLOW, HOOK_STEPS="200")  # a job in its early stages for 20 s
    first = spec_text("two-part", rows_file)  # a complete spec on its own
    rest = "# the rest of the file, saved a few seconds later\nevaluate: {limit: 9}\n"
    # saved twice, 4 s apart (the first save's content is a valid spec): Syncthing sends the first
    # save as a version of its own, and the claim's deletion reaches the laptop before the second save
    (laptop / "slow.yaml").write_text(first)
    time.sleep(4)
    (laptop / "slow.yaml").write_text(first + rest)
    def slow_jobs() -> list[dict]:
        return [s for s in statuses(root / "outbox").values() if s["source"] == "slow.yaml"]

    whole = wait_for(lambda: next((s for s in slow_jobs() if ran_on(root, s) == first + rest), None), timeout=60,
                     what="the whole file in the inbox")
    assert ended(root, "slow.yaml", timeout=90)  # (the newest job of that name)
    wait_for(lambda: all(s["state"] not in ("queued", "running") for s in slow_jobs()), timeout=60)
    states = {s["job_id"]: s["state"] for s in slow_jobs()}
    assert states.pop(whole["job_id"]) == "succeeded"
    assert set(states.values()) <= {"superseded"}, states  # a truncated version never ran to the end


@pytest.mark.sync_tools
def test_a_real_syncthing_conflict_copy_is_kept_and_never_run(tmp_path, syncthing, start_daemon, rows_file):
    root = tmp_path / "root"
    laptop, inbox = syncthing.a.folder, syncthing.b.folder
    _atomic_save(laptop, "edit.yaml", spec_text("original", rows_file))  # both sides have it (no daemon yet)
    wait_for(lambda: (inbox / "edit.yaml").exists(), timeout=30, what="the original synced")
    syncthing.scan()
    syncthing.pause()
    _atomic_save(laptop, "edit.yaml", spec_text("laptop-edit", rows_file))
    time.sleep(1.1)
    _atomic_save(inbox, "edit.yaml", spec_text("desktop-edit", rows_file))  # both sides edit while apart
    syncthing.scan()  # each side has recorded its own edit
    syncthing.resume()
    conflict = wait_for(lambda: next((p.name for d in (laptop, inbox) for p in d.iterdir()
                                      if ".sync-conflict-" in p.name), None), timeout=40, what="a conflict copy")
    wait_for(lambda: conflict in os.listdir(inbox), timeout=30, what="the conflict copy in the inbox")
    start_daemon()
    st = ended(root, conflict)
    assert st["state"] == "rejected" and st["error"]["type"] == "SyncConflict"
    assert st["error"]["lost_to"] == "edit.yaml" and "-edit" in ran_on(root, st)
    assert ended(root, "edit.yaml")["state"] == "succeeded"
