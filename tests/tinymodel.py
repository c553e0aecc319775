"""Tiny random models with a tokenizer trained on the spot, for real MLX tests in seconds."""

from __future__ import annotations

import json
import random
from pathlib import Path

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

WORDS = ["select", "from", "where", "group", "by", "order", "count", "sum", "avg", "table", "name", "id", "value", "price", "city", "year", "total", "max", "min", "what", "is", "the", "how", "many", "list", "show", "all", "of", "in", "and", "or", "not", "null", "join", "on", "as", "distinct", "having", "limit"]


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
        lines.append(" ".join(words) + f" {rng.randint(0, 999)};")
    return lines


def train_tokenizer(out_dir: Path, template: str = "chatml", vocab_size: int = 400) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if template == "chatml":
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        bos, eos, chat_template = None, "<|im_end|>", CHATML
    else:
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
        bos, eos, chat_template = "<|begin_of_text|>", "<|eot_id|>", LLAMA3
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=eos,
                                   unk_token=None)
    fast.chat_template = chat_template
    fast.save_pretrained(str(out_dir))
    return len(fast)


def make_tiny_model(out_dir: Path, model_type: str = "llama", template: str = "chatml", seed: int = 0, **overrides) -> Path:
    """A 2-layer model of the given architecture with random weights, loadable by mlx_lm.load."""
    import importlib

    import mlx.core as mx
    from mlx.utils import tree_flatten

    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = train_tokenizer(out_dir, template)
    config = {
        "model_type": model_type,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "vocab_size": vocab,
        "max_position_embeddings": 512,
        "tie_word_embeddings": model_type in ("qwen2", "qwen3"),
    }
    config.update(overrides)
    if model_type == "gemma2":
        config.update(head_dim=16, query_pre_attn_scalar=16, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    module = importlib.import_module(f"mlx_lm.models.{ {'mistral': 'llama'}.get(model_type, model_type)}")
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(config))
    params = dict(tree_flatten(model.parameters()))
    mx.eval(params)
    mx.save_safetensors(str(out_dir / "model.safetensors"), params, metadata={"format": "mlx"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir


def logits(model_dir: Path, text: str = "select name from table where id 42;"):
    import mlx.core as mx
    from mlx_lm import load

    model, tok = load(str(model_dir))
    ids = mx.array([tok.encode(text)])
    return model(ids)[0].astype(mx.float32)
