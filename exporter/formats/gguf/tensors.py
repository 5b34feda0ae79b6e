"""Phi-3 checkpoint tensors -> llama.cpp's ``phi3`` GGUF tensors, and their storage types.

llama.cpp's phi3 graph takes the checkpoint's fused projections as they are: ``qkv_proj`` (q, k, v
stacked along the output) is ``attn_qkv`` and ``gate_up_proj`` (gate, then up) is ``ffn_up``, which
llama.cpp splits in the same order for SwiGLU. Both use NEOX-style rotation like transformers, so no
row permutation is needed (unlike llama.cpp's ``llama`` architecture). Phi-4-mini is the same
architecture with partial rotary and tied embeddings (no ``output`` tensor: llama.cpp reuses
``token_embd``).
"""

from __future__ import annotations

import re
from typing import Any, Iterator

import numpy as np

from phi_edge.runtimes.errors import PhiEdgeError

# checkpoint name (layer index as {i}) -> GGUF name
NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.qkv_proj.weight": "blk.{i}.attn_qkv.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "model.layers.{i}.mlp.gate_up_proj.weight": "blk.{i}.ffn_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
}
_PATTERNS = [(re.compile("^" + re.escape(src).replace(r"\{i\}", r"(\d+)") + "$"), dst) for src, dst in NAMES.items()]

# what each precision stores: (matmul body, token_embd, output). Q4_0 leaves the output matrix at Q8_0
# (llama.cpp's own Q4_0 recipe keeps it at Q6_K, a K-quant gguf's numpy quantizer lacks).
RECIPES = {
    "fp32": ("F32", "F32", "F32"),
    "fp16": ("F16", "F16", "F16"),
    "bf16": ("BF16", "BF16", "BF16"),
    "int8": ("Q8_0", "Q8_0", "Q8_0"),
    "int4": ("Q4_0", "Q4_0", "Q8_0"),
}
FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 7, "BF16": 32}  # llama_ftype of the body type
BLOCK = 32  # elements per block of Q4_0 / Q8_0 along a row


def gguf_name(name: str) -> str | None:
    """The GGUF name of a checkpoint tensor, or None for one llama.cpp does not read."""
    for pattern, dst in _PATTERNS:
        m = pattern.match(name)
        if m:
            return dst.format(i=m.group(1)) if m.groups() else dst
    return None


def check_names(names: list[str]) -> None:
    """Refuse a checkpoint with tensors we would silently drop (e.g. split q/k/v of another layout)."""
    unknown = [n for n in names if gguf_name(n) is None and not n.endswith("rotary_emb.inv_freq")]
    if unknown:
        raise PhiEdgeError(f"the gguf exporter does not know the checkpoint tensors {', '.join(unknown[:4])}"
                           f"{' ...' if len(unknown) > 4 else ''}; it writes Phi-3 / Phi-4-mini layouts "
                           f"(fused qkv_proj and gate_up_proj)")


def storage_type(gguf: str, shape: tuple[int, ...], precision: str) -> tuple[str, str | None]:
    """(type, fallback note) for one tensor: 1-D tensors (norms) stay F32; a matrix whose row is not a
    whole number of 32-wide blocks falls back to F16 for the quantized types, as llama.cpp does."""
    body, embd, out = RECIPES[precision]
    if len(shape) < 2:
        return "F32", None
    want = embd if gguf == "token_embd.weight" else out if gguf == "output.weight" else body
    if want in ("Q4_0", "Q8_0") and shape[-1] % BLOCK:
        return "F16", f"{gguf}: row width {shape[-1]} is not a multiple of {BLOCK}; stored as F16"
    return want, None


def encode(array: np.ndarray, qtype: str) -> tuple[np.ndarray, Any]:
    """The tensor's bytes for the GGUF writer: (data, raw_dtype or None for a plain float array)."""
    from gguf import GGMLQuantizationType, quants

    if qtype == "F32":
        return np.ascontiguousarray(array, dtype=np.float32), None
    if qtype == "F16":
        return np.ascontiguousarray(array, dtype=np.float16), None
    t = GGMLQuantizationType[qtype]
    return quants.quantize(np.ascontiguousarray(array, dtype=np.float32), t), t


def read_checkpoint(files) -> Iterator[tuple[str, np.ndarray]]:
    """(name, float32 array) of every tensor in the checkpoint's safetensors files, one at a time
    (through torch, which reads bf16 as well)."""
    from safetensors import safe_open

    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                yield name, st.get_tensor(name).float().numpy()


def rope_factors(config: dict[str, Any], rope: dict[str, Any], rot_dims: int) -> dict[str, np.ndarray]:
    """LongRoPE's per-frequency factors as llama.cpp's ``rope_factors_long/short`` tensors."""
    out = {}
    for key, name in (("long_factor", "rope_factors_long.weight"), ("short_factor", "rope_factors_short.weight")):
        factors = np.asarray(rope[key], dtype=np.float32)
        if factors.shape != (rot_dims // 2,):
            raise PhiEdgeError(f"rope_scaling.{key} has {factors.size} entries; the model's rotary width "
                               f"{rot_dims} needs {rot_dims // 2}")
        out[name] = factors
    return out
