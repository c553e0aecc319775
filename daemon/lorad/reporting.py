"""train.report_to: the settings and every loss to Weights & Biases or SwanLab, as `mlx_lm.lora --report-to`.

Reporting sends a job's settings and losses to a service, so a spec gets it only when the
daemon's owner allows that service (`lorad run --allow-report-to wandb`; checked when the spec
is claimed and again here). A job is one run: its id is derived from the job id and a resumed
stage continues it. Credentials and mode are the owner's environment (WANDB_API_KEY or
`wandb login`, WANDB_MODE=offline; SWANLAB_API_KEY, SWANLAB_MODE). A service that fails costs
a warning in events.jsonl, never the training.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from lorad.stages import StageFailed


class Reporter:
    """One service's run: log(metrics, step) for every row of metrics.jsonl, finish() at the end."""

    def __init__(self, service: str, run: Any, log: Any):
        self.service, self.run, self.log = service, run, log
        self.failed = False

    def _guarded(self, what: str, call: Any) -> None:
        if self.failed:
            return
        try:
            call()
        except Exception as e:  # a dashboard must not end a training run
            self.failed = True
            self.log.warning("report_to_failed", service=self.service, during=what, error=f"{type(e).__name__}: {e}")

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        self._guarded("log", lambda: self.run.log(metrics, step=step))

    def finish(self) -> None:
        self._guarded("finish", self.run.finish)


def run_id(job_id: str) -> str:
    """W&B and SwanLab accept letters, digits, '-' and '_' in a run id."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", job_id)[:64]


def _start(service: str, project: str, job_id: str, name: str, log_dir: Path, config: dict[str, Any]) -> Any:
    if service == "wandb":
        import wandb

        return wandb.init(project=project, name=name, id=run_id(job_id), resume="allow", dir=str(log_dir),
                          config=config, reinit="finish_previous")
    import swanlab

    return swanlab.init(project=project, experiment_name=name, id=run_id(job_id), resume="allow",
                        logdir=str(log_dir / "swanlog"), config=config)


def open_reporters(services: list[str], project: str, job_id: str, name: str, log_dir: Path, config: dict[str, Any],
                   log: Any) -> list[Reporter]:
    """A started run per service; a service the owner did not allow, or that is not installed, fails the stage."""
    from lorad import policy

    trust = policy.from_env()
    reporters = []
    for service in services:
        if trust is not None:
            try:
                trust.check_report_to(service)
            except policy.PolicyError as e:
                raise StageFailed(str(e)) from None
        try:
            run = _start(service, project, job_id, name, log_dir, config)
        except ImportError:
            raise StageFailed(f"train.report_to: {service} is not installed in lorad's environment "
                              f"(pip install {service}, in the same environment as lorad)") from None
        except Exception as e:
            log.warning("report_to_failed", service=service, during="init", error=f"{type(e).__name__}: {e}")
            continue
        log.info("report_to_started", service=service, project=project, run_id=run_id(job_id))
        reporters.append(Reporter(service, run, log))
    return reporters
