"""GGUF format: our own Phi -> GGUF writer on the PyPI ``gguf`` package, run by llama.cpp.

Writes ``model.gguf`` for llama.cpp's ``phi3`` architecture (Phi-3, Phi-3.5-mini, Phi-4-mini) or its
``phimoe`` architecture (Phi-3.5-MoE: experts stacked per layer, see :mod:`.tensors`): the
hyperparameters, LongRoPE (``rope_factors_long/short``, attention factor, original context), the
sliding window, the tokenizer (``tokenizer.ggml.*``, see :mod:`.vocab`) and the chat template, and the
tensors (:mod:`.tensors`) at fp32, fp16, bf16, int8 (Q8_0) or int4 (llama.cpp's Q4_K_M mix, see
:func:`q4_k_m_type`), quantized with ``gguf``'s numpy quantizer and our own K-quants (:mod:`.kquants`,
Q4_K / Q5_K / Q6_K, which ``gguf`` only dequantizes). Every quantized tensor
is read back with ``gguf.GGUFReader`` and dequantized with ``gguf``'s dequantizer before the export
is accepted. Nothing of llama.cpp's convert script is used or run. With ``--calibration-text`` an
importance matrix (:mod:`.imatrix`) weights the quantizers' scale search as llama.cpp's does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from phi_edge.runtimes.errors import PhiEdgeError

from .. import ExportOptions, FormatResult, require_tool
from . import kquants, legacy, tensors, vocab

FORMAT = "gguf"
OPTIONS: frozenset[str] = frozenset({"quant", "calibration_text"})
TOOLS = ("gguf", "xllamacpp")
FILE = "model.gguf"
ARCH = "phi3"
ARCH_MOE = "phimoe"
# bytes per weight of each storage type (blocks of 32: Q8_0 34 bytes, Q4_0 18 bytes)
BYTES = {"F32": 4.0, "F16": 2.0, "BF16": 2.0, "Q8_0": 34 / 32, "Q4_0": 18 / 32, "Q5_0": 22 / 32, "Q5_1": 24 / 32,
         "Q4_K": 144 / 256, "Q5_K": 176 / 256, "Q6_K": 210 / 256}
# a dequantized tensor read back from the file must be this close to the source, relative to the
# tensor's largest magnitude (a scale per 32 weights: Q8_0 half a step of 1/127, Q4_0 of 1/8)
# (Q5_0/Q5_1: a step of their 32 levels; the K-quants: a step of a sub-block of their 16 / 32 / 64 levels with
# room for the least-squares scales, which may clip a sub-block's extreme, and the 6- / 8-bit scales)
READBACK_TOLERANCE = {"F32": 0.0, "F16": 1e-3, "BF16": 8e-3, "Q8_0": 1 / 127, "Q4_0": 1 / 7,
                      "Q5_0": 1 / 15, "Q5_1": 1 / 15, "Q4_K": 1 / 5, "Q5_K": 1 / 10, "Q6_K": 1 / 15}

# int4 is llama.cpp's Q4_K_M, as llama_tensor_get_type (src/llama-quant.cpp) picks the types for a dense,
# non-Falcon model: Q4_K for every matrix except
# - output.weight (token_embd.weight when the embeddings are tied and there is no output): Q6_K, or Q8_0
#   when its row width is not a multiple of 256;
# - attn_qkv (the fused projection Phi-3 has): Q5_K; llama.cpp's Q6_K rule for attn_v in the
#   use_more_bits layers only matches split attn_v tensors, which phi3 GGUFs do not have;
# - ffn_down in the layers use_more_bits picks (the first and last eighth, and every third layer
#   between them): Q6_K.
# --quant picks another of llama.cpp's mixes, by the same function's rules: Q4_K_S (Q4_K; Q5_K for
# ffn_down in the first eighth of the layers), Q5_K_M (Q5_K; Q6_K for attn_qkv and the use_more_bits
# ffn_down), Q6_K (Q6_K throughout), each with the output rule above; Q4_0 and Q8_0 are the plain
# recipes of --int4 before K-quants (output Q8_0) and of --int8.
# A matrix whose row width is not a multiple of 256 falls back as llama.cpp does: Q4_K -> Q5_0,
# Q5_K -> Q5_1, Q6_K -> Q8_0, and to F16 when the width is not a multiple of 32 either; each fallback
# is listed in the manifest's quantization "fallbacks".
Q4_K_M = "Q4_K_M"
K_SCHEMES = {"Q4_K_M": "Q4_K", "Q4_K_S": "Q4_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K"}  # scheme -> most tensors' type
PLAIN_SCHEMES = {"Q4_0": "int4", "Q8_0": "int8"}  # scheme -> the tensors.RECIPES entry it is
SCHEME_FILE_TYPES = {"Q4_0": 2, "Q8_0": 7, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18}  # llama_ftype
DEFAULT_SCHEMES = {"int4": Q4_K_M, "int8": "Q8_0"}
K_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of the layers that get more bits in its _M mixes."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def kquant_type(scheme: str, name: str, shape: tuple[int, ...], n_layers: int,
                tied: bool) -> tuple[str, str | None]:
    """(type, fallback note) of one GGUF tensor in a K-quant mix (the rules above); 1-D tensors stay F32."""
    if len(shape) < 2 or name.endswith("ffn_gate_inp.weight"):  # llama.cpp never quantizes the router
        return "F32", None
    width = shape[-1]
    parts = name.split(".")
    kind = parts[2] if name.startswith("blk.") else None
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        if width % kquants.QK_K:
            return "Q8_0", f"{name}: row width {width} is not a multiple of {kquants.QK_K}; stored as Q8_0, not Q6_K"
        return "Q6_K", None
    want = K_SCHEMES[scheme]
    if kind == "attn_qkv":
        want = {"Q4_K_M": "Q5_K", "Q5_K_M": "Q6_K"}.get(scheme, want)
    elif kind == "attn_v" and scheme in ("Q4_K_M", "Q5_K_M") and use_more_bits(int(parts[1]), n_layers):
        want = "Q6_K"  # split attn_v (phimoe) in the use_more_bits layers
    elif kind in ("ffn_down", "ffn_down_exps"):
        layer = int(parts[1])
        if scheme in ("Q4_K_M", "Q5_K_M") and use_more_bits(layer, n_layers):
            want = "Q6_K"
        elif scheme == "Q4_K_S" and layer < n_layers // 8:
            want = "Q5_K"
    if width % kquants.QK_K == 0:
        return want, None
    got = K_FALLBACK[want] if width % tensors.BLOCK == 0 else "F16"
    return got, f"{name}: row width {width} is not a multiple of {kquants.QK_K}; stored as {got}, not {want}"


def q4_k_m_type(name: str, shape: tuple[int, ...], n_layers: int, tied: bool) -> tuple[str, str | None]:
    return kquant_type(Q4_K_M, name, shape, n_layers, tied)


def scheme_of(precision: str, q: dict[str, Any]) -> str:
    """The quantization mix: --quant's, else int4's Q4_K_M, int8's Q8_0, or the float type."""
    name = q.get("quant")
    if name is None:
        return DEFAULT_SCHEMES.get(precision) or tensors.RECIPES[precision][0]
    known = {s.lower(): s for s in SCHEME_FILE_TYPES}
    if str(name).lower() not in known:
        raise PhiEdgeError(f"--quant {name} is not a GGUF quantization phi-edge writes; known: "
                           f"{', '.join(SCHEME_FILE_TYPES)}")
    if precision not in DEFAULT_SCHEMES:
        raise PhiEdgeError(f"--quant applies to quantized GGUF exports (--int4 or --int8), not {precision}")
    return known[str(name).lower()]


def storage_type(name: str, shape: tuple[int, ...], scheme: str, n_layers: int, tied: bool):
    if scheme in K_SCHEMES:
        return kquant_type(scheme, name, shape, n_layers, tied)
    recipe = PLAIN_SCHEMES.get(scheme) or next(p for p, r in tensors.RECIPES.items() if r[0] == scheme)
    return tensors.storage_type(name, shape, recipe)


def encode(array: np.ndarray, qtype: str, importance: np.ndarray | None = None):
    """(bytes, raw type) of one tensor; ``importance`` (per column, from an importance matrix) weights the
    scale search of the K-quants and of Q4_0 / Q5_0 / Q5_1 (llama.cpp ignores it for Q8_0 and floats)."""
    from gguf import GGMLQuantizationType

    if qtype in kquants.TYPES:
        return kquants.quantize(array, qtype, importance), GGMLQuantizationType[qtype]
    if importance is not None and qtype in legacy.TYPES:
        return legacy.quantize(array, qtype, importance), GGMLQuantizationType[qtype]
    return tensors.encode(array, qtype)


def weighted(qtype: str) -> bool:
    """Whether an importance matrix changes how ``qtype`` is quantized."""
    return qtype in kquants.TYPES or qtype in legacy.TYPES


def scheme_bytes(config: dict[str, Any], scheme: str) -> int:
    """The matrices' bytes in a quantization mix, tensor by tensor from the configuration's shapes."""
    from ...sizing import head_dim

    h, inter, layers = int(config["hidden_size"]), int(config["intermediate_size"]), int(config["num_hidden_layers"])
    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    hd, vocab_n = head_dim(config), int(config["vocab_size"])
    tied = bool(config.get("tie_word_embeddings"))
    experts = int(config.get("num_local_experts") or 0)
    shapes = {"token_embd.weight": (vocab_n, h)}
    if not tied:
        shapes["output.weight"] = (vocab_n, h)
    for i in range(layers):
        if experts:
            shapes.update({f"blk.{i}.attn_q.weight": (heads * hd, h), f"blk.{i}.attn_k.weight": (kv * hd, h),
                           f"blk.{i}.attn_v.weight": (kv * hd, h), f"blk.{i}.attn_output.weight": (h, heads * hd),
                           f"blk.{i}.ffn_gate_exps.weight": (experts, inter, h),
                           f"blk.{i}.ffn_up_exps.weight": (experts, inter, h),
                           f"blk.{i}.ffn_down_exps.weight": (experts, h, inter)})
            continue
        shapes.update({f"blk.{i}.attn_qkv.weight": ((heads + 2 * kv) * hd, h),
                       f"blk.{i}.attn_output.weight": (h, heads * hd),
                       f"blk.{i}.ffn_up.weight": (2 * inter, h), f"blk.{i}.ffn_down.weight": (h, inter)})
    return int(sum(BYTES[storage_type(n, s, scheme, layers, tied)[0]] * float(np.prod(s)) for n, s in shapes.items()))


def check(ckpt, target, opts: ExportOptions) -> None:
    require_tool("gguf", "the gguf exporter")
    config = ckpt.config
    if config.get("model_type") not in ("phi3", "phimoe"):
        raise PhiEdgeError(f"the gguf exporter writes Phi-3 / Phi-3.5-mini / Phi-4-mini (model_type phi3) and "
                           f"Phi-3.5-MoE (phimoe), not {ckpt.architecture}; export it for another target, "
                           f"e.g. --target intel-cpu")
    if opts.precision not in tensors.RECIPES:
        raise PhiEdgeError(f"the gguf exporter writes {', '.join(tensors.RECIPES)}, not {opts.precision}")
    scheme_of(opts.precision, opts.quant)  # an unknown --quant name, or --quant on a float export
    if opts.quant.get("calibration_text"):
        if opts.precision not in DEFAULT_SCHEMES:
            raise PhiEdgeError(f"--calibration-text builds an importance matrix for quantized GGUF exports "
                               f"(--int4 or --int8), not {opts.precision}")
        from ..openvino.calibration import read_text

        read_text(opts.quant["calibration_text"])  # a missing, empty or non-UTF-8 file fails here
    if config.get("quantization_config"):
        raise PhiEdgeError("the checkpoint is already quantized; export from its float checkpoint")
    if ckpt.weight_format != "safetensors":
        raise PhiEdgeError("the gguf exporter reads safetensors weights; convert the checkpoint first")
    from ...checkpoint import rope_settings

    rope = rope_settings(config)
    kind = rope.get("type") or rope.get("rope_type") if rope else None
    if kind not in (None, "longrope", "su"):
        raise PhiEdgeError(f"llama.cpp's phi3 model applies LongRoPE only, not rope_scaling type '{kind}'")


def estimate_bytes(config: dict[str, Any], precision: str, q: dict[str, Any], target) -> int:
    from ...sizing import param_counts

    c = param_counts(config)
    scheme = scheme_of(precision, q)
    if scheme in K_SCHEMES or scheme in PLAIN_SCHEMES:
        return scheme_bytes(config, scheme) + int(c.other * 4)
    body, embd, out = (BYTES[t] for t in tensors.RECIPES[precision])
    return int(c.linear * body + c.embeddings * embd + c.lm_head * out + c.other * 4)


def model_name(ckpt, phi3_rule: bool) -> str:
    """``general.name``: llama.cpp strips the whitespace after Phi-3's special tokens only when the
    name contains "phi-3", so the name says "Phi-3" exactly when the source's tokenizer strips that way."""
    base = Path(str(ckpt.source)).name or "model"
    clean = base.replace("Phi-3", "Phi").replace("phi-3", "phi").replace("Phi3", "Phi").replace("phi3", "phi")
    return f"Phi-3 ({base})" if phi3_rule else clean


def export(ckpt, target, opts: ExportOptions, out: Path, steps) -> FormatResult:
    gguf = require_tool("gguf", "the gguf exporter")
    from ...checkpoint import rope_settings
    from ...sizing import head_dim
    from ...source_tokenizer import SourceTokenizer, chat_template_of

    config = ckpt.config
    precision = opts.precision
    source_tok = SourceTokenizer(ckpt.path)
    tj = source_tok.normalized_json()
    phi3_rule = vocab.phi3_strip_rule(tj)
    hd = head_dim(config)
    rot = int(hd * float(config.get("partial_rotary_factor", 1.0)))
    rope = rope_settings(config)
    original = int(rope.get("original_max_position_embeddings") or config.get("original_max_position_embeddings")
                   or config["max_position_embeddings"])
    tied = bool(config.get("tie_word_embeddings"))
    path = out / FILE
    arch = ARCH_MOE if ckpt.is_moe else ARCH
    n_experts = int(config.get("num_local_experts") or 0) if ckpt.is_moe else 0

    writer = gguf.GGUFWriter(str(path), arch)
    name = model_name(ckpt, phi3_rule)
    writer.add_name(name)
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_rope_scaling_orig_ctx_len(original)
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_head_count(int(config["num_attention_heads"]))
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or config["num_attention_heads"]))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-5)))  # phimoe reads this key too
    if n_experts:
        writer.add_expert_count(n_experts)
        writer.add_expert_used_count(int(config["num_experts_per_tok"]))
    writer.add_rope_dimension_count(rot)
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    if config.get("sliding_window"):
        writer.add_sliding_window(int(config["sliding_window"]))
    n_layers = int(config["num_hidden_layers"])
    scheme = scheme_of(precision, opts.quant)
    writer.add_file_type(SCHEME_FILE_TYPES.get(scheme) or tensors.FILE_TYPES[scheme])
    attn_factor = 1.0
    extra: dict[str, np.ndarray] = {}
    if rope:
        factor = config["max_position_embeddings"] / original
        attn_factor = float(rope.get("attention_factor") or (
            np.sqrt(1 + np.log(factor) / np.log(original)) if factor > 1 else 1.0))
        writer.add_rope_scaling_attn_factors(attn_factor)
        extra = tensors.rope_factors(config, rope, rot)
    tok_info = vocab.write(writer, tj, int(config["vocab_size"]), source_tok.behaviour)
    template = chat_template_of(ckpt.path, source_tok.config)
    if template:
        writer.add_chat_template(template)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    importance: dict[str, np.ndarray] = {}
    imatrix_tokens = 0
    text = opts.quant.get("calibration_text")
    if text:
        from . import imatrix

        with steps.step(f"Collecting an importance matrix from {Path(text).name} (torch forward hooks)"):
            importance, imatrix_tokens = imatrix.collect(ckpt.path, text, arch)
        if tied and "output.weight" in importance:  # the output matrix is token_embd
            importance["token_embd.weight"] = importance.pop("output.weight")
    types: dict[str, str] = {}
    fallbacks: list[str] = []
    names: list[str] = []
    used: dict[str, np.ndarray] = {}
    with steps.step(f"Converting the weights to GGUF ({precision}: {scheme})"):
        for dst, array, srcs in tensors.gguf_tensors(ckpt.weight_files, arch, n_experts):
            names.extend(srcs)
            if dst is None or (tied and dst == "output.weight"):
                continue
            qtype, note = storage_type(dst, array.shape, scheme, n_layers, tied)
            if note:
                fallbacks.append(note)
            imp = importance.get(dst) if weighted(qtype) else None
            if imp is not None:
                used[dst] = imp
            data, raw = encode(array, qtype, imp)
            writer.add_tensor(dst, data, raw_dtype=raw)
            types[dst] = qtype
        tensors.check_names(names, arch)
        for dst, array in extra.items():
            writer.add_tensor(dst, array)
            types[dst] = "F32"
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    with steps.step("Reading the GGUF back and checking every tensor against the checkpoint"):
        readback = check_readback(path, ckpt, types, tied, extra, used, arch, n_experts)
    counts: dict[str, int] = {}
    for t in types.values():
        counts[t] = counts.get(t, 0) + 1
    quant = {"tool": "gguf (numpy quantizer)" + (" and phi-edge's numpy K-quants" if scheme in K_SCHEMES else ""),
             "file": FILE, "types": counts, "scheme": scheme,
             "body": K_SCHEMES.get(scheme) or tensors.RECIPES[PLAIN_SCHEMES.get(scheme, precision)][0],
             "token_embd": types.get("token_embd.weight"),
             "output": "token_embd (tied)" if tied else types.get("output.weight"), "fallbacks": fallbacks,
             "imatrix": ({"text": Path(text).name, "tokens": imatrix_tokens, "tensors": len(used),
                          "how": "per-column mean squared inputs of each linear layer of the float32 source "
                                 "(torch forward hooks), weighting the scale search as llama.cpp's quant_weights"}
                         if text else None)}
    if text:
        quant["tool"] += " with an importance matrix"
    runtime = {"gguf_file": FILE, "original_context_length": original if rope else None,
               "longrope": bool(rope), "general_name": name, "architecture": arch}
    from .modelfile import write as write_modelfile  # Ollama's Modelfile beside the gguf file

    write_modelfile(out, FILE, ckpt.family, opts.context_length)
    return FormatResult(quantization=quant, runtime=runtime,
                        verification={"gguf_readback": readback, "gguf_tokenizer": tok_info})


def check_readback(path: Path, ckpt, types: dict[str, str], tied: bool, extra: dict[str, np.ndarray],
                   weighted_by_imatrix: dict[str, np.ndarray] | None = None, arch: str = ARCH,
                   n_experts: int = 0) -> str:
    """Read the file with ``gguf.GGUFReader``, dequantize each tensor with ``gguf``'s dequantizer and
    compare it with the source: exact for F32; otherwise the largest error within half a quantization
    step of the tensor's largest magnitude, or, for a tensor quantized with an importance matrix (whose
    fit may clip a rarely used column's extreme to serve the others, as llama.cpp's does), the
    importance-weighted RMS error within the same fraction of the importance-weighted RMS."""
    from gguf import GGUFReader, quants

    reader = GGUFReader(str(path))
    found = {t.name: t for t in reader.tensors}
    if set(found) != set(types):
        raise PhiEdgeError(f"the written GGUF holds {sorted(set(found) ^ set(types))[:4]} unexpectedly; "
                           f"nothing was written")
    worst: dict[str, float] = {}

    def compare(name: str, want: np.ndarray) -> None:
        t = found[name]
        got = quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
        qtype = types[name]
        imp = (weighted_by_imatrix or {}).get(name)
        if imp is None:
            scale = float(np.abs(want).max()) or 1.0
            err = float(np.abs(got.astype(np.float32) - want).max()) / scale
        else:
            col = kquants.floor_importance(np.asarray(imp, np.float32))
            total = float(np.sum(np.square(want, dtype=np.float64) * col)) or 1.0
            err = float(np.sqrt(np.sum(np.square(got - want, dtype=np.float64) * col) / total))
        if err > READBACK_TOLERANCE[qtype] + 1e-7:
            raise PhiEdgeError(f"{name} ({qtype}) reads back from the GGUF {err:.3g} (relative) away from the "
                               f"checkpoint; the export is refused and nothing was written")
        worst[qtype] = max(worst.get(qtype, 0.0), err)

    for dst, array, _ in tensors.gguf_tensors(ckpt.weight_files, arch, n_experts):
        if dst is not None and dst in types:
            compare(dst, array)
    for dst, array in extra.items():
        compare(dst, array)
    detail = ", ".join(f"{t} max relative error {e:.2g}" for t, e in sorted(worst.items()))
    if weighted_by_imatrix:
        detail += (f"; for the {len(weighted_by_imatrix)} tensors quantized with the importance matrix the error "
                   f"is the importance-weighted RMS relative to the weights'")
    return f"all {len(types)} tensors read back with gguf.GGUFReader and dequantized match the checkpoint ({detail})"


def smoke_device(target) -> str:
    return "cpu"
