"""MLX/HF model folder → GGUF that llama.cpp (and so Ollama) loads, with its tokenizer and chat template.

Written with gguf-py's GGUFWriter, tensor name maps and quantizers, streaming:
tensor infos first, then one tensor at a time, so peak memory is about one
tensor, not the model. K-quants go through llama.cpp's own quantizer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ARCHS = {"llama": "LLAMA", "mistral": "LLAMA", "qwen2": "QWEN2", "qwen3": "QWEN3"}
PERMUTE_QK = {"llama", "mistral"}  # llama.cpp's rope kernel wants these rows interleaved
GGUFPY_TYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1"}
FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
              "q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1"}
LLAMA_CPP_TYPES = {"q4_k_m": "Q4_K_M", "q4_k_s": "Q4_K_S", "q5_k_m": "Q5_K_M", "q5_k_s": "Q5_K_S",
                   "q6_k": "Q6_K", "q3_k_m": "Q3_K_M", "q2_k": "Q2_K"}


class ExportError(Exception):
    pass


def _pre_tokenizer_name(tokenizer_json: dict[str, Any]) -> str:
    """The `tokenizer.ggml.pre` llama.cpp needs to split text as this tokenizer does."""
    pre = json.dumps(tokenizer_json.get("pre_tokenizer") or {})
    if '"Digits"' in pre and '"individual_digits": true' in pre:
        return "smollm"
    if "\\\\p{N}{1,3}" in pre and "(?i:'s|'t|'re|'ve|'m|'ll|'d)" in pre:
        return "llama-bpe"
    if "\\\\p{N}|" in pre and "(?i:'s|'t|'re|'ve|'m|'ll|'d)" in pre:
        return "qwen2"
    if '"ByteLevel"' in pre and '"use_regex": true' in pre and '"Split"' not in pre:
        return "gpt-2"  # HF ByteLevel's built-in regex is GPT-2's
    return "default"


def tokenizer_metadata(model_dir: Path) -> dict[str, Any]:
    """Tokens, types, pre-tokenizer name and BOS use of the tokenizer training used (byte-level BPE only).

    Read from the tokenizer as transformers builds it (its class may replace the
    file's pre-tokenizer, as Qwen2Tokenizer does), not from tokenizer.json alone.
    """
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    backend = getattr(tokenizer._tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(f"{model_dir}: only fast (tokenizer.json) tokenizers are exported to GGUF")
    tj = json.loads(backend.to_str())
    model = tj.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ExportError("only byte-level BPE tokenizers (Llama 3, SmolLM, Qwen) are exported to GGUF; "
                          "SentencePiece-style tokenizers (Llama 2, Mistral 7B, Gemma) are not supported yet")
    vocab: dict[str, int] = dict(model["vocab"])
    specials: dict[int, bool] = {}
    for added in tj.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        specials[added["id"]] = bool(added.get("special"))
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [5] * size  # UNUSED until filled
    for token, idx in vocab.items():
        tokens[idx] = token
        types[idx] = 3 if specials.get(idx) else 4 if idx in specials else 1  # CONTROL / USER_DEFINED / NORMAL
    bos = tokenizer.bos_token_id
    return {"tokens": tokens, "types": types, "model": "gpt2", "pre": _pre_tokenizer_name(tj),
            "add_bos": bos is not None and tokenizer.encode("a")[:1] == [bos]}


@dataclass(frozen=True)
class LazyTensor:
    """One tensor of a .safetensors file, read (memory-mapped) only when converted."""

    path: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    def load(self) -> np.ndarray:
        raw = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self.start, shape=(self.end - self.start,))
        if self.dtype == "BF16":
            arr = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif self.dtype in SAFETENSORS_FLOATS:
            arr = np.frombuffer(raw, SAFETENSORS_FLOATS[self.dtype]).astype(np.float32)
        else:
            raise ExportError(f"unsupported tensor dtype {self.dtype} in {self.path.name}")
        return arr.reshape(self.shape)


SAFETENSORS_FLOATS = {"F32": np.float32, "F16": np.float16, "F64": np.float64}


def _load_weights(model_dir: Path) -> dict[str, LazyTensor]:
    """Tensor index of every .safetensors file (header only: nothing is read yet)."""
    weights: dict[str, LazyTensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            weights[name] = LazyTensor(f, info["dtype"], tuple(info["shape"]), 8 + n + begin, 8 + n + end)
    if not weights:
        raise ExportError(f"{model_dir} has no .safetensors weights")
    return weights


def _plan(weights: dict[str, Any], config: dict[str, Any], outtype: str, name_map: Any) -> list[tuple[str, str, Any]]:
    """[(hf name, gguf name, ggml type)] for every tensor, in the order they will be written."""
    import gguf

    T = gguf.GGMLQuantizationType
    main = T[GGUFPY_TYPES[outtype]]
    plan = []
    for hf_name in sorted(weights, key=_tensor_order):
        if hf_name.endswith((".scales", ".biases")):
            raise ExportError(f"{hf_name}: the model is still quantized; fuse with `fuse: {{dequantize: true}}`")
        if "rotary_emb" in hf_name:
            continue
        if hf_name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ExportError(f"no GGUF name for tensor {hf_name!r}")
        shape = weights[hf_name].shape
        if len(shape) < 2 or shape[-1] % 32 != 0:
            qtype = T.F32
        elif main in (T.Q4_0, T.Q4_1) and gguf_name in ("token_embd.weight", "output.weight"):
            qtype = T.Q8_0  # as llama-quantize does: keep embeddings and output at higher precision
        else:
            qtype = main
        plan.append((hf_name, gguf_name, qtype))
    return plan


def _tensor_order(name: str) -> tuple:
    parts = name.split(".")
    layer = int(parts[2]) if len(parts) > 2 and parts[1] == "layers" and parts[2].isdigit() else -1
    return (0 if "embed" in name else 2 if layer < 0 else 1, layer, name)


def _convert(tensor: LazyTensor, hf_name: str, config: dict[str, Any], arch: str, qtype: Any) -> np.ndarray:
    import gguf

    from lorad.gguf_import import permute_rows

    arr = tensor.load()
    if arch in PERMUTE_QK and (".q_proj." in hf_name or ".k_proj." in hf_name) and hf_name.endswith("weight"):
        heads = config["num_attention_heads"] if ".q_proj." in hf_name else config.get("num_key_value_heads", config["num_attention_heads"])
        arr = permute_rows(arr, heads)
    T = gguf.GGMLQuantizationType
    if qtype == T.F32:
        return arr
    if qtype == T.F16:
        return arr.astype(np.float16)
    return gguf.quants.quantize(arr, qtype)


def write_gguf(model_dir: Path, out_path: Path, outtype: str = "f16", name: str | None = None) -> dict[str, Any]:
    """Write model_dir as GGUF at out_path (temp name, then rename); returns a summary."""
    import gguf

    if outtype not in GGUFPY_TYPES:
        raise ExportError(f"gguf.outtype {outtype!r} is written by llama.cpp's quantizer, not here")
    config = json.loads((model_dir / "config.json").read_text())
    model_type = config.get("model_type")
    if model_type not in ARCHS:
        raise ExportError(f"model_type {model_type!r} cannot be exported to GGUF yet (supported: {', '.join(sorted(ARCHS))})")
    if "quantization" in config:
        raise ExportError("the model is quantized; fuse with `fuse: {dequantize: true}` before GGUF export")
    arch_enum = getattr(gguf.MODEL_ARCH, ARCHS[model_type])
    arch = gguf.MODEL_ARCH_NAMES[arch_enum]
    n_layers = config["num_hidden_layers"]
    name_map = gguf.get_tensor_name_map(arch_enum, n_layers)
    tok = tokenizer_metadata(model_dir)
    weights = _load_weights(model_dir)
    plan = _plan(weights, config, outtype, name_map)

    tmp = out_path.with_name(f".{out_path.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    n_head = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    writer.add_name(name or model_dir.name)
    writer.add_context_length(config.get("max_position_embeddings", 4096))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(config.get("num_key_value_heads", n_head))
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-5))
    writer.add_rope_freq_base(config.get("rope_theta", 10000.0))
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(len(tok["tokens"]))
    writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[outtype]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_tokenizer_model(tok["model"])
    writer.add_tokenizer_pre(tok["pre"])
    writer.add_token_list(tok["tokens"])
    writer.add_token_types(tok["types"])
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tok["tokens"]))
    # say explicitly whether a BOS is added (llama.cpp's default differs by architecture): as in training
    special.add_special_token["bos"] = tok["add_bos"]
    special.add_to_gguf(writer, quiet=True)

    for hf_name, gguf_name, qtype in plan:
        shape = list(weights[hf_name].shape)
        if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            dtype = np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16
            nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
            writer.add_tensor_info(gguf_name, shape, np.dtype(dtype), nbytes)
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
            writer.add_tensor_info(gguf_name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for hf_name, _gguf_name, qtype in plan:
        writer.write_tensor_data(_convert(weights.pop(hf_name), hf_name, config, model_type, qtype))
    writer.close()
    os.replace(tmp, out_path)
    return {"architecture": arch, "outtype": outtype, "tensors": len(plan), "pre_tokenizer": tok["pre"],
            "vocab": len(tok["tokens"]), "bytes": out_path.stat().st_size,
            "chat_template": bool(special.chat_template)}


def quantize_with_llama_cpp(src: Path, dest: Path, outtype: str) -> None:
    """K-quants (q4_k_m, ...) with llama.cpp's own quantizer, from an f16 GGUF."""
    try:
        import llama_cpp
    except ImportError:
        raise ExportError(f"gguf.outtype {outtype} needs llama.cpp's quantizer: `lorad install-llama` "
                          "(llama-cpp-python), or choose q8_0, q4_0, q4_1, f16, bf16 or f32") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{LLAMA_CPP_TYPES[outtype]}")
    tmp = dest.with_name(f".{dest.name}.tmp")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise ExportError(f"llama.cpp's quantizer failed ({rc}) for {outtype}")
    os.replace(tmp, dest)


def _mlx_logits(model_dir: Path, tokens: list[int]) -> np.ndarray:
    import mlx.core as mx
    from mlx_lm import load

    model, _ = load(str(model_dir))
    out = model(mx.array([tokens]))[0].astype(mx.float32)
    return np.array(out)


def compare_with_llama_cpp(gguf_path: Path, model_dir: Path, prompt: str) -> dict[str, Any]:
    """Run the same tokens through llama.cpp and MLX; logits agreement and tokenizer agreement."""
    import llama_cpp
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    tokens = tokenizer.encode(prompt)
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=max(64, len(tokens) + 8), logits_all=True,
                          n_threads=max(1, os.cpu_count() or 1), verbose=False)
    llm_tokens = llm.tokenize(prompt.encode(), add_bos=True, special=True)  # BOS only where the model adds one
    llm.eval(tokens)
    ref = _mlx_logits(model_dir, tokens)
    got = np.array(llm.scores[: len(tokens)], dtype=np.float32)
    diff = np.abs(got - ref)
    top1 = float(np.mean(got.argmax(-1) == ref.argmax(-1)))
    return {
        "tokens": len(tokens),
        "max_abs_diff": round(float(diff.max()), 5),
        "mean_abs_diff": round(float(diff.mean()), 6),
        "logit_scale": round(float(np.abs(ref).max()), 4),
        "top1_agreement": round(top1, 4),
        "tokenizer_agrees": llm_tokens == tokens,
    }


def iter_gguf_metadata(path: Path) -> Iterator[tuple[str, Any]]:
    """(key, value) pairs of a GGUF file's metadata, strings decoded (for tests and `lorad` checks)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    for key, field in reader.fields.items():
        yield key, field.contents()
