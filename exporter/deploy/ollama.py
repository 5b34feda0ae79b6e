"""``phi-export push OUT ollama://HOST[:PORT]/NAME``: a GGUF artifact into an Ollama server over its REST API."""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import time
from pathlib import Path
from typing import Any, Callable

from phi_edge.runtimes.errors import PhiEdgeError
from phi_edge.runtimes.manifest import Manifest

DEFAULT_PORT = 11434
CHUNK = 1 << 20
CONNECT_TIMEOUT = 15.0
# Ollama answers a blob upload only after hashing it, and /api/create may copy a large blob:
# the longest wait for any one read (each read, not the whole exchange)
READ_TIMEOUT = 900.0
MAX_STATUS_LINES = 100_000


class OllamaClient:
    """The few endpoints of Ollama's REST API (docs/api.md) a push needs, on http.client."""

    def __init__(self, host: str, port: int = DEFAULT_PORT, timeout: float = READ_TIMEOUT):
        self.host, self.port, self.timeout = host, port, timeout
        self.label = f"{'[' + host + ']' if ':' in host else host}:{port}"

    # ---- plumbing -------------------------------------------------------------------------------
    def _connect(self) -> http.client.HTTPConnection:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=CONNECT_TIMEOUT)
        try:
            conn.connect()
        except OSError as e:
            conn.close()
            why = "timed out" if isinstance(e, socket.timeout) else e.strerror or type(e).__name__
            if isinstance(e, socket.gaierror):
                raise PhiEdgeError(f"cannot reach Ollama at {self.label}: the host name does not resolve ({why}); "
                                   f"check the host in ollama://HOST[:PORT]/NAME") from None
            raise PhiEdgeError(f"cannot reach Ollama at {self.label} ({why}): start it there with 'ollama serve' "
                               f"(OLLAMA_HOST=0.0.0.0:{self.port} to accept other machines) and check the host "
                               f"and port") from None
        conn.sock.settimeout(self.timeout)
        return conn

    def _error(self, what: str, resp: http.client.HTTPResponse, body: bytes) -> PhiEdgeError:
        message = body.decode("utf-8", "replace").strip()
        try:
            message = json.loads(message).get("error") or message
        except (ValueError, AttributeError):
            pass
        message = " ".join(str(message).split())[:500] or resp.reason
        return PhiEdgeError(f"Ollama at {self.label} refused {what} (HTTP {resp.status}): \"{message}\"")

    def _json(self, method: str, path: str, body: dict[str, Any] | None, what: str) -> dict[str, Any]:
        conn = self._connect()
        try:
            data = json.dumps(body).encode() if body is not None else None
            try:
                conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                raw = resp.read()
            except (OSError, http.client.HTTPException) as e:
                raise PhiEdgeError(f"the connection to Ollama at {self.label} broke during {what} "
                                   f"({type(e).__name__}: {e}); rerun the same command") from None
            if resp.status >= 300:
                raise self._error(what, resp, raw)
            try:
                return json.loads(raw or b"{}")
            except ValueError:
                raise PhiEdgeError(f"Ollama at {self.label} answered {what} with something other than JSON: "
                                   f"{raw[:200]!r}") from None
        finally:
            conn.close()

    # ---- endpoints ------------------------------------------------------------------------------
    def has_blob(self, digest: str) -> bool:
        """HEAD /api/blobs/sha256:<hex>: 200 the blob exists, 404 it does not."""
        conn = self._connect()
        try:
            try:
                conn.request("HEAD", f"/api/blobs/sha256:{digest}")
                resp = conn.getresponse()
                resp.read()
            except (OSError, http.client.HTTPException) as e:
                raise PhiEdgeError(f"the connection to Ollama at {self.label} broke while checking for the blob "
                                   f"({type(e).__name__}); rerun the same command") from None
            if resp.status == 200:
                return True
            if resp.status == 404:
                return False
            raise self._error("the blob check", resp, b"")
        finally:
            conn.close()

    def push_blob(self, path: Path, digest: str, size: int, on_bytes: Callable[[int], None]) -> int:
        """POST /api/blobs/sha256:<hex> with the file streamed in chunks (201 created; 400 digest
        mismatch). Ollama writes the blob under a temporary name and keeps it only when every byte
        arrived with this digest, so a cut upload leaves nothing behind. Returns the bytes sent."""
        conn = self._connect()
        sent = 0
        h = hashlib.sha256()
        try:
            try:
                conn.putrequest("POST", f"/api/blobs/sha256:{digest}")
                conn.putheader("Content-Type", "application/octet-stream")
                conn.putheader("Content-Length", str(size))
                conn.endheaders()
                with open(path, "rb") as f:
                    while block := f.read(CHUNK):
                        conn.send(block)
                        h.update(block)
                        sent += len(block)
                        on_bytes(len(block))
                resp = conn.getresponse()
                raw = resp.read()
            except (OSError, http.client.HTTPException) as e:
                raise PhiEdgeError(f"the upload of {path.name} to Ollama at {self.label} stopped after {sent} of "
                                   f"{size} bytes ({type(e).__name__}: {e}); Ollama keeps no partial blob and "
                                   f"no model was created: rerun the same command") from None
            if sent != size or h.hexdigest() != digest:
                raise PhiEdgeError(f"{path.name} changed while it was sent (now {sent} bytes, sha256 "
                                   f"{h.hexdigest()[:12]}..., manifest {digest[:12]}...); re-export the artifact")
            if resp.status >= 300:
                raise self._error(f"the upload of {path.name}", resp, raw)
            return sent
        finally:
            conn.close()

    def create(self, body: dict[str, Any], on_status: Callable[[str], None]) -> list[str]:
        """POST /api/create, reading its stream of JSON status lines until {"status": "success"}."""
        conn = self._connect()
        statuses: list[str] = []
        try:
            try:
                conn.request("POST", "/api/create", body=json.dumps(body).encode(),
                             headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                if resp.status >= 300:
                    raise self._error(f"creating model '{body['model']}'", resp, resp.read())
                for _ in range(MAX_STATUS_LINES):
                    line = resp.readline()
                    if not line:
                        break
                    if not line.strip():
                        continue
                    try:
                        item = json.loads(line)
                    except ValueError:
                        raise PhiEdgeError(f"Ollama at {self.label} sent a status line that is not JSON while "
                                           f"creating '{body['model']}': {line[:200]!r}") from None
                    if item.get("error"):
                        message = " ".join(str(item["error"]).split())[:500]
                        raise PhiEdgeError(f"Ollama at {self.label} could not create model '{body['model']}': "
                                           f"\"{message}\"")
                    status = str(item.get("status", ""))
                    statuses.append(status)
                    on_status(status)
                    if status == "success":
                        return statuses
            except (OSError, http.client.HTTPException) as e:
                raise PhiEdgeError(f"the connection to Ollama at {self.label} broke while it created model "
                                   f"'{body['model']}' ({type(e).__name__}); rerun the same command (the blob is "
                                   f"already there)") from None
            last = statuses[-1] if statuses else "nothing"
            raise PhiEdgeError(f"Ollama at {self.label} ended the create of '{body['model']}' without success "
                               f"(last status: {last}); rerun the same command")
        finally:
            conn.close()

    def show(self, name: str) -> dict[str, Any]:
        """POST /api/show {"model": NAME}: the model's template, parameters and details."""
        return self._json("POST", "/api/show", {"model": name}, f"showing model '{name}'")


def push_ollama(folder: Path, manifest: Manifest, host: str, port: int | None, name: str,
                on_start: Callable[[int], None], on_bytes: Callable[[int], None]) -> dict[str, Any]:
    """Send the artifact's gguf file as a blob (unless Ollama has it), create NAME from it with the
    family's template and parameters, and check that Ollama shows it. ``manifest`` was read with
    every sha256 checked, so its sha256 of the gguf file is the blob's digest."""
    if manifest.format != "gguf":
        raise PhiEdgeError(f"'{folder}' is a {manifest.format} artifact (target {manifest.target}); Ollama runs "
                           f"GGUF files: export with --target ollama and push that folder")
    from ..formats.gguf import modelfile

    start = time.perf_counter()
    gguf_file = manifest.runtime.get("gguf_file") or "model.gguf"
    entry = next((e for e in manifest.files if e.path == gguf_file), None)
    if entry is None:
        raise PhiEdgeError(f"the manifest of '{folder}' lists no {gguf_file}; re-export with --target ollama")
    client = OllamaClient(host, port or DEFAULT_PORT)
    report: dict[str, Any] = {"destination": f"ollama://{client.label}/{name}", "ollama": True, "model": name,
                              "artifact": str(folder), "digest": f"sha256:{entry.sha256}", "total_bytes": entry.size,
                              "bytes_sent": 0, "blob": "", "statuses": [], "device_verify": None}
    if client.has_blob(entry.sha256):
        report["blob"] = "already there"
    else:
        on_start(entry.size)
        report["bytes_sent"] = client.push_blob(folder / gguf_file, entry.sha256, entry.size, on_bytes)
        report["blob"] = "sent"
    # The current /api/create form (Ollama >= 0.5.5, docs/api.md "Create a model from GGUF"): "files"
    # maps the file name to the blob's digest and the Modelfile's commands come as fields; the old
    # {"modelfile": "FROM @sha256:..."} form is no longer documented.
    body = {"model": name, "files": {gguf_file: f"sha256:{entry.sha256}"},
            "template": modelfile.template(manifest.family),
            "parameters": modelfile.parameters(manifest.context_length), "stream": True}
    report["statuses"] = client.create(body, lambda s: None)
    shown = client.show(name)
    report["show"] = {"template": shown.get("template"), "parameters": shown.get("parameters"),
                      "details": shown.get("details")}
    report["seconds"] = round(time.perf_counter() - start, 3)
    return report
