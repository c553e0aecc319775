"""Where things live under a lorad root.

ROOT/inbox   public: users and sync tools drop specs here
ROOT/outbox  public: one entry per submitted file (a projection of the job store)
ROOT/state   private to the daemon, never synced; the daemon flocks this folder itself
    jobs.sqlite3    the job store: every job's state, spec bytes and history (jobstore.py)
    lock            the pid of the daemon holding the folder's lock (for people; the flock is the lock)
    claimed/ID.yaml a spec renamed out of the inbox, until the store has it
    kept/ID.yaml    claimed files that could not be copied to the outbox (too large)
    requests/       `ID.cancel` / `ID.retry` from the CLI while a daemon runs
    run/ID/         the running stage's spec, context and report channel
    running.json    the stage process in flight (for crash recovery)
    cache/          converted base models, keyed by source and options
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    root: Path
    inbox: Path
    outbox: Path
    state: Path

    @property
    def claimed(self) -> Path:
        return self.state / "claimed"

    @property
    def kept(self) -> Path:
        return self.state / "kept"

    @property
    def requests(self) -> Path:
        return self.state / "requests"

    @property
    def store(self) -> Path:
        return self.state / "jobs.sqlite3"

    def run_dir(self, job_id: str) -> Path:
        return self.state / "run" / job_id

    @property
    def cache(self) -> Path:
        return self.state / "cache"

    @property
    def lock(self) -> Path:
        return self.state / "lock"

    @property
    def running(self) -> Path:
        return self.state / "running.json"

    def job_dir(self, job_id: str) -> Path:
        return self.outbox / job_id

    def make_dirs(self) -> None:
        for d in (self.inbox, self.outbox, self.claimed, self.kept, self.requests, self.cache):
            d.mkdir(parents=True, exist_ok=True)


def installed_root_file() -> Path:
    """Where `lorad install-agent` records the service's root, so other commands need no --root."""
    return Path.home() / ".config" / "lorad" / "root"


def default_root() -> Path:
    """$LORAD_ROOT, else the root of the installed service, else ~/lorad."""
    if os.environ.get("LORAD_ROOT"):
        return Path(os.environ["LORAD_ROOT"]).expanduser()
    try:
        recorded = installed_root_file().read_text().strip()
    except OSError:
        recorded = ""
    return Path(recorded).expanduser() if recorded else Path.home() / "lorad"


def resolve(root: str | Path | None = None, inbox: str | Path | None = None, outbox: str | Path | None = None) -> Layout:
    base = Path(root).expanduser() if root else default_root()
    base = base.absolute()
    return Layout(
        root=base,
        inbox=Path(inbox).expanduser().absolute() if inbox else base / "inbox",
        outbox=Path(outbox).expanduser().absolute() if outbox else base / "outbox",
        state=base / "state",
    )
