"""GGUF file → MLX model folder (config.json, model.safetensors, tokenizer files).

`mx.load` reads GGUF and keeps Q4_0, Q4_1 and Q8_0 tensors quantized (MLX affine,
groups of 32); other types arrive dequantized. What it does not do:
  - name tensors as mlx-lm's model classes expect (blk.N.attn_q → model.layers.N.self_attn.q_proj),
  - undo the row permutation llama.cpp applies to attn_q/attn_k for its rope kernel,
  - rebuild the Hugging Face config and tokenizer from the GGUF metadata.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SUPPORTED_ARCHS = {"llama", "qwen2", "qwen3", "mistral"}
PERMUTED_ARCHS = {"llama", "mistral"}  # llama.cpp's LlamaModel permutes q/k; Qwen's converters do not

TENSOR_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
BLOCK_TENSOR_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def _scalar(meta: dict[str, Any], key: str, default: Any = None) -> Any:
    value = meta.get(key, default)
    if hasattr(value, "item"):
        value = value.item()
    return value


def hf_tensor_name(gguf_name: str) -> str:
    """blk.3.attn_q.weight → model.layers.3.self_attn.q_proj.weight (suffix kept: weight/scales/biases/bias)."""
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        layer, base, rest = parts[1], parts[2], parts[3:]
        if base not in BLOCK_TENSOR_NAMES:
            raise ValueError(f"unknown GGUF tensor {gguf_name!r}")
        return ".".join([f"model.layers.{layer}", BLOCK_TENSOR_NAMES[base], *rest])
    if parts[0] not in TENSOR_NAMES:
        raise ValueError(f"unknown GGUF tensor {gguf_name!r}")
    return ".".join([TENSOR_NAMES[parts[0]], *parts[1:]])


def unpermute_rows(w: Any, n_head: int) -> Any:
    """Inverse of llama.cpp's `permute` (convert_hf_to_gguf.py) on the row axis."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rows(w: Any, n_head: int) -> Any:
    """llama.cpp's `permute`: HF rope layout → GGUF rope layout (used on export)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_config(meta: dict[str, Any], has_output: bool, quantization: dict[str, int] | None) -> dict[str, Any]:
    arch = _scalar(meta, "general.architecture")
    p = f"{arch}."
    n_embd = int(_scalar(meta, p + "embedding_length"))
    n_head = int(_scalar(meta, p + "attention.head_count"))
    config: dict[str, Any] = {
        "model_type": "mistral" if arch == "mistral" else arch,
        "architectures": [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                           "qwen3": "Qwen3ForCausalLM"}[arch]],
        "hidden_size": n_embd,
        "num_hidden_layers": int(_scalar(meta, p + "block_count")),
        "intermediate_size": int(_scalar(meta, p + "feed_forward_length")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(_scalar(meta, p + "attention.head_count_kv", n_head)),
        "rms_norm_eps": float(_scalar(meta, p + "attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(_scalar(meta, p + "rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_scalar(meta, p + "context_length", 4096)),
        "vocab_size": int(_scalar(meta, p + "vocab_size", 0) or len(meta["tokenizer.ggml.tokens"])),
        "tie_word_embeddings": not has_output,
        "head_dim": int(_scalar(meta, p + "attention.key_length", n_embd // n_head)),
        "bos_token_id": _scalar(meta, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _scalar(meta, "tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float16",
    }
    if arch in ("qwen2",):
        config["attention_bias"] = True
    if quantization:
        config["quantization"] = dict(quantization)
    return config


def build_tokenizer(meta: dict[str, Any], out_dir: Path) -> None:
    """tokenizer.json + tokenizer_config.json from GGUF metadata (transformers' own GGUF converter)."""
    from tokenizers import pre_tokenizers
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    keys = {"model": "tokenizer_type", "pre": "pre_tokenizer_type", "tokens": "tokens", "scores": "scores",
            "token_type": "token_type", "merges": "merges", "bos_token_id": "bos_token_id",
            "eos_token_id": "eos_token_id", "unknown_token_id": "unk_token_id", "padding_token_id": "pad_token_id"}
    tok_dict: dict[str, Any] = {}
    for gguf_key, name in keys.items():
        value = meta.get(f"tokenizer.ggml.{gguf_key}")
        if value is None:
            continue
        tok_dict[name] = value.tolist() if hasattr(value, "tolist") else value
    arch = _scalar(meta, "general.architecture")
    backend, _ = convert_gguf_tokenizer(arch, tok_dict)
    if tok_dict.get("pre_tokenizer_type") == "smollm":
        # llama.cpp's smollm pre-tokenizer splits digits one by one (as SmolLM's tokenizer.json does)
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    backend.save(str(out_dir / "tokenizer.json"))
    tokens = tok_dict["tokens"]

    def token(key: str) -> str | None:
        idx = _scalar(meta, f"tokenizer.ggml.{key}")
        return tokens[idx] if idx is not None and 0 <= idx < len(tokens) else None

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id") or token("eos_token_id"),
        "add_bos_token": bool(_scalar(meta, "tokenizer.ggml.add_bos_token", tok_dict.get("tokenizer_type") == "llama")),
        "add_eos_token": bool(_scalar(meta, "tokenizer.ggml.add_eos_token", False)),
        "model_max_length": int(_scalar(meta, f"{arch}.context_length", 4096)),
        "clean_up_tokenization_spaces": False,
    }
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = str(meta["tokenizer.chat_template"])
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def convert_gguf(gguf_path: Path, out_dir: Path) -> dict[str, Any]:
    """Write an mlx-lm loadable folder for gguf_path into out_dir; returns a summary."""
    import mlx.core as mx

    weights, meta = mx.load(str(gguf_path), format="gguf", return_metadata=True)
    arch = _scalar(meta, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"{gguf_path.name}: GGUF architecture {arch!r} is not supported "
                         f"(supported: {', '.join(sorted(SUPPORTED_ARCHS))})")
    n_head = int(_scalar(meta, f"{arch}.attention.head_count"))
    n_head_kv = int(_scalar(meta, f"{arch}.attention.head_count_kv", n_head))
    out: dict[str, Any] = {}
    bits_seen: dict[int, int] = {}
    for name, w in weights.items():
        hf_name = hf_tensor_name(name)
        if arch in PERMUTED_ARCHS and (".attn_q." in name or ".attn_k." in name) and w.ndim >= 1:
            w = unpermute_rows(w, n_head if ".attn_q." in name else n_head_kv)
        out[hf_name] = w
        if name.endswith(".scales"):
            packed = weights[name[: -len(".scales")] + ".weight"]
            in_features = w.shape[-1] * 32
            bits = packed.shape[-1] * 32 // in_features
            bits_seen[bits] = bits_seen.get(bits, 0) + 1
    quantization = None
    if bits_seen:
        common = max(bits_seen, key=lambda b: bits_seen[b])
        quantization = {"group_size": 32, "bits": common}
    has_output = "output.weight" in weights
    config = hf_config(meta, has_output, quantization)
    out_dir.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out_dir / "model.safetensors"), out, metadata={"format": "mlx"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    build_tokenizer(meta, out_dir)
    return {"architecture": arch, "tensors": len(weights), "quantized_bits": bits_seen, "tied_embeddings": not has_output}
