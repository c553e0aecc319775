"""The pipeline: prepare → convert → lora → fuse → gguf → ollama, plus evaluate.

A stage is a function `run(ctx: StageContext) -> dict[str, str]` that reads
the spec and earlier stages' outputs from ctx.work_dir, writes its own outputs
there, and returns {artifact name: path relative to work_dir}. It knows nothing
of inboxes, queues or daemons. It must be safe to re-run, and resume from its
own checkpoints when it finds them. When ctx.should_stop() turns true it saves
what it can and raises Interrupted.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PIPELINE = ["prepare", "convert", "lora", "fuse", "gguf", "ollama", "evaluate"]


class Interrupted(Exception):
    """The stage stopped early on request, after saving a checkpoint."""


class Skipped(Exception):
    """The stage has nothing to do here (e.g. no Ollama server); the job goes on."""

    def __init__(self, message: str, artifacts: dict[str, str] | None = None):
        super().__init__(message)
        self.artifacts = artifacts or {}


class StageFailed(Exception):
    """A failure with a message meant for the user (no traceback needed)."""

    retryable = False  # True: a later attempt, resuming from the checkpoint, may succeed (the daemon retries)


@dataclass
class StageContext:
    spec: dict[str, Any]  # validated, defaults applied
    work_dir: Path  # the job's outbox entry: inputs and outputs live here
    cache_dir: Path  # shared between jobs (converted base models)
    log: Any  # structlog logger bound to job_id and stage
    report_progress: Callable[[dict[str, Any]], None] = lambda progress: None
    should_stop: Callable[[], bool] = lambda: False
    artifacts: dict[str, str] = field(default_factory=dict)  # from earlier stages

    def path(self, *parts: str) -> Path:
        return self.work_dir.joinpath(*parts)


def stage_function(name: str) -> Callable[[StageContext], dict[str, str]]:
    if name not in PIPELINE:
        raise KeyError(name)
    module = importlib.import_module(f"lorad.stages.{name}")
    return module.run
