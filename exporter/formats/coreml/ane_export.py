"""The Neural Engine variant of the Core ML export (``--target apple-ane``): its options, the two
fixed-shape functions converted, compressed and joined into one package, and what Linux checks of it
(graph parity in torch, the package's structure, every stored weight read back)."""

from __future__ import annotations

import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from phi_edge.runtimes.errors import PhiEdgeError

from .. import merged_quant
from .checks import combined_round_trip, parity_skipped
from .ane_convert import FUNCTIONS, INPUTS, MODES

DEFAULT_PREFILL = 64
PREFILL_RANGE = (2, 512)
MIN_WEIGHT_COSINE = {"float16": 0.99999, "int8-per-channel": 0.9999, "int4-per-channel": 0.97, "palettize4": 0.97}


def is_ane(target) -> bool:
    return target.runtime.get("variant") == "ane"


def prefill_length(target, opts) -> int:
    return int(opts.quant.get("prefill_chunk") or target.runtime.get("prefill_length", DEFAULT_PREFILL))


def weight_mode(target, opts) -> str:
    """float16, int8-per-channel, or the int4 mode (int4-per-channel or palettize4)."""
    if opts.precision == "int4":
        return str(merged_quant(target, opts).get("quant", MODES[0])).lower()
    return "int8-per-channel" if opts.precision == "int8" else "float16"


def check(target, opts) -> None:
    """The ANE variant's own options: no block size, a known 4-bit mode, a prefill length that divides
    the context."""
    if "block_size" in opts.quant:
        raise PhiEdgeError(f"--block-size does not apply to target '{target.name}': its int4 has one scale per output "
                           f"channel or a lookup table per matrix (--quant {' or --quant '.join(MODES)})")
    if "quant" in opts.quant and opts.precision != "int4":
        raise PhiEdgeError(f"--quant chooses the 4-bit encoding of --precision int4 ({', '.join(MODES)}); "
                           f"{opts.precision} has none")
    mode = weight_mode(target, opts)
    if opts.precision == "int4" and mode not in MODES:
        raise PhiEdgeError(f"--quant {mode} is not a 4-bit encoding target '{target.name}' writes; use "
                           f"{' or '.join(MODES)}")
    n, context = prefill_length(target, opts), opts.context_length
    if not PREFILL_RANGE[0] <= n <= min(PREFILL_RANGE[1], context):
        raise PhiEdgeError(f"--prefill-chunk {n} is out of range: the prefill function takes {PREFILL_RANGE[0]} to "
                           f"{min(PREFILL_RANGE[1], context)} tokens per call")
    if context % n:
        lower, upper = context // n * n, (context // n + 1) * n
        raise PhiEdgeError(f"context length {context} is not a multiple of the prefill length {n}: the ANE package's "
                           f"functions have fixed shapes; use --context-length {lower or upper}"
                           f"{f' or {upper}' if lower else ''}, or a --prefill-chunk that divides {context}")


def settings(target, opts) -> dict[str, Any]:
    from .ane_convert import settings as used

    return {**used(opts.precision, weight_mode(target, opts)), "prefill_length": prefill_length(target, opts)}


def estimate_bytes(matrices: int, rows: int, precision: str, mode: str) -> int:
    """``matrices`` weights in ``rows`` output channels (int4/int8: a fp16 scale per row; palettized: a
    16-entry fp16 table per matrix, a few hundred bytes in all)."""
    if mode == "palettize4":
        return matrices // 2
    if precision == "int4":
        return matrices // 2 + rows * 2
    if precision == "int8":
        return matrices + rows * 2
    return matrices * 2


def export(ckpt, target, opts, out: Path, steps, parity_max_params: int, n_params: int,
           part_max_params: int = 500_000_000):
    """Write ``model.mlpackage`` (functions prefill and decode) into ``out``, or one such package per part
    of whole layers for a model above ``part_max_params``; returns the FormatResult's parts:
    (quantization, runtime, verification, rope)."""
    from . import ane
    from .convert import part_name
    from .decoder import Shape, chunks

    context, n, mode = opts.context_length, prefill_length(target, opts), weight_mode(target, opts)
    shape = Shape.of(ckpt.config)
    verification: dict[str, Any] = {}
    if n_params <= parity_max_params:
        with steps.step("Checking the traced ANE decoder against transformers in torch (fp32)"):
            verification["graph_parity"] = graph_parity(ckpt, context, n)
    else:
        verification["graph_parity"] = parity_skipped(n_params)
    parts = chunks(shape, part_max_params)
    packages, checks, rope = [], [], {}
    for index, part in enumerate(parts):
        name = part_name(index, len(parts))
        which = "" if len(parts) == 1 else f" part {index + 1}/{len(parts)} (layers {part[0]}-{sum(part) - 1})"
        rope, checked = export_part(ckpt, out / name, which, context, n, part, opts.precision, mode, steps)
        packages.append(name)
        checks.append(checked)
    verification["structure"] = [c["structure"] for c in checks] if len(parts) > 1 else checks[0]["structure"]
    trips = [c["weights"] for c in checks]
    verification["weights_round_trip"] = {**trips[0], **combined_round_trip(trips)}
    window = int(ckpt.config.get("sliding_window") or 0)
    runtime = {"packages": packages, "parts": [list(p) for p in parts], "functions": {FUNCTIONS[0]: n, FUNCTIONS[1]: 1},
               "prefill_length": n, "compute_units": str(target.runtime.get("compute_units", target.device)),
               "sliding_window": window if 0 < window < context else 0, "decoder": asdict(shape),
               "inputs": list(INPUTS), "outputs": ane.output_names(shape),
               "vocab_slices": [rows for _, rows in ane.vocab_slices(shape.vocab)],
               "states": ["key_cache", "value_cache"], "minimum_deployment_target": "iOS18",
               "layout": "ANE: activations (1, C, 1, T), matrices as 1x1 convolutions, every shape fixed"}
    return settings(target, opts), runtime, verification, rope


def export_part(ckpt, package: Path, which: str, context: int, n: int, part: tuple[int, int], precision: str,
                mode: str, steps) -> tuple[dict[str, Any], dict[str, Any]]:
    """Convert both functions of one part (the whole model when it is one part), compress, join them into
    ``package`` and read it back; only this part's weights are in memory. Returns (rope, checks)."""
    import gc

    import torch

    from . import ane, ane_convert as cv
    from .ane_readback import structure, weights_round_trip
    from .decoder import Shape

    module, rope = ane.build(ckpt.path, ckpt.config, context, n, dtype=torch.float16, part=part)
    what = {"int4-per-channel": "int4, one scale per output channel", "palettize4": "4-bit palettization, a "
            "16-entry k-means table per matrix", "int8-per-channel": "int8, one scale per output channel"}.get(mode)
    with tempfile.TemporaryDirectory(prefix="phi-edge-ane-") as tmp:
        singles = {}
        for name, tokens in zip(FUNCTIONS, (n, 1)):
            this = module if tokens == n else ane.with_tokens(module, 1)
            with steps.step(f"Converting the {name} function{which} ({tokens} token{'s' if tokens > 1 else ''} per "
                            f"call, context {context}, fixed shapes) with coremltools"):
                mlmodel = cv.convert(this)
            if what:
                with steps.step(f"Compressing the {name} function's weights{which} ({what}) with "
                                f"coremltools.optimize.coreml"):
                    mlmodel = cv.compress(mlmodel, this, precision, mode)
            singles[name] = cv.save_single(mlmodel, Path(tmp) / f"{name}.mlpackage")
            del mlmodel, this
            gc.collect()
        with steps.step(f"Joining both functions{which} into one package (coremltools multifunction, weights "
                        f"stored once)"):
            cv.join(singles, package)
    with steps.step(f"Reading the package{which} back: both functions' structure and every stored weight"):
        checks = {"structure": structure(package, Shape.of(ckpt.config), context, n, mode, part),
                  "weights": weights_round_trip(package, module, mode, MIN_WEIGHT_COSINE[mode])}
    del module
    gc.collect()
    return rope, checks


def graph_parity(ckpt, context: int, n: int) -> dict[str, Any]:
    """Both traced functions (fp32, fp32 cache) against transformers on a probe longer than one prefill
    chunk (so the padded last chunk is exercised), then greedy decode through the shared cache, fed
    exactly as the runtime feeds them."""
    import torch
    from transformers import AutoModelForCausalLM

    from . import ane
    from .ane_convert import trace
    from .ane_readback import torch_functions
    from .parity import FixedSteps, check, probe_ids

    decode_steps = 8
    module, rope = ane.build(ckpt.path, ckpt.config, context, n, cache_dtype=torch.float32)
    length = n + n // 2 + 1
    if rope.get("factors") == "long":
        length = max(length, rope["original_context"] + 4)
    length = min(length, context - decode_steps)
    engine = torch_functions(module, traced={n: trace(module), 1: trace(ane.with_tokens(module, 1))})
    hf = AutoModelForCausalLM.from_pretrained(str(ckpt.path), dtype=torch.float32).eval()
    window = int(ckpt.config.get("sliding_window") or 0)
    window = window if 0 < window < context else 0
    steps = FixedSteps(engine, n, context, window, ane.output_names(module.shape))
    result = check(None, hf, probe_ids(ckpt.config["vocab_size"], length), decode_steps, window, steps=steps)
    if not result.pop("ok"):
        raise PhiEdgeError(f"the ANE decoder does not compute what transformers does on this checkpoint "
                           f"(max logit difference {result['max_abs_logit_diff']:.2e}, greedy identical: "
                           f"{result['greedy_identical']}); nothing was written, please report this")
    return {**result, "prefill_length": n, "tolerance": 1e-3, "precision": "fp32", "reference": "transformers",
            "functions": "both traced (prefill in padded chunks, decode one token), one cache"}
