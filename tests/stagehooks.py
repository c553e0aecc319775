"""Stand-in stages for daemon tests (selected with LORAD_STAGE_HOOKS).

They exercise what the daemon must handle — a long stage that checkpoints on
SIGTERM and resumes, a stage that crashes hard — without the minutes a real
training run takes. The MLX stages are tested for real in their own tests.
"""

from __future__ import annotations

import json
import os
import time

from lorad.stages import Interrupted, StageContext


def slow_train(ctx: StageContext) -> dict[str, str]:
    """Counts to STEPS, 0.1 s a step, checkpointing every step; resumes from the checkpoint."""
    steps = int(os.environ.get("HOOK_STEPS", "40"))
    ckpt = ctx.path("ckpt.json")
    start = json.loads(ckpt.read_text())["step"] if ckpt.exists() else 0
    ctx.log.info("hook_resume" if start else "hook_start", step=start, pid=os.getpid())
    ctx.path("stage.pid").write_text(str(os.getpid()))
    def save(step: int) -> None:  # as a real checkpoint is written: a temporary name, then a rename
        ctx.path(".ckpt.tmp").write_text(json.dumps({"step": step}))
        os.replace(ctx.path(".ckpt.tmp"), ckpt)

    for step in range(start, steps):
        if ctx.should_stop():
            save(step)
            raise Interrupted(f"stopped at step {step}")
        time.sleep(0.1)
        save(step + 1)
        ctx.report_progress({"iteration": step + 1, "iters": steps})
    return {"ckpt": "ckpt.json"}


def abort(ctx: StageContext) -> dict[str, str]:
    """Dies the way a native crash does: no exception, no cleanup."""
    os.abort()


def raise_error(ctx: StageContext) -> dict[str, str]:
    raise ValueError("the stage hit a bug")


def die_of_signal(ctx: StageContext) -> dict[str, str]:
    """Dies of HOOK_SIGNAL sent to itself (SIGILL: a build for another CPU; SIGKILL: the OOM killer)."""
    import signal

    sig = int(os.environ.get("HOOK_SIGNAL", str(int(signal.SIGKILL))))
    if sig not in (signal.SIGKILL, signal.SIGSTOP):  # those two cannot be caught, nor reset
        signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)
    time.sleep(10)
    return {}


def report_limits(ctx: StageContext) -> dict[str, str]:
    """Writes the resource limits the stage process runs under."""
    import resource

    limits = {"core": resource.getrlimit(resource.RLIMIT_CORE)[0], "fsize": resource.getrlimit(resource.RLIMIT_FSIZE)[0]}
    ctx.path("limits.json").write_text(json.dumps(limits))
    return {"limits": "limits.json"}


def paced_lora(ctx: StageContext) -> dict[str, str]:
    """The real lora stage, each training step held for HOOK_STEP_SECONDS (default 0.2) on every rank,
    so a test can fail a host mid-training; all else (ranks, all_sum, checkpoints) is the real thing."""
    from lorad.stages import lora

    pause = float(os.environ.get("HOOK_STEP_SECONDS", "0.2"))
    report = lora.Tracker.on_train_loss_report

    def paced(self: lora.Tracker, info: dict) -> None:
        time.sleep(pause)
        report(self, info)

    lora.Tracker.on_train_loss_report = paced  # type: ignore[method-assign]
    return lora.run(ctx)


def retryable_then_fine(ctx: StageContext) -> dict[str, str]:
    """Fails with a retryable error (as the lora stage does for a lost training host) HOOK_FAILS times, then succeeds."""
    from lorad.stages.lora import HostLost

    tries = ctx.path("tries.txt")
    count = int(tries.read_text()) + 1 if tries.exists() else 1
    tries.write_text(str(count))
    if count <= int(os.environ.get("HOOK_FAILS", "1")):
        raise HostLost(f"training host 10.9.9.9 (rank 1) stopped answering (try {count})")
    return {}


def plain_failure(ctx: StageContext) -> dict[str, str]:
    from lorad.stages import StageFailed

    raise StageFailed("the data has no rows")
