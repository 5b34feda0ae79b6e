"""MLX backend: runs ``mlx`` artifacts with mlx-lm (Apple Silicon GPU; MLX's CPU build elsewhere).

mlx-lm loads the model and tokenizer and generates (``generate_step``, ``make_sampler``,
``make_logits_processors``). Two of its Phi model details differ from the transformers reference,
and are corrected on the loaded model so the artifact computes what the checkpoint does:

- LongRoPE (Phi-3.5-mini, Phi-3.5-MoE, Phi-4-mini): mlx-lm always rotates with the long factors;
  the reference uses the short ones while the sequence fits the original context, and recomputes
  the whole sequence with the long ones when it first outgrows it.
- Phi-3.5-MoE routing: mlx-lm weights the top-2 experts by a softmax over the two; the reference
  uses sparsemixer's weights (each a softmax over the experts within 2*jitter of the pick).

Imports mlx and mlx-lm only (mlx-lm brings transformers for the tokenizer; never torch here).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from . import require
from .base import Runtime, SamplingParams
from .errors import PhiEdgeError
from .manifest import Manifest

FORMAT = "mlx"
DEVICES = ("gpu", "cpu")


class MlxRuntime(Runtime):
    format = FORMAT

    def __init__(self, folder: Path, manifest: Manifest, device: str | None = None):
        mx = require("mlx.core", FORMAT)
        require("mlx_lm", FORMAT)
        from mlx_lm.utils import load_model

        here = "gpu" if mx.is_available(mx.gpu) else "cpu"
        device = (device or here).lower()
        if device not in DEVICES:
            raise PhiEdgeError(f"mlx artifacts run on {', '.join(DEVICES)}, not '{device}'")
        if device != here:
            raise PhiEdgeError(f"MLX on this machine runs on the {here} only, not the {device}; "
                               + ("run it on an Apple Silicon Mac for the GPU" if here == "cpu"
                                  else "leave the device out to use the GPU"))
        super().__init__(folder, manifest, device)
        self._mx = mx
        try:
            self._model, self._config = load_model(Path(folder))
        except (ValueError, FileNotFoundError) as e:
            raise PhiEdgeError(f"mlx-lm could not load {folder}: {e}; re-export the model") from None
        self._ropes = match_reference(self._model, self._config)
        # tokenizer.json through the tokenizers library, as the export checked it (mlx-lm's own loader
        # goes through transformers, which may rebuild a tokenizer differently from its files)
        tokenizers = require("tokenizers", FORMAT)
        self._tokenizer = tokenizers.Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))

    def _encode_plain(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def _token_ids(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[int]:
        from mlx_lm.generate import generate_step
        from mlx_lm.sample_utils import make_sampler

        mx = self._mx
        if params.seed is not None:
            mx.random.seed(int(params.seed))
        sampler = make_sampler(temp=0.0 if params.greedy else params.temperature, top_p=params.top_p,
                               top_k=params.top_k)
        ids, left = list(prompt_ids), params.max_new_tokens
        while left > 0:
            steps = left
            if self._ropes:
                # LongRoPE: the reference recomputes the whole sequence with the long factors when it first
                # outgrows the original context; so do we, by starting over at that token
                long = self._use_long(len(ids))
                steps = left if long else min(left, self._ropes[0].original + 1 - len(ids))
            for token, _ in generate_step(mx.array(ids), self._model, max_tokens=steps, sampler=sampler,
                                          logits_processors=self._penalty(params, ids)):
                ids.append(int(token))
                left -= 1
                yield int(token)

    def _penalty(self, params: SamplingParams, ids: list[int]) -> list | None:
        """mlx-lm's repetition penalty over the whole sequence, as transformers applies it (generate_step
        hands its processors only the tokens after the prefill: the last prompt token on)."""
        if params.repetition_penalty == 1.0:
            return None
        from mlx_lm.sample_utils import make_logits_processors

        mx = self._mx
        (penalize,) = make_logits_processors(repetition_penalty=params.repetition_penalty,
                                             repetition_context_size=self.context_length)
        before = mx.array(ids[:-1], dtype=mx.int32)
        return [lambda tokens, logits: penalize(mx.concatenate([before, tokens.astype(mx.int32)]), logits)]

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        mx = self._mx
        model, ropes = self._logits_model()
        self._use_long(len(ids), ropes)
        out = model(mx.array([list(ids)]))[0].astype(mx.float32)
        return np.array(out)

    @property
    def logits_note(self) -> str:
        """How ``logits()`` computes, where that differs from generation ("" where it does not)."""
        if self.manifest.precision == "fp32" or self._mx.metal.is_available():
            return ""
        return (f"logits from the artifact's {self.manifest.precision} weights "
                + ("dequantized" if self.manifest.precision.startswith("int") else "widened")
                + " to float32 on CPU (no Metal)")

    def _logits_model(self) -> tuple:
        """The model ``logits()`` runs and its LongRoPE layers. Without Metal, MLX's CPU build runs
        quantized and float16 matmuls in float16, very slowly; there a float32 copy of the artifact's
        own weights (dequantized once, built on first use) computes what the device does, up to
        activation precision. Generation always runs the artifact as is."""
        if not self.logits_note:
            return self._model, self._ropes
        if getattr(self, "_float_model", None) is None:
            from mlx_lm.utils import load_model

            model, config = load_model(self.folder)
            model = dequantized_float32(model)
            self._float_model = model, match_reference(model, config)
        return self._float_model

    def _use_long(self, length: int, ropes: list | None = None) -> bool:
        """Set the LongRoPE layers for a forward pass over ``length`` tokens, as the reference does."""
        ropes = self._ropes if ropes is None else ropes
        long = bool(ropes) and length > ropes[0].original
        for rope in ropes:
            rope.long = long
        return long


def open_artifact(folder: Path, manifest: Manifest, device: str | None = None) -> MlxRuntime:
    return MlxRuntime(folder, manifest, device)


def dequantized_float32(model):
    """``model`` (in place) with each quantized layer swapped for a float32 one holding its
    dequantized weights, and every other floating-point parameter cast to float32."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_map, tree_map_with_path

    def dense(path, m):
        if "scales" not in m:
            return m
        w = mx.dequantize(m["weight"], m["scales"], m.get("biases"), group_size=m.group_size, bits=m.bits,
                          mode=getattr(m, "mode", "affine")).astype(mx.float32)
        if isinstance(m, nn.QuantizedEmbedding):
            layer = nn.Embedding(w.shape[0], w.shape[1])
        elif isinstance(m, nn.QuantizedLinear):
            layer = nn.Linear(w.shape[1], w.shape[0], bias="bias" in m)
        else:  # mlx-lm's QuantizedSwitchLinear: Phi-3.5-MoE's experts
            from mlx_lm.models.switch_layers import SwitchLinear

            layer = SwitchLinear(w.shape[2], w.shape[1], w.shape[0], bias="bias" in m)
        layer.weight = w
        if "bias" in m:
            layer.bias = m["bias"]
        return layer

    model.update_modules(tree_map_with_path(dense, model.leaf_modules(), is_leaf=nn.Module.is_module))
    model.update(tree_map(lambda p: p.astype(mx.float32) if mx.issubdtype(p.dtype, mx.floating) else p,
                          model.parameters()))
    mx.eval(model.parameters())
    return model


# ---- the two corrections: the reference's LongRoPE switch and sparsemixer routing ----------------

def match_reference(model, config: dict) -> list:
    """Swap mlx-lm's LongRoPE and Phi-3.5-MoE routing for the reference's; returns the LongRoPE
    modules (the runtime picks short or long factors for each pass)."""
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}  # the hub's or transformers 5's key
    ropes = []
    for layer in model.layers:
        attn = layer.self_attn
        if (rope.get("type") or rope.get("rope_type")) in ("longrope", "su"):
            dims = getattr(attn.rope, "dim", None) or attn.rope.dims  # mlx-lm's SuScaledRoPE, or nn.RoPE when it missed the scaling
            attn.rope = _long_rope(dims, config, rope)
            ropes.append(attn.rope)
        if hasattr(layer, "block_sparse_moe"):
            jitter = float(config.get("router_jitter_noise", 0.01))
            layer.block_sparse_moe = _sparse_mixer_block(layer.block_sparse_moe, jitter)
    return ropes


def _long_rope(dims: int, config: dict, rope: dict):
    import mlx.core as mx
    import mlx.nn as nn

    original = int(rope.get("original_max_position_embeddings") or config.get("original_max_position_embeddings")
                   or config["max_position_embeddings"])
    factor = config["max_position_embeddings"] / original
    default = rope.get("attention_factor") or (
        math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1 else 1.0)

    class LongRoPE(nn.Module):
        """The short factors while the sequence fits the original context, the long ones beyond
        (the runtime sets ``long`` for each pass); mlx-lm's SuScaledRoPE always uses the long ones."""

        def __init__(self):
            super().__init__()
            self.dim, self.original, self.long = dims, original, False
            freqs = float(config.get("rope_theta", 10000.0)) ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)
            self._freqs = (mx.array(rope["short_factor"], dtype=mx.float32) * freqs,
                           mx.array(rope["long_factor"], dtype=mx.float32) * freqs)
            self._scales = (rope.get("short_mscale") or default, rope.get("long_mscale") or default)

        def __call__(self, x, offset=0):
            x = x[...]
            x[..., :dims] = self._scales[self.long] * x[..., :dims]
            return mx.fast.rope(x, dims, traditional=False, base=None, scale=1.0, offset=offset,
                                freqs=self._freqs[self.long])

    return LongRoPE()


def _sparsemixer(scores, jitter_eps: float):
    """Phi-3.5-MoE's inference routing (transformers' ``sparsemixer`` with training off): the top
    expert, then the best of the rest, each weighted by a softmax over the experts whose score is
    within ``2 * jitter_eps`` (relative) of it."""
    import mlx.core as mx

    experts = mx.arange(scores.shape[-1])
    masked, picks, weights = scores, [], []
    for _ in range(2):
        pick = mx.argmax(masked, axis=-1, keepdims=True)
        best = mx.take_along_axis(masked, pick, axis=-1)
        far = (best - scores) / mx.maximum(mx.abs(scores), best) > 2 * jitter_eps
        probs = mx.softmax(mx.where(far, -mx.inf, masked), axis=-1, precise=True)
        picks.append(pick)
        weights.append(mx.take_along_axis(probs, pick, axis=-1))
        masked = mx.where(experts == pick, -mx.inf, masked)
    return mx.concatenate(picks, axis=-1), mx.concatenate(weights, axis=-1)


def _sparse_mixer_block(block, jitter_eps: float):
    import mlx.core as mx
    import mlx.nn as nn

    class SparseMixerMoE(nn.Module):
        """mlx-lm's PhiMoE block (same gate and experts) with the reference's routing weights."""

        def __init__(self):
            super().__init__()
            self.gate, self.switch_mlp = block.gate, block.switch_mlp

        def __call__(self, x):
            inds, weights = _sparsemixer(self.gate(x), jitter_eps)
            y = self.switch_mlp(x, inds)
            return (y * weights[..., None].astype(y.dtype)).sum(axis=-2)

    return SparseMixerMoE()
