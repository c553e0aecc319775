"""report.md and its plots for a job of any data format: what was run, how long it took, how good it got.

loss.png (training and validation loss, raw and smoothed), metrics.png (every metric of every
model with its 95 % interval), accuracy.png (text-to-SQL execution accuracy), and examples
chosen where the fine-tune won and where it lost against the base.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lorad.evalmetrics import REPORTED, SCORES, metric_value
from lorad.fsutil import atomic_write_text
from lorad.outbox import read_events, seconds_since

MODEL_LABELS = {"base": "base model", "finetuned": "fine-tuned (MLX)", "gguf": "fine-tuned GGUF (llama.cpp)"}


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def smoothed(values: list[float], weight: float = 0.9) -> list[float]:
    """TensorBoard's debiased exponential moving average: the trend under a noisy per-step loss."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** i))
    return out


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
    steps, losses = zip(*train)
    ax.plot(steps, losses, color="#2b8cbe", alpha=0.3, linewidth=1, label="train loss")
    ax.plot(steps, smoothed(list(losses)), color="#2b8cbe", linewidth=2, label="train loss (smoothed)")
    if valid:
        ax.plot(*zip(*valid), "o-", color="#e6550d", label="validation loss")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return True


def _present(result: dict[str, Any]) -> tuple[list[str], list[str], bool]:
    """The models evaluated, the scores any of them has, and whether any has a loss."""
    models = [m for m in MODEL_LABELS if m in result]
    shown = [k for k in SCORES if any(metric_value(result[m], k)[0] is not None for m in models)]
    return models, shown, any(result[m].get("loss") is not None for m in models)


def plot_metrics(result: dict[str, Any], out: Path) -> bool:
    """Grouped bars (one group per metric, one bar per model) with 95 % intervals, and held-out loss."""
    models, shown, has_loss = _present(result)
    if not models or not (shown or has_loss):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"base": "#999999", "finetuned": "#2b8cbe", "gguf": "#7bccc4"}
    panels = [p for p in ("generation" if shown else None, "loss" if has_loss else None) if p]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 + 2.2 * len(shown), 4), dpi=110, squeeze=False,
                             gridspec_kw={"width_ratios": [max(1, len(shown)), 1] if len(panels) == 2 else [1]})
    labels = _labels(result)
    for ax, panel in zip(axes[0], panels):
        width = 0.8 / len(models)
        if panel == "generation":
            for j, m in enumerate(models):
                xs, ys, lo, hi = [], [], [], []
                for i, k in enumerate(shown):
                    v, ci = metric_value(result[m], k)
                    if v is None:
                        continue
                    xs.append(i + (j - (len(models) - 1) / 2) * width)
                    ys.append(100 * v)
                    lo.append(100 * (v - ci[0]) if ci else 0)
                    hi.append(100 * (ci[1] - v) if ci else 0)
                ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, color=colors[m], label=labels[m])
            ax.set_xticks(range(len(shown)), [SCORES[k] for k in shown])
            ax.set_ylabel("%")
            ax.set_ylim(0, 105)
            ax.legend(fontsize=8)
        else:
            present = [m for m in models if result[m].get("loss") is not None]
            ys = [result[m]["loss"] for m in present]
            cis = [result[m].get("loss_ci95") or [y, y] for m, y in zip(present, ys)]
            ax.bar(range(len(present)), ys, yerr=[[y - c[0] for y, c in zip(ys, cis)], [c[1] - y for y, c in zip(ys, cis)]],
                   capsize=4, color=[colors[m] for m in present])
            ax.set_xticks(range(len(present)), [m for m in present])
            ax.set_ylabel("held-out loss per answer token (lower is better)")
    fig.suptitle(f"{result['rows']} held-out {result['format']} rows ({result['split']})")
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
        f"- export: GGUF `{spec['gguf']['outtype']}`; evaluation on {result['rows']} held-out {result['format']} rows "
        f"({result['split']}), answers up to {result['max_new_tokens']} tokens ({result['max_new_tokens_from']})",
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
    lines += results_section(result, labels)
    if plot_metrics(result, ctx.path("metrics.png")):
        artifacts["metrics_plot"] = "metrics.png"
        lines += ["", "![metrics with 95 % intervals](metrics.png)"]
    if result["format"] == "gretel":
        lines += execution_section(result, labels)
        if plot_accuracy(result, ctx.path("accuracy.png")):
            artifacts["accuracy_plot"] = "accuracy.png"
            lines += ["", "![execution accuracy](accuracy.png)"]
    lines += gguf_section(ctx)
    lines += examples_section(result, per_row, labels)
    atomic_write_text(ctx.path("report.md"), "\n".join(lines) + "\n")
    return artifacts


def _fmt(v: float | None, ci: list[float] | None, pct: bool = True) -> str:
    if v is None:
        return "–"
    if pct:
        return f"{100 * v:.1f} %" + (f" [{100 * ci[0]:.1f}–{100 * ci[1]:.1f}]" if ci else "")
    return f"{v:.3f}" + (f" [{ci[0]:.3f}–{ci[1]:.3f}]" if ci else "")


def results_section(result: dict[str, Any], labels: dict[str, str]) -> list[str]:
    """One table: every metric of every model, with its 95 % interval."""
    models, shown, has_loss = _present(result)
    head = ["model"] + ([REPORTED[k][0] for k in ("loss", "perplexity")] if has_loss else []) + [SCORES[k] for k in shown]
    show_stop = any("did_not_stop" in result[m] for m in models)
    head += ["did not stop"] if show_stop else []
    lines = ["", "## Results", "",
             f"On {result['rows']} held-out rows; loss and perplexity on the answer tokens; answers are greedy, "
             f"up to {result['max_new_tokens']} new tokens. Brackets: 95 % intervals.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in models:
        r = result[m]
        cells = [labels[m]]
        if has_loss:
            cells += [_fmt(r.get("loss"), r.get("loss_ci95"), pct=False), _fmt(r.get("perplexity"), r.get("perplexity_ci95"), pct=False)]
        cells += [_fmt(*metric_value(r, k)) for k in shown]
        if show_stop:
            d = r.get("did_not_stop")
            cells.append(f"{d['count']} / {result['rows']} ({100 * d['rate']:.0f} %)" if d else "–")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for name, diff in (result.get("deltas") or {}).items():
        if diff:
            parts = [f"{SCORES[k]} {100 * v:+.1f} points" if k in SCORES else f"{k} {v:+.3f}"
                     for k, v in diff.items()]
            lines.append(f"- {name.replace('_', ' ')}: " + ", ".join(parts))
    return lines


def execution_section(result: dict[str, Any], labels: dict[str, str]) -> list[str]:
    lines = ["", "## Execution accuracy", "", "| model | execution accuracy | 95 % interval | valid SQL | scored / rows | excluded |",
             "|---|---|---|---|---|---|"]
    for m, label in labels.items():
        if m in result and "execution_accuracy" in result[m]:
            s = result[m]
            ci = s.get("execution_accuracy_ci95") or [None, None]
            lines.append(f"| {label} | {_pct(s['execution_accuracy'])} | {_pct(ci[0])} – {_pct(ci[1])} | {_pct(s['valid_sql_rate'])} "
                         f"| {s['scored']} / {s['n']} | {s['excluded'] or '–'} |")
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
    return lines


def row_score(row: dict[str, Any], model: str) -> float | None:
    """The per-row number examples are ranked by: execution match for SQL, else chrF, ROUGE-L, exact match."""
    r = row.get(model) or {}
    if r.get("match") is not None:
        return float(r["match"])
    return next((float(r[k]) for k in ("chrf", "rouge_l", "exact_match") if r.get(k) is not None), None)


def pick_examples(per_row: list[dict[str, Any]], k: int = 3) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The rows where the fine-tune gained most over the base, and where it lost most (not the first rows)."""
    diffs = []
    for i, r in enumerate(per_row):
        a, b = row_score(r, "finetuned"), row_score(r, "base")
        if a is not None and b is not None:
            diffs.append((a - b, i))
    wins = [per_row[i] for d, i in sorted(diffs, key=lambda x: (-x[0], x[1])) if d > 0][:k]
    losses = [per_row[i] for d, i in sorted(diffs) if d < 0][:k]
    return wins, losses


def _one_line(text: str | None, limit: int = 300) -> str:
    flat = " ".join((text or "").split())
    return (flat[:limit] + " …") if len(flat) > limit else flat


def examples_section(result: dict[str, Any], per_row: list[dict[str, Any]], labels: dict[str, str]) -> list[str]:
    wins, losses = pick_examples(per_row)
    models = [m for m in MODEL_LABELS if m in result]
    lines: list[str] = []
    for title, rows in (("Where the fine-tune won", wins), ("Where the fine-tune lost", losses)):
        if not rows:
            continue
        lines += ["", f"## {title}", ""]
        for r in rows:
            question = r["question"].split("Question:")[-1].replace("SQL:", "").strip()
            lines += [f"- **{_one_line(question, 200)}**", f"  - reference: `{_one_line(r['reference'])}`"]
            for m in models:
                a = r.get(m) or {}
                if "prediction" not in a:
                    continue
                score = row_score(r, m)
                note = (a.get("reason") or "") if "match" in a else (f"chrF {100 * a['chrf']:.0f}" if "chrf" in a else "")
                limit = ", did not stop" if a.get("hit_limit") else ""
                lines.append(f"  - {labels[m]}: `{_one_line(a.get('pred_sql') or a['prediction'])}` "
                             f"({note or ('score ' + str(score))}{limit})")
    if not (wins or losses) and per_row:
        lines += ["", "## Examples", "", "The fine-tuned and base models scored the same on every row."]
    return lines
