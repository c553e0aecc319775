"""One outbox entry per submitted file: job ids, status.json, events.jsonl.

status.json is the public record of a job. It is rewritten atomically, so it is
always valid JSON. At any moment one process owns it: the stage process while
a stage runs, the daemon (or a CLI command when no daemon runs) otherwise.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import structlog

from lorad.fsutil import atomic_write_bytes, atomic_write_json, read_json

STATES = ("queued", "running", "succeeded", "failed", "cancelled", "rejected")
FINAL_STATES = ("succeeded", "failed", "cancelled", "rejected")
JOB_ID_RE = re.compile(r"^\d{8}-\d{6}-\d{6}-[a-z0-9][a-z0-9._-]{0,47}$")

_id_lock = threading.Lock()
_last_stamp = [0]


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def slug(text: str) -> str:
    s = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")
    return (s or "job")[:40]


def new_job_id(hint: str, taken: Callable[[str], bool] = lambda _id: False) -> str:
    """Sortable, unique id: UTC time to the microsecond (strictly increasing), then a slug."""
    with _id_lock:
        while True:
            stamp = max(time.time_ns() // 1000, _last_stamp[0] + 1)
            _last_stamp[0] = stamp
            dt = datetime.fromtimestamp(stamp / 1e6, timezone.utc)
            job_id = f"{dt:%Y%m%d-%H%M%S}-{stamp % 1_000_000:06d}-{slug(hint)}"
            if not taken(job_id):
                return job_id


def status_path(job_dir: Path) -> Path:
    return Path(job_dir) / "status.json"


def read_status(job_dir: Path) -> dict[str, Any] | None:
    return read_json(status_path(job_dir))


def write_status(job_dir: Path, status: dict[str, Any]) -> dict[str, Any]:
    status["updated_at"] = now_iso()
    atomic_write_json(status_path(job_dir), status)
    return status


def update_status(job_dir: Path, **changes: Any) -> dict[str, Any]:
    status = read_status(job_dir) or {}
    status.update(changes)
    return write_status(job_dir, status)


def new_status(job_id: str, name: str | None, source: str, state: str) -> dict[str, Any]:
    created = now_iso()
    return {
        "job_id": job_id,
        "name": name,
        "source": source,
        "state": state,
        "stage": None,
        "stages": {},
        "progress": {},
        "error": None,
        "artifacts": {},
        "created_at": created,
        "updated_at": created,
    }


def create_entry(job_dir: Path, spec_bytes: bytes, status: dict[str, Any]) -> None:
    """spec.yaml first, status.json last: a status file means the entry is complete."""
    job_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(job_dir / "spec.yaml", spec_bytes)
    write_status(job_dir, status)


def set_stage(status: dict[str, Any], stage: str, state: str, **extra: Any) -> dict[str, Any]:
    """Record a stage transition (running/succeeded/failed/skipped/interrupted) in status."""
    record = status.setdefault("stages", {}).setdefault(stage, {})
    now = now_iso()
    if state == "running":
        record.update(state="running", started_at=now, finished_at=None, seconds=None)
    else:
        record["state"] = state
        record["finished_at"] = now
        record["seconds"] = seconds_since(record["started_at"]) if record.get("started_at") else record.get("seconds")
    record.update(extra)
    return status


def seconds_since(iso: str) -> float:
    started = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    return round((datetime.now(timezone.utc) - started).total_seconds(), 3)


def read_events(path: Path) -> list[dict[str, Any]]:
    """The events of a job log (events.jsonl or a rank's log); a line cut short by a crash is skipped."""
    if not path.exists():
        return []
    events = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events


def _json_logger(stream: Any) -> structlog.typing.FilteringBoundLogger:
    return structlog.wrap_logger(
        structlog.WriteLogger(stream),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(default=str),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(0),
    )


def event_logger(job_dir: Path, name: str = "events.jsonl", **context: Any) -> structlog.typing.FilteringBoundLogger:
    """A structlog logger appending JSON lines to the job's events.jsonl (or another log in the job).

    Each event is one write() on an O_APPEND file, so the daemon and a stage
    process can log to the same file without interleaving.
    """
    path = Path(job_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a", buffering=1 << 16)
    return _json_logger(fh).bind(**context)


def daemon_logger() -> structlog.typing.FilteringBoundLogger:
    """The daemon's own log: JSON lines on stderr (launchd and journald keep them)."""
    return _json_logger(sys.stderr).bind(pid=os.getpid())
