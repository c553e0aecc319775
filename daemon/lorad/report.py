"""report.md, loss.png and accuracy.png for a job: what was run, how long it took, how good it got."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lorad.fsutil import atomic_write_text
from lorad.outbox import read_events, seconds_since

MODEL_LABELS = {"base": "base model", "finetuned": "fine-tuned (MLX)", "gguf": "fine-tuned GGUF (llama.cpp)"}


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def plot_loss(metrics: Path, out: Path) -> bool:
    if not metrics.exists():
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    train = [(r["iteration"], r["train_loss"]) for r in rows if "train_loss" in r]
    valid = [(r["iteration"], r["val_loss"]) for r in rows if "val_loss" in r]
    if not train:
        return False
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(*zip(*train), label="train loss", linewidth=1)
    if valid:
        ax.plot(*zip(*valid), "o-", label="validation loss")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return True


def plot_accuracy(result: dict[str, Any], out: Path) -> bool:
    models = [m for m in MODEL_LABELS if m in result and result[m].get("execution_accuracy") is not None]
    if not models:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = [100 * result[m]["execution_accuracy"] for m in models]
    lo = [a - 100 * result[m]["execution_accuracy_ci95"][0] for a, m in zip(acc, models)]
    hi = [100 * result[m]["execution_accuracy_ci95"][1] - a for a, m in zip(acc, models)]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.bar([_labels(result)[m] for m in models], acc, yerr=[lo, hi], capsize=6, color=["#999999", "#2b8cbe", "#7bccc4"][: len(models)])
    for i, (a, up) in enumerate(zip(acc, hi)):
        ax.text(i, a + up + 1.5, f"{a:.1f}%", ha="center")  # above the error bar, not on it
    ax.set_ylabel("execution accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Text-to-SQL execution accuracy, {result['rows']} held-out rows ({result['engine']})")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return True


def _labels(result: dict[str, Any]) -> dict[str, str]:
    runtime = "llama.cpp" if result.get("base_runtime") == "llama.cpp" else "MLX"
    return {**MODEL_LABELS, "base": f"base model ({runtime})"}


def gguf_section(ctx: Any) -> list[str]:
    """What the gguf stage proved: llama.cpp's agreement with MLX and its own chat answer."""
    check = ctx.path("gguf_check.json")
    if not check.exists():
        return []
    c = json.loads(check.read_text())
    lines = ["", "## The GGUF in llama.cpp", "",
             f"- `{c['outtype']}`: the same next token as MLX at {100 * c['top1_agreement']:.1f} % of {c['tokens']} positions; "
             f"max |Δlogit| {c['max_abs_diff']:.3g} ({100 * c.get('relative_diff', 0):.2f} % of the logit scale); "
             f"tokenizer {'agrees' if c['tokenizer_agrees'] else 'DISAGREES'} with the Hugging Face one"]
    chats = [e for e in read_events(ctx.path("events.jsonl")) if e.get("event") == "gguf_chat"]
    if chats:
        chat = chats[-1]
        stopped = "stopped at the end of its turn" if chat["finish_reason"] == "stop" else "did NOT stop: it ran to the token limit"
        lines.append(f"- chat completion (the GGUF's own template) on the first held-out question {stopped}: "
                     f"`{' '.join(chat['answer'].split())[:300]}`")
    return lines


def write_report(ctx: Any, result: dict[str, Any], per_row: list[dict[str, Any]]) -> dict[str, str]:
    spec = ctx.spec
    labels = _labels(result)
    status = json.loads(ctx.path("status.json").read_text()) if ctx.path("status.json").exists() else {}
    artifacts = {"report": "report.md"}
    lines = [f"# lorad report: {spec['name']}", ""]
    lines += [f"Job `{status.get('job_id', ctx.work_dir.name)}`, created {status.get('created_at', '?')}.", "", "## Settings", ""]
    t = spec["train"]
    lines += [
        f"- model: `{spec['model']['source']}`" + (f", quantized {spec['model']['quantize']}" if spec["model"].get("quantize") else ""),
        f"- data: `{spec['data']['source']}` (limit {spec['data'].get('limit', 'none')}, seed {spec['data']['seed']})",
        f"- training: {t['method']}, {t['iters']} iterations, batch {t['batch_size']}, learning rate {t['learning_rate']}, "
        f"{t['num_layers']} layers, rank {t['lora']['rank']}, scale {t['lora']['scale']}, prompt masking {t['mask_prompt']}",
        f"- export: GGUF `{spec['gguf']['outtype']}`; evaluation on {result['rows']} rows with {result['engine']}",
        "",
        "## Time per stage",
        "",
        "| stage | state | seconds |",
        "|---|---|---|",
    ]
    for name, rec in (status.get("stages") or {}).items():
        seconds = rec.get("seconds")
        if seconds is None and rec.get("started_at"):  # this stage: still running while it writes the report
            seconds = f"{seconds_since(rec['started_at']):.1f} (at report time)"
        lines.append(f"| {name} | {rec.get('state')} | {seconds} |")
    done = ctx.path("adapters", "done.json")
    if done.exists():
        d = json.loads(done.read_text())
        best = f"{d['best_val_loss']:.4f}" if d.get("best_val_loss") is not None else "–"
        lines += ["", f"Training ran {d['iterations']} iterations; best validation loss {best} "
                      f"at iteration {d['best_iteration']}" + (" (stopped early)." if d.get("stopped_early") else ".")]
    if plot_loss(ctx.path("adapters", "metrics.jsonl"), ctx.path("loss.png")):
        artifacts["loss_plot"] = "loss.png"
        lines += ["", "![training and validation loss](loss.png)"]
    lines += ["", "## Execution accuracy", "", "| model | execution accuracy | 95 % interval | valid SQL | scored / rows | excluded |",
              "|---|---|---|---|---|---|"]
    for m, label in labels.items():
        if m in result:
            s = result[m]
            ci = s.get("execution_accuracy_ci95") or [None, None]
            lines.append(f"| {label} | {_pct(s['execution_accuracy'])} | {_pct(ci[0])} – {_pct(ci[1])} | {_pct(s['valid_sql_rate'])} "
                         f"| {s['scored']} / {s['n']} | {s['excluded'] or '–'} |")
    if result.get("deltas"):
        lines += [""] + [f"- {k.replace('_', ' ')}: {100 * v:+.1f} points" for k, v in result["deltas"].items()]
    if plot_accuracy(result, ctx.path("accuracy.png")):
        artifacts["accuracy_plot"] = "accuracy.png"
        lines += ["", "![execution accuracy](accuracy.png)"]
    lines += gguf_section(ctx)
    complexities = sorted({c for m in MODEL_LABELS if m in result for c in (result[m].get("by_complexity") or {})})
    if complexities:
        present = [m for m in MODEL_LABELS if m in result]
        lines += ["", "### By SQL complexity", "", "| complexity | " + " | ".join(labels[m] for m in present) + " |",
                  "|---|" + "---|" * len(present)]
        for c in complexities:
            cells = []
            for m in present:
                b = (result[m].get("by_complexity") or {}).get(c)
                cells.append(f"{_pct(b['execution_accuracy'])} ({b['matches']}/{b['scored']})" if b else "–")
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
    key = "finetuned" if "finetuned" in result else "base"
    right = [r for r in per_row if (r.get(key) or {}).get("match") is True][:3]
    wrong = [r for r in per_row if (r.get(key) or {}).get("match") is False][:3]
    for title, examples in (("Right", right), ("Wrong", wrong)):
        if examples:
            lines += ["", f"## {title} answers ({labels[key]})", ""]
            for r in examples:
                question = r["question"].split("Question:")[-1].replace("SQL:", "").strip()
                lines += [f"- **{question}**", f"  - gold: `{r['sql']}`",
                          f"  - answer: `{(r[key]['pred_sql'] or r[key]['prediction'] or '').strip()[:300]}` ({r[key]['reason']})"]
    atomic_write_text(ctx.path("report.md"), "\n".join(lines) + "\n")
    return artifacts
