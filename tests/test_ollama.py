"""Ollama: the Modelfile in a GGUF artifact, and ``phi-export push OUT ollama://HOST:PORT/NAME``
against a stand-in Ollama server on loopback that implements the documented endpoints
(HEAD/POST /api/blobs/sha256:..., POST /api/create streaming status lines, POST /api/show)."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip("gguf")

from phi_edge.exporter.cli import main  # noqa: E402
from phi_edge.exporter.deploy.push import parse_destination, push  # noqa: E402
from phi_edge.exporter.formats.gguf import modelfile  # noqa: E402
from phi_edge.runtimes.errors import PhiEdgeError  # noqa: E402
from phi_edge.runtimes.manifest import MANIFEST_NAME, read_manifest  # noqa: E402


class FakeOllama:
    """Just enough of Ollama's REST API (docs/api.md), checking the digest of every uploaded blob."""

    def __init__(self):
        self.blobs: dict[str, bytes] = {}
        self.models: dict[str, dict] = {}
        self.uploads = 0
        self.cut_next_upload = False  # read half the blob, then drop the connection
        self.create_error: str | None = None  # answer /api/create with this error
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _reply(self, status: int, body: dict | None = None) -> None:
                data = json.dumps(body).encode() if body is not None else b""
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _digest(self) -> str | None:
                prefix = "/api/blobs/sha256:"
                return self.path[len(prefix):] if self.path.startswith(prefix) else None

            def do_HEAD(self):
                digest = self._digest()
                self._reply(200 if digest in fake.blobs else 404)

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                digest = self._digest()
                if digest is not None:
                    fake.uploads += 1
                    h, data, left = hashlib.sha256(), bytearray(), length
                    if fake.cut_next_upload:
                        fake.cut_next_upload = False
                        self.rfile.read(length // 2)
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                    while left > 0:  # bounded: at most Content-Length bytes
                        block = self.rfile.read(min(left, 1 << 16))
                        if not block:
                            break
                        h.update(block)
                        data += block
                        left -= len(block)
                    if h.hexdigest() != digest:
                        return self._reply(400, {"error": "digest mismatch, expected " + digest})
                    fake.blobs[digest] = bytes(data)
                    return self._reply(201)
                body = json.loads(self.rfile.read(length) or b"{}")
                if self.path == "/api/create":
                    return self._create(body)
                if self.path == "/api/show":
                    model = fake.models.get(body.get("model"))
                    if model is None:
                        return self._reply(404, {"error": f"model '{body.get('model')}' not found"})
                    params = "\n".join(f"{k:<30} {json.dumps(v)}" for k, vs in model["parameters"].items()
                                       for v in (vs if isinstance(vs, list) else [vs]))
                    return self._reply(200, {"template": model["template"], "parameters": params,
                                             "details": {"format": "gguf", "family": "phi3"}})
                self._reply(404, {"error": "not found"})

            def _create(self, body: dict) -> None:
                if fake.create_error:
                    return self._reply(500, {"error": fake.create_error})
                missing = [d for d in body.get("files", {}).values() if d.removeprefix("sha256:") not in fake.blobs]
                if not body.get("files") or missing:
                    return self._reply(400, {"error": f"blob {missing} not found"})
                lines = [{"status": "parsing GGUF"}]
                lines += [{"status": f"using existing layer {d}"} for d in body["files"].values()]
                lines += [{"status": "writing manifest"}, {"status": "success"}]
                data = b"".join(json.dumps(x).encode() + b"\n" for x in lines)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-ndjson")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                fake.models[body["model"]] = body

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda *a: None  # the cut upload's broken socket is expected
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def start(self) -> "FakeOllama":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    def dest(self, name: str) -> str:
        return f"ollama://127.0.0.1:{self.port}/{name}"


@pytest.fixture
def ollama():
    server = FakeOllama().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def artifact(exported):
    return exported("ollama", "fp16")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(*args: str):
    return CliRunner().invoke(main, ["push", *args])


# ---- Modelfile ---------------------------------------------------------------------------------

def test_modelfile_in_the_gguf_artifact(artifact):
    m = read_manifest(artifact, verify=True)
    assert "Modelfile" in [e.path for e in m.files]  # listed, with its sha256
    text = (artifact / "Modelfile").read_text()
    lines = text.splitlines()
    assert lines[0] == f"FROM ./{m.runtime['gguf_file']}" == "FROM ./model.gguf"
    assert f'TEMPLATE """{modelfile.PHI3_TEMPLATE}"""' in text
    assert "<|user|>\n{{ .Content }}" not in text  # the role is the message's own
    assert "{{ range .Messages }}" in text.replace("{{-", "{{")
    assert "<|{{ .Role }}|>\n{{ .Content }}<|end|>\n" in text and text.count("<|assistant|>\n") == 1
    for stop in ("<|end|>", "<|user|>", "<|assistant|>", "<|system|>", "<|endoftext|>"):
        assert f'PARAMETER stop "{stop}"' in lines
    assert f"PARAMETER num_ctx {m.context_length}" in lines
    assert [x for x in lines if x.startswith("PARAMETER num_ctx")] == [f"PARAMETER num_ctx {m.context_length}"]


def test_modelfile_families():
    phi4 = modelfile.render("model.gguf", "phi4-mini", 8192)
    assert 'TEMPLATE """{{- range .Messages }}<|{{ .Role }}|>{{ .Content }}<|end|>{{ end }}<|assistant|>"""' in phi4
    assert "PARAMETER num_ctx 8192" in phi4.splitlines() and "\n<|" not in phi4
    for family in ("phi3", "phi3-128k"):
        text = modelfile.render("x.gguf", family, 4096)
        assert text.startswith("FROM ./x.gguf\n") and modelfile.PHI3_TEMPLATE in text
        assert "PARAMETER num_ctx 4096" in text.splitlines()
    assert modelfile.parameters(2048) == {"stop": list(modelfile.STOPS), "num_ctx": 2048}


# ---- push to Ollama ----------------------------------------------------------------------------

def test_destination_form():
    d = parse_destination("ollama://localhost:11434/my-phi")
    assert (d.scheme, d.host, d.port, d.path, str(d)) == ("ollama", "localhost", 11434, "my-phi",
                                                          "ollama://localhost:11434/my-phi")
    d = parse_destination("ollama://gpu-box/me/phi:q4")
    assert (d.host, d.port, d.path, str(d)) == ("gpu-box", None, "me/phi:q4", "ollama://gpu-box:11434/me/phi:q4")
    for bad in ("ollama://host", "ollama://host/", "ollama://host:x/name", "ollama://u@host/name",
                "ollama://host/bad name"):
        with pytest.raises(PhiEdgeError):
            parse_destination(bad)


def test_push_creates_the_model_then_skips_the_upload(artifact, ollama):
    m = read_manifest(artifact)
    digest = next(e.sha256 for e in m.files if e.path == "model.gguf")
    r = run(str(artifact), ollama.dest("my-phi"), "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["blob"] == "sent" and report["bytes_sent"] == (artifact / "model.gguf").stat().st_size
    assert report["statuses"][-1] == "success" and report["digest"] == f"sha256:{digest}"
    assert ollama.blobs[digest] == (artifact / "model.gguf").read_bytes()
    created = ollama.models["my-phi"]
    assert created["files"] == {"model.gguf": f"sha256:{digest}"}
    assert created["template"] == modelfile.PHI3_TEMPLATE
    assert created["parameters"] == {"stop": list(modelfile.STOPS), "num_ctx": m.context_length}
    assert report["show"]["template"] == modelfile.PHI3_TEMPLATE
    # again: Ollama has the blob (HEAD 200), so only the model is (re)created
    r = run(str(artifact), ollama.dest("my-phi-2"))
    assert r.exit_code == 0, r.output
    assert ollama.uploads == 1 and "already there" in r.stdout and "ollama run my-phi-2" in r.stdout
    assert set(ollama.models) == {"my-phi", "my-phi-2"}


def test_cut_upload_fails_cleanly_and_a_rerun_succeeds(artifact, ollama, monkeypatch):
    from phi_edge.exporter.deploy import ollama as transport

    monkeypatch.setattr(transport, "CHUNK", 1 << 16)  # many chunks: the server drops the connection midway
    ollama.cut_next_upload = True
    r = run(str(artifact), ollama.dest("cut"))
    assert r.exit_code == 1
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: the upload of model.gguf")
    assert "rerun" in err and f"127.0.0.1:{ollama.port}" in err
    assert ollama.blobs == {} and ollama.models == {}  # nothing half-created
    sizes, started = [], []
    report = push(artifact, ollama.dest("cut"), on_start=started.append, on_bytes=sizes.append)
    assert report["blob"] == "sent" and "cut" in ollama.models and ollama.uploads == 2
    size = (artifact / "model.gguf").stat().st_size
    assert started == [size] and sum(sizes) == size and max(sizes) == 1 << 16  # streamed in chunks


def test_unreachable_host_is_one_line_naming_host_and_port(artifact):
    port = free_port()
    r = run(str(artifact), f"ollama://127.0.0.1:{port}/my-phi")
    assert r.exit_code == 1
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert f"127.0.0.1:{port}" in err and "ollama serve" in err
    r = run(str(artifact), "ollama://no-such-host.invalid/my-phi")
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "no-such-host.invalid:11434" in r.stderr and "does not resolve" in r.stderr


def test_server_error_is_quoted(artifact, ollama):
    ollama.create_error = "unsupported architecture \"phi3\" in this build"
    r = run(str(artifact), ollama.dest("my-phi"))
    assert r.exit_code == 1
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1
    assert '"unsupported architecture "phi3" in this build"' in err and "HTTP 500" in err
    assert ollama.models == {}


def test_non_gguf_artifact_is_refused(exported, ollama):
    onnx = exported("cpu", "fp32")
    r = run(str(onnx), ollama.dest("my-phi"))
    assert r.exit_code == 1
    assert "--target ollama" in r.stderr and "onnx-genai" in r.stderr
    assert ollama.uploads == 0 and ollama.models == {}


def test_changed_gguf_is_caught_before_sending(artifact, ollama, tmp_path):
    copy = Path(shutil.copytree(artifact, tmp_path / "art"))
    with open(copy / "model.gguf", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    r = run(str(copy), ollama.dest("my-phi"))
    assert r.exit_code == 1 and "sha256" in r.stderr
    assert ollama.uploads == 0 and (copy / MANIFEST_NAME).is_file()
