"""The stage process: `python -m lorad.stagerun JOB_DIR STAGE --cache DIR`.

The daemon runs each stage in its own process so that a crash, a leak or a
native abort in MLX or llama.cpp never takes the daemon down. The daemon owns
the job's record: this process reads the stored spec and the artifacts so far
from $LORAD_RUN_DIR (state/run/ID, private) and reports progress, artifacts and
its error as JSON lines appended to RUN_DIR/STAGE.report.jsonl, which the
daemon applies. SIGTERM only sets a flag that the stage polls, so the stage can
checkpoint before it exits.

Exit codes: 0 done, 75 interrupted (checkpointed, resume later), 77 skipped,
1 failed (error reported).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_SKIPPED = 0, 1, 75, 77

_stop = {"requested": False}


def _on_signal(signum: int, frame: Any) -> None:
    _stop["requested"] = True


class Reporter:
    """Appends one JSON line per message to the daemon's report file (O_APPEND: one write each)."""

    def __init__(self, path: Path | None):
        self.path = path

    def send(self, **message: Any) -> None:
        if self.path is None:
            return
        line = (json.dumps(message, default=str) + "\n").encode()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        except OSError:
            pass  # a full disk loses a progress line, not the stage


def _resolve(stage: str):
    """The stage function; LORAD_STAGE_HOOKS=stage=module:function swaps one in (tests)."""
    import importlib

    from lorad.stages import stage_function

    for item in filter(None, os.environ.get("LORAD_STAGE_HOOKS", "").split(",")):
        name, _, target = item.partition("=")
        if name == stage:
            module, _, func = target.partition(":")
            return getattr(importlib.import_module(module), func)
    return stage_function(stage)


class _ProgressWriter:
    """Progress to the event log every time, to the daemon at most once a second."""

    def __init__(self, reporter: Reporter, log: Any, min_interval: float = 1.0):
        self.reporter = reporter
        self.log = log
        self.min_interval = min_interval
        self.last = 0.0

    def __call__(self, progress: dict[str, Any]) -> None:
        self.log.info("progress", **progress)
        now = time.monotonic()
        if now - self.last < self.min_interval and not progress.get("final"):
            return
        self.last = now
        self.reporter.send(progress={k: v for k, v in progress.items() if k != "final"})


def _run_inputs(job_dir: Path, stage: str) -> tuple[Path, dict[str, Any], Reporter]:
    """(the spec to read, the daemon's context, the report channel) for this stage run."""
    run_dir = os.environ.get("LORAD_RUN_DIR")
    if not run_dir:  # a rank on another host, or a stage run by hand: the job folder's copy
        return job_dir / "spec.yaml", {}, Reporter(None)
    run = Path(run_dir)
    try:
        context = json.loads((run / "context.json").read_text())
    except (OSError, ValueError):
        context = {}
    return run / "spec.yaml", context, Reporter(run / f"{stage}.report.jsonl")


def run_stage(job_dir: Path, stage: str, cache_dir: Path) -> int:
    from lorad import accel, disk
    from lorad.outbox import event_logger
    from lorad.spec import check_file
    from lorad.stages import Interrupted, Skipped, StageContext, StageFailed

    spec_path, context, reporter = _run_inputs(job_dir, stage)
    job_id = context.get("job_id", job_dir.name)
    rank = int(os.environ.get("MLX_RANK", "0"))  # set by mlx.launch for a distributed lora stage
    if rank:  # other ranks keep their own log, report nothing, and read the job folder's spec (copied to their host)
        log = event_logger(job_dir, f"logs/{stage}.rank{rank}.jsonl", job_id=job_id, stage=stage, rank=rank)
        return _run_rank(job_dir, stage, cache_dir, log, job_dir / "spec.yaml")
    log = event_logger(job_dir, job_id=job_id, stage=stage)

    def fail(etype: str, message: str, tb: str | None = None, **extra: Any) -> int:
        error = {"type": etype, "message": message, "stage": stage, "errors": [], **extra}
        if tb:
            error["traceback"] = tb[-4000:]
        reporter.send(error=error)
        return EXIT_FAILED

    backend = accel.prepare_backend(stage)
    if backend:
        log.info("backend", **backend)
    result = check_file(spec_path)
    if not result.ok or result.spec is None:
        log.error("spec_invalid", errors=[p.as_dict() for p in result.problems])
        return fail("SpecError", "the stored spec no longer validates")
    ctx = StageContext(
        spec=result.spec,
        work_dir=job_dir,
        cache_dir=cache_dir,
        log=log,
        report_progress=_ProgressWriter(reporter, log),
        should_stop=lambda: _stop["requested"],
        artifacts=dict(context.get("artifacts") or {}),
    )
    try:
        artifacts = _resolve(stage)(ctx) or {}
    except Interrupted as e:
        log.warning("stage_interrupted", message=str(e))
        return EXIT_INTERRUPTED
    except Skipped as e:
        log.warning("stage_skipped", message=str(e))
        reporter.send(stage_message=str(e), artifacts=e.artifacts)
        return EXIT_SKIPPED
    except StageFailed as e:
        log.error("stage_failed", error_type=type(e).__name__, message=str(e), retryable=e.retryable)
        return fail(type(e).__name__, str(e), retryable=e.retryable)
    except Exception as e:  # noqa: BLE001 - any stage bug becomes a failed job, with its traceback
        if disk.is_disk_full(e):
            free = shutil.disk_usage(job_dir).free if job_dir.exists() else 0
            message = (f"the disk is full: stage {stage} could not write ({e}); {free / 2**20:.0f} MiB free. "
                       "Free some space, then `lorad retry` the job")
            log.error("stage_failed", error_type="DiskFull", message=message)
            return fail("DiskFull", message)
        log.error("stage_failed", error_type=type(e).__name__, message=str(e), exc_info=True)
        return fail(type(e).__name__, str(e), traceback.format_exc())
    reporter.send(artifacts=artifacts)
    log.info("stage_outputs", artifacts=artifacts)
    return EXIT_OK


def _run_rank(job_dir: Path, stage: str, cache_dir: Path, log: Any, spec_path: Path) -> int:
    from lorad import accel
    from lorad.spec import check_file
    from lorad.stages import Interrupted, StageContext

    accel.prepare_backend(stage)
    spec = check_file(spec_path).spec
    if spec is None:
        log.error("stage_failed", error_type="SpecError", message="spec.yaml no longer validates")
        return EXIT_FAILED
    ctx = StageContext(spec=spec, work_dir=job_dir, cache_dir=cache_dir, log=log,
                       report_progress=lambda p: log.info("progress", **p), should_stop=lambda: _stop["requested"])
    try:
        _resolve(stage)(ctx)
    except Interrupted:
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001
        log.error("stage_failed", error_type=type(e).__name__, message=str(e), exc_info=True)
        return EXIT_FAILED
    return EXIT_OK


class _PlainText:
    """A text stream without ANSI escape codes: logs/<stage>.log is read in editors and synced folders,
    and mlx-lm's rich console writes bold and colour codes even to a file."""

    ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

    def __init__(self, stream: Any):
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(self.ANSI.sub("", text))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lorad-stage")
    parser.add_argument("job_dir", type=Path)
    parser.add_argument("stage")
    parser.add_argument("--cache", type=Path, required=True)
    args = parser.parse_args(argv)
    sys.stdout = _PlainText(sys.stdout)
    sys.stderr = _PlainText(sys.stderr)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    # A stage outlives the terminal that started the daemon; a rank on another host must not outlive
    # its SSH session (mlx.launch's `ssh -tt`: the session's end is a SIGHUP).
    signal.signal(signal.SIGHUP, signal.SIG_DFL if "MLX_RANK" in os.environ else signal.SIG_IGN)
    args.cache.mkdir(parents=True, exist_ok=True)
    return run_stage(args.job_dir.resolve(), args.stage, args.cache.resolve())


if __name__ == "__main__":
    sys.exit(main())
