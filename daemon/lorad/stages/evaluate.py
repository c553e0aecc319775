"""evaluate: answer held-out questions with the base, the fine-tuned and the GGUF model; score by execution.

Greedy answers to the same chat-templated prompts the model was trained on.
MLX models generate in batches; the GGUF runs in llama.cpp. Each model's
answers are kept in eval/<model>.jsonl (so a resumed stage skips finished
models) and scored with `lorad score`'s rules. Writes eval.json, eval_rows.jsonl
and the report (report.md, loss.png, accuracy.png).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorad.fsutil import atomic_write_json, atomic_write_text
from lorad.prompts import chat_prompt, gretel_prompt
from lorad.score import score_rows
from lorad.stages import Interrupted, StageContext, StageFailed
from lorad.stages.convert import base_path
from lorad.stages.gguf import llama_cpp_available

MAX_NEW_TOKENS = 76  # the longest gold query in the bundled set is 72 tokens
BATCH = 16


def eval_rows(ctx: StageContext) -> list[dict[str, Any]]:
    """Held-out gretel rows with the training prompt: evaluate.data, else the job's test split."""
    spec = ctx.spec["evaluate"]
    limit = spec["limit"]
    if spec.get("data"):
        from lorad.stages.prepare import load_source

        source = load_source(spec["data"], ctx.cache_dir)
        raw = [r for rows in source.values() for r in rows]
        with_context = ctx.spec["data"].get("with_context", True)
        rows = [{**r, "prompt": gretel_prompt(str(r["sql_prompt"]), str(r.get("sql_context") or ""), with_context)}
                for r in raw if r.get("sql_prompt") and r.get("sql")]
    else:
        test = ctx.path("data", "test.jsonl")
        if not test.exists():
            raise StageFailed("no data/test.jsonl: run prepare, or give evaluate.data")
        rows = [json.loads(x) for x in test.read_text().splitlines() if x.strip()]
    rows = [r for r in rows if r.get("sql") and "prompt" in r]
    if not rows:
        raise StageFailed("no text-to-SQL rows to evaluate (rows need prompt/sql_prompt, sql_context and sql; "
                          "evaluate only applies to gretel-format data)")
    return rows[:limit]


def mlx_answers(model_dir: Path, adapter_dir: Path | None, prompts: list[str], should_stop: Callable[[], bool],
                log: Any) -> list[str]:
    from mlx_lm.generate import batch_generate

    from lorad.stages.lora import load_for_training

    model, tokenizer, _config, _ = load_for_training(model_dir, log)  # dequantized on a CPU, as in training
    if adapter_dir is not None:
        from mlx_lm.utils import load_adapters

        model = load_adapters(model, str(adapter_dir))
    model.eval()
    texts = [chat_prompt(tokenizer, p) for p in prompts]
    answers: list[str] = []
    for i in range(0, len(texts), BATCH):
        if should_stop():
            raise Interrupted("stopped during evaluation")
        batch = [tokenizer.encode(t, add_special_tokens=False) for t in texts[i:i + BATCH]]
        answers.extend(batch_generate(model, tokenizer, batch, max_tokens=MAX_NEW_TOKENS).texts)
    return answers


def gguf_answers(gguf: Path, tokenizer_dir: Path, prompts: list[str], should_stop: Callable[[], bool]) -> list[str]:
    import llama_cpp
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=2048, n_threads=max(1, os.cpu_count() or 1), verbose=False)
    answers = []
    for prompt in prompts:
        if should_stop():
            raise Interrupted("stopped during evaluation")
        out = llm.create_completion(chat_prompt(tokenizer, prompt), max_tokens=MAX_NEW_TOKENS, temperature=0.0,
                                    top_k=1, repeat_penalty=1.0)
        answers.append(out["choices"][0]["text"])
    return answers


def _cached(path: Path, n: int) -> list[str] | None:
    if not path.exists():
        return None
    answers = [json.loads(x)["prediction"] for x in path.read_text().splitlines() if x.strip()]
    return answers if len(answers) == n else None


def run(ctx: StageContext) -> dict[str, str]:
    from lorad.report import write_report

    rows = eval_rows(ctx)
    prompts = [r["prompt"] for r in rows]
    engine = ctx.spec["evaluate"]["engine"]
    out_dir = ctx.path("eval")
    out_dir.mkdir(exist_ok=True)
    base = base_path(ctx)
    fused = ctx.path("fused")
    adapters = ctx.path("adapters")
    gguf = ctx.path("model.gguf")
    base_gguf = json.loads(ctx.path("base_model.json").read_text()).get("gguf")
    base_runtime = "llama.cpp" if base_gguf and Path(base_gguf).exists() and llama_cpp_available() else "mlx"
    runners: dict[str, Callable[[], list[str]]] = {}
    if base_runtime == "llama.cpp":
        # the base came as a GGUF: answer with it in llama.cpp, as its users run it (and ~3x faster on a CPU)
        runners["base"] = lambda: gguf_answers(Path(base_gguf), base, prompts, ctx.should_stop)
    else:
        runners["base"] = lambda: mlx_answers(base, None, prompts, ctx.should_stop, ctx.log)
    if (fused / "config.json").exists():
        runners["finetuned"] = lambda: mlx_answers(fused, None, prompts, ctx.should_stop, ctx.log)
    elif (adapters / "adapters.safetensors").exists():
        runners["finetuned"] = lambda: mlx_answers(base, adapters, prompts, ctx.should_stop, ctx.log)
    if gguf.exists():
        if llama_cpp_available():
            runners["gguf"] = lambda: gguf_answers(gguf, fused if fused.exists() else base, prompts, ctx.should_stop)
        else:
            ctx.log.warning("gguf_eval_skipped", reason="llama-cpp-python is not installed")
    result: dict[str, Any] = {"engine": engine, "rows": len(rows), "max_new_tokens": MAX_NEW_TOKENS,
                              "base_runtime": base_runtime}
    per_row = [{"id": r.get("id"), "sql_complexity": r.get("sql_complexity"), "question": r.get("prompt"),
                "sql": r["sql"]} for r in rows]
    for done, (name, answer) in enumerate(runners.items()):
        ctx.report_progress({"iteration": done, "iters": len(runners), "model": name})
        cache = out_dir / f"{name}.jsonl"
        answers = _cached(cache, len(rows))
        seconds = None
        if answers is None:
            t0 = time.time()
            answers = answer()
            seconds = round(time.time() - t0, 2)
            atomic_write_text(cache, "".join(json.dumps({"prediction": a}) + "\n" for a in answers))
        summary, scored = score_rows([{**r, "prediction": a} for r, a in zip(rows, answers)], engine)
        summary["generation_seconds"] = seconds
        result[name] = summary
        for row, s in zip(per_row, scored):
            row[name] = {"prediction": s["prediction"], "pred_sql": s["pred_sql"], "match": s["match"], "reason": s["reason"]}
        ctx.log.info("evaluated", model=name, execution_accuracy=summary["execution_accuracy"],
                     ci95=summary["execution_accuracy_ci95"], scored=summary["scored"], seconds=seconds)
        ctx.report_progress({"iteration": done + 1, "iters": len(runners), "model": name})
    for a, b in (("finetuned", "base"), ("gguf", "finetuned")):
        if a in result and b in result and result[a]["execution_accuracy"] is not None and result[b]["execution_accuracy"] is not None:
            result.setdefault("deltas", {})[f"{a}_minus_{b}"] = round(result[a]["execution_accuracy"] - result[b]["execution_accuracy"], 4)
    result["rows_file"] = "eval_rows.jsonl"
    atomic_write_text(ctx.path("eval_rows.jsonl"), "".join(json.dumps(r, default=str) + "\n" for r in per_row))
    atomic_write_json(ctx.path("eval.json"), result)
    ctx.log.info("evaluation_done", deltas=result.get("deltas"))
    artifacts = {"eval": "eval.json", "eval_rows": "eval_rows.jsonl"}
    artifacts.update(write_report(ctx, result, per_row))
    return artifacts
