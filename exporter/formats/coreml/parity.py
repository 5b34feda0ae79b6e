"""Graph parity in torch: our traced decoder against transformers, prefill then decode through its own
cache, the way the device runs it (the mask the runtime builds, the cache written in place)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from phi_edge.runtimes.coreml import causal_mask, feed_fixed

MAX_ABS_DIFF = 1e-3  # fp32 logits, ours vs transformers


class TorchSteps:
    """Run a decoder (eager or traced) step by step: ``prefill(ids)`` then ``step(token)``."""

    def __init__(self, module, window: int = 0, dtype=np.float32):
        self.module, self.window, self.dtype = module, window, dtype
        self.length = 0

    def run(self, ids: Sequence[int]) -> np.ndarray:
        import torch

        t = len(ids)
        mask = torch.from_numpy(causal_mask(self.length, t, self.window, self.dtype))
        with torch.no_grad():
            logits = self.module(torch.tensor([list(ids)], dtype=torch.int32), mask)
        self.length += t
        return logits[0].float().numpy()


class FixedSteps:
    """Run the fixed-shape (ANE) functions as the runtime does: ``run(ids)`` feeds chunks of N through
    prefill (the last padded), a lone token through decode, one state throughout."""

    def __init__(self, engine, chunk: int, context: int, window: int, outputs: Sequence[str]):
        self.engine, self.chunk, self.context, self.window, self.outputs = engine, chunk, context, window, outputs
        self.state, self.length = engine.make_state(), 0

    def run(self, ids: Sequence[int]) -> np.ndarray:
        logits = feed_fixed(self.engine, self.state, ids, self.length, self.chunk, self.context, self.window,
                            self.outputs)
        self.length += len(ids)
        return logits


def probe_ids(vocab: int, length: int, seed: int = 0) -> list[int]:
    """Deterministic token ids spread over the vocabulary (special tokens excluded by staying below 32000)."""
    rng = np.random.default_rng(seed)
    return rng.integers(3, min(vocab, 32000), size=length).tolist()


def check(traced, hf_model, prompt: Sequence[int], decode_steps: int, window: int, steps=None) -> dict[str, Any]:
    """Prefill ``prompt`` and greedy-decode ``decode_steps`` tokens with ``traced`` (float32 cache) or
    ``steps`` (anything with ``run(ids) -> logits``); compare every position's logits with transformers'
    on the whole sequence and the greedy tokens with transformers' argmax. Returns the figures; ``ok``
    says whether both hold."""
    import torch

    steps = steps or TorchSteps(traced, window)
    ours = [steps.run(prompt)]
    tokens = list(prompt)
    for _ in range(decode_steps):
        token = int(ours[-1][-1].argmax())
        tokens.append(token)
        ours.append(steps.run([token]))
    logits = np.concatenate(ours)[:len(tokens)]
    with torch.no_grad():
        theirs = hf_model(torch.tensor([tokens])).logits[0].float().numpy()
    diff = float(np.abs(logits - theirs).max())
    generated = tokens[len(prompt):]
    want = theirs[len(prompt) - 1:len(tokens) - 1].argmax(-1).tolist()
    return {"prefill_tokens": len(prompt), "decode_steps": decode_steps, "max_abs_logit_diff": diff,
            "greedy_identical": generated == want, "ok": diff <= MAX_ABS_DIFF and generated == want}
