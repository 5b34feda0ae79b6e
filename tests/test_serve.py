"""phi-run serve, driven by the official openai client (not our code) on 127.0.0.1: chat and
completions, streaming and not, stop strings, errors, auth, disconnects, and a bounded load test."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from phi_edge.runtimes import load  # noqa: E402
from phi_edge.runtimes.cli import main as phi_run  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
KEY = "sk-test-8f3c1e0d9b7a"
_spec = importlib.util.spec_from_file_location("serve_load", REPO / "benchmarks" / "serve_load.py")
serve_load = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(serve_load)


@pytest.fixture(scope="module")
def artifact(exported):
    return exported("cpu", "fp32")


@pytest.fixture(scope="module")
def server(artifact, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    proc, url = serve_load.start_server(artifact, "--api-key", KEY, "--max-queue", "8", log=log)
    yield {"proc": proc, "url": url, "model": Path(artifact).name, "log": log}
    serve_load.stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def local(artifact):
    return load(artifact)


def _alive(server) -> None:
    assert httpx.get(server["url"] + "/health", timeout=5).json()["status"] == "ok"


def test_models_lists_the_one_model(client, server):
    assert [m.id for m in client.models.list().data] == [server["model"]]


def test_completion_equals_generate(client, server, local):
    want = local.generate("The sky is", max_new_tokens=12, temperature=0)
    r = client.completions.create(model=server["model"], prompt="The sky is", max_tokens=12, temperature=0)
    assert r.choices[0].text == want.text
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(want.prompt_token_ids) and r.usage.completion_tokens == 12


def test_streamed_completion_equals_generate_for_the_same_seed(client, server, local):
    for temperature, seed in ((0, None), (0.9, 7)):
        want = local.generate("Once upon a time", max_new_tokens=16, temperature=temperature, seed=seed).text
        pieces = [c.choices[0].text for c in client.completions.create(
            model=server["model"], prompt="Once upon a time", max_tokens=16, temperature=temperature, seed=seed,
            stream=True) if c.choices]
        assert "".join(pieces) == want


def test_chat_uses_the_chat_template_ids(client, server, local):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    want = local.generate(local.chat_ids(messages), max_new_tokens=10, temperature=0)
    r = client.chat.completions.create(model=server["model"], messages=messages, max_tokens=10, temperature=0)
    assert r.choices[0].message.content == want.text and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(local.chat_ids(messages))
    chunks = list(client.chat.completions.create(model=server["model"], messages=messages, max_tokens=10,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10


def test_stop_strings(client, server, local):
    full = local.generate("The sky is", max_new_tokens=12, temperature=0).text
    stop = full.split()[2]  # a word from the middle
    want = full[:full.index(stop)]
    r = client.completions.create(model=server["model"], prompt="The sky is", max_tokens=12, temperature=0,
                                  stop=[stop, "never-there"])
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=server["model"], prompt="The sky is", max_tokens=12, temperature=0, stop=stop, stream=True))
    assert streamed == want


def test_errors_are_openai_shaped_and_the_server_keeps_serving(client, server):
    m = server["model"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=m, messages=[{"role": "wizard", "content": "hi"}])
    assert "wizard" in str(e.value) and e.value.body["param"] == "messages[0].role"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=m, prompt="Hello", max_tokens=10**6)
    assert e.value.body["code"] == "context_length_exceeded" and "context of" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4o", prompt="Hello", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=m, prompt="Hello", max_tokens=2, temperature=-1)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server["url"] + "/v1", api_key="wrong", max_retries=0).models.list()
    auth = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    r = httpx.post(server["url"] + "/v1/completions", content=b"{not json", headers=auth)
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(server["url"] + "/v1/completions", content=b"x" * (2 << 20), headers=auth)
    assert r.status_code == 413
    r = httpx.post(server["url"] + "/v1/chat/completions", json={"model": m, "messages": "hi"}, headers=auth)
    assert r.status_code == 400
    r = httpx.post(server["url"] + "/v1/completions", json=[1, 2], headers=auth)
    assert r.status_code == 400
    _alive(server)
    assert client.completions.create(model=m, prompt="Hello", max_tokens=2).choices[0].text


def test_a_client_that_disconnects_stops_its_generation(server):
    url, auth = server["url"], {"authorization": f"Bearer {KEY}"}
    before = httpx.get(url + "/health").json()["pieces_generated"]
    body = {"model": server["model"], "prompt": "Hello", "max_tokens": 1500, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, headers=auth, timeout=30) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]  # a few events, then hang up
    assert any(line.startswith("data: ") for line in got)
    deadline = time.monotonic() + 10
    while httpx.get(url + "/health").json()["queued"] and time.monotonic() < deadline:
        time.sleep(0.05)
    health = httpx.get(url + "/health").json()
    assert health["queued"] == 0
    assert health["pieces_generated"] - before < 500  # stopped long before 1500 tokens
    time.sleep(0.3)
    assert httpx.get(url + "/health").json()["pieces_generated"] == health["pieces_generated"]


def test_the_key_is_never_logged(server):
    assert KEY not in server["log"].read_text()


def test_non_loopback_host_needs_a_key_or_no_auth(artifact):
    r = CliRunner().invoke(phi_run, ["serve", str(artifact), "--host", "0.0.0.0"])
    assert r.exit_code == 1 and "--api-key" in r.output and "--no-auth" in r.output
    r = CliRunner().invoke(phi_run, ["serve", str(artifact), "--host", "0.0.0.0", "--api-key", "k", "--no-auth"])
    assert r.exit_code == 1


def test_phi_run_prompt_still_works(artifact):
    r = CliRunner().invoke(phi_run, [str(artifact), "Hello", "-n", "3", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["source"] == "local"


def test_load_bounded_concurrency(server, local):
    import psutil

    want = local.generate("The quick brown fox", max_new_tokens=24, temperature=0)
    proc = psutil.Process(server["proc"].pid)
    serve_load.run_load(server["url"], server["model"], clients=4, max_tokens=4, api_key=KEY)  # warm up
    threads, rss = proc.num_threads(), proc.memory_info().rss
    figures = serve_load.run_load(server["url"], server["model"], clients=48, max_tokens=24, api_key=KEY)
    assert not figures["other"], figures["other"][:3]
    assert figures["ok"] + figures["rejected_429"] == 48 and figures["ok"] >= 9  # 1 running + 8 queued at least
    for r in figures["results"]:
        if r["status"] == 200:
            assert r["text"] == want.text and r["finish"] == want.finish_reason and r["done"]
        else:
            assert int(r["retry_after"]) >= 1 and r["error"]["code"] == "rate_limit_exceeded"
    deadline = time.monotonic() + 5
    while proc.num_threads() > threads and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc.num_threads() == threads
    assert proc.memory_info().rss < rss * 1.10
    _alive(server)
    print(f"\nload: {figures['ok']} ok, {figures['rejected_429']} x 429, p50 {figures['p50_s'] * 1000:.0f} ms, "
          f"p95 {figures['p95_s'] * 1000:.0f} ms, {figures['tokens_per_s']:.0f} tokens/s")


def test_a_non_streaming_client_that_disconnects_stops_its_generation(server):
    url, auth = server["url"], {"authorization": f"Bearer {KEY}"}
    before = httpx.get(url + "/health").json()["pieces_generated"]
    body = {"model": server["model"], "prompt": "Hello", "max_tokens": 1500}  # 1500 pieces when not stopped
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", json=body, headers=auth, timeout=0.1)
    deadline = time.monotonic() + 10
    while httpx.get(url + "/health").json()["queued"] and time.monotonic() < deadline:
        time.sleep(0.05)
    health = httpx.get(url + "/health").json()
    assert health["queued"] == 0 and health["pieces_generated"] - before < 1400
    _alive(server)
