"""The stage process: `python -m lorad.stagerun JOB_DIR STAGE --cache DIR`.

The daemon runs each stage in its own process so that a crash, a leak or a
native abort in MLX or llama.cpp never takes the daemon down. This process owns
status.json while it runs; SIGTERM only sets a flag that the stage polls, so
the stage can checkpoint before it exits.

Exit codes: 0 done, 75 interrupted (checkpointed, resume later), 77 skipped,
1 failed (error written to status.json).
"""

from __future__ import annotations

import argparse
import os
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
    """Puts progress into status.json at most once a second (each rewrite may be a sync upload)."""

    def __init__(self, job_dir: Path, log: Any, min_interval: float = 1.0):
        self.job_dir = job_dir
        self.log = log
        self.min_interval = min_interval
        self.last = 0.0

    def __call__(self, progress: dict[str, Any]) -> None:
        from lorad.outbox import read_status, write_status

        self.log.info("progress", **progress)
        now = time.monotonic()
        if now - self.last < self.min_interval and not progress.get("final"):
            return
        self.last = now
        status = read_status(self.job_dir) or {}
        status["progress"] = {**status.get("progress", {}), **{k: v for k, v in progress.items() if k != "final"}}
        write_status(self.job_dir, status)


def run_stage(job_dir: Path, stage: str, cache_dir: Path) -> int:
    from lorad import accel
    from lorad.outbox import event_logger, read_status
    from lorad.spec import check_file
    from lorad.stages import Interrupted, Skipped, StageContext, StageFailed

    status = read_status(job_dir) or {}
    job_id = status.get("job_id", job_dir.name)
    rank = int(os.environ.get("MLX_RANK", "0"))  # set by mlx.launch for a distributed lora stage
    if rank:  # other ranks keep their own log and leave status.json to rank 0
        log = event_logger(job_dir, f"logs/{stage}.rank{rank}.jsonl", job_id=job_id, stage=stage, rank=rank)
        return _run_rank(job_dir, stage, cache_dir, log)
    log = event_logger(job_dir, job_id=job_id, stage=stage)
    backend = accel.prepare_backend(stage)
    if backend:
        log.info("backend", **backend)
    result = check_file(job_dir / "spec.yaml")
    if not result.ok:
        log.error("spec_invalid", errors=[p.as_dict() for p in result.problems])
        _record_error(job_dir, stage, "SpecError", "spec.yaml no longer validates")
        return EXIT_FAILED
    ctx = StageContext(
        spec=result.spec,
        work_dir=job_dir,
        cache_dir=cache_dir,
        log=log,
        report_progress=_ProgressWriter(job_dir, log),
        should_stop=lambda: _stop["requested"],
        artifacts=dict(status.get("artifacts") or {}),
    )
    try:
        artifacts = _resolve(stage)(ctx) or {}
    except Interrupted as e:
        log.warning("stage_interrupted", message=str(e))
        return EXIT_INTERRUPTED
    except Skipped as e:
        message, skipped_artifacts = str(e), e.artifacts
        log.warning("stage_skipped", message=message)
        _update_status(job_dir, lambda s: (s.setdefault("stages", {}).setdefault(stage, {}).update(message=message),
                                           s.setdefault("artifacts", {}).update(skipped_artifacts)))
        return EXIT_SKIPPED
    except StageFailed as e:
        log.error("stage_failed", error_type="StageFailed", message=str(e))
        _record_error(job_dir, stage, "StageFailed", str(e))
        return EXIT_FAILED
    except Exception as e:  # noqa: BLE001 - any stage bug becomes a failed job, with its traceback
        log.error("stage_failed", error_type=type(e).__name__, message=str(e), exc_info=True)
        _record_error(job_dir, stage, type(e).__name__, str(e), traceback.format_exc())
        return EXIT_FAILED
    _update_status(job_dir, lambda s: s.setdefault("artifacts", {}).update(artifacts))
    log.info("stage_outputs", artifacts=artifacts)
    return EXIT_OK


def _run_rank(job_dir: Path, stage: str, cache_dir: Path, log: Any) -> int:
    from lorad import accel
    from lorad.spec import check_file
    from lorad.stages import Interrupted, StageContext

    accel.prepare_backend(stage)
    ctx = StageContext(spec=check_file(job_dir / "spec.yaml").spec, work_dir=job_dir, cache_dir=cache_dir, log=log,
                       report_progress=lambda p: log.info("progress", **p), should_stop=lambda: _stop["requested"])
    try:
        _resolve(stage)(ctx)
    except Interrupted:
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001
        log.error("stage_failed", error_type=type(e).__name__, message=str(e), exc_info=True)
        return EXIT_FAILED
    return EXIT_OK


def _update_status(job_dir: Path, change: Any) -> None:
    from lorad.outbox import read_status, write_status

    status = read_status(job_dir) or {}
    change(status)
    write_status(job_dir, status)


def _record_error(job_dir: Path, stage: str, etype: str, message: str, tb: str | None = None) -> None:
    error = {"type": etype, "message": message, "stage": stage, "errors": []}
    if tb:
        error["traceback"] = tb[-4000:]
    _update_status(job_dir, lambda s: s.update(error=error))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lorad-stage")
    parser.add_argument("job_dir", type=Path)
    parser.add_argument("stage")
    parser.add_argument("--cache", type=Path, required=True)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    args.cache.mkdir(parents=True, exist_ok=True)
    return run_stage(args.job_dir.resolve(), args.stage, args.cache.resolve())


if __name__ == "__main__":
    sys.exit(main())
