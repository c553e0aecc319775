"""Inbox rules that need no daemon: names, job ids, claiming, submit and status."""

from __future__ import annotations

import json
import subprocess
import sys
import unicodedata

from conftest import spec_text
from lorad.inbox import InboxTracker, claim, classify
from lorad.outbox import JOB_ID_RE, new_job_id


def test_classify_names():
    assert classify("job.yaml") == classify("Job.YML") == "spec"
    assert classify("job (Jane's conflicted copy 2026-01-02).yaml") == "conflict"
    assert classify(".job.yaml.swp") == classify("job.yaml.part") == classify("~$job.yaml") == "ignore"


def test_job_ids_are_unique_and_sorted():
    ids = [new_job_id("x") for _ in range(10_000)]
    assert len(set(ids)) == 10_000 and ids == sorted(ids)
    assert all(JOB_ID_RE.match(i) for i in ids[:10])


def test_nfd_and_nfc_names_are_one_candidate(tmp_path):
    nfc = unicodedata.normalize("NFC", "caf\u00e9.yaml")
    (tmp_path / nfc).write_text("x: 1\n")
    tracker = InboxTracker(tmp_path, settle=0.0)
    tracker.scan()
    tracker.note(unicodedata.normalize("NFD", nfc))  # macOS reports decomposed names
    assert len(tracker.candidates) == 1


def test_claim_is_won_once(tmp_path):
    src = tmp_path / "a.yaml"
    src.write_text("x")
    assert claim(src, tmp_path / "b.yaml") is True
    assert claim(src, tmp_path / "c.yaml") is False


def test_submit_prints_the_job_id_it_gets_and_status_shows_it(tmp_path, rows_file, lorad_env):
    spec = tmp_path / "s.yaml"
    spec.write_text(spec_text("sub", rows_file))
    root = tmp_path / "root"
    out = subprocess.run([sys.executable, "-m", "lorad", "submit", str(spec), "--root", str(root)],
                         capture_output=True, text=True, env=lorad_env, timeout=60)
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip()
    assert JOB_ID_RE.match(job_id) and (root / "inbox" / f"{job_id}.yaml").read_text() == spec.read_text()
    run = subprocess.run([sys.executable, "-m", "lorad", "run", "--once", "--root", str(root), "--allow-read", str(tmp_path)],
                         capture_output=True, text=True, env=lorad_env, timeout=120)
    assert run.returncode == 0, run.stderr
    st = subprocess.run([sys.executable, "-m", "lorad", "status", job_id, "--json", "--root", str(root)],
                        capture_output=True, text=True, env=lorad_env, timeout=60)
    assert json.loads(st.stdout)["state"] == "succeeded" and json.loads(st.stdout)["job_id"] == job_id
    table = subprocess.run([sys.executable, "-m", "lorad", "status", "--root", str(root)],
                           capture_output=True, text=True, env=lorad_env, timeout=60).stdout
    assert table.splitlines()[0].split() == ["JOB", "STATE", "STAGE", "DETAIL"]
    assert job_id in table and "succeeded" in table


def test_submit_refuses_an_invalid_spec(tmp_path, lorad_env):
    spec = tmp_path / "s.yaml"
    spec.write_text("version: 1\nname: x\n")
    out = subprocess.run([sys.executable, "-m", "lorad", "submit", str(spec), "--root", str(tmp_path / "r")],
                         capture_output=True, text=True, env=lorad_env, timeout=60)
    assert out.returncode == 1 and f"{spec}:1:1: $.model" in out.stderr
    assert not (tmp_path / "r" / "inbox").exists() or not list((tmp_path / "r" / "inbox").iterdir())
