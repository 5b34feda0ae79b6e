"""Core ML format (``coreml``): a stateful ``.mlpackage`` for iPhone, iPad and Mac, made in-process with
coremltools' Python API from our own traced decoder (:mod:`.decoder`, :mod:`.convert`).

No Core ML runtime exists on Linux, so each export checks, and the manifest's ``verification`` records,
exactly what can be checked here: graph parity in torch (our traced decoder against transformers,
prefill then decode through its own cache, :mod:`.parity`), the stored weights read back from the
saved package and dequantized (:mod:`.readback`), and the package's declared structure. Core ML
itself never ran; the manifest and the runtime's refusal say so.
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict
from pathlib import Path
from typing import Any

from phi_edge.runtimes.errors import PhiEdgeError

from .. import ExportOptions, FormatResult, merged_quant, require_tool
from .checks import closing_notes, combined_round_trip, parity_skipped, record_checks

FORMAT = "coreml"
OPTIONS = frozenset({"block_size", "prefill_chunk", "quant"})  # the last two: --target apple-ane only
TOOLS = ("coremltools", "torch", "transformers", "numpy")
BLOCK_SIZES = (16, 32, 64, 128)
PARITY_MAX_PARAMS = 400_000_000  # above this the fp32 parity check (two fp32 models) is left to the tests
PARITY_DECODE_STEPS = 8
PART_MAX_PARAMS = 500_000_000  # a larger model is converted in parts of whole layers (converter memory)
MIN_WEIGHT_COSINE = {"fp16": 0.99999, "int8": 0.9999, "int4": 0.99}  # stored vs source, per matrix


def check(ckpt, target, opts: ExportOptions) -> None:
    config = ckpt.config
    if importlib.util.find_spec("coremltools") is None:
        require_tool("coremltools", "the Core ML exporter")
    if ckpt.architecture not in ("Phi3ForCausalLM",):
        raise PhiEdgeError(f"the Core ML exporter writes Phi-3 / Phi-4-mini (Phi3ForCausalLM) models, not "
                           f"{ckpt.architecture}; export it for --target apple-silicon (MLX) instead")
    from ...checkpoint import rope_settings

    rope = rope_settings(config)
    rope_type = (rope.get("type") or rope.get("rope_type")) if rope else None
    if rope_type not in (None, "longrope", "su"):
        raise PhiEdgeError(f"the Core ML exporter applies plain rope and LongRoPE, not rope_scaling '{rope_type}'; "
                           f"export this checkpoint for another target")
    if config.get("quantization_config"):
        raise PhiEdgeError("the checkpoint is already quantized; export from its float checkpoint and let "
                           "--precision quantize it")
    if ckpt.weight_format != "safetensors":
        raise PhiEdgeError("the Core ML exporter reads weights from *.safetensors only; convert the checkpoint "
                           "(transformers' save_pretrained) and export that folder")
    from . import ane_export

    if ane_export.is_ane(target):
        return ane_export.check(target, opts)
    for key, flag in (("prefill_chunk", "--prefill-chunk"), ("quant", "--quant")):
        if key in opts.quant:
            raise PhiEdgeError(f"{flag} does not apply to target '{target.name}' (flexible shapes, block-wise int4): "
                               f"it is for --target apple-ane; this target takes --block-size")
    if opts.precision != "int4" and "block_size" in opts.quant:
        raise PhiEdgeError(f"--block-size applies to --precision int4 (block-wise int4); {opts.precision} "
                           f"{'is per-channel' if opts.precision == 'int8' else 'is not quantized'}")
    if opts.precision == "int4":
        block = int(merged_quant(target, opts).get("block_size", 32))
        widths = _input_widths(config)
        if block not in BLOCK_SIZES or any(w % block for w in widths):
            ok = [b for b in BLOCK_SIZES if all(w % b == 0 for w in widths)]
            raise PhiEdgeError(f"--block-size {block} does not fit this model: it must be one of "
                               f"{', '.join(map(str, BLOCK_SIZES))} and divide every matrix's input width "
                               f"({', '.join(map(str, sorted(widths)))}); use {ok[-1] if ok else 16}")


def _input_widths(config: dict[str, Any]) -> set[int]:
    from .decoder import Shape

    s = Shape.of(config)
    return {s.hidden, s.heads * s.head_dim, s.intermediate}


def estimate_bytes(config: dict[str, Any], precision: str, q: dict[str, Any], target) -> int:
    """Every matrix at the precision (int4: a fp16 scale per block; int8: per output row), norms and
    the rotary tables in fp16."""
    from ...sizing import param_counts

    c = param_counts(config)
    matrices = c.linear + c.embeddings + c.lm_head
    from . import ane_export

    if ane_export.is_ane(target):
        mode = q.get("quant", "int4-per-channel") if precision == "int4" else precision
        rows = matrices // config["hidden_size"]  # about: most matrices are hidden wide
        return ane_export.estimate_bytes(matrices, rows, precision, str(mode).lower()) + c.other * 2
    if precision == "int4":
        block = int(q.get("block_size", 32))
        size = matrices // 2 + matrices // block * 2
    elif precision == "int8":
        size = matrices + matrices // config["hidden_size"] * 2
    else:
        size = matrices * 2
    return size + c.other * 2


def smoke_device(target) -> str:
    return str(target.runtime.get("compute_units", target.device))


def export(ckpt, target, opts: ExportOptions, out: Path, steps) -> FormatResult:
    require_tool("coremltools", "the Core ML exporter")
    from .convert import settings
    from .decoder import Shape, chunks

    context = opts.context_length
    shape = Shape.of(ckpt.config)
    n_params = _params(ckpt.config)
    from . import ane_export

    if ane_export.is_ane(target):
        return _export_ane(ckpt, target, opts, out, steps, n_params)
    used = settings(opts.precision, merged_quant(target, opts))
    verification: dict[str, Any] = {}
    if n_params <= PARITY_MAX_PARAMS:
        with steps.step("Checking the traced decoder against transformers in torch (fp32)"):
            verification["graph_parity"] = graph_parity(ckpt, context)
    else:
        verification["graph_parity"] = parity_skipped(n_params)
    parts = chunks(shape, PART_MAX_PARAMS)
    packages, checked, rope = [], [], {}
    for index, part in enumerate(parts):
        name, rope, checks = export_part(ckpt, opts, out, shape, part, index, len(parts), used, steps)
        packages.append(name)
        checked.append(checks)
    verification["structure"] = [c["structure"] for c in checked]
    verification["weights_round_trip"] = {
        **combined_round_trip([c["weights"] for c in checked]),
        "against": "the fp16 weights converted (the checkpoint's, rounded to fp16)",
        "read_with": "coremltools' MIL loader (milproto) and its constexpr dequantization"}
    notes = record_checks(verification, rope)
    window = int(ckpt.config.get("sliding_window") or 0)
    runtime = {"packages": packages, "parts": [list(p) for p in parts],
               "compute_units": str(target.runtime.get("compute_units", target.device)),
               "sliding_window": window if 0 < window < context else 0, "decoder": asdict(shape),
               "inputs": ["input_ids", "causal_mask"], "output": "logits", "states": ["key_cache", "value_cache"],
               "minimum_deployment_target": "iOS18"}
    return FormatResult(quantization=used, runtime=runtime, verification=verification,
                        notes=notes + closing_notes(packages, PART_MAX_PARAMS))


def _export_ane(ckpt, target, opts: ExportOptions, out: Path, steps, n_params: int) -> FormatResult:
    """``--target apple-ane``: one package, prefill and decode functions of fixed shapes (:mod:`.ane_export`)."""
    from . import ane_export

    used, runtime, verification, rope = ane_export.export(ckpt, target, opts, out, steps, PARITY_MAX_PARAMS, n_params,
                                                          PART_MAX_PARAMS)
    notes = record_checks(verification, rope, ", both functions")
    notes.append(f"Neural Engine layout: fixed shapes, prefill function of {runtime['prefill_length']} tokens and "
                 f"decode function of 1 in one package sharing the KV-cache state; logits in "
                 f"{len(runtime['outputs'])} vocabulary slices")
    return FormatResult(quantization=used, runtime=runtime, verification=verification,
                        notes=notes + closing_notes(runtime["packages"], PART_MAX_PARAMS))


def export_part(ckpt, opts: ExportOptions, out: Path, shape, part: tuple[int, int], index: int, count: int,
                used: dict[str, Any], steps) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """Convert, compress, save and read back one part of the model (the whole model when count is 1);
    only this part's weights are in memory."""
    import gc

    import torch

    from . import convert as cv
    from .decoder import build
    from .readback import structure

    context = opts.context_length
    which = "" if count == 1 else f" part {index + 1}/{count} (layers {part[0]}-{part[0] + part[1] - 1})"
    with steps.step(f"Converting{which} with coremltools (context {context}, KV cache as fp16 state)"):
        module, rope = build(ckpt.path, ckpt.config, context, dtype=torch.float16, part=part)
        mlmodel = cv.convert(module)
    if opts.precision in ("int4", "int8"):
        what = f"block-wise int4, blocks of {used['block_size']}" if opts.precision == "int4" else "per-channel int8"
        with steps.step(f"Compressing the weights{which} ({what}) with coremltools.optimize.coreml"):
            mlmodel = cv.quantize(mlmodel, module, opts.precision, used.get("block_size", 32))
    name = cv.part_name(index, count)
    with steps.step(f"Writing the Core ML package{which}"):
        cv.save(mlmodel, out / name)
    del mlmodel
    gc.collect()
    with steps.step(f"Reading the package{which} back: structure and every stored weight"):
        checks = {"structure": structure(out / name, module.shape, part, context, opts.precision),
                  "weights": weights_round_trip(out / name, module, opts.precision)}
    del module
    gc.collect()
    return name, rope, checks


def _params(config: dict[str, Any]) -> int:
    from ...sizing import param_counts

    return param_counts(config).total


def graph_parity(ckpt, context: int) -> dict[str, Any]:
    """Our decoder (traced, fp32, fp32 cache) against transformers on a probe: prefill, then greedy
    decode through its own cache. A LongRoPE model exported past its original window gets a probe
    longer than that window (the long factors are what both then use)."""
    import torch
    from transformers import AutoModelForCausalLM

    from .convert import trace
    from .decoder import build
    from .parity import check, probe_ids

    module, rope = build(ckpt.path, ckpt.config, context, dtype=torch.float32, cache_dtype=torch.float32)
    length = 12
    if rope.get("factors") == "long":
        length = rope["original_context"] + 4
    length = min(length, context - PARITY_DECODE_STEPS)
    hf = AutoModelForCausalLM.from_pretrained(str(ckpt.path), dtype=torch.float32).eval()
    window = int(ckpt.config.get("sliding_window") or 0)
    result = check(trace(module), hf, probe_ids(ckpt.config["vocab_size"], length), PARITY_DECODE_STEPS, window)
    if not result.pop("ok"):
        raise PhiEdgeError(f"the Core ML decoder does not compute what transformers does on this checkpoint "
                           f"(max logit difference {result['max_abs_logit_diff']:.2e}, greedy identical: "
                           f"{result['greedy_identical']}); nothing was written, please report this")
    return {**result, "tolerance": 1e-3, "precision": "fp32", "reference": "transformers"}


def weights_round_trip(package: Path, module, precision: str) -> dict[str, Any]:
    """Every matrix as the package stores it (dequantized by coremltools' own constexpr code) against
    the weights that went in: cosine and relative RMS error, worst of all."""
    import numpy as np

    from .convert import parameter_of, weight_const_names
    from .readback import load_program, stored_values, weight_ops

    _, program = load_program(package)
    names = weight_const_names(module)
    params = dict(module.named_parameters())
    ops = {op: parameter_of(op, names) for op in weight_ops(program) if parameter_of(op, names)}
    worst_cos, worst_rel = 1.0, 0.0
    for op, ours in ops.items():
        stored = stored_values(program, {op})[op].astype(np.float32).ravel()
        source = params[ours].detach().float().numpy().ravel()
        cos = float(stored @ source / (np.linalg.norm(stored) * np.linalg.norm(source) + 1e-30))
        rel = float(np.sqrt(np.mean((stored - source) ** 2)) / (np.sqrt(np.mean(source ** 2)) + 1e-30))
        worst_cos, worst_rel = min(worst_cos, cos), max(worst_rel, rel)
    if len(ops) != len([p for p in params.values() if p.dim() == 2]):
        raise PhiEdgeError(f"the saved package holds {len(ops)} of the model's matrices; nothing was written, "
                           f"please report this")
    if worst_cos < MIN_WEIGHT_COSINE[precision]:
        raise PhiEdgeError(f"a stored {precision} weight differs from the checkpoint's (cosine {worst_cos:.5f}, "
                           f"below {MIN_WEIGHT_COSINE[precision]}); nothing was written, please report this")
    return {"matrices": len(ops), "min_cosine": round(worst_cos, 6), "max_relative_rms_error": round(worst_rel, 6),
            "against": "the fp16 weights converted (the checkpoint's, rounded to fp16)",
            "read_with": "coremltools' MIL loader (milproto) and its constexpr dequantization"}
