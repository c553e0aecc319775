"""gguf: fused/ → model.gguf, then proof that llama.cpp loads it and agrees with MLX.

The check runs the same tokens through llama.cpp and the MLX fused model and
compares logits; an unquantized export (f32/f16/bf16) that disagrees fails the
stage. A short chat completion shows the model answers and stops.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from lorad.gguf_export import LLAMA_CPP_TYPES, ExportError, compare_with_llama_cpp, quantize_with_llama_cpp, write_gguf
from lorad.prompts import chat_prompt
from lorad.stages import StageContext, StageFailed

TOLERANCE = {"f32": 0.002, "f16": 0.01, "bf16": 0.05}  # max |Δlogit| / max |logit| for unquantized exports
SMOKE_QUESTION = "What is the capital of France?"


def job_question(ctx: StageContext) -> str:
    """The first held-out prompt: what the model was tuned to answer (or a stock question)."""
    test = ctx.path("data", "test.jsonl")
    if test.exists():
        with open(test, encoding="utf-8") as rows:
            for line in rows:
                row = json.loads(line)
                if "prompt" in row:
                    return row["prompt"]
                user = [m["content"] for m in row.get("messages", []) if m.get("role") == "user"]
                if user:
                    return user[0]
    return SMOKE_QUESTION


def llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def smoke_chat(gguf_path: Path, question: str, max_tokens: int = 96) -> dict[str, Any]:
    """llama.cpp's own chat completion (it applies the GGUF's chat template)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=1024, n_threads=max(1, os.cpu_count() or 1), verbose=False)
    out = llm.create_chat_completion(messages=[{"role": "user", "content": question}], max_tokens=max_tokens, temperature=0.0)
    choice = out["choices"][0]
    return {"answer": choice["message"]["content"], "finish_reason": choice["finish_reason"]}


def run(ctx: StageContext) -> dict[str, str]:
    from mlx_lm.utils import load_tokenizer

    fused = ctx.path("fused")
    if not (fused / "config.json").exists():
        raise StageFailed("no fused model: run the fuse stage first")
    outtype = ctx.spec["gguf"]["outtype"]
    out = ctx.path("model.gguf")
    t0 = time.time()
    try:
        if outtype in LLAMA_CPP_TYPES:
            f16 = ctx.path(".model-f16.gguf")
            summary = write_gguf(fused, f16, "f16", name=ctx.spec["name"])
            quantize_with_llama_cpp(f16, out, outtype)
            f16.unlink()
            summary.update(outtype=outtype, bytes=out.stat().st_size)
        else:
            summary = write_gguf(fused, out, outtype, name=ctx.spec["name"])
    except ExportError as e:
        raise StageFailed(str(e)) from None
    ctx.log.info("gguf_written", seconds=round(time.time() - t0, 2), **summary)

    if not llama_cpp_available():
        ctx.log.warning("gguf_verification_skipped", reason="llama-cpp-python is not installed",
                        hint="`lorad install-llama` to check every export with llama.cpp")
        return {"gguf": "model.gguf"}
    tokenizer = load_tokenizer(fused)
    question = job_question(ctx)
    prompt = chat_prompt(tokenizer, question)  # MLX and llama.cpp see the same tokens
    agreement = compare_with_llama_cpp(out, fused, prompt)
    relative = agreement["max_abs_diff"] / max(agreement["logit_scale"], 1e-6)
    agreement["relative_diff"] = round(relative, 5)
    ctx.log.info("gguf_agreement", outtype=outtype, **agreement)
    (ctx.path("gguf_check.json")).write_text(json.dumps({"outtype": outtype, **agreement}, indent=2))
    if outtype in TOLERANCE and (relative > TOLERANCE[outtype] or agreement["top1_agreement"] < 0.9):
        raise StageFailed(f"llama.cpp disagrees with MLX on the {outtype} export: max |Δlogit| {agreement['max_abs_diff']} "
                          f"({relative:.4f} of the logit scale), top-1 agreement {agreement['top1_agreement']}")
    if not agreement["tokenizer_agrees"]:
        ctx.log.warning("gguf_tokenizer_mismatch", pre_tokenizer=summary.get("pre_tokenizer"),
                        hint="llama.cpp splits this prompt into different tokens than the HF tokenizer")
    chat = smoke_chat(out, question)
    ctx.log.info("gguf_chat", question=question, **chat)
    if chat["finish_reason"] != "stop":
        ctx.log.warning("gguf_chat_did_not_stop", hint="the answer ran to max_tokens: check the chat template and "
                        "end-of-turn tokens, or train longer so the model learns where its answer ends")
    return {"gguf": "model.gguf", "gguf_check": "gguf_check.json"}
