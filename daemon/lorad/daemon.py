"""The daemon: watch the inbox, claim specs, run jobs one at a time.

Lifecycle, in phases (after rq's worker):
  1. boot      take the root's lock (one daemon per root), install signal flags
  2. recover   stop a stage process orphaned by a crash; requeue jobs that were running
  3. listen    watcher events + a periodic rescan feed the inbox tracker
  4. claim     rename complete specs into state/claimed, write the outbox entry
               (queued, or rejected with every problem)
  5. work      run the next stage of the job at the head of the FIFO queue in a
               child process; one stage process at a time
  6. stop      on SIGTERM/SIGINT: ask the stage to checkpoint, wait, exit

Job states and transitions (after supervisor):
  (claim) → queued | rejected
  queued  → running | cancelled
  running → succeeded | failed | cancelled | queued (interrupted: resumes on next start)
Signal handlers only set flags; the loop acts on them.
"""

from __future__ import annotations

import errno
import fcntl
import os
import queue
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorad import accel, inbox, outbox, sdnotify, watcher
from lorad.fsutil import atomic_write_json, read_json
from lorad.layout import Layout
from lorad.spec import check_bytes
from lorad.stagerun import EXIT_INTERRUPTED, EXIT_OK, EXIT_SKIPPED

STOP_GRACE_SECONDS = 25.0  # SIGTERM → checkpoint → exit, inside launchd's ExitTimeOut
MAX_ATTEMPTS = 3  # interrupted runs (crash, SIGKILL) resumed before a job fails
EXIT_ALREADY_RUNNING = 3


class AlreadyRunning(Exception):
    pass


@dataclass
class StageProcess:
    job_id: str
    stage: str
    proc: subprocess.Popen
    log_file: Any
    term_sent_at: float | None = None
    cancel: bool = False


@dataclass
class Flags:
    stop: bool = False
    rescan: bool = False
    signals: list[int] = field(default_factory=list)


def acquire_lock(layout: Layout) -> int:
    """flock the root's lock file; the kernel releases it if we die, so no stale pids."""
    layout.state.mkdir(parents=True, exist_ok=True)
    fd = os.open(layout.lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise AlreadyRunning(lock_owner(layout)) from None
        raise
    os.ftruncate(fd, 0)  # only after we own it: never wipe the running owner's pid
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def lock_owner(layout: Layout) -> int | None:
    try:
        return int(layout.lock.read_text().strip() or 0) or None
    except (OSError, ValueError):
        return None


def daemon_running(layout: Layout) -> bool:
    try:
        fd = os.open(layout.lock, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except OSError:
        return True
    finally:
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


class Daemon:
    def __init__(self, layout: Layout, once: bool = False, polling: bool = False,
                 settle: float = 2.0, rescan_interval: float = 30.0):
        self.layout = layout
        self.once = once
        self.polling = polling
        self.rescan_interval = rescan_interval
        self.tracker = inbox.InboxTracker(layout.inbox, settle=settle)
        self.events: queue.Queue = queue.Queue()
        self.flags = Flags()
        self.queue: list[str] = []  # job ids, FIFO
        self.current: StageProcess | None = None
        self.log = outbox.daemon_logger()
        self.observer = None
        self.exit_code = 0
        self.inbox_error_reported = False
        self.caffeinate: subprocess.Popen | None = None
        self.watchdog_every = sdnotify.watchdog_interval()
        self.last_watchdog = 0.0
        self.service_status: tuple[str, ...] = ()

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

    # --- phase 2: recover ----------------------------------------------
    def recover(self) -> None:
        running = read_json(self.layout.running)
        if running:
            pid, started = running.get("pid"), running.get("pid_start")
            if pid and started and process_start_time(pid) == started:
                self.log.warning("orphan_stage_found", pid=pid, job_id=running.get("job_id"))
                self._kill_group(pid)
            self.layout.running.unlink(missing_ok=True)
        jobs = []
        for path in self.layout.claimed.glob("*.yaml"):
            job_id = path.stem
            status = outbox.read_status(self.layout.job_dir(job_id))
            if status is None:  # crashed between claim and entry: finish the entry now
                self._make_entry(job_id, path.read_bytes(), source=job_id + ".yaml")
                status = outbox.read_status(self.layout.job_dir(job_id))
            if status.get("state") in outbox.FINAL_STATES:
                self._retire(job_id)
                continue
            if status.get("state") == "running":
                self._requeue_interrupted(job_id, status, reason="daemon stopped without a clean shutdown")
            jobs.append((status.get("state") != "running", status.get("created_at", ""), job_id))
        self.queue = [j for _, _, j in sorted(jobs)]
        if self.queue:
            self.log.info("recovered_queue", jobs=len(self.queue))

    def _requeue_interrupted(self, job_id: str, status: dict, reason: str) -> None:
        job_dir = self.layout.job_dir(job_id)
        attempts = status.get("attempts", 1) + 1
        stage = status.get("stage")
        if stage:
            outbox.set_stage(status, stage, "interrupted")
        log = outbox.event_logger(job_dir, job_id=job_id)
        if attempts > MAX_ATTEMPTS:
            status.update(state="failed", error={"type": "Interrupted", "message": f"{reason}; gave up after {MAX_ATTEMPTS} attempts", "errors": []})
            outbox.write_status(job_dir, status)
            log.error("job_failed", reason="too many interruptions")
            return
        status.update(state="queued", attempts=attempts)
        outbox.write_status(job_dir, status)
        log.warning("job_requeued", reason=reason, attempt=attempts, resume_stage=stage)

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
        except PermissionError as e:
            if not self.inbox_error_reported:
                self.inbox_error_reported = True
                interpreter = os.path.realpath(sys.executable)
                hint = ""
                if e.errno == errno.EPERM:  # EACCES is plain permissions; EPERM is macOS privacy (TCC)
                    hint = (f"macOS privacy protection blocks {interpreter} from this folder: grant that program "
                            "Full Disk Access (System Settings → Privacy & Security), or move the inbox "
                            "out of Desktop, Documents and iCloud Drive")
                self.log.error("inbox_permission_denied", folder=str(self.layout.inbox), errno=e.errno,
                               interpreter=interpreter, hint=hint or "check the folder's permissions")
            return False
        self.inbox_error_reported = False
        return True

    def _make_entry(self, job_id: str, data: bytes, source: str) -> bool:
        """Write the outbox entry for a claimed spec; True when the job is queued."""
        result = check_bytes(data)
        name = (result.raw or {}).get("name") if isinstance((result.raw or {}).get("name"), str) else None
        job_dir = self.layout.job_dir(job_id)
        if result.ok:
            status = outbox.new_status(job_id, result.spec["name"], source, "queued")
            status["attempts"] = 1
        else:
            status = outbox.new_status(job_id, name, source, "rejected")
            status["error"] = {
                "type": "SpecError",
                "message": f"{len(result.problems)} problem(s) in {source}",
                "errors": [p.as_dict() for p in result.problems],
            }
        outbox.create_entry(job_dir, data, status)
        log = outbox.event_logger(job_dir, job_id=job_id)
        if result.ok:
            log.info("job_queued", source=source, name=status["name"])
        else:
            for p in result.problems:
                log.error("spec_problem", **p.as_dict())
            log.error("job_rejected", source=source, problems=len(result.problems))
        return result.ok

    def claim_ready(self) -> None:
        for name in self.tracker.ready():
            kind = inbox.classify(name)
            src = self.layout.inbox / name
            if kind == "conflict":
                # a conflict copy is a record of a user's edit: keep it, show it, never run it
                self._reject_conflict(name)
                continue
            stem = Path(name).stem
            taken = lambda j: self.layout.job_dir(j).exists() or (self.layout.claimed / f"{j}.yaml").exists()
            job_id = stem if outbox.JOB_ID_RE.match(stem) and not taken(stem) else outbox.new_job_id(stem, taken)
            dest = self.layout.claimed / f"{job_id}.yaml"
            try:
                claimed = inbox.claim(src, dest)
            except OSError as e:
                self.log.error("claim_failed", file=name, error=str(e))
                continue
            finally:
                self.tracker.forget(name)
            if not claimed:
                continue
            if self._make_entry(job_id, dest.read_bytes(), source=name):
                self.queue.append(job_id)
            else:
                self._retire(job_id)
            self.log.info("claimed", file=name, job_id=job_id)

    def _reject_conflict(self, name: str) -> None:
        src = self.layout.inbox / name
        job_id = outbox.new_job_id(Path(name).stem, lambda j: self.layout.job_dir(j).exists())
        dest = self.layout.done / f"{job_id}.yaml"
        self.tracker.forget(name)
        if not inbox.claim(src, dest):
            return
        status = outbox.new_status(job_id, None, name, "rejected")
        status["error"] = {
            "type": "SyncConflict",
            "message": f"{name} looks like a sync tool's conflict copy; it was not run. "
                       "Compare it with the original and submit the version you want under a new name.",
            "errors": [{"path": "$", "line": None, "message": "sync_conflict"}],
        }
        outbox.create_entry(self.layout.job_dir(job_id), dest.read_bytes(), status)
        outbox.event_logger(self.layout.job_dir(job_id), job_id=job_id).warning("job_rejected", reason="sync_conflict", source=name)
        self.log.warning("sync_conflict", file=name, job_id=job_id)

    def _retire(self, job_id: str) -> None:
        src = self.layout.claimed / f"{job_id}.yaml"
        if src.exists():
            os.replace(src, self.layout.done / f"{job_id}.yaml")

    # --- cancel ------------------------------------------------------------
    def handle_cancel_requests(self) -> None:
        for req in self.layout.cancel_requests.iterdir():
            job_id = req.name
            req.unlink(missing_ok=True)
            if self.current and self.current.job_id == job_id:
                self.current.cancel = True
                self._terminate_current()
            elif job_id in self.queue:
                self.queue.remove(job_id)
                finish_cancelled(self.layout, job_id)
                self._retire(job_id)

    # --- phase 5: work ---------------------------------------------------
    def _next_stage(self, status: dict) -> str | None:
        from lorad.spec import check_file

        result = check_file(self.layout.job_dir(status["job_id"]) / "spec.yaml")
        wanted = result.spec["stages"] if result.ok else []
        done = {k for k, v in (status.get("stages") or {}).items() if v.get("state") in ("succeeded", "skipped")}
        return next((s for s in wanted if s not in done), None)

    def start_next(self) -> None:
        while self.queue and self.current is None:
            job_id = self.queue[0]
            job_dir = self.layout.job_dir(job_id)
            status = outbox.read_status(job_dir)
            stage = self._next_stage(status) if status else None
            if stage is None:
                self.queue.pop(0)
                self._finish_job(job_id, status)
                continue
            outbox.set_stage(status, stage, "running")
            status.update(state="running", stage=stage)
            outbox.write_status(job_dir, status)
            outbox.event_logger(job_dir, job_id=job_id, stage=stage).info("stage_started", attempt=status.get("attempts", 1))
            self._spawn(job_id, stage)

    def _spawn(self, job_id: str, stage: str) -> None:
        job_dir = self.layout.job_dir(job_id)
        (job_dir / "logs").mkdir(exist_ok=True)
        log_file = open(job_dir / "logs" / f"{stage}.log", "ab")
        env = {**sdnotify.child_env(dict(os.environ)), **accel.blas_env(self.layout.cache),
               "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "lorad.stagerun", str(job_dir), stage, "--cache", str(self.layout.cache)],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,  # its own process group: we signal the whole stage, tools included
            preexec_fn=_die_with_parent,
        )
        self.current = StageProcess(job_id, stage, proc, log_file)
        self._hold_awake(True)
        atomic_write_json(self.layout.running, {
            "job_id": job_id, "stage": stage, "pid": proc.pid,
            "pid_start": process_start_time(proc.pid), "started_at": outbox.now_iso(),
        })
        self.log.info("stage_spawned", job_id=job_id, stage=stage, pid=proc.pid)

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

    def poll_current(self) -> None:
        cur = self.current
        if cur is None:
            return
        if cur.term_sent_at and time.monotonic() - cur.term_sent_at > STOP_GRACE_SECONDS:
            try:
                os.killpg(cur.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        code = cur.proc.poll()
        if code is None:
            return
        try:
            os.killpg(cur.proc.pid, signal.SIGKILL)  # tools the stage started and left behind
        except (ProcessLookupError, PermissionError):
            pass
        cur.log_file.close()
        self.current = None
        self.layout.running.unlink(missing_ok=True)
        self._stage_ended(cur, code)

    def _stage_ended(self, cur: StageProcess, code: int) -> None:
        job_dir = self.layout.job_dir(cur.job_id)
        status = outbox.read_status(job_dir) or {}
        log = outbox.event_logger(job_dir, job_id=cur.job_id, stage=cur.stage)
        if code not in (EXIT_OK, EXIT_SKIPPED) or cur.cancel:
            self._hold_awake(False)  # the job stops here (failed, cancelled or interrupted)
        if cur.cancel:
            outbox.set_stage(status, cur.stage, "cancelled")
            outbox.write_status(job_dir, status)
            self.queue.remove(cur.job_id)
            finish_cancelled(self.layout, cur.job_id)
            self._retire(cur.job_id)
            return
        if code == EXIT_OK or code == EXIT_SKIPPED:
            state = "succeeded" if code == EXIT_OK else "skipped"
            outbox.set_stage(status, cur.stage, state)
            outbox.write_status(job_dir, status)
            log.info("stage_finished", state=state, seconds=status["stages"][cur.stage].get("seconds"))
            return  # the loop starts the next stage
        if code == EXIT_INTERRUPTED or (cur.term_sent_at and self.flags.stop):
            outbox.set_stage(status, cur.stage, "interrupted")
            status["state"] = "queued"
            outbox.write_status(job_dir, status)
            log.warning("stage_interrupted", resume="on next start")
            return
        reason = f"exit code {code}" if code > 0 else f"killed by signal {signal.Signals(-code).name}"
        outbox.set_stage(status, cur.stage, "failed", exit=code)
        if not status.get("error"):
            tail = _tail(job_dir / "logs" / f"{cur.stage}.log")
            status["error"] = {"type": "StageCrashed", "message": f"stage {cur.stage} crashed ({reason})",
                               "stage": cur.stage, "errors": [], "log_tail": tail}
        status.update(state="failed")
        outbox.write_status(job_dir, status)
        log.error("job_failed", stage=cur.stage, reason=reason, error=status["error"].get("message"))
        self.queue.remove(cur.job_id)
        self._retire(cur.job_id)

    def _finish_job(self, job_id: str, status: dict | None) -> None:
        self._hold_awake(False)
        job_dir = self.layout.job_dir(job_id)
        if status is not None and status.get("state") not in outbox.FINAL_STATES:
            status.update(state="succeeded", stage=None)
            outbox.write_status(job_dir, status)
            outbox.event_logger(job_dir, job_id=job_id).info("job_succeeded", artifacts=status.get("artifacts"))
        self._retire(job_id)

    # --- the loop ----------------------------------------------------------
    def run(self) -> int:
        self.layout.make_dirs()
        try:
            lock_fd = acquire_lock(self.layout)
        except AlreadyRunning as e:
            print(f"lorad: a daemon is already running on {self.layout.root} (pid {e.args[0]})", file=sys.stderr)
            return EXIT_ALREADY_RUNNING
        try:
            self.install_signals()
            self.log.info("daemon_started", root=str(self.layout.root), inbox=str(self.layout.inbox),
                          outbox=str(self.layout.outbox), once=self.once, polling=self.polling)
            self.recover()
            self._start_watcher()
            sdnotify.notify("READY=1", f"STATUS=watching {self.layout.inbox}")
            self._loop()
        finally:
            self._hold_awake(False)
            if self.observer is not None:
                self.observer.stop()
            os.close(lock_fd)
        return self.exit_code

    def _loop(self) -> None:
        last_scan = 0.0
        while True:
            self._tell_systemd()
            if self.flags.stop and not self._stopping():
                return
            if not self.flags.stop:
                now = time.monotonic()
                if self.observer is not None and not self.observer.is_alive():
                    self.log.warning("watcher_died", action="restarting")
                    self._start_watcher()
                    last_scan = 0.0
                if now - last_scan >= self.rescan_interval or self.flags.rescan:
                    self.flags.rescan = False
                    if self._check_inbox_access():
                        self.tracker.scan()
                    last_scan = now
                self.claim_ready()
                self.handle_cancel_requests()
            self.poll_current()
            if not self.flags.stop:
                self.start_next()
            if self.once and not self.flags.stop and self.current is None and not self.queue and not self.tracker.pending:
                self.log.info("daemon_drained")
                return
            idle_wait = 0.1 if (self.tracker.pending or self.current or self.flags.stop) else 1.0
            self._wait(min(idle_wait, self.watchdog_every or idle_wait))

    def _tell_systemd(self) -> None:
        """Status line, watchdog ping and STOPPING=1 for a Type=notify unit (no-ops elsewhere)."""
        if self.flags.stop:
            fields = ("STOPPING=1", "STATUS=stopping" + (f": {self.current.stage} is checkpointing" if self.current else ""))
        elif self.current is not None:
            fields = (f"STATUS=running {self.current.job_id}: {self.current.stage} ({len(self.queue) - 1} queued)",)
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
        return True

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


def finish_cancelled(layout: Layout, job_id: str) -> None:
    job_dir = layout.job_dir(job_id)
    status = outbox.read_status(job_dir) or {}
    status.update(state="cancelled")
    outbox.write_status(job_dir, status)
    outbox.event_logger(job_dir, job_id=job_id).warning("job_cancelled", artifacts="kept")


def _tail(path: Path, n: int = 2000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-n:].decode("utf-8", "replace")


def run(layout: Layout, **kwargs: Any) -> int:
    return Daemon(layout, **kwargs).run()
