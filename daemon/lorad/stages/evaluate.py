"""evaluate: did the fine-tune get better, and did the GGUF keep it? For every data format.

Three models — the base, the fine-tuned MLX model and the GGUF in llama.cpp — on the same
held-out rows (evaluate.data, else the job's test split, else its validation split):

- held-out loss and perplexity on the tokens training scores (the completion; all of a text
  row), from each runtime's own logits on the same token ids;
- greedy answers to the same prompts training used, up to a length taken from the longest
  reference (plus a margin), scored against the references (lorad.evalmetrics) and, for
  text-to-SQL rows, by execution (lorad.score). Answers that hit the limit are counted.

Each model's answers and losses are kept under eval/ so a resumed stage skips finished models.
Writes eval.json, eval_rows.jsonl and the report (lorad.report).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorad.evalmetrics import REPORTED, generation_summary, loss_summary, metric_value, metrics_for, row_scores
from lorad.fsutil import atomic_write_json, atomic_write_text
from lorad.prompts import messages_prompt
from lorad.stages import Interrupted, StageContext, StageFailed
from lorad.stages.convert import base_path
from lorad.stages.gguf import llama_cpp_available
from lorad.stages.prepare import prepared_format

BATCH = 16  # prompts per batch_generate call
LOSS_BATCH = 8  # held-out rows per forward pass, sorted by length
TEXT_PREFIX_WORDS = 64  # a text row: the model continues its first half (at most this many words)
MAX_NEW_TOKENS_CAP = 2048


@dataclass
class Case:
    """One held-out row, as each part of the evaluation needs it."""

    row: dict[str, Any]  # the training-format row (mlx-lm's datasets tokenize it for the loss)
    messages: list[dict[str, Any]] | None  # the turns the model answers; None for a text row
    prefix: str  # a text row's opening the model continues
    reference: str  # the answer it should give
    question: str  # for people: the last user turn, or the text row's opening
    extra: dict[str, Any] = field(default_factory=dict)  # gretel: sql_context, sql, sql_complexity, id


def to_case(row: dict[str, Any], fmt: str) -> Case | None:
    """A held-out row → a Case, or None when it has nothing to answer (e.g. a chat not ending with the assistant)."""
    if fmt in ("gretel", "completions"):
        extra: dict[str, Any] = {k: row[k] for k in ("id", "sql_context", "sql", "sql_complexity") if k in row}
        return Case(row, [{"role": "user", "content": row["prompt"]}], "", str(row["completion"]),
                    str(row["prompt"]), extra)
    if fmt == "chat":
        messages = row["messages"]
        if len(messages) < 2 or messages[-1].get("role") != "assistant":
            return None
        users = [m for m in messages[:-1] if m.get("role") == "user"]
        return Case(row, messages[:-1], "", str(messages[-1]["content"]), str(users[-1]["content"] if users else ""))
    words = str(row["text"]).split()
    if len(words) < 2:
        return None
    cut = min(len(words) // 2, TEXT_PREFIX_WORDS)
    prefix = " ".join(words[:cut])
    return Case(row, None, prefix, " ".join(words[cut:]), prefix)


def held_out_rows(ctx: StageContext) -> tuple[list[dict[str, Any]], str]:
    """Training-format rows to evaluate on, and where they came from."""
    spec = ctx.spec["evaluate"]
    if spec.get("data"):
        from lorad.stages.prepare import detect_format, load_source, to_training_row

        raw = [r for rows in load_source(spec["data"], ctx.cache_dir).values() for r in rows if isinstance(r, dict)]
        if not raw:
            raise StageFailed(f"evaluate.data {spec['data']!r} has no rows")
        fmt = ctx.spec["data"].get("format") or detect_format(raw[0])
        converted = [to_training_row(r, fmt, ctx.spec["data"].get("with_context", True)) for r in raw]
        return [r for r in converted if r], "evaluate.data"
    for split in ("test", "valid"):
        path = ctx.path("data", f"{split}.jsonl")
        if path.exists():
            rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
            if rows:
                return rows, split
    raise StageFailed("no held-out rows: data/test.jsonl and data/valid.jsonl are empty or missing "
                      "(run prepare with data.test_fraction > 0, or give evaluate.data)")


def eval_cases(ctx: StageContext) -> tuple[str, list[Case], str]:
    rows, split = held_out_rows(ctx)
    fmt = prepared_format(rows[0])
    cases = [c for c in (to_case(r, fmt) for r in rows if prepared_format(r) == fmt) if c is not None]
    if not cases:
        raise StageFailed(f"none of the {len(rows)} held-out {fmt} rows has an answer to compare with "
                          "(a chat row must end with an assistant turn)")
    return fmt, cases[: ctx.spec["evaluate"]["limit"]], split


def token_sequences(cases: list[Case], tokenizer: Any, fmt: str, max_len: int) -> list[tuple[list[int], int]]:
    """(tokens, first scored position) per row, exactly as training tokenizes and masks it (mlx-lm's datasets)."""
    from types import SimpleNamespace

    from mlx_lm.tuner.datasets import create_dataset

    dataset = create_dataset([c.row for c in cases], tokenizer, SimpleNamespace(mask_prompt=fmt != "text"))
    out = []
    for i in range(len(cases)):
        tokens, offset = dataset.process(dataset[i])
        out.append((list(tokens)[:max_len], offset))
    return out


def sequence_losses(sequences: list[tuple[list[int], int]],
                    nll: Callable[[list[int], int], float]) -> list[tuple[float, int]]:
    """(summed NLL, scored tokens) per row; nll(tokens, t0) sums -log p(token t+1) over positions t >= t0.

    Positions from offset - 1 on predict a scored token (mlx-lm's default_loss mask).
    """
    out = []
    for tokens, offset in sequences:
        start = max(offset - 1, 0)
        count = len(tokens) - 1 - start
        out.append((nll(tokens, start), count) if count > 0 else (0.0, 0))
    return out


def mlx_losses(model: Any, sequences: list[tuple[list[int], int]]) -> list[tuple[float, int]]:
    """sequence_losses' numbers, rows of similar length batched (right padding changes nothing under a causal mask)."""
    import mlx.core as mx
    import numpy as np

    from lorad import completion_loss, cpu_ops

    out: list[tuple[float, int]] = [(0.0, 0)] * len(sequences)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]))
    with cpu_ops.vectorized(model):
        for chunk in (order[i:i + LOSS_BATCH] for i in range(0, len(order), LOSS_BATCH)):
            width = max(len(sequences[i][0]) for i in chunk)
            batch = np.zeros((len(chunk), width), np.int32)
            index: list[int] = []
            row_of: list[int] = []
            for row, i in enumerate(chunk):
                tokens, offset = sequences[i]
                batch[row, :len(tokens)] = tokens
                positions = range(max(offset - 1, 0), len(tokens) - 1)  # as sequence_losses
                index.extend(row * (width - 1) + t for t in positions)
                row_of.extend([row] * len(positions))
            if not index:
                continue
            targets = batch[:, 1:].reshape(-1)[index]
            nll = completion_loss.position_losses(model, mx.array(batch[:, :-1]), mx.array(index), mx.array(targets))
            sums = np.bincount(row_of, weights=np.array(nll.tolist(), np.float64), minlength=len(chunk))
            counts = np.bincount(row_of, minlength=len(chunk))
            for row, i in enumerate(chunk):
                out[i] = (float(sums[row]), int(counts[row]))
    return out


def gguf_losses(gguf: Path, sequences: list[tuple[list[int], int]]) -> list[tuple[float, int]]:
    """The same NLL from llama.cpp's own logits (logits_all), fed the same token ids."""
    import llama_cpp
    import numpy as np

    n_ctx = max(len(t) for t, _ in sequences) + 8
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=n_ctx, n_batch=min(n_ctx, 512), logits_all=True,
                          n_threads=max(1, os.cpu_count() or 1), verbose=False)

    def nll(tokens: list[int], start: int) -> float:
        llm.reset()
        llm.eval(tokens[:-1])
        logits = np.asarray(llm.scores[start:len(tokens) - 1], dtype=np.float64)
        top = logits.max(axis=1, keepdims=True)
        logz = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
        targets = np.asarray(tokens[start + 1:])
        return float((logz - logits[np.arange(len(targets)), targets]).sum())

    return sequence_losses(sequences, nll)


def load_mlx(model_dir: Path, adapter_dir: Path | None, log: Any) -> tuple[Any, Any]:
    from lorad.stages.lora import load_for_training

    model, tokenizer, _config, _ = load_for_training(model_dir, log)  # dequantized on a CPU, as in training
    if adapter_dir is not None:
        from mlx_lm.utils import load_adapters

        model = load_adapters(model, str(adapter_dir))
    model.eval()
    return model, tokenizer


def prompt_ids(cases: list[Case], tokenizer: Any) -> list[list[int]]:
    """The token ids every runtime is given: chat turns through the template, text openings as they are."""
    out = []
    for c in cases:
        if c.messages is not None:
            out.append(tokenizer.encode(messages_prompt(tokenizer, c.messages), add_special_tokens=False))
        else:
            out.append(tokenizer.encode(c.prefix))
    return out


def mlx_answers(model: Any, tokenizer: Any, prompts: list[list[int]], max_new: int,
                should_stop: Callable[[], bool]) -> list[tuple[str, bool]]:
    """(answer, hit the limit) per prompt, greedy, in batches."""
    from mlx_lm.generate import batch_generate

    out: list[tuple[str, bool]] = []
    for i in range(0, len(prompts), BATCH):
        if should_stop():
            raise Interrupted("stopped during evaluation")
        r = batch_generate(model, tokenizer, prompts[i:i + BATCH], max_tokens=max_new, return_token_ids=True)
        out.extend((text, len(ids) >= max_new) for text, ids in zip(r.texts, r.token_ids or []))
    return out


def gguf_answers(gguf: Path, prompts: list[list[int]], max_new: int,
                 should_stop: Callable[[], bool]) -> list[tuple[str, bool]]:
    import llama_cpp

    n_ctx = max(len(p) for p in prompts) + max_new + 8
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=max(n_ctx, 512), n_threads=max(1, os.cpu_count() or 1), verbose=False)
    out = []
    for ids in prompts:
        if should_stop():
            raise Interrupted("stopped during evaluation")
        choice = llm.create_completion(ids, max_tokens=max_new, temperature=0.0, top_k=1, repeat_penalty=1.0)["choices"][0]
        out.append((choice["text"], choice["finish_reason"] == "length"))
    return out


def answer_length(cases: list[Case], tokenizer: Any, override: int | None) -> tuple[int, str]:
    """max_new_tokens: the spec's, else the longest reference in tokens plus a quarter (at least 16)."""
    if override:
        return override, "evaluate.max_new_tokens"
    longest = max(len(tokenizer.encode(c.reference, add_special_tokens=False)) for c in cases)
    return min(MAX_NEW_TOKENS_CAP, longest + max(16, math.ceil(longest / 4))), f"longest reference ({longest} tokens) + margin"


@dataclass
class ModelRun:
    """How to get one model's losses and answers."""

    losses: Callable[[], list[tuple[float, int]]]
    answers: Callable[[], list[tuple[str, bool]]]
    runtime: str


def model_runs(ctx: StageContext, sequences: list[tuple[list[int], int]], prompts: list[list[int]],
               max_new: int) -> dict[str, ModelRun]:
    base = base_path(ctx)
    fused, adapters, gguf = ctx.path("fused"), ctx.path("adapters"), ctx.path("model.gguf")
    base_gguf = json.loads(ctx.path("base_model.json").read_text()).get("gguf") if ctx.path("base_model.json").exists() else None
    loaded: dict[str, Any] = {}

    def mlx(key: str, model_dir: Path, adapter_dir: Path | None) -> ModelRun:
        def model() -> tuple[Any, Any]:
            if key not in loaded:
                loaded.clear()  # one MLX model in memory at a time
                loaded[key] = load_mlx(model_dir, adapter_dir, ctx.log)
            return loaded[key]

        return ModelRun(lambda: mlx_losses(model()[0], sequences),
                        lambda: mlx_answers(*model(), prompts, max_new, ctx.should_stop), "MLX")

    def llama(path: Path) -> ModelRun:
        return ModelRun(lambda: gguf_losses(path, sequences),
                        lambda: gguf_answers(path, prompts, max_new, ctx.should_stop), "llama.cpp")

    runs: dict[str, ModelRun] = {}
    if base_gguf and Path(base_gguf).exists() and llama_cpp_available():
        runs["base"] = llama(Path(base_gguf))  # the base came as a GGUF: as its users run it (and ~3x faster on a CPU)
    else:
        runs["base"] = mlx("base", base, None)
    if (fused / "config.json").exists():
        runs["finetuned"] = mlx("finetuned", fused, None)
    elif (adapters / "adapters.safetensors").exists():
        runs["finetuned"] = mlx("finetuned", base, adapters)
    if gguf.exists():
        if llama_cpp_available():
            runs["gguf"] = llama(gguf)
        else:
            ctx.log.warning("gguf_eval_skipped", reason="llama-cpp-python is not installed")
    return runs


def _cached(path: Path, key: dict[str, Any]) -> Any:
    """What an earlier attempt computed under exactly the same settings, else None."""
    if path.exists():
        try:
            saved = json.loads(path.read_text())
        except ValueError:
            return None
        if saved.get("key") == key:
            return saved["value"]
    return None


def _compute(path: Path, key: dict[str, Any], compute: Callable[[], Any]) -> tuple[Any, float | None]:
    value = _cached(path, key)
    if value is not None:
        return value, None
    t0 = time.time()
    value = compute()
    atomic_write_json(path, {"key": key, "value": value})
    return value, round(time.time() - t0, 2)


def run(ctx: StageContext) -> dict[str, str]:
    from mlx_lm.utils import load_tokenizer

    from lorad.report import write_report
    from lorad.score import score_rows

    spec = ctx.spec["evaluate"]
    fmt, cases, split = eval_cases(ctx)
    metrics = metrics_for(fmt, spec.get("metrics"))
    tokenizer = load_tokenizer(base_path(ctx))
    max_new, max_new_from = answer_length(cases, tokenizer, spec.get("max_new_tokens"))
    sequences = token_sequences(cases, tokenizer, fmt, ctx.spec["train"]["max_seq_length"])
    prompts = prompt_ids(cases, tokenizer)
    runs = model_runs(ctx, sequences, prompts, max_new)
    generation = [m for m in metrics if m != "loss"]
    result: dict[str, Any] = {"format": fmt, "split": split, "rows": len(cases), "metrics": metrics,
                              "max_new_tokens": max_new, "max_new_tokens_from": max_new_from,
                              "engine": spec["engine"], "runtimes": {k: r.runtime for k, r in runs.items()},
                              "base_runtime": "llama.cpp" if runs["base"].runtime == "llama.cpp" else "mlx"}
    per_row: list[dict[str, Any]] = [{"id": c.extra.get("id"), "question": c.question, "reference": c.reference,
                                      **({"sql": c.extra["sql"], "sql_complexity": c.extra.get("sql_complexity")}
                                         if fmt == "gretel" else {})} for c in cases]
    out_dir = ctx.path("eval")
    out_dir.mkdir(exist_ok=True)
    steps = len(runs) * (("loss" in metrics) + bool(generation))
    done = 0
    for name, model_run in runs.items():
        summary: dict[str, Any] = {"runtime": model_run.runtime}
        if "loss" in metrics:
            ctx.report_progress({"iteration": done, "iters": steps, "model": name, "task": "loss"})
            losses, seconds = _compute(out_dir / f"{name}.loss.json", {"rows": len(cases), "tokens": [len(t) for t, _ in sequences]},
                                       model_run.losses)
            summary.update(loss_summary([nll for nll, _ in losses], [n for _, n in losses]), loss_seconds=seconds)
            for row, (nll, n) in zip(per_row, losses):
                row.setdefault(name, {})["loss"] = round(nll / n, 4) if n else None
            done += 1
        if generation:
            ctx.report_progress({"iteration": done, "iters": steps, "model": name, "task": "answers"})
            answers, seconds = _compute(out_dir / f"{name}.answers.json", {"rows": len(cases), "max_new_tokens": max_new,
                                                                           "prompt_tokens": [len(p) for p in prompts]},
                                        model_run.answers)
            predictions = [a for a, _ in answers]
            stripped, references = [p.strip() for p in predictions], [c.reference.strip() for c in cases]
            scores = [row_scores(p, r, generation) for p, r in zip(stripped, references)]
            summary.update(generation_summary(stripped, references, scores, generation))
            hit = sum(1 for _, h in answers if h)
            summary["did_not_stop"] = {"count": hit, "rate": round(hit / len(cases), 4)}
            summary["generation_seconds"] = seconds
            for row, (prediction, hit_limit), s in zip(per_row, answers, scores):
                row.setdefault(name, {}).update(prediction=prediction, hit_limit=hit_limit, **s)
            if "execution" in metrics:
                execution, scored = score_rows([{**c.extra, "prediction": p} for c, p in zip(cases, predictions)], spec["engine"])
                summary.update(execution)
                for row, s in zip(per_row, scored):
                    row[name].update(pred_sql=s["pred_sql"], match=s["match"], reason=s["reason"])
            done += 1
        result[name] = summary
        ctx.log.info("evaluated", model=name, **{m: metric_value(summary, m)[0] for m in REPORTED},
                     did_not_stop=(summary.get("did_not_stop") or {}).get("count"))
    ctx.report_progress({"iteration": steps, "iters": steps})
    result["deltas"] = deltas(result)
    result["rows_file"] = "eval_rows.jsonl"
    atomic_write_text(ctx.path("eval_rows.jsonl"), "".join(json.dumps(r, default=str) + "\n" for r in per_row))
    atomic_write_json(ctx.path("eval.json"), result)
    ctx.log.info("evaluation_done", deltas=result["deltas"])
    artifacts = {"eval": "eval.json", "eval_rows": "eval_rows.jsonl"}
    artifacts.update(write_report(ctx, result, per_row))
    return artifacts


def deltas(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    """fine-tuned − base and GGUF − fine-tuned, per metric (lower loss/perplexity is better)."""
    out: dict[str, dict[str, float]] = {}
    for a, b in (("finetuned", "base"), ("gguf", "finetuned")):
        if a in result and b in result:
            diff = {}
            for m in REPORTED:
                x, y = metric_value(result[a], m)[0], metric_value(result[b], m)[0]
                if x is not None and y is not None:
                    diff[m] = round(x - y, 4)
            out[f"{a}_minus_{b}"] = diff
    return out
