"""Our own Phi decoder written for tracing into Core ML: one module that does prefill and decode.

What makes it trace and convert cleanly:

- ``qkv_proj`` is split into q/k/v linears and ``gate_up_proj`` into gate/up linears (plain matmuls,
  each quantized on its own);
- RMSNorm is written out, scaled by each row's largest magnitude first so its squares stay inside
  fp16 (the device computes in fp16; Phi's hidden states have outliers past 256);
- rotary tables are constants over the exported context. LongRoPE's factors are chosen once from the
  exported context, as llama.cpp does: the long factors when the context exceeds the original window,
  else the short ones (transformers switches per sequence length; they agree on the sequences that
  fit the choice);
- partial rotary (Phi-4-mini), grouped-query attention, tied embeddings;
- the KV cache is two registered buffers ``key_cache`` / ``value_cache`` [layers, 1, kv_heads, context,
  head_dim] updated in place (Core ML states); the positions come from the shapes: the ``causal_mask``
  input [1, 1, T, end] covers the cache up to ``end`` and the T new tokens sit at ``end - T .. end``;
- the sliding window lives in the mask the host builds (:func:`phi_edge.runtimes.coreml.causal_mask`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

CACHE_NAMES = ("key_cache", "value_cache")


@dataclass(frozen=True)
class Shape:
    """The dimensions of the decoder (from config.json)."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    rotary_dim: int
    eps: float
    tied: bool

    @classmethod
    def of(cls, config: dict[str, Any]) -> "Shape":
        heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        rope = config.get("rope_parameters") or {}
        partial = config.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0)) or 1.0
        return cls(vocab=config["vocab_size"], hidden=config["hidden_size"], intermediate=config["intermediate_size"],
                   layers=config["num_hidden_layers"], heads=heads,
                   kv_heads=config.get("num_key_value_heads") or heads, head_dim=head_dim,
                   rotary_dim=int(head_dim * partial), eps=float(config.get("rms_norm_eps", 1e-5)),
                   tied=bool(config.get("tie_word_embeddings")))


def rope_choice(hf_config, context: int) -> dict[str, Any]:
    """Which rotary factors the exported graph uses for ``context`` tokens, for the manifest."""
    params = hf_config.rope_parameters or {}
    rope_type = params.get("rope_type", "default")
    if rope_type != "longrope":
        return {"rope_type": rope_type}
    original = int(params.get("original_max_position_embeddings") or hf_config.original_max_position_embeddings)
    factors = "long" if context > original else "short"
    return {"rope_type": "longrope", "factors": factors, "original_context": original, "context": context,
            "note": f"LongRoPE {factors} factors for the whole context, chosen once from the exported context "
                    f"{context} vs the original window {original} (as llama.cpp does); transformers switches per "
                    f"sequence length, so the two agree on sequences "
                    + (f"longer than {original} tokens" if factors == "long" else f"up to {original} tokens")}


def rope_tables(hf_config, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [context, rotary_dim] in float32, as transformers computes them for the chosen factors."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from phi_edge.runtimes.errors import PhiEdgeError

    rope_type = (hf_config.rope_parameters or {}).get("rope_type", "default")
    if rope_type == "default":
        from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

        inv, scale = Phi3RotaryEmbedding.compute_default_rope_parameters(hf_config)
    elif rope_type == "longrope":
        inv, scale = ROPE_INIT_FUNCTIONS["longrope"](hf_config, None, seq_len=context)
    else:
        raise PhiEdgeError(f"rope type '{rope_type}' is not supported by the Core ML exporter (default and longrope "
                           f"are); export this checkpoint for another target")
    freqs = torch.outer(torch.arange(context, dtype=torch.float32), inv.float())
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scale, emb.sin() * scale


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm with each row first divided by its largest magnitude (exact in real arithmetic for any
    positive divisor; in fp16 it keeps the squares from overflowing)."""
    peak = x.abs().amax(dim=-1, keepdim=True) + 1e-6
    y = x / peak
    return y * torch.rsqrt(y.pow(2).mean(dim=-1, keepdim=True) + eps / (peak * peak)) * weight


class Layer(torch.nn.Module):
    def __init__(self, s: Shape):
        super().__init__()
        self.input_norm = torch.nn.Parameter(torch.ones(s.hidden))
        self.q_proj = torch.nn.Linear(s.hidden, s.heads * s.head_dim, bias=False)
        self.k_proj = torch.nn.Linear(s.hidden, s.kv_heads * s.head_dim, bias=False)
        self.v_proj = torch.nn.Linear(s.hidden, s.kv_heads * s.head_dim, bias=False)
        self.o_proj = torch.nn.Linear(s.heads * s.head_dim, s.hidden, bias=False)
        self.post_norm = torch.nn.Parameter(torch.ones(s.hidden))
        self.gate_proj = torch.nn.Linear(s.hidden, s.intermediate, bias=False)
        self.up_proj = torch.nn.Linear(s.hidden, s.intermediate, bias=False)
        self.down_proj = torch.nn.Linear(s.intermediate, s.hidden, bias=False)


class PhiDecoder(torch.nn.Module):
    """forward(x, causal_mask [1, 1, T, end]): writes the T new keys/values into the cache at
    ``end - T .. end`` and attends over the cache up to ``end``.

    A whole model takes ``input_ids`` int32 [1, T] and returns logits [1, T, vocab]. A chunk of it (layers
    ``first_layer .. first_layer + n_layers``, for converting a large model part by part) takes the
    hidden states [1, T, hidden] unless it holds the embedding, and returns them unless it holds the head."""

    def __init__(self, s: Shape, cos: torch.Tensor, sin: torch.Tensor, cache_dtype=torch.float16,
                 first_layer: int = 0, n_layers: int | None = None, last: bool | None = None):
        super().__init__()
        self.shape = s
        self.first_layer = first_layer
        n_layers = s.layers - first_layer if n_layers is None else n_layers
        self.embeds = first_layer == 0
        self.heads = first_layer + n_layers == s.layers if last is None else last
        context = cos.shape[0]
        if self.embeds:
            self.embed_tokens = torch.nn.Parameter(torch.zeros(s.vocab, s.hidden))
        self.layers = torch.nn.ModuleList(Layer(s) for _ in range(n_layers))
        if self.heads:
            self.norm = torch.nn.Parameter(torch.ones(s.hidden))
            if not (s.tied and self.embeds):  # tied: a chunk without the embedding holds its own copy
                self.lm_head = torch.nn.Parameter(torch.zeros(s.vocab, s.hidden))
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        cache = (n_layers, 1, s.kv_heads, context, s.head_dim)
        self.register_buffer("key_cache", torch.zeros(cache, dtype=cache_dtype))
        self.register_buffer("value_cache", torch.zeros(cache, dtype=cache_dtype))

    @property
    def context(self) -> int:
        return self.key_cache.shape[3]

    @property
    def dtype(self):
        return self.layers[0].q_proj.weight.dtype if len(self.layers) else self.norm.dtype

    def reset(self) -> None:
        self.key_cache.zero_()
        self.value_cache.zero_()

    def _rotate(self, x, cos, sin):
        rot = self.shape.rotary_dim
        x_rot = x[..., :rot]
        half = rot // 2
        turned = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
        out = x_rot * cos + turned * sin
        return torch.cat((out, x[..., rot:]), dim=-1) if rot < self.shape.head_dim else out

    def forward(self, x, causal_mask):
        s = self.shape
        t = x.shape[1]
        end = causal_mask.shape[-1]
        start = end - t
        dtype = self.dtype
        mask = causal_mask.float()  # attention runs in float32 here (fp16 on the device, by the converter)
        h = F.embedding(x, self.embed_tokens) if self.embeds else x.to(dtype)
        cos = self.rope_cos[start:end].to(dtype)
        sin = self.rope_sin[start:end].to(dtype)
        group = s.heads // s.kv_heads
        for i, layer in enumerate(self.layers):
            x = rms_norm(h, layer.input_norm, s.eps)
            q = layer.q_proj(x).view(1, t, s.heads, s.head_dim).transpose(1, 2)
            k = layer.k_proj(x).view(1, t, s.kv_heads, s.head_dim).transpose(1, 2)
            v = layer.v_proj(x).view(1, t, s.kv_heads, s.head_dim).transpose(1, 2)
            q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
            self.key_cache[i:i + 1, :, :, start:end, :] = k.to(self.key_cache.dtype).unsqueeze(0)
            self.value_cache[i:i + 1, :, :, start:end, :] = v.to(self.value_cache.dtype).unsqueeze(0)
            keys = self.key_cache[i, :, :, :end, :].float()
            values = self.value_cache[i, :, :, :end, :].float()
            if group > 1:  # grouped-query attention: each kv head serves ``group`` query heads
                keys, values = (c.unsqueeze(2).expand(1, s.kv_heads, group, end, s.head_dim)
                                .reshape(1, s.heads, end, s.head_dim) for c in (keys, values))
            out = F.scaled_dot_product_attention(q.float(), keys, values, attn_mask=mask).to(dtype)
            h = h + layer.o_proj(out.transpose(1, 2).reshape(1, t, s.heads * s.head_dim))
            x = rms_norm(h, layer.post_norm, s.eps)
            h = h + layer.down_proj(F.silu(layer.gate_proj(x)) * layer.up_proj(x))
        if not self.heads:
            return h
        h = rms_norm(h, self.norm, s.eps)
        return F.linear(h, self.lm_head if hasattr(self, "lm_head") else self.embed_tokens)


def chunks(s: Shape, max_params: int) -> list[tuple[int, int]]:
    """(first layer, layer count) of each part, whole layers, each part at most ``max_params`` parameters
    where it can be (the embedding counts in the first part, the head in the last)."""
    layer = s.hidden * (s.heads + 2 * s.kv_heads) * s.head_dim + s.heads * s.head_dim * s.hidden \
        + 3 * s.hidden * s.intermediate
    edge = s.vocab * s.hidden
    parts, start, size = [], 0, edge
    for i in range(s.layers):
        extra = edge if i == s.layers - 1 else 0
        if i > start and size + layer + extra > max_params:
            parts.append((start, i - start))
            start, size = i, 0
        size += layer
    parts.append((start, s.layers - start))
    return parts


def layer_weight_names(shape, layer: int, ours: str, suffix: str = "") -> dict[str, tuple[str, slice | None]]:
    """One decoder layer: our parameter name (``ours`` + projection + ``suffix``) -> (the checkpoint's tensor
    name, rows of it): q/k/v split out of ``qkv_proj``, gate/up out of ``gate_up_proj``."""
    q, kv, inter = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim, shape.intermediate
    p = f"model.layers.{layer}."
    return {
        ours + "input_norm": (p + "input_layernorm.weight", None),
        ours + "post_norm": (p + "post_attention_layernorm.weight", None),
        ours + "q_proj" + suffix: (p + "self_attn.qkv_proj.weight", slice(0, q)),
        ours + "k_proj" + suffix: (p + "self_attn.qkv_proj.weight", slice(q, q + kv)),
        ours + "v_proj" + suffix: (p + "self_attn.qkv_proj.weight", slice(q + kv, q + 2 * kv)),
        ours + "o_proj" + suffix: (p + "self_attn.o_proj.weight", None),
        ours + "gate_proj" + suffix: (p + "mlp.gate_up_proj.weight", slice(0, inter)),
        ours + "up_proj" + suffix: (p + "mlp.gate_up_proj.weight", slice(inter, 2 * inter)),
        ours + "down_proj" + suffix: (p + "mlp.down_proj.weight", None),
    }


def hf_weight_names(module: PhiDecoder) -> dict[str, tuple[str, slice | None]]:
    """Our parameter name -> (the checkpoint's tensor name, rows of it) for every weight of ``module``."""
    s = module.shape
    names = {}
    if module.embeds:
        names["embed_tokens"] = ("model.embed_tokens.weight", None)
    for j in range(len(module.layers)):
        names.update(layer_weight_names(s, module.first_layer + j, f"layers.{j}.", ".weight"))
    if module.heads:
        names["norm"] = ("model.norm.weight", None)
        if hasattr(module, "lm_head"):
            names["lm_head"] = ("model.embed_tokens.weight" if s.tied else "lm_head.weight", None)
    return names


def build(ckpt_path, config: dict[str, Any], context: int, dtype=torch.float32, cache_dtype=torch.float16,
          part: tuple[int, int] | None = None):
    """Our decoder (or the ``part`` (first layer, layer count) of it) for the checkpoint at ``ckpt_path``
    with its weights in ``dtype``, read tensor by tensor from its safetensors files (never the whole
    float32 model at once); and the rope choice."""
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(str(ckpt_path))
    s = Shape.of(config)
    cos, sin = rope_tables(hf_config, context)
    first, count = part or (0, s.layers)
    with torch.device("meta"):
        module = PhiDecoder(s, cos.to("meta"), sin.to("meta"), cache_dtype, first_layer=first, n_layers=count)
    module.to_empty(device="cpu")
    module.rope_cos.copy_(cos)
    module.rope_sin.copy_(sin)
    module.reset()
    load_weights(module, checkpoint_tensors(ckpt_path), dtype)
    return module.eval(), rope_choice(hf_config, context)


def checkpoint_tensors(ckpt_path):
    """name -> a function reading that tensor from the checkpoint's safetensors files."""
    from pathlib import Path

    from safetensors import safe_open

    where = {}
    for f in sorted(Path(ckpt_path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as handle:
            for name in handle.keys():
                where[name] = f

    def read(name: str) -> torch.Tensor:
        with safe_open(str(where[name]), framework="pt") as handle:
            return handle.get_tensor(name)

    return {name: (lambda n=name: read(n)) for name in where}


def load_weights(module: torch.nn.Module, tensors, dtype, names: dict | None = None) -> None:
    """Fill ``module``'s weights from ``tensors`` (checkpoint name -> reader), converting each to ``dtype``.
    ``names``: our parameter name -> (checkpoint name, rows), by default :func:`hf_weight_names`; a parameter
    may add size-1 axes to the checkpoint's shape (the Neural Engine's [out, in, 1, 1] convolutions)."""
    from phi_edge.runtimes.errors import PhiEdgeError

    params = dict(module.named_parameters())
    fused: dict[str, torch.Tensor] = {}
    for ours, (theirs, rows) in (names or hf_weight_names(module)).items():
        if theirs not in tensors:
            raise PhiEdgeError(f"the checkpoint has no tensor '{theirs}'; it is not a Phi-3/Phi-4-mini checkpoint "
                               f"phi-edge can export to Core ML")
        if theirs not in fused:
            fused = {theirs: tensors[theirs]()}  # one checkpoint tensor in memory at a time
        w = fused[theirs] if rows is None else fused[theirs][rows]
        target = params[ours]
        expected = tuple(n for n in target.shape if n != 1) if target.dim() > w.dim() else tuple(target.shape)
        if tuple(w.shape) != expected:
            raise PhiEdgeError(f"tensor '{theirs}' has shape {tuple(w.shape)}, expected {expected} from "
                               f"config.json; the checkpoint's weights do not match its config")
        target.data = w.to(dtype).reshape(target.shape).contiguous()
