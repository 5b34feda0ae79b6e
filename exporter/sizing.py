"""Sizes from a config alone: parameter count, artifact bytes, KV cache and runtime RAM.

Used by ``phi-export plan``, by the fit check before an export and for the manifest's estimate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

RUNTIME_OVERHEAD_BYTES = 256 * 1024**2  # engine, tokenizer, activations, allocator slack
FLOAT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
QUANT_BITS = {"int4": 4, "int8": 8}


@dataclass
class ParamCounts:
    embeddings: int
    lm_head: int  # 0 when tied to the embeddings
    linear: int  # every projection inside the decoder layers (quantizable)
    other: int  # norms, biases, routers
    vision: int = 0  # Phi-4-multimodal's image encoder and projection (exported at fp32)

    @property
    def total(self) -> int:
        return self.embeddings + self.lm_head + self.linear + self.other + self.vision


def head_dim(config: dict[str, Any]) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def param_counts(config: dict[str, Any]) -> ParamCounts:
    h = config["hidden_size"]
    inter = config["intermediate_size"]
    layers = config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    hd = head_dim(config)
    vocab = config["vocab_size"]
    attn = h * heads * hd + 2 * h * kv * hd + heads * hd * h
    experts = config.get("num_local_experts")
    mlp = experts * 3 * h * inter if experts else 3 * h * inter
    other_per_layer = 2 * h * (2 if experts else 1)  # norms (LayerNorm has a bias)
    if experts:
        other_per_layer += h * experts  # router
    if config.get("attention_bias"):
        other_per_layer += heads * hd + 2 * kv * hd + h
    tied = bool(config.get("tie_word_embeddings"))
    lm_head = 0 if tied else vocab * h + (vocab if config.get("lm_head_bias") else 0)
    return ParamCounts(embeddings=vocab * h, lm_head=lm_head, linear=layers * (attn + mlp),
                       other=layers * other_per_layer + h * (2 if experts else 1), vision=vision_params(config))


def vision_params(config: dict[str, Any]) -> int:
    """Parameters of the exported image path: SigLIP up to its feature layer, the projection, the
    newline/separator rows (0 for text-only configs)."""
    v = config.get("vision_config")
    if not isinstance(v, dict):
        return 0
    hv, iv, h = v.get("hidden_size", 1152), v.get("intermediate_size", 4304), config["hidden_size"]
    layers = v.get("num_hidden_layers", 27)
    feature = v.get("feature_layer", -2)
    layers = layers + 1 + feature if feature < 0 else feature
    patch, side = v.get("patch_size", 14), v.get("image_size", 448) // v.get("patch_size", 14)
    per_layer = 4 * (hv * hv + hv) + 2 * hv * iv + iv + hv + 4 * hv
    return (3 * patch * patch * hv + hv + side * side * hv + layers * per_layer
            + hv * h + h + h * h + h + 2 * hv)


def quantized_bytes(n: int, bits: int, block: int, float_bytes: int, asym: bool) -> int:
    """Bytes of ``n`` weights at ``bits`` with one scale (and zero point if ``asym``) per block."""
    blocks = n / max(block, 1)
    return int(n * bits / 8 + blocks * float_bytes + (blocks * bits / 8 if asym else 0))


def kv_cache_bytes(config: dict[str, Any], context: int, dtype_bytes: int) -> int:
    kv = config.get("num_key_value_heads") or config["num_attention_heads"]
    return 2 * config["num_hidden_layers"] * kv * head_dim(config) * context * dtype_bytes


def runtime_bytes(weights_bytes: int, kv_bytes: int) -> int:
    return int(weights_bytes + kv_bytes + RUNTIME_OVERHEAD_BYTES + 0.05 * weights_bytes)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"
