"""A local HTTP server that follows Ollama's documented REST API (docs/api.md), strictly.

Only what lorad uses: GET /api/version; HEAD /api/blobs/:digest (200 or 404);
POST /api/blobs/:digest (201, or 400 when the body's sha256 differs);
POST /api/create {model, files, adapters?, template?, system?, parameters?, stream?}
answering a stream of {"status": ...} lines ending in {"status": "success"}, or
{"error": ...} for an unknown blob. Every request is recorded for the tests.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

CREATE_KEYS = {"model", "from", "files", "adapters", "template", "license", "system", "parameters",
               "messages", "quantize", "stream", "renderer", "parser"}


class FakeOllama:
    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.models: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str]] = []
        self.create_bodies: list[dict[str, Any]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _json(self, code: int, obj: Any) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                server.requests.append(("GET", self.path))
                if self.path == "/api/version":
                    return self._json(200, {"version": "0.33.0"})
                self._json(404, {"error": "not found"})

            def do_HEAD(self) -> None:
                server.requests.append(("HEAD", self.path))
                digest = self.path.removeprefix("/api/blobs/")
                self.send_response(200 if self.path.startswith("/api/blobs/") and digest in server.blobs else 404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_POST(self) -> None:
                server.requests.append(("POST", self.path))
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                if self.path.startswith("/api/blobs/"):
                    digest = self.path.removeprefix("/api/blobs/")
                    if not digest.startswith("sha256:") or "sha256:" + hashlib.sha256(body).hexdigest() != digest:
                        return self._json(400, {"error": "digest mismatch"})
                    server.blobs[digest] = body
                    self.send_response(201)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if self.path == "/api/create":
                    req = json.loads(body)
                    server.create_bodies.append(req)
                    unknown = set(req) - CREATE_KEYS
                    if unknown or "model" not in req:
                        return self._json(400, {"error": f"invalid request: {sorted(unknown) or 'model missing'}"})
                    missing = [d for d in (req.get("files") or {}).values() if d not in server.blobs]
                    self.send_response(200)
                    self.send_header("Content-Type", "application/x-ndjson")
                    self.end_headers()
                    lines = [{"status": "parsing GGUF"}]
                    if missing:
                        lines.append({"error": f"blob {missing[0]} not found"})
                    else:
                        lines += [{"status": f"using existing layer {d}"} for d in req.get("files", {}).values()]
                        lines += [{"status": "writing manifest"}, {"status": "success"}]
                        server.models[req["model"]] = req
                    for line in lines:
                        self.wfile.write((json.dumps(line) + "\n").encode())
                    return
                self._json(404, {"error": "not found"})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FakeOllama:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
