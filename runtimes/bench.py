"""``phi-export bench``: time to first token, prefill and decode speed, load time and peak memory
of an artifact on this device, with warm-up and repeats, reported as median and spread.

Each artifact is measured in a fresh process, so load time and peak RSS are its own. Only the
runtime is imported: it runs on the device as well as on the workstation.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

PROMPT_WORDS = ("The small computer on the desk runs a language model that answers questions about the weather, "
                "the garden, the trains and the news, one token at a time, ").split()


def _stats(xs: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(xs), 4), "min": round(min(xs), 4), "max": round(max(xs), 4),
            "stdev": round(statistics.stdev(xs), 4) if len(xs) > 1 else 0.0}


def _prompt_ids(rt, n: int, run: int = 0) -> list[int]:
    """``n`` tokens of the bench text begun at its ``run``-th word: each run its own prompt, so no engine
    serves a repeat from a prompt cache (llama.cpp keeps the last prompt's KV cache and skips its prefill)."""
    k = run % len(PROMPT_WORDS)
    base = PROMPT_WORDS[k:] + PROMPT_WORDS[:k]
    words, ids = list(base), []
    while len(ids) < n:
        ids = rt.encode(" ".join(words))
        words += base
    return ids[:n]


def measure(artifact: str, prompt_tokens: int = 128, gen_tokens: int = 64, warmup: int = 1, repeats: int = 5,
            device: str | None = None) -> dict[str, Any]:
    """Measure in this process (``bench`` runs it in a child process per artifact)."""
    from . import load

    rt = load(artifact, device=device)
    if prompt_tokens + gen_tokens >= rt.context_length:
        from .errors import PhiEdgeError

        raise PhiEdgeError(f"--prompt-tokens + --gen-tokens ({prompt_tokens + gen_tokens}) must be below the "
                           f"artifact's context ({rt.context_length})")
    rt.stop_token_ids = frozenset()  # always generate gen_tokens, so every run does the same work
    prompts = [_prompt_ids(rt, prompt_tokens, run) for run in range(warmup + repeats)]
    for ids in prompts[:warmup]:
        rt.generate(ids, max_new_tokens=gen_tokens)
    runs = [rt.generate(ids, max_new_tokens=gen_tokens).timings for ids in prompts[warmup:]]
    ids = prompts[-1]
    m = rt.manifest
    return {
        "artifact": str(artifact), "format": m.format, "target": m.target, "precision": m.precision,
        "device": rt.device, "size_bytes": m.total_bytes, "prompt_tokens": len(ids), "gen_tokens": gen_tokens,
        "scheme": m.quantization.get("scheme"),  # e.g. GGUF's Q4_K_M; None where the format names none
        # fewest tokens a run generated: below gen_tokens where the engine itself stopped at an end token
        "generated_tokens_min": min(t.generated_tokens for t in runs),
        "warmup": warmup, "repeats": repeats, "load_s": round(rt.load_s, 4),
        "time_to_first_token_s": _stats([t.time_to_first_token_s for t in runs]),
        "prefill_tokens_per_s": _stats([t.prefill_tokens_per_s for t in runs]),
        "decode_tokens_per_s": _stats([t.decode_tokens_per_s for t in runs]),
        "peak_rss_bytes": peak_rss_bytes(),
    }


def peak_rss_bytes() -> int:
    """This process's own peak RSS. On Linux VmHWM of /proc/self/status: getrusage's ru_maxrss survives
    exec and so starts at the parent's RSS when it spawned us (``bench`` runs from ``phi-export``, which
    may hold a reference model by then). Elsewhere ru_maxrss (KiB on Linux, bytes on macOS)."""
    import resource

    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def bench(artifact: str, **kwargs: Any) -> dict[str, Any]:
    """``measure`` in a fresh Python process, so load time and peak RSS belong to this artifact alone."""
    code = "import json, sys; from phi_edge.runtimes.bench import measure; " \
           "print(json.dumps(measure(sys.argv[1], **json.loads(sys.argv[2]))))"
    r = subprocess.run([sys.executable, "-c", code, str(artifact), json.dumps(kwargs)], capture_output=True, text=True)
    if r.returncode != 0:
        from .errors import PhiEdgeError

        lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
        raise PhiEdgeError(f"benchmarking {artifact} failed: {lines[-1] if lines else 'no output'}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def quality_cell(r: dict[str, Any]) -> str:
    """The perplexity ratio as printed: a number, "n/a: <reason>" where it could not be measured, or "" when
    no reference was given."""
    q = r.get("quality")
    if not q:
        return ""
    return f"{q['perplexity_ratio']:.4f}" if q.get("perplexity_ratio") is not None else q.get("error", "n/a")


def side_by_side(results: list[dict[str, Any]]) -> list[list[str]]:
    """Rows of a table with one column per artifact: what each measured, medians, for choosing a variant."""
    rows = [["", *(f"{r['target']} {r['format']} {r.get('scheme') or r['precision']}" for r in results)],
            ["size on disk", *(f"{r['size_bytes'] / 2**20:.1f} MiB" for r in results)],
            ["decode tokens/s", *(f"{r['decode_tokens_per_s']['median']:.1f}" for r in results)],
            ["first token", *(f"{r['time_to_first_token_s']['median'] * 1000:.1f} ms" for r in results)],
            ["prefill tokens/s", *(f"{r['prefill_tokens_per_s']['median']:.1f}" for r in results)],
            ["peak RSS", *(f"{r['peak_rss_bytes'] / 2**20:.1f} MiB" for r in results)]]
    if any("quality" in r for r in results):
        rows.append(["perplexity ratio", *(quality_cell(r) for r in results)])
    return rows


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def plot(results: list[dict[str, Any]], path: str | Path) -> Path:
    """Size, speed and (when measured) quality of several artifacts side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['target']}\n{r['format']} {r['precision']}" for r in results]
    panels = [("size on disk (MiB)", [r["size_bytes"] / 2**20 for r in results]),
              ("decode tokens/s", [r["decode_tokens_per_s"]["median"] for r in results]),
              ("time to first token (ms)", [r["time_to_first_token_s"]["median"] * 1000 for r in results]),
              ("peak RSS (MiB)", [r["peak_rss_bytes"] / 2**20 for r in results])]
    if all("quality" in r for r in results):
        panels.append(("perplexity ratio vs reference",
                       [r["quality"].get("perplexity_ratio") or float("nan") for r in results]))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, values) in zip(axes, panels):
        bars = ax.bar(range(len(values)), values, color=[colors[i % len(colors)] for i in range(len(values))])
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(len(values)), labels, fontsize=7)
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
    fig.suptitle("phi-edge artifacts: pick the variant that fits", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
