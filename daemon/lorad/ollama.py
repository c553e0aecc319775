"""Ollama: the Modelfile (Go TEMPLATE + stop tokens) and its documented REST API.

Endpoints used (docs/api.md): GET /api/version, HEAD and POST
/api/blobs/sha256:<hex>, POST /api/create with {model, files, template,
parameters, system, stream}, whose answer is a stream of JSON status lines
ending in {"status": "success"}.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DEFAULT_HOST = "http://127.0.0.1:11434"

TEMPLATES = {
    # Ollama's own template/chatml.gotmpl, with the system turn optional
    "chatml": (
        "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
        "<|im_start|>assistant\n"
    ),
    # template/llama3-instruct.gotmpl (BOS is added by llama.cpp itself)
    "llama3": (
        "{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
}
STOPS = {
    "chatml": ["<|im_start|>", "<|im_end|>"],
    "llama3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
}


class OllamaError(Exception):
    pass


def chat_family(chat_template: str | None) -> str | None:
    if not chat_template:
        return None
    if "<|im_start|>" in chat_template:
        return "chatml"
    if "<|start_header_id|>" in chat_template:
        return "llama3"
    return None


def default_system(render: Any, family: str | None) -> str | None:
    """The system prompt a chat template inserts on its own (SmolLM, Qwen do), so Ollama's matches training."""
    if family is None:
        return None
    text = render([{"role": "user", "content": "\x00"}])
    head = text.split("\x00")[0]
    if family == "chatml" and "<|im_start|>system\n" in head:
        return head.split("<|im_start|>system\n", 1)[1].split("<|im_end|>", 1)[0] or None
    if family == "llama3" and "<|start_header_id|>system<|end_header_id|>\n\n" in head:
        return head.split("<|start_header_id|>system<|end_header_id|>\n\n", 1)[1].split("<|eot_id|>", 1)[0].strip() or None
    return None


def stop_tokens(family: str | None, eos_tokens: list[str]) -> list[str]:
    stops = list(STOPS.get(family or "", []))
    for tok in eos_tokens:
        if tok and tok not in stops:
            stops.append(tok)
    return stops


def _quote(text: str) -> str:
    """A Modelfile value that Ollama's parser (parser/parser.go) reads back exactly.

    That parser has no escapes: a triple-quoted value ends at the first \"\"\" followed by
    whitespace, and it silently drops characters Go's strconv.IsPrint rejects. So a value with
    three quotes in a row, or with any non-printable character but tab and newline, cannot be
    written faithfully; it is refused rather than written as something else.
    """
    if '"""' in text:
        raise OllamaError(f"{text[:40]!r}…: three double quotes in a row cannot be written into a Modelfile")
    bad = next((c for c in text if not c.isprintable() and c not in "\t\n"), None)
    if bad is not None:
        raise OllamaError(f"{text[:40]!r}…: character U+{ord(bad):04X} cannot be written into a Modelfile")
    return '"""' + text + '"""'


def modelfile(gguf_name: str, template: str | None, stops: list[str], system: str | None,
              parameters: dict[str, Any] | None = None) -> str:
    lines = [f"FROM ./{gguf_name}"]
    if template:
        lines.append(f"TEMPLATE {_quote(template)}")
    for stop in stops:
        plain = stop.isprintable() and not any(c in stop for c in ' "')
        lines.append(f'PARAMETER stop "{stop}"' if plain else f"PARAMETER stop {_quote(stop)}")
    for key, value in (parameters or {}).items():
        lines.append(f"PARAMETER {key} {value}")
    if system:
        lines.append(f"SYSTEM {_quote(system)}")
    return "\n".join(lines) + "\n"


def resolve_host(host: str | None) -> str:
    """spec host, else $OLLAMA_HOST (which may lack a scheme or say 0.0.0.0), else the default."""
    host = host or os.environ.get("OLLAMA_HOST") or DEFAULT_HOST
    if "://" not in host:
        host = "http://" + host
    scheme, rest = host.split("://", 1)
    hostport = rest.split("/", 1)[0]
    if hostport.startswith("0.0.0.0"):
        hostport = "127.0.0.1" + hostport[len("0.0.0.0"):]
    if ":" not in hostport.rsplit("]", 1)[-1]:
        hostport += ":11434"
    return f"{scheme}://{hostport}"


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def _request(method: str, url: str, data: Any = None, headers: dict[str, str] | None = None, timeout: float = 30):
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    return urllib.request.urlopen(req, timeout=timeout)


def server_version(host: str, timeout: float = 3.0) -> str | None:
    try:
        with _request("GET", f"{host}/api/version", timeout=timeout) as r:
            answer = json.loads(r.read(65536) or b"{}")
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException):
        return None  # nothing there, or something that does not speak HTTP (BadStatusLine)
    return str(answer.get("version", "unknown")) if isinstance(answer, dict) else None


def has_blob(host: str, digest: str) -> bool:
    try:
        with _request("HEAD", f"{host}/api/blobs/{digest}"):
            return True
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return False
        raise OllamaError(f"HEAD /api/blobs/{digest}: HTTP {e.code}") from None


def push_blob(host: str, path: Path, digest: str) -> None:
    size = path.stat().st_size
    with open(path, "rb") as f:
        try:
            with _request("POST", f"{host}/api/blobs/{digest}", data=f, timeout=3600,
                          headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"}) as r:
                if r.status not in (200, 201):
                    raise OllamaError(f"POST /api/blobs/{digest}: HTTP {r.status}")
        except urllib.error.HTTPError as e:
            raise OllamaError(f"POST /api/blobs/{digest}: HTTP {e.code} {e.read()[:200]!r}") from None


def create(host: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """POST /api/create, yielding each streamed status object; raises on an error line or no success."""
    data = json.dumps({**body, "stream": True}).encode()
    try:
        resp = _request("POST", f"{host}/api/create", data=data, timeout=3600, headers={"Content-Type": "application/json"})
    except urllib.error.HTTPError as e:
        raise OllamaError(f"POST /api/create: HTTP {e.code} {e.read()[:300]!r}") from None
    success = False
    with resp:
        for line in resp:
            if not line.strip():
                continue
            msg = json.loads(line)
            if "error" in msg:
                raise OllamaError(f"ollama create: {msg['error']}")
            success = success or msg.get("status") == "success"
            yield msg
    if not success:
        raise OllamaError("ollama create ended without a success status")


def import_via_api(host: str, gguf: Path, model: str, template: str | None, stops: list[str],
                   system: str | None, log: Any) -> dict[str, Any]:
    try:
        return _import_via_api(host, gguf, model, template, stops, system, log)
    except (http.client.HTTPException, OSError, ValueError) as e:  # a server that stops making sense mid-way
        raise OllamaError(f"{host} broke off the import: {type(e).__name__}: {e}") from None


def _import_via_api(host: str, gguf: Path, model: str, template: str | None, stops: list[str],
                    system: str | None, log: Any) -> dict[str, Any]:
    digest = file_digest(gguf)
    uploaded = False
    if not has_blob(host, digest):
        push_blob(host, gguf, digest)
        uploaded = True
    log.info("ollama_blob", digest=digest, uploaded=uploaded, bytes=gguf.stat().st_size)
    body: dict[str, Any] = {"model": model, "files": {gguf.name: digest}, "parameters": {"stop": stops}}
    if template:
        body["template"] = template
    if system:
        body["system"] = system
    statuses = [m.get("status") for m in create(host, body)]
    return {"via": "api", "host": host, "digest": digest, "uploaded": uploaded, "statuses": statuses}


def import_via_cli(job_dir: Path, model: str) -> dict[str, Any] | None:
    exe = shutil.which("ollama")
    if exe is None:
        return None
    out = subprocess.run([exe, "create", model, "-f", "Modelfile"], cwd=job_dir, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise OllamaError(f"`ollama create {model}` failed: {(out.stderr or out.stdout).strip()[-500:]}")
    return {"via": "cli", "command": f"ollama create {model} -f Modelfile"}
