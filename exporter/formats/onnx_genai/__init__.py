"""ONNX Runtime GenAI format: the onnxruntime-genai model builder, called in-process.

Writes ``model.onnx`` (+ external data) and ``genai_config.json`` for the Raspberry Pi, Android,
generic CPU and CUDA targets. Our options map onto the builder's ``extra_options``. int4 of a dense
Phi-3-layout checkpoint streams (:mod:`.stream`: quantized layer by layer into a pre-quantized checkpoint the
builder reads, optionally AWQ/GPTQ from a local text, :mod:`.calibrate`); the rest runs the builder on the
float model (:mod:`.builder`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from phi_edge.runtimes.errors import PhiEdgeError

from .. import ExportOptions, FormatResult, merged_quant, require_tool

FORMAT = "onnx-genai"
OPTIONS = frozenset({"block_size", "symmetric", "accuracy_level", "algorithm", "lm_head", "embeddings", "awq", "gptq",
                     "calibration_text"})
DATA_AWARE = ("awq", "gptq")
TOOLS = ("onnxruntime-genai", "onnxruntime", "onnx", "onnx-ir", "transformers", "torch")
ALGORITHMS = ("rtn", "k_quant")
BLOCK_SIZES = (16, 32, 64, 128, 256)


def check(ckpt, target, opts: ExportOptions) -> None:
    require_tool("onnxruntime_genai.models.builder", "the onnx-genai exporter", load=False)
    q = merged_quant(target, opts)
    if opts.precision in ("int4", "int8"):
        if q.get("block_size", 32) not in BLOCK_SIZES:
            raise PhiEdgeError(f"--block-size must be one of {', '.join(map(str, BLOCK_SIZES))}, got {q['block_size']}")
        if q.get("algorithm", "rtn") not in ALGORITHMS:
            raise PhiEdgeError(f"--algorithm must be one of {', '.join(ALGORITHMS)}, got {q['algorithm']}")
        if q.get("accuracy_level", 0) not in (0, 1, 2, 3, 4):
            raise PhiEdgeError(f"--accuracy-level must be 0-4, got {q['accuracy_level']}")
        if q.get("lm_head", opts.precision) not in ("int4", "int8", "fp"):
            raise PhiEdgeError(f"--lm-head must be int4, int8 or fp, got {q['lm_head']}")
        emb = q.get("embeddings", _default_embeddings(ckpt.config, opts.precision))
        if emb != "fp" and not (emb == opts.precision == "int4" and ckpt.config.get("tie_word_embeddings")):
            raise PhiEdgeError(f"--embeddings {emb}: onnxruntime-genai quantizes embeddings only at int4 and only "
                               f"for models that tie them to the lm_head (Phi-4-mini); use --embeddings fp")
        block = q.get("block_size", 32)
        asym = not q.get("symmetric", True) or q.get("algorithm") == "k_quant"
        odd = [k for k in _input_dims(ckpt.config) if k % block or (k // block) % 2]
        if asym and odd:
            raise PhiEdgeError(f"asymmetric quantization (--asym or --algorithm k_quant) with --block-size {block} "
                               f"needs every input dimension to hold an even number of blocks, but "
                               f"{', '.join(map(str, odd))} does not; use --sym or another --block-size")
    elif set(opts.quant) & OPTIONS:
        raise PhiEdgeError(f"quantization options need --precision int4 or int8, not {opts.precision}")
    _check_data_aware(ckpt, opts, q)


def _check_data_aware(ckpt, opts: ExportOptions, q: dict[str, Any]) -> None:
    """--awq / --gptq need --calibration-text, int4, and the streamed route (they run in it)."""
    from .. import OPTION_FLAGS
    from .stream import config_refusal

    wanted = [k for k in DATA_AWARE if q.get(k)]
    flags = ", ".join(OPTION_FLAGS[k] for k in wanted)
    if wanted and not q.get("calibration_text"):
        raise PhiEdgeError(f"{flags} {'needs' if len(wanted) == 1 else 'need'} calibration data: pass "
                           f"--calibration-text FILE (a local text file of the kind of text the model will see)")
    if q.get("calibration_text") and not wanted:
        raise PhiEdgeError("--calibration-text is used by --awq or --gptq; add one of them or drop --calibration-text")
    if not wanted:
        return
    if opts.precision != "int4":
        raise PhiEdgeError(f"{flags} quantize to int4; pass --precision int4 (not {opts.precision})")
    if not q.get("symmetric", True):
        raise PhiEdgeError(f"{flags} write symmetric int4 here; drop --asym")
    why_not = config_refusal(ckpt.config, opts.precision, q)
    if why_not:
        raise PhiEdgeError(f"{flags} run in the streamed int4 export, which this export cannot take ({why_not}); "
                           f"drop {flags}")
    from ..openvino.calibration import read_text

    read_text(q["calibration_text"])


def _default_embeddings(config: dict[str, Any], precision: str) -> str:
    """The builder shares one int4 matrix between tied embeddings and the lm_head."""
    return "int4" if config.get("tie_word_embeddings") and precision == "int4" else "fp"


def _input_dims(config: dict[str, Any]) -> list[int]:
    """Input sizes (K) of the quantized MatMuls: hidden size and the MLP's inner size."""
    dims = [config["hidden_size"], config["intermediate_size"]]
    return sorted(set(dims))


def smoke_device(target) -> str | None:
    """Where the post-export test runs: CUDA artifacts only where CUDA is."""
    if target.device != "cuda":
        return "cpu"
    import onnxruntime_genai as og

    return "cuda" if og.is_cuda_available() else None


def estimate_bytes(config: dict[str, Any], precision: str, q: dict[str, Any], target) -> int:
    """What the builder writes: weights (tied embeddings as the builder shares them) plus the
    rotary cos/sin caches (two sets for LongRoPE)."""
    from ...plan import default_estimate
    from ...sizing import head_dim, param_counts, quantized_bytes
    from .. import vision

    fb = 2 if precision == "fp16" or (target.device == "cuda" and precision != "fp32") else 4
    q = dict(q)
    if config.get("tie_word_embeddings") and precision in ("int4", "int8"):
        c = param_counts(config)
        if precision == "int4" and q.get("embeddings", "int4") != "fp":
            q["embeddings"] = "fp"  # counted below: one int4 matrix serves the embeddings and the lm_head
            size = default_estimate(config, precision, q, float_bytes=fb) - c.embeddings * fb
            size += quantized_bytes(c.embeddings, 4, int(q.get("block_size", 32)), fb, not q.get("symmetric", True))
        else:  # a float embedding table plus a quantized copy as the lm_head
            size = default_estimate(config, precision, q, float_bytes=fb)
            size += quantized_bytes(c.embeddings, 8 if precision == "int8" else 4, int(q.get("block_size", 32)), fb,
                                    not q.get("symmetric", True))
    else:
        size = default_estimate(config, precision, {**q, "embeddings": q.get("embeddings", "fp")}, float_bytes=fb)
    rotary = int(head_dim(config) * config.get("partial_rotary_factor", 1.0)) // 2
    positions = config.get("max_position_embeddings", 4096)
    from ...checkpoint import rope_settings

    if rope_settings(config):  # LongRoPE: a long cache and a short one
        positions += config.get("original_max_position_embeddings", positions)
    size += 2 * positions * rotary * fb
    size += vision.extra_bytes(config, precision, fb)  # Phi-4-multimodal: vision.onnx, embedding.onnx
    return size


def builder_options(precision: str, q: dict[str, Any], tied: bool = False) -> list[str]:
    """Our quantization settings as the builder's KEY=VALUE extra options."""
    if precision not in ("int4", "int8"):
        return []
    opts = [f"block_size={q.get('block_size', 32)}",
            f"is_symmetric={str(q.get('symmetric', True)).lower()}",
            f"accuracy_level={q.get('accuracy_level', 4)}",
            f"algo_config={q.get('algorithm', 'rtn')}"]
    lm_head = q.get("lm_head", precision)
    if lm_head == "int8" and precision == "int4":
        opts.append("matmul_mixed_precision=last_matmul:int8")
    elif lm_head == "fp":
        opts.append("nodes_to_exclude=/lm_head/MatMul")
    embeddings = q.get("embeddings", "int4" if tied and precision == "int4" else "fp")
    if embeddings != "fp":
        opts.append("op_types_to_quantize=MatMul/Gather")
    elif tied:
        opts.append("shared_embeddings=false")  # float embedding table, quantized lm_head
    return opts


def export(ckpt, target, opts: ExportOptions, out: Path, steps) -> FormatResult:
    """int4 of a dense Phi-3-layout checkpoint streams (:mod:`.stream`); everything else runs the builder on
    the float model, as before."""
    from .. import vision

    if vision.is_multimodal(ckpt.config):  # Phi-4-multimodal: this decoder plus vision/embedding models
        return vision.export_phi4mm(ckpt, target, opts, out, steps, export)
    from . import stream
    from .builder import run_builder

    ep = "cuda" if target.device == "cuda" else "cpu"
    q = merged_quant(target, opts)
    tied = bool(ckpt.config.get("tie_word_embeddings"))
    extra = builder_options(opts.precision, q, tied)
    why_not = stream.refusal(ckpt, opts.precision, q)
    notes: list[str] = []
    if why_not is None:
        staged = out / ".quantized-checkpoint"
        io_dtype = _io_dtype(opts.precision, ep)
        methods = [k for k in DATA_AWARE if q.get(k)]
        calibrator = None
        if methods:
            from .calibrate import Calibrator

            with steps.step("Reading the calibration text"):
                calibrator = Calibrator(ckpt, q["calibration_text"], awq=bool(q.get("awq")), gptq=bool(q.get("gptq")),
                                        block=int(q.get("block_size", 32)), io_dtype=io_dtype)
        how = "+".join(m.upper() for m in methods) or "RTN"
        with steps.step(f"Quantizing to int4 layer by layer ({how}, block {q.get('block_size', 32)})"):
            stream.write_checkpoint(ckpt, staged, q, io_dtype, calibrator=calibrator)
        extra = [o for o in extra if not o.startswith("matmul_mixed_precision=")]
        with steps.step(f"Building the ONNX graph (int4, {ep}) with onnxruntime-genai from the quantized weights"):
            try:
                run_builder(staged, out, opts.precision, ep, extra, ckpt.trust_remote_code,
                            skip_empty_quantization=True)
            except OSError as e:
                raise stream.disk_full(e, out, "writing the ONNX model") or e
        import shutil

        shutil.rmtree(staged, ignore_errors=True)
        route = "streamed: quantized tensor by tensor into a pre-quantized checkpoint, then the builder"
        if calibrator is not None:
            route += f" ({how} on {calibrator.samples} calibration windows of {Path(q['calibration_text']).name})"
    else:
        with steps.step(f"Building the ONNX graph ({opts.precision}, {ep}) with onnxruntime-genai"):
            run_builder(ckpt.path, out, opts.precision, ep, extra, ckpt.trust_remote_code)
        route = "builder on the float model"
        if opts.precision == "int4":
            route += f" (not streamed: {why_not})"
    used = {"tool": "onnxruntime-genai builder", "execution_provider": ep, "builder_options": extra, "route": route}
    if opts.precision in ("int4", "int8"):
        used.update(bits=4 if opts.precision == "int4" else 8, block_size=q.get("block_size", 32),
                    symmetric=bool(q.get("symmetric", True)), accuracy_level=q.get("accuracy_level", 4),
                    algorithm=q.get("algorithm", "rtn"), lm_head=q.get("lm_head", opts.precision),
                    embeddings=q.get("embeddings", _default_embeddings(ckpt.config, opts.precision)))
        for k in DATA_AWARE:
            if q.get(k):
                used[k] = True
        if q.get("calibration_text"):
            used["calibration_text"] = Path(q["calibration_text"]).name
    return FormatResult(quantization=used, runtime={"device": ep}, notes=notes)


def _io_dtype(precision: str, ep: str):
    """The builder's input/output type for this precision and execution provider, as a torch dtype."""
    import torch
    from onnxruntime_genai.models.builder import set_io_dtype

    name = str(set_io_dtype(precision, ep, {}).name)
    return {"FLOAT": torch.float32, "FLOAT16": torch.float16, "BFLOAT16": torch.bfloat16}[name]


def finalize(out: Path, context_length: int, stop_token_ids: list[int]) -> None:
    """Make genai_config.json agree with the manifest: context window and stop tokens.

    The decoder's ``sliding_window`` section goes: with it, onnxruntime-genai 0.18 sizes the KV cache
    to the window and fails one step past it (GroupQueryAttention present-shape mismatch, e.g. after
    2063 tokens of Phi-3-mini-4k's 2047 window). The graph's attention keeps its own window
    (``local_window_size``), so the model still attends as transformers does."""
    path = out / "genai_config.json"
    cfg = json.loads(path.read_text())
    cfg["model"]["context_length"] = context_length
    cfg["model"]["eos_token_id"] = stop_token_ids
    window = cfg["model"].get("decoder", {}).get("sliding_window") or {}
    if not window.get("slide_key_value_cache"):
        cfg["model"].get("decoder", {}).pop("sliding_window", None)
    cfg.setdefault("search", {})["max_length"] = context_length
    path.write_text(json.dumps(cfg, indent=4) + "\n")




EXPORT_BASE_BYTES = int(0.8 * 1024**3)  # torch, transformers, onnxruntime and the builder imported


def builder_peak_bytes(config: dict[str, Any], source_bytes: int = 2, io_bytes: int = 4) -> int:
    """Peak RAM of the builder on the float model: transformers holds the checkpoint while the builder's
    graph holds every weight again in the io type, and ORT's RTN quantizes the largest matrix through
    float64 temporaries. Fitted to measurements (benchmarks/export_full_size.py, this machine): Phi-3-mini
    shape with 2 layers 5.26 GiB measured / 5.4 estimated; 32 layers about 22 GiB measured / 22.8 estimated."""
    from ...sizing import param_counts

    params = param_counts(config).total
    largest = max(config["vocab_size"] * config["hidden_size"], 2 * config["intermediate_size"] * config["hidden_size"])
    return int(1.0 * 1024**3 + params * (source_bytes + io_bytes) * 0.92 + largest * 24)


def streamed_peak_bytes(config: dict[str, Any], artifact_bytes: int, source_bytes: int = 2) -> int:
    """Peak RAM of the streamed route: the builder holds the pre-quantized model (about the artifact, with the
    embeddings in the checkpoint's type besides the io type they are written in) while it saves; the
    quantizer before it holds one layer at a time. Fitted to measurements (Phi-3-mini shape, this machine):
    2 layers 1.50 GiB measured / 1.6 estimated, 8 layers 1.87 / 2.0; plus 10% margin."""
    from ...sizing import param_counts

    c = param_counts(config)
    return int(1.1 * (EXPORT_BASE_BYTES + artifact_bytes + c.embeddings * source_bytes))


# ONNX Runtime's RAM to load an artifact on the CPU: it repacks the weights for its kernels (int4: blocks, scales
# and block sums) and keeps the stored scales memory-mapped. Measured: Phi-3-mini-shaped int4 (2.54 GiB) 3.2 GiB,
# Phi-3-medium-shaped int4 (8.65 GiB) 11.4-12.3 GiB; the memory-mapped load without repacking 8.6 GiB.
LOAD_FACTOR = 1.35
LOAD_BASE_BYTES = 128 * 1024**2
CHECK_RAM_SHARE = 0.4  # the artifact check loads the model as the device does up to this share of the RAM here


def check_load(artifact_bytes: int, ram_bytes: int | None = None) -> tuple[dict[str, Any], str | None]:
    """How the export's artifact check opens the model: as the device does, unless ONNX Runtime's repacked
    weights would take more than :data:`CHECK_RAM_SHARE` of this workstation's RAM; then with the weights
    memory-mapped as stored (about the file's size; far slower, so the smoke test makes one token).
    Returns the runtime's engine options and the note that says so (None: loaded as the device does)."""
    from ...plan import workstation_ram_bytes
    from ...sizing import human

    ram = ram_bytes or workstation_ram_bytes()
    need = prepacked_load_bytes(artifact_bytes)
    if not ram or need <= CHECK_RAM_SHARE * ram:
        return {}, None
    return {"prepack_weights": False}, (
        f"artifact check: loaded without ONNX Runtime's weight repacking (weights memory-mapped as stored, one "
        f"token generated), because the repacked load needs about {human(need)}, over {CHECK_RAM_SHARE:.0%} of "
        f"this workstation's {human(ram)}; the device loads it repacked: plan for about {human(need)} there")


def prepacked_load_bytes(artifact_bytes: int) -> int:
    return int(LOAD_FACTOR * artifact_bytes + LOAD_BASE_BYTES)


def export_memory(config: dict[str, Any], precision: str, q: dict[str, Any], target, artifact_bytes: int
                  ) -> tuple[int, str]:
    """The export's own peak RAM on the workstation and the route it is for (``phi-export plan``): writing the
    model, or the artifact check loading it (:func:`check_load`), whichever needs more."""
    from .stream import config_refusal

    source = 4 if str(config.get("torch_dtype") or config.get("dtype") or "bfloat16") == "float32" else 2
    io = 2 if precision == "fp16" or (target.device == "cuda" and precision != "fp32") else 4
    options, _ = check_load(artifact_bytes)
    check = artifact_bytes + LOAD_BASE_BYTES if options else prepacked_load_bytes(artifact_bytes)
    why_not = config_refusal(config, precision, q)
    if why_not is None:
        return max(streamed_peak_bytes(config, artifact_bytes, source), check), "streamed int4"
    return max(builder_peak_bytes(config, source, io), check), f"the builder on the float model; not streamed: {why_not}"
