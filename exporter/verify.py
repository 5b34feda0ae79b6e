"""``phi-export verify``: checksums, load, generate; with ``--against``, agreement with the
transformers reference (greedy tokens, top-1 agreement and cosine of next-token logits).

Runs through :mod:`phi_edge.runtimes`, so it measures every backend the same way.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

VERIFY_PROMPT = "The Raspberry Pi 5 is a small computer. Quantization makes models smaller, and"
TOKENIZER_PROBES = ["Hello world!", " leading space and  double  spaces", "Führer café naïve 日本語 🦙",
                    "<|user|>\nHi<|end|>\n<|assistant|>\n", "Numbers 3.14159 and 2026-11-28", "\ttabs\nnewlines\n\n"]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def verify(artifact: str | Path, against: str | None = None, prompt: str = VERIFY_PROMPT,
           max_new_tokens: int = 32, device: str | None = None) -> dict[str, Any]:
    from phi_edge.runtimes import load

    report: dict[str, Any] = {"artifact": str(artifact)}
    start = time.perf_counter()
    rt = load(artifact, device=device, verify=True)
    report["checksums"] = "ok"
    report["load_s"] = round(time.perf_counter() - start, 3)
    m = rt.manifest
    report.update(format=m.format, target=m.target, precision=m.precision, device=rt.device)
    result = rt.generate(prompt, max_new_tokens=max_new_tokens)
    report["generation"] = {"prompt": prompt, "text": result.text, "token_ids": result.token_ids,
                            "finish_reason": result.finish_reason, **result.timings.to_dict()}
    if against:
        report["against"] = compare(rt, against, prompt, max_new_tokens)
    return report


def compare(rt, against: str, prompt: str, max_new_tokens: int) -> dict[str, Any]:
    from .progress import tool_output_to_log
    from .reference import load_reference

    with tool_output_to_log("loading the reference checkpoint"):
        ref = load_reference(against)
    mismatched = [p for p in TOKENIZER_PROBES if rt.encode(p) != ref.encode(p)]
    ids = ref.encode(prompt)
    ref_tokens = ref.greedy(ids, max_new_tokens)
    ours = rt.generate(ids, max_new_tokens=max_new_tokens, temperature=0).token_ids
    # teacher-forced: both see the reference's continuation, so every position is comparable
    seq = ids + ref_tokens
    ref_logits = ref.logits(seq)
    our_logits = rt.logits(seq)
    n = min(len(ref_logits), len(our_logits))
    ref_logits, our_logits = ref_logits[-n:], our_logits[-n:]
    vocab = min(ref_logits.shape[-1], our_logits.shape[-1])
    ref_logits, our_logits = ref_logits[:, :vocab], our_logits[:, :vocab]
    top1 = float(np.mean(ref_logits.argmax(-1) == our_logits.argmax(-1)))
    cos = [cosine(a, b) for a, b in zip(ref_logits, our_logits)]
    same_prefix = next((i for i, (a, b) in enumerate(zip(ours, ref_tokens)) if a != b), min(len(ours), len(ref_tokens)))
    return {
        "reference": str(against),
        "tokenizer_agrees": not mismatched,
        "tokenizer_mismatches": mismatched,
        "greedy_tokens_equal": ours == ref_tokens,
        "greedy_matching_prefix": same_prefix,
        "greedy_compared": len(ref_tokens),
        "reference_tokens": ref_tokens,
        "artifact_tokens": ours,
        "top1_agreement": round(top1, 4),
        "logit_cosine_mean": round(float(np.mean(cos)), 6),
        "logit_cosine_min": round(float(np.min(cos)), 6),
        "positions": n,
    }
