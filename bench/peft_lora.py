"""The PyTorch side of bench/lora_speed.py: transformers + PEFT LoRA, eager, fp32, on the batches lorad trains on.

Run by lora_speed.py with an interpreter that has torch, transformers, peft and gguf (its own venv;
see the README). Settings as lorad's bench: LoRA rank 8, scale 20 (lora_alpha 160), dropout 0 on
q/k/v/o/gate/up/down of the last NUM_LAYERS blocks, base frozen in float32, Adam, loss on the
completion tokens only (as mlx-lm scores them: see `batch`). Rows are tokenized with the chat template, as mlx-lm does, and
batched exactly as the plan file says (row indices of train.jsonl per step), padded on the right
to the longest row. Step 1 is a warm-up; steps 2..N are timed. Prints one JSON line.

    python bench/peft_lora.py MODEL.gguf DATA_DIR PLAN.json --num-layers 8 --max-seq 256 --lr 1e-4
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load(gguf: Path):
    """transformers dequantizes the GGUF to a dense float32 model (its default keeps quantized blocks, not trainable)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    kw = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True), **kw)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    return tokenizer, model


def encode(tokenizer, row: dict, max_seq: int) -> tuple[list[int], int]:
    """(token ids, prompt length), as mlx-lm's chat and completions datasets with mask_prompt build them."""
    messages = row.get("messages") or [{"role": "user", "content": row["prompt"]},
                                       {"role": "assistant", "content": row["completion"]}]
    full = tokenizer.apply_chat_template(messages, tokenize=True)
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True)
    full, prompt = list(getattr(full, "input_ids", full)), list(getattr(prompt, "input_ids", prompt))
    return full[:max_seq], min(len(prompt), max_seq)


def batch(samples: list[tuple[list[int], int]], pad_id: int, max_seq: int) -> dict:
    """Right-padded inputs and the labels mlx-lm's default_loss scores.

    That loss scores the completion and one target past each row's end: the padding token, id 0
    (mlx-lm pads with zeros; SmolLM2's 0 is <|endoftext|>). A row that fills max_seq has no such target.
    """
    width = min(max(len(ids) for ids, _ in samples) + 1, max_seq)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for i, (ids, prompt) in enumerate(samples):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention[i, :len(ids)] = 1
        labels[i, prompt:len(ids)] = input_ids[i, prompt:len(ids)]
        if len(ids) < width:
            input_ids[i, len(ids)] = labels[i, len(ids)] = 0
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", type=Path)
    parser.add_argument("data", type=Path)
    parser.add_argument("plan", type=Path)
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--max-seq", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--scale", type=float, default=20.0)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from peft import LoraConfig, get_peft_model

    tokenizer, model = load(args.model)
    layers = model.config.num_hidden_layers
    config = LoraConfig(r=args.rank, lora_alpha=args.scale * args.rank, lora_dropout=0.0, bias="none",
                        target_modules=TARGETS, layers_to_transform=list(range(layers - args.num_layers, layers)),
                        layers_pattern="layers", task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    rows = [json.loads(x) for x in (args.data / "train.jsonl").read_text().splitlines() if x.strip()]
    plan = json.loads(args.plan.read_text())
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model.train()
    losses, seconds, tokens = [], [], []
    for indices in plan:
        samples = [encode(tokenizer, rows[i], args.max_seq) for i in indices]
        inputs = batch(samples, pad_id, args.max_seq)
        start = time.perf_counter()
        out = model(**inputs, use_cache=False)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
        seconds.append(time.perf_counter() - start)
        tokens.append(sum(len(ids) for ids, _ in samples))
    timed = sum(seconds[1:])
    a = torch.randn(2048, 2048)
    b = torch.randn(2048, 2048)
    torch.mm(a, b)
    start = time.perf_counter()
    for _ in range(10):
        torch.mm(a, b)
    gemm = 10 * 2 * 2048**3 / (time.perf_counter() - start)
    print(json.dumps({"losses": losses, "step_seconds": seconds, "tokens": tokens, "it_per_s": (len(plan) - 1) / timed,
                      "tokens_per_s": sum(tokens[1:]) / timed, "torch": torch.__version__, "threads": args.threads,
                      "gemm_flops": gemm}))


if __name__ == "__main__":
    main()
