"""One outbox entry per submitted file: job ids, status.json, events.jsonl.

status.json is the public view of a job: a projection of the daemon's job store
(jobstore.py), rewritten atomically by the daemon (or by a CLI command holding
the root's lock), so it is always valid JSON and never read back as the truth.
events.jsonl is appended to by the daemon and the stage process alike.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import structlog

from lorad.fsutil import atomic_write_json, read_json
from lorad.jobstore import FINAL

FINAL_STATES = tuple(sorted(s.value for s in FINAL))
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
    """The public view, for display only (the job store is the truth)."""
    status = read_json(status_path(job_dir))
    return status if isinstance(status, dict) else None


def write_status(job_dir: Path, status: dict[str, Any]) -> None:
    """Project a job's view (jobstore.status_view) into its outbox folder: every byte, fsync, rename."""
    Path(job_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_json(status_path(job_dir), status)


def seconds_since(iso: str) -> float:
    started = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    return round((datetime.now(timezone.utc) - started).total_seconds(), 3)


def read_events(path: Path, offset: int = 0) -> list[dict[str, Any]]:
    """The events of a job log (events.jsonl or a rank's log) from byte offset on; a line cut short
    by a crash is skipped."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except FileNotFoundError:
        return []
    events = []
    for line in text.splitlines():
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
    return _json_logger(_AppendOnly(Path(job_dir) / name)).bind(**context)


class _AppendOnly:
    """An O_APPEND log file that never raises: a full disk or a deleted outbox loses a log line, not the daemon."""

    def __init__(self, path: Path):
        self.fh: Any = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.fh = open(path, "a", buffering=1 << 16)
        except OSError:
            pass

    def write(self, text: str) -> None:
        if self.fh is None:
            return
        try:
            self.fh.write(text)
        except (OSError, ValueError):
            pass

    def flush(self) -> None:
        if self.fh is None:
            return
        try:
            self.fh.flush()
        except (OSError, ValueError):
            pass


def daemon_logger() -> structlog.typing.FilteringBoundLogger:
    """The daemon's own log: JSON lines on stderr (launchd and journald keep them)."""
    return _json_logger(sys.stderr).bind(pid=os.getpid())
