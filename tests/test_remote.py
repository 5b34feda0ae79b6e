"""The remote backend: an OpenAI-compatible endpoint behind the same Runtime API. Against our own
server (same text as the artifact at temperature 0), against a stand-in that answers like the
providers do when things go wrong (401/403/404, 429 + Retry-After, 500, slow, a cut stream), and the
local-or-endpoint fallback."""

from __future__ import annotations

import importlib.util
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip("httpx")

from phi_edge.runtimes import PhiEdgeError, load  # noqa: E402
from phi_edge.runtimes.cli import main as phi_run  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
KEY = "sk-remote-5d1e2f3a4b"


def _serve_load():
    spec = importlib.util.spec_from_file_location("serve_load", REPO / "benchmarks" / "serve_load.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def artifact(exported):
    return exported("cpu", "fp32")


@pytest.fixture(scope="module")
def ours(artifact):
    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")
    serve_load = _serve_load()
    proc, url = serve_load.start_server(artifact, "--api-key", KEY)
    yield {"url": url + "/v1", "model": Path(artifact).name}
    serve_load.stop_server(proc)


@pytest.fixture(scope="module")
def local(artifact):
    return load(artifact)


def test_endpoint_matches_the_artifact_at_temperature_0(ours, local):
    rt = load(ours["url"], model=ours["model"], api_key=KEY)
    assert rt.source == "remote"
    for prompt in ("The sky is", "Hello there, how"):
        want = local.generate(prompt, max_new_tokens=16, temperature=0)
        got = rt.generate(prompt, max_new_tokens=16, temperature=0)
        assert got.text == want.text and got.finish_reason == want.finish_reason == "length"
        assert got.timings.prompt_tokens == len(want.prompt_token_ids) and got.timings.generated_tokens == 16
        assert got.timings.total_s >= got.timings.time_to_first_token_s > 0
    assert "".join(rt.stream("The sky is", max_new_tokens=16)) == local.generate("The sky is", max_new_tokens=16).text
    messages = [{"role": "user", "content": "Hi!"}]
    assert rt.chat(messages, max_new_tokens=8).text == local.chat(messages, max_new_tokens=8).text
    assert "".join(rt.chat(messages, stream=True, max_new_tokens=8)) == local.chat(messages, max_new_tokens=8).text


def test_endpoint_stop_strings_and_what_it_cannot_do(ours, local):
    rt = load(ours["url"], model=ours["model"], api_key=KEY)
    full = local.generate("The sky is", max_new_tokens=12).text
    stop = full.split()[3]
    # five stop strings: the first four go to the server, the fifth is applied here
    got = rt.generate("The sky is", max_new_tokens=12, stop=["zz1", "zz2", "zz3", "zz4", stop])
    want = local.generate("The sky is", max_new_tokens=12, stop=[stop])
    assert got.text == want.text == full[:full.index(stop)] and got.finish_reason == "stop"
    with pytest.raises(PhiEdgeError, match="not available from an HTTP endpoint"):
        rt.logits([1, 2, 3])
    with pytest.raises(PhiEdgeError, match="not available from an HTTP endpoint"):
        rt.encode("hi")
    with pytest.raises(PhiEdgeError, match="top_k"):
        rt.generate("hi", top_k=5)


def test_phi_run_url_json_never_shows_the_key(ours, local):
    r = CliRunner().invoke(phi_run, [ours["url"], "--model", ours["model"], "--api-key", KEY, "The sky is",
                                     "-n", "8", "--json"])
    assert r.exit_code == 0, r.output
    assert KEY not in r.output
    out = json.loads(r.stdout)
    assert out["source"] == "remote" and out["text"] == local.generate("The sky is", max_new_tokens=8).text
    r = CliRunner().invoke(phi_run, [ours["url"], "--model", ours["model"], "--api-key", "wrong-" + KEY, "Hi"])
    assert r.exit_code == 1 and "401" in r.output and KEY not in r.output


def test_fallback_local_when_it_fits_else_the_endpoint(ours, artifact, monkeypatch, tmp_path):
    from phi_edge.runtimes import fallback

    rt = load(artifact, fallback=ours["url"], model=ours["model"], api_key=KEY)
    assert rt.source == "local" and rt.fallback_reason is None and rt.manifest is not None
    monkeypatch.setattr(fallback, "available_ram_bytes", lambda: 1 << 20)  # 1 MiB free
    rt = load(artifact, fallback=ours["url"], model=ours["model"], api_key=KEY)
    assert rt.source == "remote" and "RAM" in rt.fallback_reason
    assert rt.generate("The sky is", max_new_tokens=6).text == load(artifact).generate("The sky is", max_new_tokens=6).text
    monkeypatch.undo()
    rt = load(tmp_path / "missing", fallback=ours["url"], model=ours["model"], api_key=KEY)
    assert rt.source == "remote" and "did not load" in rt.fallback_reason
    assert fallback.available_ram_bytes() > 0


def test_presets_name_the_documented_endpoints(monkeypatch):
    monkeypatch.setenv("NVIDIA_API_KEY", "nvapi-x")
    rt = load(None, provider="nvidia", model="microsoft/phi-3.5-mini-instruct")
    assert rt.url == "https://integrate.api.nvidia.com/v1" and rt._headers()["authorization"] == "Bearer nvapi-x"
    assert "nvapi-x" not in repr(rt)
    monkeypatch.delenv("GITHUB_TOKEN", raising=False)
    with pytest.raises(PhiEdgeError, match="set GITHUB_TOKEN"):
        load(None, provider="github", model="microsoft/Phi-4-mini-instruct")
    monkeypatch.setenv("GITHUB_TOKEN", "ghp-x")
    assert load(None, provider="github", model="microsoft/Phi-4-mini-instruct").url == \
        "https://models.github.ai/inference"
    assert load(None, provider="ollama", model="phi3").url == "http://localhost:11434/v1"
    monkeypatch.delenv("AZURE_INFERENCE_ENDPOINT", raising=False)
    with pytest.raises(PhiEdgeError, match="AZURE_INFERENCE_ENDPOINT"):
        load(None, provider="azure", model="Phi-4")
    with pytest.raises(PhiEdgeError, match="artifact folder"):
        load("some-folder", model="x")


# ---- a stand-in provider -------------------------------------------------------------------------

def _chunk(text=None, finish=None, usage=None, chat=True):
    choice = ({"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish} if chat else
              {"index": 0, "text": text or "", "finish_reason": finish})
    body = {"id": "x", "object": "chat.completion.chunk" if chat else "text_completion",
            "choices": [] if usage else [choice]}
    if usage:
        body["usage"] = usage
    return f"data: {json.dumps(body)}\n\n".encode()


class StandIn(BaseHTTPRequestHandler):
    calls: dict[str, int] = {}
    seen: dict[str, dict] = {}

    def log_message(self, *args):
        pass

    def _send(self, status, body=None, headers=()):
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        data = json.dumps(body or {}).encode()
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _stream(self, chunks, finish=True):
        try:
            self._write_stream(chunks, finish)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (the slow scenario)

    def _write_stream(self, chunks, finish):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        chat = self.path.split("?")[0].endswith("/chat/completions")
        for c in chunks:
            self.wfile.write(_chunk(c, chat=chat))
            self.wfile.flush()
        if finish:
            self.wfile.write(_chunk(finish="stop", chat=chat)
                             + _chunk(usage={"prompt_tokens": 3, "completion_tokens": 2}, chat=chat)
                             + b"data: [DONE]\n\n")
        self.close_connection = True

    def do_POST(self):
        scenario = self.path.strip("/").split("/")[0]
        n = StandIn.calls[scenario] = StandIn.calls.get(scenario, 0) + 1
        StandIn.seen[scenario] = {"headers": dict(self.headers), "path": self.path,
                                  "body": json.loads(self.rfile.read(int(self.headers["Content-Length"])))}
        key = self.headers.get("authorization", "").removeprefix("Bearer ")
        if scenario == "unauthorized":  # GitHub Models' shape, echoing the key as some servers do
            return self._send(401, {"error": {"code": "unauthorized", "message": f"Bad credentials {key}"}})
        if scenario == "forbidden":  # NVIDIA's problem+json shape
            return self._send(403, {"status": 403, "title": "Forbidden", "detail": "Authorization failed"})
        if scenario == "notfound":
            return self._send(404, {"error": {"code": "unknown_model", "message": "Unknown model: nope"}})
        if scenario == "ratelimit" and n == 1:
            return self._send(429, {"error": {"code": "RateLimitReached", "message": "Rate limit"}},
                              [("Retry-After", "1")])
        if scenario == "ratelimit-long":
            return self._send(429, {"error": {"message": "Rate limit"}}, [("Retry-After", "3600")])
        if scenario == "flaky" and n <= 2:
            return self._send(500, {"error": {"message": "internal"}}, [("Retry-After", "0")])
        if scenario == "down":
            return self._send(503, {"error": {"message": "overloaded"}}, [("Retry-After", "0")])
        if scenario == "slow":
            time.sleep(2)
        if scenario == "cut":
            return self._stream(["Hello", " wor"], finish=False)
        return self._stream(["Hello", " world"])


@pytest.fixture(scope="module")
def standin():
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def _rt(standin, scenario, **kw):
    return load(f"{standin}/{scenario}/v1", model="microsoft/Phi-4-mini-instruct", api_key=KEY, **kw)


def test_ok_stream_reads_usage(standin):
    r = _rt(standin, "ok").chat([{"role": "user", "content": "hi"}])
    assert r.text == "Hello world" and r.finish_reason == "stop"
    assert (r.timings.prompt_tokens, r.timings.generated_tokens) == (3, 2)
    assert StandIn.seen["ok"]["headers"]["authorization"] == f"Bearer {KEY}"
    assert StandIn.seen["ok"]["body"]["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("scenario, status, hint", [("unauthorized", "401", "PHI_EDGE_API_KEY"),
                                                     ("forbidden", "403", "access"),
                                                     ("notfound", "404", "model name")])
def test_auth_and_not_found_errors_say_what_to_check(standin, scenario, status, hint):
    with pytest.raises(PhiEdgeError) as e:
        _rt(standin, scenario).generate("hi")
    message = str(e.value)
    assert status in message and hint in message and KEY not in message
    assert StandIn.calls[scenario] == 1  # not retried


def test_429_retry_after_is_honoured(standin):
    start = time.monotonic()
    assert _rt(standin, "ratelimit").generate("hi").text == "Hello world"
    assert time.monotonic() - start >= 0.9 and StandIn.calls["ratelimit"] == 2
    with pytest.raises(PhiEdgeError, match="asks to wait 3600s"):
        _rt(standin, "ratelimit-long").generate("hi")


def test_5xx_is_retried_then_reported(standin):
    assert _rt(standin, "flaky").generate("hi").text == "Hello world" and StandIn.calls["flaky"] == 3
    with pytest.raises(PhiEdgeError, match="503 after 2 retries"):
        _rt(standin, "down", max_retries=2).generate("hi")
    assert StandIn.calls["down"] == 3


def test_slow_endpoint_times_out(standin):
    start = time.monotonic()
    with pytest.raises(PhiEdgeError, match="did not answer within 0.5s"):
        _rt(standin, "slow", timeout=0.5).generate("hi")
    assert time.monotonic() - start < 1.9


def test_a_cut_stream_is_an_error_not_a_short_answer(standin):
    rt = _rt(standin, "cut")
    pieces = []
    with pytest.raises(PhiEdgeError, match="ended before it finished"):
        for piece in rt.stream("hi"):
            pieces.append(piece)
    assert "".join(pieces) == "Hello wor"


def test_azure_preset_sends_api_key_header_and_version(standin, monkeypatch):
    monkeypatch.setenv("AZURE_INFERENCE_CREDENTIAL", KEY)
    rt = load(f"{standin}/azure/models", provider="azure", model="Phi-4-mini-instruct")
    assert rt.generate("hi").text == "Hello world"
    seen = StandIn.seen["azure"]
    assert seen["headers"]["api-key"] == KEY and "authorization" not in {k.lower() for k in seen["headers"]}
    assert seen["path"].endswith("/chat/completions?api-version=2024-05-01-preview")
    assert seen["body"]["messages"] == [{"role": "user", "content": "hi"}]  # chat-only provider
