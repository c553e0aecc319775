"""The daemon's private, durable record of jobs: SQLite (WAL) in ROOT/state/jobs.sqlite3.

One writer: the daemon, or a CLI command while it holds the root's lock. The
claimed spec's bytes live here too, so nothing in the public outbox (synced,
editable by others) is ever read back as the truth: `outbox/<id>/status.json`
is a projection of a row (`status_view`), rewritten by the daemon.

Every state change goes through `JobStore.transition`, which refuses the moves
TRANSITIONS does not list (after supervisor's `change_state`) and records each
move with its reason in the `transitions` table.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any


class JobStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    REJECTED = "rejected"
    SUPERSEDED = "superseded"  # a newer version of the same inbox file arrived before this one got far
    DUPLICATE = "duplicate"  # the same bytes as a job that is queued, running or succeeded


FINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.REJECTED,
                   JobStatus.SUPERSEDED, JobStatus.DUPLICATE})
NEW = frozenset({JobStatus.QUEUED, JobStatus.REJECTED, JobStatus.DUPLICATE})  # the states a claim can create

# from → the states a job may move to. `lorad retry` is FAILED/CANCELLED → QUEUED; a retry after
# an interruption or a stage killed by a signal is RUNNING → QUEUED.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELLED, JobStatus.FAILED, JobStatus.SUPERSEDED}),
    JobStatus.RUNNING: frozenset({JobStatus.QUEUED, JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED,
                                  JobStatus.SUPERSEDED}),
    JobStatus.FAILED: frozenset({JobStatus.QUEUED}),
    JobStatus.CANCELLED: frozenset({JobStatus.QUEUED}),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.REJECTED: frozenset(),
    JobStatus.SUPERSEDED: frozenset(),
    JobStatus.DUPLICATE: frozenset(),
}


class IllegalTransition(Exception):
    pass


@dataclass
class Job:
    job_id: str
    name: str | None
    source: str
    state: JobStatus
    spec: bytes
    spec_sha256: str
    created_at: str
    updated_at: str
    stage: str | None = None
    attempts: int = 1  # the attempt now running or last run: 1 + runs lost to a crash or a kill
    not_before: float = 0.0  # wall-clock time before which a retry does not start (backoff)
    stages: dict[str, Any] = field(default_factory=dict)
    progress: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    artifacts: dict[str, str] = field(default_factory=dict)
    seq: int = 0  # claim order: the queue is FIFO by this


_JSON_FIELDS = ("stages", "progress", "error", "artifacts")
_COLUMNS = ("job_id", "name", "source", "state", "spec", "spec_sha256", "created_at", "updated_at", "stage",
            "attempts", "not_before", "stages", "progress", "error", "artifacts")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL UNIQUE,
    name TEXT,
    source TEXT NOT NULL,
    state TEXT NOT NULL,
    spec BLOB NOT NULL,
    spec_sha256 TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    stage TEXT,
    attempts INTEGER NOT NULL DEFAULT 1,
    not_before REAL NOT NULL DEFAULT 0,
    stages TEXT NOT NULL DEFAULT '{}',
    progress TEXT NOT NULL DEFAULT '{}',
    error TEXT,
    artifacts TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS transitions (
    job_id TEXT NOT NULL,
    at TEXT NOT NULL,
    from_state TEXT,
    to_state TEXT NOT NULL,
    reason TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
"""


def now_iso() -> str:
    from lorad.outbox import now_iso as _now

    return _now()


class JobStore:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(self.path), timeout=30, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # a transition survives a power cut once it returns
        self.db.executescript(_SCHEMA)

    def close(self) -> None:
        self.db.close()

    # --- reading ------------------------------------------------------------
    def _row(self, row: tuple) -> Job:
        values = dict(zip(("seq", *_COLUMNS), row))
        for key in _JSON_FIELDS:
            values[key] = json.loads(values[key]) if values[key] is not None else None
        values["state"] = JobStatus(values["state"])
        values["spec"] = bytes(values["spec"])
        return Job(**values)

    def _select(self, where: str = "", args: tuple = ()) -> list[Job]:
        sql = f"SELECT seq, {', '.join(_COLUMNS)} FROM jobs {where} ORDER BY seq"
        return [self._row(r) for r in self.db.execute(sql, args)]

    def get(self, job_id: str) -> Job | None:
        rows = self._select("WHERE job_id = ?", (job_id,))
        return rows[0] if rows else None

    def active(self) -> list[Job]:
        """Queued and running jobs, in claim order."""
        return self._select("WHERE state IN (?, ?)", (JobStatus.QUEUED.value, JobStatus.RUNNING.value))

    def all(self) -> list[Job]:
        return self._select()

    def with_sha256(self, digest: str, states: frozenset[JobStatus]) -> list[Job]:
        marks = ", ".join("?" for _ in states)
        return self._select(f"WHERE spec_sha256 = ? AND state IN ({marks})", (digest, *(s.value for s in states)))

    def with_source(self, source: str, since_iso: str = "") -> list[Job]:
        return self._select("WHERE source = ? AND created_at >= ?", (source, since_iso))

    def history(self, job_id: str) -> list[tuple[str | None, str, str | None]]:
        rows = self.db.execute("SELECT from_state, to_state, reason FROM transitions WHERE job_id = ? ORDER BY rowid",
                               (job_id,))
        return [tuple(r) for r in rows]

    # --- writing ------------------------------------------------------------
    def add(self, job_id: str, name: str | None, source: str, state: JobStatus, spec: bytes,
            error: dict[str, Any] | None = None) -> Job:
        if state not in NEW:
            raise IllegalTransition(f"{job_id}: a new job is queued, rejected or a duplicate, not {state.value}")
        now = now_iso()
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute(
                "INSERT INTO jobs (job_id, name, source, state, spec, spec_sha256, created_at, updated_at, error) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, name, source, state.value, spec, hashlib.sha256(spec).hexdigest(), now, now,
                 json.dumps(error) if error is not None else None))
            self._record(job_id, None, state, "claimed")
        job = self.get(job_id)
        assert job is not None
        return job

    def transition(self, job_id: str, to: JobStatus, reason: str, **changes: Any) -> Job:
        """Move a job to `to` (refusing a move TRANSITIONS does not allow), with other field changes."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            job = self.get(job_id)
            if job is None:
                raise KeyError(job_id)
            if to not in TRANSITIONS[job.state]:
                raise IllegalTransition(f"{job_id}: {job.state.value} → {to.value} is not allowed ({reason})")
            self._set(job_id, {**changes, "state": to.value})
            self._record(job_id, job.state, to, reason)
        new = self.get(job_id)
        assert new is not None
        return new

    def update(self, job_id: str, **changes: Any) -> Job:
        """Change fields other than the state (progress, stages, artifacts, error, stage, attempts)."""
        if "state" in changes:
            raise IllegalTransition("state changes go through transition()")
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self._set(job_id, changes)
        job = self.get(job_id)
        if job is None:
            raise KeyError(job_id)
        return job

    def _set(self, job_id: str, changes: dict[str, Any]) -> None:
        changes = {**changes, "updated_at": now_iso()}
        unknown = set(changes) - set(_COLUMNS)
        if unknown:
            raise KeyError(f"not a job field: {', '.join(sorted(unknown))}")
        values = [json.dumps(v, default=str) if k in _JSON_FIELDS and v is not None else v for k, v in changes.items()]
        assignments = ", ".join(f"{k} = ?" for k in changes)
        self.db.execute(f"UPDATE jobs SET {assignments} WHERE job_id = ?", (*values, job_id))

    def _record(self, job_id: str, before: JobStatus | None, after: JobStatus, reason: str) -> None:
        self.db.execute("INSERT INTO transitions (job_id, at, from_state, to_state, reason) VALUES (?, ?, ?, ?, ?)",
                        (job_id, now_iso(), before.value if before else None, after.value, reason))


def status_view(job: Job) -> dict[str, Any]:
    """The public status.json of a job (the keys CONTRACT.md lists, plus attempts)."""
    return {
        "job_id": job.job_id,
        "name": job.name,
        "source": job.source,
        "state": job.state.value,
        "stage": job.stage,
        "stages": job.stages,
        "progress": job.progress,
        "error": job.error,
        "artifacts": job.artifacts,
        "attempts": job.attempts,
        "created_at": job.created_at,
        "updated_at": job.updated_at,
        **({"retry_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(job.not_before))}
           if job.state == JobStatus.QUEUED and job.not_before > time.time() else {}),
    }
