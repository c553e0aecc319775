"""Where things live under a lorad root.

ROOT/inbox   public: users and sync tools drop specs here
ROOT/outbox  public: one entry per submitted file
ROOT/state   private to the daemon, never synced:
    lock            single-instance flock
    claimed/ID.yaml claimed specs of jobs that have not ended (the queue)
    done/ID.yaml    claimed specs of ended jobs
    cancel/ID       cancel requests from `lorad cancel`
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
    def done(self) -> Path:
        return self.state / "done"

    @property
    def cancel_requests(self) -> Path:
        return self.state / "cancel"

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
        for d in (self.inbox, self.outbox, self.claimed, self.done, self.cancel_requests, self.cache):
            d.mkdir(parents=True, exist_ok=True)


def default_root() -> Path:
    return Path(os.environ.get("LORAD_ROOT") or Path.home() / "lorad").expanduser()


def resolve(root: str | Path | None = None, inbox: str | Path | None = None, outbox: str | Path | None = None) -> Layout:
    base = Path(root).expanduser() if root else default_root()
    base = base.absolute()
    return Layout(
        root=base,
        inbox=Path(inbox).expanduser().absolute() if inbox else base / "inbox",
        outbox=Path(outbox).expanduser().absolute() if outbox else base / "outbox",
        state=base / "state",
    )
