"""`lorad compare JOB…`: several jobs' settings and results side by side, as a Markdown table.

What a user does after trying two learning rates: one column per job, one row per setting (those
that differ are marked) and per metric of each model (the best value in bold).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorad.evalmetrics import REPORTED, SCORES, metric_value
from lorad.report import MODEL_LABELS
from lorad.spec import check_file

SETTINGS: list[tuple[str, Callable[[dict[str, Any]], Any]]] = [
    ("model", lambda s: s["model"]["source"]),
    ("data", lambda s: s["data"]["source"]),
    ("method", lambda s: s["train"]["method"]),
    ("iterations", lambda s: s["train"]["iters"]),
    ("batch size", lambda s: s["train"]["batch_size"]),
    ("learning rate", lambda s: s["train"]["learning_rate"]),
    ("layers", lambda s: s["train"]["num_layers"]),
    ("rank", lambda s: s["train"]["lora"]["rank"]),
    ("scale", lambda s: s["train"]["lora"]["scale"]),
    ("max sequence", lambda s: s["train"]["max_seq_length"]),
    ("GGUF", lambda s: s["gguf"]["outtype"]),
]


def load_job(job_dir: Path) -> dict[str, Any]:
    """What the outbox shows of one job: its spec, its state and its eval.json (when evaluate ran)."""
    status = json.loads((job_dir / "status.json").read_text())
    checked = check_file(job_dir / "spec.yaml")  # read as the daemon read it (5e-4 is a number there)
    spec = checked.spec or {}
    result = json.loads((job_dir / "eval.json").read_text()) if (job_dir / "eval.json").exists() else {}
    done = job_dir / "adapters" / "done.json"
    training = json.loads(done.read_text()) if done.exists() else {}
    return {"id": status.get("job_id", job_dir.name), "name": status.get("name") or spec.get("name"),
            "state": status.get("state"), "spec": spec, "eval": result, "training": training}


def _setting(job: dict[str, Any], get: Callable[[dict[str, Any]], Any]) -> str:
    try:
        return str(get(job["spec"]))
    except (KeyError, TypeError):
        return "–"


def _number(v: float | None, key: str) -> str:
    if v is None:
        return "–"
    return f"{100 * v:.1f} %" if key in SCORES else f"{v:.3f}"


def compare_table(jobs: list[dict[str, Any]]) -> str:
    head = ["", *(f"{j['name']} (`{j['id']}`)" for j in jobs)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append("| state | " + " | ".join(str(j["state"]) for j in jobs) + " |")
    for label, get in SETTINGS:
        cells = [_setting(j, get) for j in jobs]
        mark = " •" if len(set(cells)) > 1 else ""  # the settings that differ: what the comparison is about
        lines.append(f"| {label}{mark} | " + " | ".join(cells) + " |")
    lines.append("| best validation loss | " + " | ".join(
        f"{j['training']['best_val_loss']:.3f}" if j["training"].get("best_val_loss") is not None else "–" for j in jobs) + " |")
    lines.append("| evaluated rows | " + " | ".join(str(j["eval"].get("rows", "–")) for j in jobs) + " |")
    for model, model_label in MODEL_LABELS.items():
        for key, (label, lower) in REPORTED.items():
            values = [metric_value(j["eval"].get(model) or {}, key)[0] for j in jobs]
            if all(v is None for v in values):
                continue
            present = [v for v in values if v is not None]
            best = (min if lower else max)(present) if len(set(present)) > 1 else None
            cells = [f"**{_number(v, key)}**" if v is not None and v == best else _number(v, key) for v in values]
            lines.append(f"| {model_label}: {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n• the setting differs between these jobs; **bold**: the best value of a metric.\n"
