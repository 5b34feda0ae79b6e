"""``phi-export verify``: checksums, load, generate; with ``--against``, agreement with the
transformers reference through text (tokenizer, greedy tokens and decoded text, top-1 agreement
and cosine of next-token logits), judged against thresholds it prints.

Runs through :mod:`phi_edge.runtimes`, so it measures every backend the same way.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from .source_tokenizer import PROBES as TOKENIZER_PROBES

VERIFY_PROMPT = "The Raspberry Pi 5 is a small computer. Quantization makes models smaller, and"
# precision -> (min mean logit cosine, min top-1 agreement); fp32/fp16 must also match greedy exactly
THRESHOLDS = {"fp32": (0.9999, 0.99), "fp16": (0.999, 0.95), "int8": (0.99, 0.9), "int4": (0.9, 0.7)}
EXACT_PRECISIONS = ("fp32", "fp16")

__all__ = ["verify", "compare", "cosine", "VERIFY_PROMPT", "TOKENIZER_PROBES", "THRESHOLDS"]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def verify(artifact: str | Path, against: str | None = None, prompt: str = VERIFY_PROMPT,
           max_new_tokens: int = 32, device: str | None = None, min_cosine: float | None = None,
           min_top1: float | None = None) -> dict[str, Any]:
    """The report; ``report["passed"]`` is False when a check against the reference failed."""
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
    report["passed"] = True
    if against:
        a = compare(rt, against, prompt, max_new_tokens, min_cosine=min_cosine, min_top1=min_top1)
        report["against"] = a
        report["passed"] = not a["failures"]
    return report


def compare(rt, against: str, prompt: str, max_new_tokens: int, min_cosine: float | None = None,
            min_top1: float | None = None) -> dict[str, Any]:
    from .progress import tool_output_to_log
    from .reference import load_reference

    with tool_output_to_log("loading the reference checkpoint"):
        ref = load_reference(against)
    mismatched = [p for p in TOKENIZER_PROBES if rt.encode(p) != ref.encode(p)]
    # greedy through text on both sides: each side's own tokenizer, the same stop tokens
    ours = rt.generate(prompt, max_new_tokens=max_new_tokens, temperature=0)
    theirs = ref.generate_text(prompt, max_new_tokens, stop_token_ids=sorted(rt.stop_token_ids))
    # teacher-forced: both see the reference's prompt and continuation, so every position is comparable
    seq = ref.encode(prompt) + theirs.token_ids
    ref_logits, our_logits = ref.logits(seq), rt.logits(seq)
    n = min(len(ref_logits), len(our_logits))
    ref_logits, our_logits = ref_logits[-n:], our_logits[-n:]
    vocab = min(ref_logits.shape[-1], our_logits.shape[-1])
    ref_logits, our_logits = ref_logits[:, :vocab], our_logits[:, :vocab]
    top1 = float(np.mean(ref_logits.argmax(-1) == our_logits.argmax(-1)))
    cos = [cosine(a, b) for a, b in zip(ref_logits, our_logits)]
    same_prefix = next((i for i, (a, b) in enumerate(zip(ours.token_ids, theirs.token_ids)) if a != b),
                       min(len(ours.token_ids), len(theirs.token_ids)))
    precision = rt.manifest.precision
    default_cos, default_top1 = THRESHOLDS.get(precision, (0.0, 0.0))
    thresholds = {"min_logit_cosine_mean": default_cos if min_cosine is None else min_cosine,
                  "min_top1_agreement": default_top1 if min_top1 is None else min_top1,
                  "greedy_must_match": precision in EXACT_PRECISIONS}
    out = {
        "reference": str(against),
        "tokenizer_agrees": not mismatched,
        "tokenizer_mismatches": mismatched,
        "greedy_tokens_equal": ours.token_ids == theirs.token_ids,
        "greedy_text_equal": ours.text == theirs.text,
        "greedy_matching_prefix": same_prefix,
        "greedy_compared": max(len(ours.token_ids), len(theirs.token_ids)),
        "reference_tokens": theirs.token_ids,
        "artifact_tokens": ours.token_ids,
        "reference_text": theirs.text,
        "artifact_text": ours.text,
        "top1_agreement": round(top1, 4),
        "logit_cosine_mean": round(float(np.mean(cos)), 6),
        "logit_cosine_min": round(float(np.min(cos)), 6),
        "positions": n,
        "logits_on": getattr(rt, "logits_device", rt.device),
        "logits_note": str(getattr(rt, "logits_note", "") or ""),
        "thresholds": thresholds,
    }
    out["failures"] = failures(out, thresholds)
    return out


def failures(a: dict[str, Any], thresholds: dict[str, Any]) -> list[str]:
    """Each failed check in words; empty when the artifact passes."""
    out = []
    if not a["tokenizer_agrees"]:
        out.append(f"the tokenizer encodes {a['tokenizer_mismatches'][0]!r} differently from the source")
    if thresholds["greedy_must_match"] and not (a["greedy_tokens_equal"] and a["greedy_text_equal"]):
        out.append(f"greedy generation differs from the reference after {a['greedy_matching_prefix']} tokens "
                   f"(exact agreement is expected at this precision)")
    if a["logit_cosine_mean"] < thresholds["min_logit_cosine_mean"]:
        out.append(f"mean logit cosine {a['logit_cosine_mean']:.6f} is below {thresholds['min_logit_cosine_mean']}")
    if a["top1_agreement"] < thresholds["min_top1_agreement"]:
        out.append(f"top-1 agreement {a['top1_agreement']:.4f} is below {thresholds['min_top1_agreement']}")
    return out
