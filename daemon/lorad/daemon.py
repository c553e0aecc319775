"""The daemon: watch the inbox, claim specs, run jobs one at a time.

Lifecycle, in phases (after rq's worker):
  1. boot      flock the state folder (one daemon per root), open the job store, install signal flags
  2. recover   stop a stage orphaned by a crash; adopt specs claimed but not stored; retry jobs
               that were running; repair whatever is torn or missing in the outbox
  3. listen    watcher events + a periodic rescan feed the inbox tracker
  4. claim     rename a complete spec into state/claimed, read it from the opened descriptor,
               store it (queued, or rejected with every problem), project its outbox entry
  5. work      run the next stage of the oldest runnable job in a child process; one at a time
  6. stop      on SIGTERM/SIGINT: ask the stage to checkpoint, wait, exit

The job store (jobstore.py) is the truth and refuses illegal state moves; the
outbox's status.json is its projection, rewritten here and never read back.
Signal handlers only set flags; the loop acts on them. Retries live in one
place, `_retry_or_fail`. No input file, stage outcome or full disk may end the
loop: each claim and each projection is guarded and reported on its job.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import queue
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorad import accel, disk, exits, inbox, outbox, sdnotify, watcher
from lorad.fsutil import atomic_write_bytes, atomic_write_json, read_json
from lorad.jobstore import FINAL, IllegalTransition, Job, JobStatus, JobStore, status_view
from lorad.layout import Layout
from lorad.policy import Policy
from lorad.policy import load as load_policy
from lorad.policy import to_env as policy_env
from lorad.spec import MAX_SPEC_BYTES, addressed_to, check_bytes
from lorad.stagerun import EXIT_INTERRUPTED, EXIT_OK, EXIT_SKIPPED

STOP_GRACE_SECONDS = 25.0  # SIGTERM → checkpoint → exit, inside launchd's ExitTimeOut
MAX_ATTEMPTS = 3  # stage runs lost to a crash or a signal before a job fails for good
RETRY_BACKOFF_SECONDS = 30.0  # doubled after each lost attempt
PROGRESS_PROJECT_INTERVAL = 1.0  # each status.json rewrite may be a sync upload
CONFIRM_SECONDS = 0.5  # a file written in place must also stay unchanged this long after the claim
CONFLICT_EVIDENCE_SECONDS = 7 * 86400  # "job 2.yaml" is a conflict copy if job.yaml came in this recently
EARLY_STAGES = ("prepare", "convert")  # a newer version of the same file supersedes a job still in these,
# or in lora before its first checkpoint (until then, nothing the job did is worth keeping)
EXIT_ALREADY_RUNNING = 3
MAX_STAGE_FILE_BYTES = 256 << 30  # a 70B model's f16 GGUF is ~140 GiB


class AlreadyRunning(Exception):
    pass


@dataclass
class StageProcess:
    job_id: str
    stage: str
    proc: subprocess.Popen
    log_file: Any
    report_path: Path
    report_offset: int = 0
    term_sent_at: float | None = None
    cancel: bool = False
    rusage: Any = None  # the ended process's resource usage (peak RSS), from wait4
    reported_error: dict[str, Any] | None = None
    superseded_by: str | None = None


@dataclass
class Confirming:
    path: Path  # state/claimed/ID.yaml
    source: str
    key: tuple[int, int, int] | None
    since: float


def _stat_key(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino)


@dataclass
class Flags:
    stop: bool = False
    rescan: bool = False
    signals: list[int] = field(default_factory=list)


# --- the root's lock ----------------------------------------------------------
def acquire_lock(layout: Layout) -> int:
    """flock the state folder itself: deleting a lock file cannot let a second daemon in.

    The kernel drops the lock when we die, so there is never a stale lock. The pid goes
    into state/lock for people and `lorad doctor`; the file is not the lock.
    """
    layout.state.mkdir(parents=True, exist_ok=True)
    fd = os.open(layout.state, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise AlreadyRunning(lock_owner(layout)) from None
        raise
    try:
        atomic_write_bytes(layout.lock, f"{os.getpid()}\n".encode())
    except OSError:
        pass  # informational only
    return fd


def lock_owner(layout: Layout) -> int | None:
    try:
        return int(layout.lock.read_text().strip() or 0) or None
    except (OSError, ValueError):
        return None


def daemon_running(layout: Layout) -> bool:
    try:
        fd = os.open(layout.state, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


@contextmanager
def exclusive(layout: Layout) -> Iterator[JobStore]:
    """The job store for a CLI command, holding the root's lock so no daemon starts meanwhile."""
    fd = acquire_lock(layout)
    store = JobStore(layout.store)
    try:
        yield store
    finally:
        store.close()
        os.close(fd)


def process_start_time(pid: int) -> str | None:
    """Start time of pid (Linux /proc; `ps` elsewhere), to tell a reused pid from ours."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except OSError:
        pass
    try:
        out = subprocess.run(["ps", "-o", "lstart=", "-p", str(pid)], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _die_with_parent() -> None:
    """In the stage process: get SIGTERM when the daemon dies (Linux), so no stage outlives it."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def _stage_limits() -> None:
    """In the stage process, before exec: die with the daemon; no core dumps (a model's worth of memory on
    disk); files no larger than MAX_STAGE_FILE_BYTES (a runaway writer fails, the disk does not fill)."""
    import resource

    _die_with_parent()
    for limit, value in ((resource.RLIMIT_CORE, 0), (resource.RLIMIT_FSIZE, MAX_STAGE_FILE_BYTES)):
        try:
            _, hard = resource.getrlimit(limit)
            resource.setrlimit(limit, (min(value, hard) if hard != resource.RLIM_INFINITY else value, hard))
        except (ValueError, OSError):
            pass


def read_claimed(path: Path) -> tuple[bytes | None, str | None]:
    """(bytes, None), or (None, why not): never follows a link, never blocks on a FIFO, never reads a huge file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        if e.errno == errno.ELOOP:
            return None, "a symbolic link, not a file: only regular files are read from the inbox"
        return None, f"cannot be opened ({e.strerror})"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None, "not a regular file (a FIFO, socket or device): only regular files are read from the inbox"
        if st.st_size > MAX_SPEC_BYTES:
            return None, f"{st.st_size} bytes; job specs are limited to {MAX_SPEC_BYTES} bytes"
        chunks, total = [], 0
        while total <= MAX_SPEC_BYTES:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > MAX_SPEC_BYTES:
            return None, f"more than {MAX_SPEC_BYTES} bytes; job specs are limited to {MAX_SPEC_BYTES} bytes"
        return b"".join(chunks), None
    finally:
        os.close(fd)


class Daemon:
    def __init__(self, layout: Layout, once: bool = False, polling: bool = False,
                 settle: float = 2.0, rescan_interval: float = 30.0, retry_backoff: float = RETRY_BACKOFF_SECONDS,
                 policy: Policy | None = None, rename_delay: float = 0.5, name: str | None = None,
                 default_daemon: str | None = None):
        self.layout = layout
        self.name = name or default_name()
        self.is_default = (default_daemon or self.name) == self.name  # takes the specs without runs_on
        self.shared_inbox = default_daemon is not None  # other daemons claim from this inbox too
        self.policy = policy or load_policy(layout.root, layout.inbox)
        self.once = once
        self.polling = polling
        self.rescan_interval = rescan_interval
        self.retry_backoff = retry_backoff
        self.tracker = inbox.InboxTracker(layout.inbox, settle=settle, rename_delay=rename_delay)
        self.events: queue.Queue = queue.Queue()
        self.flags = Flags()
        self.current: StageProcess | None = None
        self.log = outbox.daemon_logger()
        self.observer: Any = None
        self.exit_code = 0
        self.inbox_error_reported = False
        self.caffeinate: subprocess.Popen | None = None
        self.watchdog_every = sdnotify.watchdog_interval()
        self.last_watchdog = 0.0
        self.service_status: tuple[str, ...] = ()
        self.store: JobStore | None = None
        self.unprojected: set[str] = set()  # jobs whose status.json could not be written (full disk)
        self.last_projection = 0.0
        self.last_adopt = 0.0
        self.confirming: dict[str, Confirming] = {}

    @property
    def db(self) -> JobStore:
        assert self.store is not None, "the job store opens at boot"
        return self.store

    # --- phase 1: boot -------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        self.flags.signals.append(signum)
        if signum == signal.SIGHUP:
            self.flags.rescan = True
        else:
            self.flags.stop = True

    def install_signals(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)

    # --- projection: the store → the outbox --------------------------------
    def _project(self, job: Job) -> None:
        """Rewrite status.json from the store; a failure (full disk) is retried later, never raised."""
        try:
            outbox.write_status(self.layout.job_dir(job.job_id), status_view(job))
            self.unprojected.discard(job.job_id)
        except OSError as e:
            if job.job_id not in self.unprojected:
                self.log.error("outbox_write_failed", job_id=job.job_id, error=str(e),
                               hint="free disk space; the daemon keeps the job and rewrites the entry later")
            self.unprojected.add(job.job_id)

    def _reproject_pending(self) -> None:
        if not self.unprojected or time.monotonic() - self.last_projection < 5.0:
            return
        self.last_projection = time.monotonic()
        for job_id in list(self.unprojected):
            job = self.db.get(job_id)
            if job is not None:
                self._project(job)

    def _job_log(self, job_id: str, **context: Any) -> Any:
        return outbox.event_logger(self.layout.job_dir(job_id), job_id=job_id, **context)

    # --- phase 2: recover ----------------------------------------------
    def recover(self) -> None:
        running = read_json(self.layout.running)
        if isinstance(running, dict):
            pid, started = running.get("pid"), running.get("pid_start")
            if isinstance(pid, int) and started and process_start_time(pid) == started:
                self.log.warning("orphan_stage_found", pid=pid, job_id=running.get("job_id"))
                self._kill_group(pid)
        self.layout.running.unlink(missing_ok=True)
        self._clean_temp()
        self._adopt_claimed()
        for job in self.db.active():
            if job.state == JobStatus.RUNNING:
                self._retry_or_fail(job, job.stage, {"type": "Interrupted",
                                                     "message": "the daemon stopped without a clean shutdown"})
        self._repair_outbox()
        active = self.db.active()
        if active:
            self.log.info("recovered_queue", jobs=len(active))

    def _clean_temp(self) -> None:
        """Half-written folders a killed stage left (convert's .KEY.PID.tmp, run folders of ended jobs)."""
        for tmp in (self.layout.cache / "models").glob(".*.tmp"):
            shutil.rmtree(tmp, ignore_errors=True)
            self.log.info("temp_removed", path=str(tmp))
        run_root = self.layout.state / "run"
        if run_root.is_dir():
            for run_dir in run_root.iterdir():
                job = self.db.get(run_dir.name)
                if job is None or job.state in FINAL:
                    shutil.rmtree(run_dir, ignore_errors=True)

    def _adopt_claimed(self) -> None:
        """Specs renamed into state/claimed that the store does not have yet (a crash or a full disk
        between the rename and the insert); a stored one's file is just removed."""
        self.last_adopt = time.monotonic()
        for path in sorted(self.layout.claimed.glob("*.yaml")):
            job_id = path.stem
            sidecar = self.layout.claimed / f".{job_id}.source"
            if self.db.get(job_id) is not None:
                path.unlink(missing_ok=True)
                sidecar.unlink(missing_ok=True)
                continue
            if job_id in self.confirming:
                continue
            try:
                source = sidecar.read_text()
            except OSError:
                source = f"{job_id}.yaml"
            self._guarded_register(job_id, path, source=source)

    def _repair_outbox(self) -> None:
        """Whatever is torn, missing or edited in the outbox is rewritten from the store, and said on the job."""
        for job in self.db.all():
            job_dir = self.layout.job_dir(job.job_id)
            found = read_json(outbox.status_path(job_dir))
            if not job_dir.joinpath("spec.yaml").exists() and len(job.spec) <= MAX_SPEC_BYTES:
                try:
                    job_dir.mkdir(parents=True, exist_ok=True)
                    atomic_write_bytes(job_dir / "spec.yaml", job.spec)
                except OSError:
                    pass
            if not isinstance(found, dict) or found.get("job_id") != job.job_id or found.get("state") != job.state.value:
                self._project(job)
                self._job_log(job.job_id).warning("outbox_repaired", found=type(found).__name__ if found is not None
                                                  else "missing", state=job.state.value)

    def _kill_group(self, pid: int, grace: float = 10.0) -> None:
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                try:
                    os.killpg(pid, 0)
                except ProcessLookupError:
                    return
                time.sleep(0.1)

    # --- phase 3/4: listen and claim -------------------------------------
    def _start_watcher(self) -> None:
        try:
            self.observer = watcher.start(self.layout.inbox, self.events, polling=self.polling)
        except OSError as e:
            self.observer = None
            self.log.error("watcher_failed", error=str(e), fallback="rescan every interval")

    def _check_inbox_access(self) -> bool:
        try:
            with os.scandir(self.layout.inbox):
                pass
        except OSError as e:
            if not self.inbox_error_reported:
                self.inbox_error_reported = True
                interpreter = os.path.realpath(sys.executable)
                hint = "check the folder's permissions" if isinstance(e, PermissionError) else "does the folder exist?"
                if e.errno == errno.EPERM:  # EACCES is plain permissions; EPERM is macOS privacy (TCC)
                    hint = (f"macOS privacy protection blocks {interpreter} from this folder: grant that program "
                            "Full Disk Access (System Settings → Privacy & Security), or move the inbox "
                            "out of Desktop, Documents and iCloud Drive")
                self.log.error("inbox_permission_denied" if isinstance(e, PermissionError) else "inbox_unreadable",
                               folder=str(self.layout.inbox), errno=e.errno, interpreter=interpreter, hint=hint)
            return False
        self.inbox_error_reported = False
        return True

    def _taken(self, job_id: str) -> bool:
        return (self.db.get(job_id) is not None or self.layout.job_dir(job_id).exists()
                or (self.layout.claimed / f"{job_id}.yaml").exists())

    def claim_ready(self) -> None:
        for name in self.tracker.ready():
            cand = self.tracker.candidates.get(name)
            moved_in = bool(cand and cand.moved_in)
            self.tracker.forget(name)
            try:
                self._claim(name, moved_in)
            except Exception as e:  # noqa: BLE001 - one file must never end the loop
                self.log.error("claim_failed", file=name, error=f"{type(e).__name__}: {e}",
                               disk_full=disk.is_disk_full(e))
        self._confirm_claims()

    def _for_me(self, name: str) -> bool:
        """Whether this daemon claims inbox/name: its runs_on names this daemon, or it has none (or cannot be
        read) and this is the default daemon. Another daemon's file is left alone: no claim, no outbox entry."""
        data, _ = read_claimed(self.layout.inbox / name)
        names = addressed_to(data) if data is not None else None
        mine = self.name in names if names is not None else self.is_default
        if not mine:
            self.tracker.leave(name)
            self.log.info("left_for_another_daemon", file=name, runs_on=names or "(the default daemon)", daemon=self.name)
        return mine

    def _claim(self, name: str, moved_in: bool = False) -> None:
        src = self.layout.inbox / name
        kind = inbox.classify(name)
        if kind == "cancel":
            self._cancel_file(name)
            return
        if not self._for_me(name):
            return
        original = inbox.conflict_original(name)
        if kind == "conflict" or (kind == "maybe-conflict" and original and self._was_here(original)):
            # a conflict copy is a record of a user's edit: keep it, show it, never run it
            self._reject_conflict(name, original)
            return
        stem = Path(name).stem
        job_id = stem if outbox.JOB_ID_RE.match(stem) and not self._taken(stem) else outbox.new_job_id(stem, self._taken)
        dest = self.layout.claimed / f"{job_id}.yaml"
        if not inbox.claim(src, dest):
            return
        self.log.info("claimed", file=name, job_id=job_id)
        try:
            atomic_write_bytes(self.layout.claimed / f".{job_id}.source", name.encode())  # for adoption after a crash
        except OSError:
            pass
        if moved_in:  # renamed into place: complete by the writer's word
            self._guarded_register(job_id, dest, source=name)
        else:  # written in place: the bytes must stay put a little longer, now that no one can add to the name
            self.confirming[job_id] = Confirming(dest, name, _stat_key(dest), time.monotonic())

    def _confirm_claims(self) -> None:
        """Register claimed files whose bytes stayed unchanged, with no writer, for CONFIRM_SECONDS."""
        now = time.monotonic()
        for job_id, c in list(self.confirming.items()):
            key = _stat_key(c.path)
            if key is None:
                del self.confirming[job_id]
                continue
            if key != c.key or inbox.open_for_writing(c.path):
                if key != c.key:
                    self.log.warning("claimed_file_changed", job_id=job_id, file=c.source,
                                     action="waiting until it stops changing")
                c.key, c.since = key, now
                continue
            if now - c.since >= CONFIRM_SECONDS:
                del self.confirming[job_id]
                self._guarded_register(job_id, c.path, source=c.source)

    def _was_here(self, original: str) -> bool:
        """Evidence for a conflict copy: its original (.yaml or .yml) is in the inbox now, or came in lately."""
        stem = Path(original).stem
        since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() - CONFLICT_EVIDENCE_SECONDS))
        return any((self.layout.inbox / name).exists() or self.db.with_source(name, since)
                   for name in (f"{stem}.yaml", f"{stem}.yml"))

    def _cancel_file(self, name: str) -> None:
        """`JOB.cancel` or `cancel-JOB` dropped into the inbox: cancel for people who only have the folder."""
        ref = inbox.cancel_target(name) or ""
        active = [j for j in self.db.active() if j.job_id == ref or j.job_id.startswith(ref) or j.name == ref]
        if not active and self.shared_inbox:  # perhaps another daemon's job: that daemon consumes the file
            self.tracker.leave(name)
            self.log.info("cancel_file_left", file=name, reason="no active job here; left for the other daemons")
            return
        try:
            os.unlink(self.layout.inbox / name)
        except OSError:
            return
        if len(active) != 1:
            self.log.warning("cancel_file_ignored", file=name, matches=[j.job_id for j in active],
                             reason="no active job" if not active else "more than one active job matches")
            return
        job = active[0]
        self._job_log(job.job_id).info("cancel_requested", via=f"inbox file {name}")
        if self.current and self.current.job_id == job.job_id:
            self.current.cancel = True
            self._terminate_current()
        else:
            self._set(job, JobStatus.CANCELLED, f"cancelled by {name} in the inbox")

    def _guarded_register(self, job_id: str, claimed: Path, source: str) -> None:
        """Store a claimed file as a job. A full disk leaves it in state/claimed (adopted later); anything
        else odd about it becomes a rejected job; nothing here ends the loop."""
        try:
            self._register(job_id, claimed, source)
        except (OSError, sqlite3.Error) as e:
            if disk.is_disk_full(e):
                self.log.error("claim_deferred", job_id=job_id, file=source, reason="disk full",
                               hint="free disk space; the spec waits in state/claimed and is taken up again")
                return
            raise

    def _register(self, job_id: str, claimed: Path, source: str) -> None:
        data, unreadable = read_claimed(claimed)
        if data is None:
            problems = [{"path": "$", "line": None, "column": None, "message": f"{source}: {unreadable}"}]
            message = f"{source} was not read: {unreadable}"
            kept = b""
            if claimed.is_file() and not claimed.is_symlink():  # a large file: kept privately, never copied out
                os.replace(claimed, self.layout.kept / claimed.name)
                message += f" (kept as {self.layout.kept / claimed.name})"
            error = {"type": "SpecError", "message": message, "errors": problems}
            job = self.db.add(job_id, None, source, JobStatus.REJECTED, kept, error)
        else:
            result = check_bytes(data, self.policy)
            raw_name = (result.raw or {}).get("name")
            name = raw_name if isinstance(raw_name, str) else None
            if result.ok and result.spec is not None:
                original = None if result.spec.get("rerun") else self._original_of(data)
                if original is not None:
                    error = {"type": "Duplicate", "duplicate_of": original.job_id, "errors": [],
                             "message": f"the same bytes as job {original.job_id} ({original.state.value}); not run "
                                        "again. To run it again, add `rerun: true` to the spec or use `lorad submit --rerun`"}
                    job = self.db.add(job_id, result.spec["name"], source, JobStatus.DUPLICATE, data, error)
                else:
                    job = self.db.add(job_id, result.spec["name"], source, JobStatus.QUEUED, data)
                    self._supersede_earlier(job)
            else:
                error = {"type": "SpecError", "message": f"{len(result.problems)} problem(s) in {source}",
                         "errors": [p.as_dict() for p in result.problems]}
                job = self.db.add(job_id, name, source, JobStatus.REJECTED, data, error)
        claimed.unlink(missing_ok=True)  # the store has the bytes now
        (self.layout.claimed / f".{job_id}.source").unlink(missing_ok=True)
        job_dir = self.layout.job_dir(job_id)
        try:
            job_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(job_dir / "spec.yaml", job.spec)  # the submitted bytes, unchanged
        except OSError as e:
            self.log.error("outbox_write_failed", job_id=job_id, error=str(e))
        self._project(job)
        log = self._job_log(job_id)
        if job.state == JobStatus.QUEUED:
            log.info("job_queued", source=source, name=job.name)
        elif job.state == JobStatus.DUPLICATE:
            log.warning("job_duplicate", source=source, duplicate_of=(job.error or {}).get("duplicate_of"))
        else:
            for problem in (job.error or {}).get("errors", []):
                log.error("spec_problem", **problem)
            log.error("job_rejected", source=source, problems=len((job.error or {}).get("errors", [])))

    def _original_of(self, data: bytes) -> Job | None:
        """A job with exactly these bytes that is queued, running or succeeded (a re-delivery)."""
        import hashlib

        same = self.db.with_sha256(hashlib.sha256(data).hexdigest(),
                                   frozenset({JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.SUCCEEDED}))
        return same[0] if same else None

    def _supersede_earlier(self, newer: Job) -> None:
        """Last write wins for one inbox name: an earlier version still queued, or still in its early stages
        (prepare, convert, or lora before its first checkpoint), ends `superseded`; after that, a new
        version of the name is a new job."""
        for job in self.db.with_source(newer.source):
            if job.job_id == newer.job_id or job.state not in (JobStatus.QUEUED, JobStatus.RUNNING):
                continue
            done = {k for k, v in job.stages.items() if v.get("state") in ("succeeded", "skipped")}
            if not done <= set(EARLY_STAGES):
                continue
            if self.current and self.current.job_id == job.job_id:
                first_checkpoint = self.layout.job_dir(job.job_id) / "adapters" / "checkpoint" / "state.json"
                if not (self.current.stage in EARLY_STAGES
                        or (self.current.stage == "lora" and not first_checkpoint.exists())):
                    continue
                self.current.superseded_by = newer.job_id
                self._terminate_current()
            else:
                self._set(job, JobStatus.SUPERSEDED, f"superseded by {newer.job_id}",
                          error=_superseded(newer.job_id, newer.source))
            self._job_log(newer.job_id).info("job_supersedes", earlier=job.job_id, source=newer.source)

    def _reject_conflict(self, name: str, original: str | None = None) -> None:
        job_id = outbox.new_job_id(Path(name).stem, self._taken)
        dest = self.layout.claimed / f"{job_id}.yaml"
        if not inbox.claim(self.layout.inbox / name, dest):
            return
        data, unreadable = read_claimed(dest)
        lost_to = f" of {original}" if original else ""
        error = {
            "type": "SyncConflict", "lost_to": original,
            "message": f"{name} is a sync tool's conflict copy{lost_to}; it was not run. Its bytes are kept here "
                       "(spec.yaml): compare them with the original and submit the version you want under a new name.",
            "errors": [{"path": "$", "line": None, "message": "sync_conflict"}],
        }
        job = self.db.add(job_id, None, name, JobStatus.REJECTED, data or b"", error)
        dest.unlink(missing_ok=True)
        try:
            self.layout.job_dir(job_id).mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.layout.job_dir(job_id) / "spec.yaml", job.spec)
        except OSError:
            pass
        self._project(job)
        self._job_log(job_id).warning("job_rejected", reason="sync_conflict", source=name)
        self.log.warning("sync_conflict", file=name, job_id=job_id)

    # --- requests from the CLI: cancel, retry -------------------------------
    def handle_requests(self) -> None:
        try:
            requests = sorted(self.layout.requests.iterdir())
        except OSError:
            return
        for req in requests:
            req.unlink(missing_ok=True)
            job_id, _, verb = req.name.rpartition(".")
            job = self.db.get(job_id)
            if job is None:
                continue
            if verb == "cancel":
                if self.current and self.current.job_id == job_id:
                    self.current.cancel = True
                    self._terminate_current()
                elif job.state == JobStatus.QUEUED:
                    self._set(job, JobStatus.CANCELLED, "cancelled by the user")
            elif verb == "retry":
                retry_job(self.db, job, log=self._job_log(job_id))
                job = self.db.get(job_id)
                if job is not None:
                    self._project(job)

    # --- the one place a job changes state -------------------------------------
    def _set(self, job: Job, to: JobStatus, reason: str, **changes: Any) -> Job | None:
        try:
            new = self.db.transition(job.job_id, to, reason, **changes)
        except IllegalTransition as e:
            self.log.error("illegal_transition", job_id=job.job_id, error=str(e))
            return None
        self._project(new)
        log = self._job_log(job.job_id)
        if to in FINAL:
            event = f"job_{to.value}"
            (log.error if to == JobStatus.FAILED else log.info)(event, reason=reason, artifacts=new.artifacts or None)
        return new

    def _retry_or_fail(self, job: Job, stage: str | None, error: dict[str, Any]) -> None:
        """A stage run was lost (crash, signal, daemon died, a training host gone): retry with backoff, resuming from its
        checkpoint, until MAX_ATTEMPTS runs were lost; then the job fails and stays failed."""
        gave_up = job.attempts >= MAX_ATTEMPTS
        attempts = job.attempts if gave_up else job.attempts + 1
        stages = dict(job.stages)
        if stage:
            stages[stage] = {**stages.get(stage, {}), "state": "failed" if gave_up else "interrupted",
                             "finished_at": outbox.now_iso()}
        if gave_up:
            message = f"{error['message']}; gave up after {attempts} attempts"
            self._set(job, JobStatus.FAILED, message, attempts=attempts, stages=stages,
                      error={**error, "message": message, "attempts": attempts})
            return
        delay = self.retry_backoff * 2 ** (attempts - 2)
        changes = {"attempts": attempts, "stages": stages, "not_before": time.time() + delay,
                   "error": {**error, "retrying_in_seconds": round(delay, 1), "attempts": attempts}}
        if job.state == JobStatus.RUNNING:
            self._set(job, JobStatus.QUEUED, error["message"], **changes)
        else:
            self._project(self.db.update(job.job_id, **changes))
        self._job_log(job.job_id, stage=stage).warning("job_requeued", reason=error["message"],
                                                       attempt=attempts, in_seconds=round(delay, 1))

    # --- phase 5: work ---------------------------------------------------
    def start_next(self) -> None:
        while self.current is None:
            now = time.time()
            job = next((j for j in self.db.active() if j.not_before <= now), None)
            if job is None:
                return
            result = check_bytes(job.spec)  # parsed once per start: stages and the disk estimate come from it
            if not result.ok or result.spec is None:  # valid when claimed; not for this lorad (a schema change)
                self._set(job, JobStatus.FAILED, "the spec no longer validates",
                          error={"type": "SpecError", "message": "the stored spec no longer validates with this lorad",
                                 "errors": [p.as_dict() for p in result.problems]})
                continue
            spec = result.spec
            wanted = list(spec["stages"])
            done = {k for k, v in job.stages.items() if v.get("state") in ("succeeded", "skipped")}
            stage = next((s for s in wanted if s not in done), None)
            if stage is None:
                if job.state == JobStatus.QUEUED:  # resumed after its last stage had finished
                    job = self.db.transition(job.job_id, JobStatus.RUNNING, "resumed")
                self._hold_awake(False)
                self._set(job, JobStatus.SUCCEEDED, "every stage finished", stage=None, error=None)
                continue
            try:
                disk.check_free(stage, disk.stage_need(stage, spec, self.layout.job_dir(job.job_id)), self.layout.root)
            except disk.DiskFull as e:
                self._set(job, JobStatus.FAILED, str(e), error={"type": "DiskFull", "message": str(e), "stage": stage, "errors": []})
                continue
            stages = {**job.stages, stage: {"state": "running", "started_at": outbox.now_iso(), "finished_at": None,
                                            "seconds": None}}
            changes = {"stage": stage, "stages": stages, "progress": {}}
            if job.state == JobStatus.QUEUED:
                started = self._set(job, JobStatus.RUNNING, f"stage {stage} starts", **changes)
            else:
                started = self.db.update(job.job_id, **changes)
                self._project(started)
            if started is None:
                return
            self._job_log(job.job_id, stage=stage).info("stage_started", attempt=started.attempts)
            try:
                self._spawn(started, stage)
            except OSError as e:
                why = "disk full" if disk.is_disk_full(e) else str(e)
                self._set(started, JobStatus.FAILED, f"could not start stage {stage}: {why}",
                          error={"type": "DiskFull" if disk.is_disk_full(e) else "SpawnFailed",
                                 "message": f"could not start stage {stage}: {why}", "stage": stage, "errors": []})

    def _spawn(self, job: Job, stage: str) -> None:
        job_dir = self.layout.job_dir(job.job_id)
        run_dir = self.layout.run_dir(job.job_id)
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(run_dir / "spec.yaml", job.spec)  # the stage reads the stored spec, not the outbox copy
        atomic_write_json(run_dir / "context.json", {"job_id": job.job_id, "artifacts": job.artifacts,
                                                     "attempt": job.attempts})
        report = run_dir / f"{stage}.report.jsonl"
        report.unlink(missing_ok=True)
        (job_dir / "logs").mkdir(parents=True, exist_ok=True)
        log_file = open(job_dir / "logs" / f"{stage}.log", "ab")
        env = {**sdnotify.child_env(dict(os.environ)), **accel.blas_env(self.layout.cache),
               "PYTHONUNBUFFERED": "1", "NO_COLOR": "1", "LORAD_RUN_DIR": str(run_dir), **policy_env(self.policy)}
        proc = subprocess.Popen(
            [sys.executable, "-m", "lorad.stagerun", str(job_dir), stage, "--cache", str(self.layout.cache)],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,  # its own process group: we signal the whole stage, tools included
            preexec_fn=_stage_limits,
        )
        self.current = StageProcess(job.job_id, stage, proc, log_file, report)
        self._hold_awake(True)
        try:
            atomic_write_json(self.layout.running, {
                "job_id": job.job_id, "stage": stage, "pid": proc.pid,
                "pid_start": process_start_time(proc.pid), "started_at": outbox.now_iso(),
            })
        except OSError:
            pass  # only used to find an orphan after a crash
        self.log.info("stage_spawned", job_id=job.job_id, stage=stage, pid=proc.pid)

    def _hold_awake(self, on: bool) -> None:
        """While a job runs, keep the machine from sleeping (macOS `caffeinate -i -w <our pid>`)."""
        if on and self.caffeinate is None:
            exe = shutil.which("caffeinate")
            if exe:
                self.caffeinate = subprocess.Popen([exe, "-i", "-w", str(os.getpid())], stdin=subprocess.DEVNULL,
                                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                self.log.info("caffeinate_started", pid=self.caffeinate.pid)
        elif not on and self.caffeinate is not None:
            self.caffeinate.terminate()
            try:
                self.caffeinate.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.caffeinate.kill()
            self.log.info("caffeinate_released", pid=self.caffeinate.pid)
            self.caffeinate = None

    def _terminate_current(self) -> None:
        cur = self.current
        if cur and cur.term_sent_at is None:
            cur.term_sent_at = time.monotonic()
            try:
                os.killpg(cur.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def _read_reports(self, cur: StageProcess, final: bool = False) -> None:
        """Apply what the stage reported (progress, artifacts, its error) to the store."""
        try:
            with open(cur.report_path, "rb") as f:
                f.seek(cur.report_offset)
                data = f.read()
        except OSError:
            return
        end = len(data) if final else data.rfind(b"\n") + 1  # a line still being written waits
        if end <= 0:
            return
        cur.report_offset += end
        job = self.db.get(cur.job_id)
        if job is None:
            return
        changes: dict[str, Any] = {}
        for line in data[:end].splitlines():
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if not isinstance(msg, dict):
                continue
            if isinstance(msg.get("progress"), dict):
                earlier = changes.get("progress", job.progress)
                earlier = earlier if earlier.get("stage") == cur.stage else {}
                changes["progress"] = {**earlier, **msg["progress"], "stage": cur.stage}
            if isinstance(msg.get("artifacts"), dict):
                changes["artifacts"] = {**changes.get("artifacts", job.artifacts), **msg["artifacts"]}
            if isinstance(msg.get("error"), dict):
                cur.reported_error = msg["error"]
            if isinstance(msg.get("stage_message"), str):
                stages = changes.get("stages", dict(job.stages))
                stages[cur.stage] = {**stages.get(cur.stage, {}), "message": msg["stage_message"]}
                changes["stages"] = stages
        if changes:
            job = self.db.update(cur.job_id, **changes)
            if final or time.monotonic() - self.last_projection >= PROGRESS_PROJECT_INTERVAL:
                self.last_projection = time.monotonic()
                self._project(job)

    def poll_current(self) -> None:
        cur = self.current
        if cur is None:
            return
        if cur.term_sent_at and time.monotonic() - cur.term_sent_at > STOP_GRACE_SECONDS:
            try:
                os.killpg(cur.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            pid, wait_status, rusage = os.wait4(cur.proc.pid, os.WNOHANG)  # wait4: the child's peak memory too
        except ChildProcessError:
            pid, wait_status, rusage = cur.proc.pid, None, None
        if pid == 0:
            self._read_reports(cur)
            return
        code = os.waitstatus_to_exitcode(wait_status) if wait_status is not None else (cur.proc.poll() or 0)
        cur.proc.returncode = code
        cur.rusage = rusage
        try:
            os.killpg(cur.proc.pid, signal.SIGKILL)  # tools the stage started and left behind
        except (ProcessLookupError, PermissionError):
            pass
        cur.log_file.close()
        self.current = None
        self.layout.running.unlink(missing_ok=True)
        self._read_reports(cur, final=True)
        self._stage_ended(cur, code)

    def _stage_ended(self, cur: StageProcess, code: int) -> None:
        job = self.db.get(cur.job_id)
        if job is None:
            return
        log = self._job_log(cur.job_id, stage=cur.stage)
        stages = dict(job.stages)
        record = dict(stages.get(cur.stage, {}))
        record["finished_at"] = outbox.now_iso()
        if record.get("started_at"):
            record["seconds"] = outbox.seconds_since(record["started_at"])
        if code not in (EXIT_OK, EXIT_SKIPPED) or cur.cancel:
            self._hold_awake(False)  # the job stops here (failed, cancelled or interrupted)
        if cur.superseded_by:
            stages[cur.stage] = {**record, "state": "cancelled"}
            self._set(job, JobStatus.SUPERSEDED, f"superseded by {cur.superseded_by}", stages=stages,
                      error=_superseded(cur.superseded_by, job.source))
            return
        if cur.cancel:
            stages[cur.stage] = {**record, "state": "cancelled"}
            self._set(job, JobStatus.CANCELLED, "cancelled by the user", stages=stages)
            return
        if code in (EXIT_OK, EXIT_SKIPPED):
            state = "succeeded" if code == EXIT_OK else "skipped"
            stages[cur.stage] = {**record, "state": state}
            self._project(self.db.update(job.job_id, stages=stages, error=None))
            log.info("stage_finished", state=state, seconds=record.get("seconds"))
            return  # the loop starts the next stage
        if code == EXIT_INTERRUPTED or (cur.term_sent_at and self.flags.stop):
            stages[cur.stage] = {**record, "state": "interrupted"}
            self._set(job, JobStatus.QUEUED, "interrupted by a daemon stop; resumes on next start", stages=stages)
            log.warning("stage_interrupted", resume="on next start")
            return
        tail = _tail(self.layout.job_dir(cur.job_id) / "logs" / f"{cur.stage}.log")
        if code > 0 and cur.reported_error:  # the stage said what went wrong, and whether to try again
            error = {**cur.reported_error, "stage": cur.stage, "errors": cur.reported_error.get("errors", [])}
            retryable = bool(error.pop("retryable", False))
        else:
            why = exits.explain(code, cur.stage, cur.rusage, stopped_by_us=cur.term_sent_at is not None)
            error = {"type": "StageCrashed", "message": why.message, "hint": why.hint, "stage": cur.stage,
                     "errors": [], "log_tail": tail, "exit": code, "peak_rss_bytes": why.peak_rss_bytes}
            log.error("stage_crashed", reason=why.message, hint=why.hint, exit=code, peak_rss_bytes=why.peak_rss_bytes)
            retryable = why.retryable
        stages[cur.stage] = {**record, "state": "failed", "exit": code}
        if retryable:
            self._project(self.db.update(job.job_id, stages=stages))
            self._retry_or_fail(self.db.get(job.job_id) or job, cur.stage, error)
        else:
            self._set(job, JobStatus.FAILED, error.get("message", "stage failed"), stages=stages, error=error)

    # --- the loop ----------------------------------------------------------
    def run(self) -> int:
        self.install_signals()  # first: a SIGHUP or SIGTERM during start-up sets a flag, never kills
        try:
            self.layout.make_dirs()
            lock_fd = acquire_lock(self.layout)
        except AlreadyRunning as e:
            print(f"lorad: a daemon is already running on {self.layout.root} (pid {e.args[0]})", file=sys.stderr)
            return EXIT_ALREADY_RUNNING
        except OSError as e:
            print(f"lorad: cannot use {self.layout.root}: {e}", file=sys.stderr)
            return 1
        try:
            self.store = JobStore(self.layout.store)
            self.log.info("daemon_started", name=self.name, default_daemon=self.is_default, root=str(self.layout.root),
                          inbox=str(self.layout.inbox),
                          outbox=str(self.layout.outbox), once=self.once, polling=self.polling)
            self.recover()
            ensure_placeholder(self.layout.inbox)
            self._start_watcher()
            sdnotify.notify("READY=1", f"STATUS=watching {self.layout.inbox}")
            self._loop()
        finally:
            self._hold_awake(False)
            if self.observer is not None:
                self.observer.stop()
            if self.store is not None:
                self.store.close()
            os.close(lock_fd)
        return self.exit_code

    def _loop(self) -> None:
        last_scan = 0.0
        while True:
            try:
                if not self._step(last_scan):
                    return
                if time.monotonic() - last_scan >= self.rescan_interval:
                    last_scan = time.monotonic()
            except Exception as e:  # noqa: BLE001 - the last line of defence: log, slow down, go on
                self.log.error("loop_error", error=f"{type(e).__name__}: {e}", disk_full=disk.is_disk_full(e),
                               exc_info=True)
                time.sleep(1.0)
                if self.flags.stop and self.current is None:
                    return

    def _step(self, last_scan: float) -> bool:
        """One turn of the loop; False when the daemon should exit."""
        self._tell_systemd()
        if self.flags.stop and not self._stopping():
            return False
        if not self.flags.stop:
            now = time.monotonic()
            if self.observer is not None and not self.observer.is_alive():
                self.log.warning("watcher_died", action="restarting")
                self._start_watcher()
                self.flags.rescan = True
            if now - last_scan >= self.rescan_interval or self.flags.rescan:
                self.flags.rescan = False
                if self._check_inbox_access():
                    self.tracker.scan()
                if now - self.last_adopt >= self.rescan_interval:
                    self._adopt_claimed()
            self.claim_ready()
            self.handle_requests()
        self.poll_current()
        self._reproject_pending()
        if not self.flags.stop:
            self.start_next()
        if self.once and not self.flags.stop and self.current is None and not self.tracker.pending \
                and not self.confirming and not self.db.active():
            self.log.info("daemon_drained")
            return False
        idle_wait = 0.1 if (self.tracker.pending or self.confirming or self.current or self.flags.stop) else 1.0
        if self.once and self.current is None and self.db.active():
            idle_wait = 0.1  # waiting out a retry's backoff
        self._wait(min(idle_wait, self.watchdog_every or idle_wait))
        return True

    def _tell_systemd(self) -> None:
        """Status line, watchdog ping and STOPPING=1 for a Type=notify unit (no-ops elsewhere)."""
        fields: tuple[str, ...]
        if self.flags.stop:
            fields = ("STOPPING=1", "STATUS=stopping" + (f": {self.current.stage} is checkpointing" if self.current else ""))
        elif self.current is not None:
            queued = sum(1 for j in self.db.active() if j.job_id != self.current.job_id)
            fields = (f"STATUS=running {self.current.job_id}: {self.current.stage} ({queued} queued)",)
        else:
            fields = (f"STATUS=idle, watching {self.layout.inbox}",)
        if fields != self.service_status:
            self.service_status = fields
            sdnotify.notify(*fields)
        now = time.monotonic()
        if self.watchdog_every and now - self.last_watchdog >= self.watchdog_every:
            self.last_watchdog = now
            sdnotify.notify("WATCHDOG=1")

    def _stopping(self) -> bool:
        """Shutdown step; True while a stage is still checkpointing."""
        if self.current is None:
            self.log.info("daemon_stopped", signals=[signal.Signals(s).name for s in self.flags.signals])
            return False
        self._terminate_current()
        self.poll_current()
        return self.current is not None

    def _wait(self, timeout: float) -> None:
        try:
            name, moved = self.events.get(timeout=timeout)
        except queue.Empty:
            return
        while True:
            self.tracker.note(name, moved_in=moved)
            try:
                name, moved = self.events.get_nowait()
            except queue.Empty:
                return


def _superseded(newer: str, source: str) -> dict[str, Any]:
    return {"type": "Superseded", "superseded_by": newer, "errors": [],
            "message": f"a newer version of {source} arrived (job {newer}) before this one got past its early stages"}


def retry_job(store: JobStore, job: Job, log: Any = None) -> str:
    """`lorad retry`: a failed or cancelled job is queued again and resumes at its first unfinished stage."""
    if job.state not in (JobStatus.FAILED, JobStatus.CANCELLED):
        return f"{job.job_id}: {job.state.value}; only a failed or cancelled job can be retried"
    stages = {k: v for k, v in job.stages.items() if v.get("state") in ("succeeded", "skipped")}
    store.transition(job.job_id, JobStatus.QUEUED, "retried by the user", attempts=1, not_before=0.0,
                     error=None, stages=stages, stage=None)
    if log is not None:
        log.info("job_retried", resume_from=next((s for s in job.stages if s not in stages), None))
    return f"{job.job_id}: queued again; it resumes from its last good stage and checkpoint"


def cancel_job(store: JobStore, job: Job) -> str:
    if job.state in FINAL:
        return f"{job.job_id}: already {job.state.value}"
    store.transition(job.job_id, JobStatus.CANCELLED, "cancelled by the user")
    return f"{job.job_id}: cancelled"


def ensure_placeholder(inbox_dir: Path) -> None:
    """The one file lorad writes into the inbox: two-way sync tools (unison) refuse a replica that was
    'completely emptied', which is what claiming the last spec would otherwise do."""
    path = inbox_dir / inbox.PLACEHOLDER
    if path.exists():
        return
    try:
        atomic_write_bytes(path, b"lorad watches this folder for job specs (*.yaml). Keep this file: two-way sync "
                                 b"tools stop syncing a folder that becomes empty.\n")
    except OSError:
        pass


def _tail(path: Path, n: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def default_name() -> str:
    """This machine's short host name: what `runs_on` names unless `lorad run --name` says otherwise."""
    return socket.gethostname().split(".")[0] or "localhost"


def run(layout: Layout, **kwargs: Any) -> int:
    return Daemon(layout, **kwargs).run()
