"""The Neural Engine variant of our decoder (``--target apple-ane``): fixed shapes, 4-D tensors only.

The same Phi decoder as :mod:`.decoder`, laid out the way the ANE runs transformers:

- every activation is (1, C, 1, T) and every matrix a 1x1 convolution weight [out, in, 1, 1];
- every size is a Python constant baked in at construction (T tokens per call, the context): the
  forward takes no int from a tensor's shape (coremltools 9.0 with numpy 2.4 cannot convert fixed
  shapes whose trace folds a shape into an int);
- the position comes in as an input (``position`` int32 [1, 1, 1, 1]); a one-hot [context, T] matrix
  built from it places the T new keys/values in the cache (positions past the context are dropped)
  and picks the rotary rows, so nothing is sliced at a dynamic index;
- the KV cache is two states [layers, kv_heads * head_dim, 1, context], rewritten whole each call;
- the vocabulary projection is split into slices below 16384 rows (``logits_0``, ``logits_1``, ...,
  each [1, rows, 1, T]); with tied embeddings the embedding is gathered from those same slices.

One instance per call length: the prefill function (T = N) and the decode function (T = 1) are two
instances sharing weights (:func:`with_tokens`), converted separately and saved as one package. A large
model is converted in parts of whole layers (``first_layer``, ``n_layers``): a part without the
embedding takes ``hidden_states`` fp16 [1, hidden, 1, T], a part without the head returns
``output_hidden_states`` the same shape; each part has its own state.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .decoder import (CACHE_NAMES, Shape, checkpoint_tensors, layer_weight_names, load_weights, rope_choice,
                      rope_tables)

MAX_SLICE = 16383  # rows per vocabulary slice: below 16384, the ANE's limit on a dimension
OUTPUT_PREFIX = "logits_"


def vocab_slices(vocab: int) -> list[tuple[int, int]]:
    """(first row, rows) of each slice: as few equal slices as keep each below 16384 rows."""
    count = math.ceil(vocab / MAX_SLICE)
    size = math.ceil(vocab / count)
    return [(a, min(size, vocab - a)) for a in range(0, vocab, size)]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the channels of (1, C, 1, T), each column first divided by its largest magnitude
    (exact in real arithmetic; in fp16 it keeps the squares from overflowing)."""
    peak = x.abs().amax(dim=1, keepdim=True) + 1e-6
    y = x / peak
    return y * torch.rsqrt(y.pow(2).mean(dim=1, keepdim=True) + eps / (peak * peak)) * weight


def conv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution of (1, C, 1, T): traced as one (what Core ML gets); run eagerly (the stored
    weights scored in torch) as the same product through a matmul, much faster on a CPU."""
    if torch.jit.is_tracing():
        return torch.nn.functional.conv2d(x, weight)
    out = torch.matmul(weight[:, :, 0, 0], x[0, :, 0, :])
    return out.view(1, weight.shape[0], 1, x.shape[3])


class AneLayer(torch.nn.Module):
    def __init__(self, s: Shape):
        super().__init__()
        q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim

        def matrix(rows: int, cols: int):
            return torch.nn.Parameter(torch.empty(rows, cols, 1, 1))

        self.input_norm = torch.nn.Parameter(torch.ones(1, s.hidden, 1, 1))
        self.q_proj, self.k_proj, self.v_proj = matrix(q, s.hidden), matrix(kv, s.hidden), matrix(kv, s.hidden)
        self.o_proj = matrix(s.hidden, q)
        self.post_norm = torch.nn.Parameter(torch.ones(1, s.hidden, 1, 1))
        self.gate_proj, self.up_proj = matrix(s.intermediate, s.hidden), matrix(s.intermediate, s.hidden)
        self.down_proj = matrix(s.hidden, s.intermediate)


class AneDecoder(torch.nn.Module):
    """forward(input_ids int32 [1, 1, 1, T], position int32 [1, 1, 1, 1], causal_mask [1, 1, T, context])
    -> the vocabulary slices' logits, each [1, rows, 1, T]. Writes the T new keys/values at
    ``position .. position + T`` into the cache and attends over the whole cache under the mask."""

    def __init__(self, s: Shape, context: int, tokens: int, cache_dtype=torch.float16, first_layer: int = 0,
                 n_layers: int | None = None):
        super().__init__()
        self.shape, self.context, self.tokens = s, context, tokens
        self.first_layer = first_layer
        n_layers = s.layers - first_layer if n_layers is None else n_layers
        self.embeds, self.heads = first_layer == 0, first_layer + n_layers == s.layers
        self.slices = vocab_slices(s.vocab)
        if self.embeds and not s.tied:
            self.embed_tokens = torch.nn.Parameter(torch.empty(s.vocab, s.hidden, 1, 1))
        self.layers = torch.nn.ModuleList(AneLayer(s) for _ in range(n_layers))
        if self.heads:
            self.norm = torch.nn.Parameter(torch.ones(1, s.hidden, 1, 1))
        if self.heads or (self.embeds and s.tied):  # tied: the embedding is gathered from the head's slices
            self.lm_head = torch.nn.ParameterList(torch.nn.Parameter(torch.empty(n, s.hidden, 1, 1))
                                                  for _, n in self.slices)
        cache = (n_layers, s.kv_heads * s.head_dim, 1, context)
        self.register_buffer("key_cache", torch.zeros(cache, dtype=cache_dtype))
        self.register_buffer("value_cache", torch.zeros(cache, dtype=cache_dtype))
        # constants: rotary tables [1, 1, rotary_dim, context], cache slots and the call's token offsets
        self.register_buffer("rope_cos", torch.zeros(1, 1, s.rotary_dim, context), persistent=False)
        self.register_buffer("rope_sin", torch.zeros(1, 1, s.rotary_dim, context), persistent=False)
        self.register_buffer("slots", torch.arange(context, dtype=torch.int32).view(1, 1, context, 1),
                             persistent=False)
        self.register_buffer("offsets", torch.arange(tokens, dtype=torch.int32).view(1, 1, 1, tokens),
                             persistent=False)

    @property
    def dtype(self):
        return next(self.parameters()).dtype

    def reset(self) -> None:
        self.key_cache.zero_()
        self.value_cache.zero_()

    def set_rope(self, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """cos/sin [context, rotary_dim] (as :func:`.decoder.rope_tables` gives them), kept in the weights'
        dtype (so the converted tables keep their names: ``rope_cos``, ``rope_sin``)."""
        shape = (1, 1, self.shape.rotary_dim, self.context)
        self.rope_cos = cos.t().reshape(shape).to(self.dtype).contiguous()
        self.rope_sin = sin.t().reshape(shape).to(self.dtype).contiguous()
        self.slots.copy_(torch.arange(self.context, dtype=torch.int32).view(self.slots.shape))
        self.offsets.copy_(torch.arange(self.tokens, dtype=torch.int32).view(self.offsets.shape))

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """(1, hidden, 1, T) rows of the embedding (with tied embeddings: of the head's slices)."""
        s, t = self.shape, self.tokens
        if not s.tied:
            rows = torch.index_select(self.embed_tokens, 0, ids)
        else:
            rows = None
            for (first, n), weight in zip(self.slices, self.lm_head):
                local = ids - first
                inside = ((local >= 0) & (local < n)).to(weight.dtype).view(t, 1, 1, 1)
                part = torch.index_select(weight, 0, local.clamp(0, n - 1)) * inside
                rows = part if rows is None else rows + part
        return rows.permute(2, 1, 3, 0)  # (T, hidden, 1, 1) -> (1, hidden, 1, T)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (heads, head_dim, 1, T); cos/sin (1, rotary_dim, 1, T)."""
        s = self.shape
        rot, half = s.rotary_dim, s.rotary_dim // 2
        x_rot = x[:, :rot]
        turned = torch.cat((-x_rot[:, half:], x_rot[:, :half]), dim=1)
        out = x_rot * cos + turned * sin
        return torch.cat((out, x[:, rot:]), dim=1) if rot < s.head_dim else out

    def forward(self, input_ids, position, causal_mask):
        s, t, ctx = self.shape, self.tokens, self.context
        dtype = self.dtype
        group, d = s.heads // s.kv_heads, s.head_dim
        kv = s.kv_heads * d
        h = self.embed(input_ids.view(t)) if self.embeds else input_ids.to(dtype)
        place = (self.slots == position.view(1, 1, 1, 1) + self.offsets).to(dtype)  # (1, 1, context, T)
        placed_t = place.transpose(2, 3)  # (1, 1, T, context)
        keep = 1.0 - placed_t.sum(dim=2, keepdim=True)  # (1, 1, 1, context): 0 where written
        cos = torch.matmul(self.rope_cos, place).view(1, s.rotary_dim, 1, t)
        sin = torch.matmul(self.rope_sin, place).view(1, s.rotary_dim, 1, t)
        mask = causal_mask.to(dtype)
        scale = 1.0 / math.sqrt(d)
        for i, layer in enumerate(self.layers):
            x = rms_norm(h, layer.input_norm, s.eps)
            q = self._rotate(conv(x, layer.q_proj).view(s.heads, d, 1, t), cos, sin)
            k = self._rotate(conv(x, layer.k_proj).view(s.kv_heads, d, 1, t), cos, sin)
            v = conv(x, layer.v_proj)
            cache_dtype = self.key_cache.dtype
            keys = self.key_cache[i:i + 1].to(dtype) * keep + torch.matmul(k.view(1, kv, 1, t), placed_t)
            values = self.value_cache[i:i + 1].to(dtype) * keep + torch.matmul(v, placed_t)
            self.key_cache[i:i + 1] = keys.to(cache_dtype)
            self.value_cache[i:i + 1] = values.to(cache_dtype)
            scores = torch.matmul(q.view(s.kv_heads, group, d, t).transpose(2, 3), keys.view(s.kv_heads, 1, d, ctx))
            weights = torch.softmax(scores * scale + mask, dim=-1)  # (kv_heads, group, T, context)
            out = torch.matmul(weights, values.view(s.kv_heads, 1, d, ctx).transpose(2, 3))
            h = h + conv(out.transpose(2, 3).reshape(1, s.heads * d, 1, t), layer.o_proj)
            x = rms_norm(h, layer.post_norm, s.eps)
            h = h + conv(torch.nn.functional.silu(conv(x, layer.gate_proj)) * conv(x, layer.up_proj),
                         layer.down_proj)
        if not self.heads:
            return h
        h = rms_norm(h, self.norm, s.eps)
        return tuple(conv(h, weight) for weight in self.lm_head)


def output_names(s: Shape) -> list[str]:
    return [f"{OUTPUT_PREFIX}{j}" for j in range(len(vocab_slices(s.vocab)))]


def empty(s: Shape, context: int, tokens: int, cache_dtype=torch.float16,
          part: tuple[int, int] | None = None) -> AneDecoder:
    """A decoder (or the ``part`` (first layer, layer count) of it) with uninitialised weights (allocated,
    not filled) and zeroed constants."""
    first, count = part or (0, s.layers)
    with torch.device("meta"):
        module = AneDecoder(s, context, tokens, cache_dtype, first_layer=first, n_layers=count)
    module.to_empty(device="cpu")
    module.reset()
    return module


def with_tokens(module: AneDecoder, tokens: int) -> AneDecoder:
    """The same decoder (its very weight tensors, its rotary tables) for calls of ``tokens`` tokens."""
    other = empty(module.shape, module.context, tokens, module.key_cache.dtype,
                  (module.first_layer, len(module.layers)))
    other.load_state_dict(module.state_dict(), assign=True)
    other.set_rope(module.rope_cos[0, 0].t().float(), module.rope_sin[0, 0].t().float())
    return other.eval()


def weight_names(module: AneDecoder) -> dict[str, tuple[str, slice | None]]:
    """Our parameter name -> (the checkpoint's tensor name, rows of it), for ``module``'s weights."""
    s = module.shape
    names: dict[str, tuple[str, slice | None]] = {}
    if hasattr(module, "embed_tokens"):
        names["embed_tokens"] = ("model.embed_tokens.weight", None)
    for j in range(len(module.layers)):
        names.update(layer_weight_names(s, module.first_layer + j, f"layers.{j}."))
    if module.heads:
        names["norm"] = ("model.norm.weight", None)
    if hasattr(module, "lm_head"):
        head = "model.embed_tokens.weight" if s.tied else "lm_head.weight"
        for j, (first, n) in enumerate(vocab_slices(s.vocab)):
            names[f"lm_head.{j}"] = (head, slice(first, first + n))
    return names


def build(ckpt_path, config: dict[str, Any], context: int, tokens: int, dtype=torch.float32,
          cache_dtype=torch.float16, part: tuple[int, int] | None = None) -> tuple[AneDecoder, dict[str, Any]]:
    """The ANE decoder (or its ``part``) for calls of ``tokens`` tokens with the checkpoint's weights in
    ``dtype``, read tensor by tensor; and the rope choice."""
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(str(ckpt_path))
    s = Shape.of(config)
    module = empty(s, context, tokens, cache_dtype, part)
    load_weights(module, checkpoint_tensors(ckpt_path), dtype, weight_names(module))
    module.set_rope(*rope_tables(hf_config, context))
    return module.eval(), rope_choice(hf_config, context)


def matrices(module: AneDecoder) -> dict[str, torch.nn.Parameter]:
    """Every weight matrix (4-D, [out, in, 1, 1]) by name; the norms are [1, C, 1, 1]."""
    return {name: p for name, p in module.named_parameters() if p.shape[0] > 1}


__all__ = ["AneDecoder", "CACHE_NAMES", "build", "vocab_slices", "with_tokens", "output_names", "matrices"]
