"""Phi checkpoint tensors -> llama.cpp's ``phi3`` and ``phimoe`` GGUF tensors, and their storage types.

llama.cpp's phi3 graph takes the checkpoint's fused projections as they are: ``qkv_proj`` (q, k, v
stacked along the output) is ``attn_qkv`` and ``gate_up_proj`` (gate, then up) is ``ffn_up``, which
llama.cpp splits in the same order for SwiGLU. Both use NEOX-style rotation like transformers, so no
row permutation is needed (unlike llama.cpp's ``llama`` architecture). Phi-4-mini is the same
architecture with partial rotary and tied embeddings (no ``output`` tensor: llama.cpp reuses
``token_embd``).

Phi-3.5-MoE (``phimoe``) has split q/k/v with biases, norms with biases, an output bias, a router
(``ffn_gate_inp``) and per-layer experts. Its checkpoints store the experts one by one
(``block_sparse_moe.experts.E.w1/w2/w3``: gate, down, up; the hub's layout, which transformers 5 also
writes on save) or fused as transformers 5 holds them in memory (``mlp.experts.gate_up_proj``, shape
(experts, 2 * ffn, hidden), gate first, and ``mlp.experts.down_proj``, (experts, hidden, ffn)); both are
stacked into llama.cpp's ``ffn_gate_exps`` / ``ffn_up_exps`` (experts, ffn, hidden) and
``ffn_down_exps`` (experts, hidden, ffn) by :func:`gguf_tensors`.
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
# phimoe: everything but the experts (and the norms' and projections' biases, "weight" -> "bias")
NAMES_MOE = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "model.layers.{i}.block_sparse_moe.gate.weight": "blk.{i}.ffn_gate_inp.weight",
    "model.layers.{i}.mlp.router.weight": "blk.{i}.ffn_gate_inp.weight",
}
NAMES_MOE.update({k.replace(".weight", ".bias"): v.replace(".weight", ".bias") for k, v in list(NAMES_MOE.items())
                  if "embed" not in k and "gate" not in k and "router" not in k})
# expert tensors: (layer, expert or None when fused, which)
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight$")
_FUSED = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
EXPERT_KINDS = {"w1": "ffn_gate_exps", "w2": "ffn_down_exps", "w3": "ffn_up_exps"}


def _compile(names: dict[str, str]) -> list:
    return [(re.compile("^" + re.escape(src).replace(r"\{i\}", r"(\d+)") + "$"), dst) for src, dst in names.items()]


_PATTERNS = _compile(NAMES)
_PATTERNS_MOE = _compile(NAMES_MOE)

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


def gguf_name(name: str, arch: str = "phi3") -> str | None:
    """The GGUF name of a checkpoint tensor (not an expert), or None for one llama.cpp does not read."""
    for pattern, dst in (_PATTERNS_MOE if arch == "phimoe" else _PATTERNS):
        m = pattern.match(name)
        if m:
            return dst.format(i=m.group(1)) if m.groups() else dst
    return None


def check_names(names: list[str], arch: str = "phi3") -> None:
    """Refuse a checkpoint with tensors we would silently drop (e.g. split q/k/v of another layout)."""
    unknown = [n for n in names if gguf_name(n, arch) is None and not n.endswith("rotary_emb.inv_freq")
               and not (arch == "phimoe" and (_EXPERT.match(n) or _FUSED.match(n)))]
    if unknown:
        raise PhiEdgeError(f"the gguf exporter does not know the checkpoint tensors {', '.join(unknown[:4])}"
                           f"{' ...' if len(unknown) > 4 else ''}; it writes Phi-3 / Phi-4-mini layouts "
                           f"(fused qkv_proj and gate_up_proj)")


def storage_type(gguf: str, shape: tuple[int, ...], precision: str) -> tuple[str, str | None]:
    """(type, fallback note) for one tensor: 1-D tensors (norms) stay F32; a matrix whose row is not a
    whole number of 32-wide blocks falls back to F16 for the quantized types, as llama.cpp does."""
    body, embd, out = RECIPES[precision]
    if len(shape) < 2 or gguf.endswith("ffn_gate_inp.weight"):  # llama.cpp never quantizes the router
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


def gguf_tensors(files, arch: str, n_experts: int = 0) -> Iterator[tuple[str, np.ndarray, list[str]]]:
    """(GGUF name, float32 array, checkpoint names it came from) of every tensor llama.cpp reads, in
    checkpoint order; a layer's experts come out stacked once all of them have been read."""
    pending: dict[tuple[int, str], dict[int, np.ndarray]] = {}
    for name, array in read_checkpoint(files):
        if arch == "phimoe":
            m, f = _EXPERT.match(name), _FUSED.match(name)
            if m:
                layer, expert, kind = int(m.group(1)), int(m.group(2)), EXPERT_KINDS[m.group(3)]
                got = pending.setdefault((layer, kind), {})
                got[expert] = array
                if len(got) == n_experts:
                    del pending[(layer, kind)]
                    yield (f"blk.{layer}.{kind}.weight", np.stack([got[e] for e in range(n_experts)]),
                           [name.replace(f"experts.{expert}.", f"experts.{e}.") for e in range(n_experts)])
                continue
            if f:
                layer = int(f.group(1))
                if f.group(2) == "down_proj":
                    yield f"blk.{layer}.ffn_down_exps.weight", array, [name]
                else:
                    half = array.shape[1] // 2  # gate first, then up (transformers' chunk order)
                    yield f"blk.{layer}.ffn_gate_exps.weight", np.ascontiguousarray(array[:, :half]), [name]
                    yield f"blk.{layer}.ffn_up_exps.weight", np.ascontiguousarray(array[:, half:]), [name]
                continue
        dst = gguf_name(name, arch)
        yield (dst, array, [name]) if dst is not None else (None, array, [name])
    if pending:
        (layer, kind), got = next(iter(pending.items()))
        raise PhiEdgeError(f"layer {layer} of the checkpoint holds {len(got)} of its {n_experts} experts' {kind} "
                           f"matrices; the checkpoint is incomplete")
