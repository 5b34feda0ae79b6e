"""Load test for ``phi-run serve``: N concurrent clients, each sending one request; prints p50/p95 latency,
tokens/s, how many got 429, and the server's thread count and RSS before and after.

    python benchmarks/serve_load.py OUT [--clients 48] [--max-tokens 32] [--max-queue 8]

Starts the server itself on 127.0.0.1 (a free port) and stops it. Finishes by itself: every client sends
exactly one request with a timeout. ``run_load`` is also what tests/test_serve.py runs.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(artifact: str | Path, *extra: str, log: Path | None = None, ready_s: float = 60.0):
    """``phi-run serve`` in a subprocess on a free loopback port: (process, base_url)."""
    port = free_port()
    out = open(log, "w") if log else subprocess.DEVNULL
    proc = subprocess.Popen([sys.executable, "-c", "from phi_edge.runtimes.cli import main; main()", "serve",
                             str(artifact), "--port", str(port), *extra], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + ready_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}" + (f"; see {log}" if log else ""))
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the server did not come up in time")


def stop_server(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def run_load(url: str, model: str, clients: int = 48, max_tokens: int = 32, api_key: str | None = None,
             prompt: str = "The quick brown fox", timeout: float = 60.0) -> dict:
    """Fire ``clients`` requests at once; each returns 200 or 429. Returns the figures."""
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    barrier = threading.Barrier(clients)

    def one(i: int) -> dict:
        with httpx.Client(timeout=timeout) as client:
            barrier.wait(timeout=timeout)
            start = time.perf_counter()
            r = client.post(url + "/v1/completions", json={**body, "stream": i % 2 == 1}, headers=headers)
            if i % 2 == 1 and r.status_code == 200:  # streamed: join the pieces
                text, finish, events = "", None, [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
                for e in events[:-1]:
                    choice = json.loads(e)["choices"][0]
                    text += choice["text"]
                    finish = choice["finish_reason"] or finish
                out = {"text": text, "finish": finish, "done": events[-1] == "[DONE]", "tokens": None}
            elif r.status_code == 200:
                d = r.json()
                out = {"text": d["choices"][0]["text"], "finish": d["choices"][0]["finish_reason"], "done": True,
                       "tokens": d["usage"]["completion_tokens"]}
            else:
                out = {"error": r.json().get("error"), "retry_after": r.headers.get("retry-after")}
            end = time.perf_counter()
            return {"status": r.status_code, "latency_s": end - start, "start": start, "end": end,
                    "stream": i % 2 == 1, **out}

    with ThreadPoolExecutor(max_workers=clients) as pool:
        results = list(pool.map(one, range(clients)))
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    ok = [r for r in results if r["status"] == 200]
    lat = sorted(r["latency_s"] for r in ok)
    tokens = sum(r["tokens"] if r["tokens"] is not None else max_tokens for r in ok)
    return {"clients": clients, "ok": len(ok), "rejected_429": sum(r["status"] == 429 for r in results),
            "other": [r for r in results if r["status"] not in (200, 429)], "wall_s": wall,
            "p50_s": statistics.median(lat) if lat else None,
            "p95_s": lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else None,
            "tokens_per_s": tokens / wall, "results": results}


def main() -> None:
    import psutil

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--clients", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-queue", type=int, default=8)
    args = ap.parse_args()
    proc, url = start_server(args.artifact, "--max-queue", str(args.max_queue), "--log-level", "warning")
    try:
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        run_load(url, model, clients=4, max_tokens=4)  # warm up
        p = psutil.Process(proc.pid)
        before = (p.num_threads(), p.memory_info().rss)
        figures = run_load(url, model, clients=args.clients, max_tokens=args.max_tokens)
        time.sleep(0.5)
        after = (p.num_threads(), p.memory_info().rss)
    finally:
        stop_server(proc)
    figures.pop("results")
    print(json.dumps({**figures, "threads_before": before[0], "threads_after": after[0],
                      "rss_before_mib": round(before[1] / 2**20, 1), "rss_after_mib": round(after[1] / 2**20, 1)},
                     indent=2))


if __name__ == "__main__":
    main()
