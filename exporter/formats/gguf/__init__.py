"""GGUF format: our own Phi -> GGUF writer on the PyPI ``gguf`` package, run by llama.cpp.

Writes ``model.gguf`` for llama.cpp's ``phi3`` architecture (Phi-3, Phi-3.5-mini, Phi-4-mini): the
hyperparameters, LongRoPE (``rope_factors_long/short``, attention factor, original context), the
sliding window, the tokenizer (``tokenizer.ggml.*``, see :mod:`.vocab`) and the chat template, and the
tensors (:mod:`.tensors`) at fp32, fp16, bf16, int8 (Q8_0) or int4 (Q4_0), quantized with ``gguf``'s
numpy quantizer. K-quants (Q4_K_M etc.) need a quantizer we do not have yet. Every quantized tensor
is read back with ``gguf.GGUFReader`` and dequantized with ``gguf``'s dequantizer before the export
is accepted. Nothing of llama.cpp's convert script is used or run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from phi_edge.runtimes.errors import PhiEdgeError

from .. import ExportOptions, FormatResult, require_tool
from . import tensors, vocab

FORMAT = "gguf"
OPTIONS: frozenset[str] = frozenset()
TOOLS = ("gguf", "xllamacpp")
FILE = "model.gguf"
ARCH = "phi3"
# bytes per weight of each storage type (blocks of 32: Q8_0 34 bytes, Q4_0 18 bytes)
BYTES = {"F32": 4.0, "F16": 2.0, "BF16": 2.0, "Q8_0": 34 / 32, "Q4_0": 18 / 32}
# a dequantized tensor read back from the file must be this close to the source, relative to the
# tensor's largest magnitude (a scale per 32 weights: Q8_0 half a step of 1/127, Q4_0 of 1/8)
READBACK_TOLERANCE = {"F32": 0.0, "F16": 1e-3, "BF16": 8e-3, "Q8_0": 1 / 127, "Q4_0": 1 / 7}


def check(ckpt, target, opts: ExportOptions) -> None:
    require_tool("gguf", "the gguf exporter")
    config = ckpt.config
    if ckpt.is_moe or config.get("model_type") != "phi3":
        raise PhiEdgeError(f"the gguf exporter writes Phi-3 / Phi-3.5-mini / Phi-4-mini (model_type phi3), "
                           f"not {ckpt.architecture}; export it for another target, e.g. --target intel-cpu")
    if opts.precision not in tensors.RECIPES:
        raise PhiEdgeError(f"the gguf exporter writes {', '.join(tensors.RECIPES)}, not {opts.precision}")
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

    writer = gguf.GGUFWriter(str(path), ARCH)
    name = model_name(ckpt, phi3_rule)
    writer.add_name(name)
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_rope_scaling_orig_ctx_len(original)
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_head_count(int(config["num_attention_heads"]))
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or config["num_attention_heads"]))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-5)))
    writer.add_rope_dimension_count(rot)
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    if config.get("sliding_window"):
        writer.add_sliding_window(int(config["sliding_window"]))
    writer.add_file_type(tensors.FILE_TYPES[tensors.RECIPES[precision][0]])
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

    types: dict[str, str] = {}
    fallbacks: list[str] = []
    names: list[str] = []
    with steps.step(f"Converting the weights to GGUF ({precision}: "
                    f"{'/'.join(dict.fromkeys(tensors.RECIPES[precision]))})"):
        for src, array in tensors.read_checkpoint(ckpt.weight_files):
            names.append(src)
            dst = tensors.gguf_name(src)
            if dst is None or (tied and dst == "output.weight"):
                continue
            qtype, note = tensors.storage_type(dst, array.shape, precision)
            if note:
                fallbacks.append(note)
            data, raw = tensors.encode(array, qtype)
            writer.add_tensor(dst, data, raw_dtype=raw)
            types[dst] = qtype
        tensors.check_names(names)
        for dst, array in extra.items():
            writer.add_tensor(dst, array)
            types[dst] = "F32"
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    with steps.step("Reading the GGUF back and checking every tensor against the checkpoint"):
        readback = check_readback(path, ckpt, types, tied, extra)
    counts: dict[str, int] = {}
    for t in types.values():
        counts[t] = counts.get(t, 0) + 1
    quant = {"tool": "gguf (numpy quantizer)", "file": FILE, "types": counts,
             "body": tensors.RECIPES[precision][0], "token_embd": types.get("token_embd.weight"),
             "output": "token_embd (tied)" if tied else types.get("output.weight"), "fallbacks": fallbacks}
    runtime = {"gguf_file": FILE, "original_context_length": original if rope else None,
               "longrope": bool(rope), "general_name": name}
    return FormatResult(quantization=quant, runtime=runtime,
                        verification={"gguf_readback": readback, "gguf_tokenizer": tok_info})


def check_readback(path: Path, ckpt, types: dict[str, str], tied: bool, extra: dict[str, np.ndarray]) -> str:
    """Read the file with ``gguf.GGUFReader``, dequantize each tensor with ``gguf``'s dequantizer and
    compare it with the source (exact for F32; within half a quantization step otherwise)."""
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
        scale = float(np.abs(want).max()) or 1.0
        err = float(np.abs(got.astype(np.float32) - want).max()) / scale
        qtype = types[name]
        if err > READBACK_TOLERANCE[qtype] + 1e-7:
            raise PhiEdgeError(f"{name} ({qtype}) reads back from the GGUF {err:.3g} (relative) away from the "
                               f"checkpoint; the export is refused and nothing was written")
        worst[qtype] = max(worst.get(qtype, 0.0), err)

    for src, array in tensors.read_checkpoint(ckpt.weight_files):
        dst = tensors.gguf_name(src)
        if dst is not None and dst in types:
            compare(dst, array)
    for dst, array in extra.items():
        compare(dst, array)
    detail = ", ".join(f"{t} max relative error {e:.2g}" for t, e in sorted(worst.items()))
    return f"all {len(types)} tensors read back with gguf.GGUFReader and dequantized match the checkpoint ({detail})"


def smoke_device(target) -> str:
    return "cpu"
