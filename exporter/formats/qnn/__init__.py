"""Qualcomm NPU format (``qnn``): static prefill/decode graphs, QDQ-quantized (w8a16 or w4a16) and
compiled into QNN HTP context binaries for one Snapdragon SoC.

onnxruntime-genai's builder has no QNN target, so the graphs are our own torch export
(:mod:`.graph`), calibrated and quantized with onnxruntime's QNN QDQ tooling
(:mod:`.quant`) and compiled with the QNN execution provider (``phi_edge.runtimes.qnn.session``).
On a workstation the HTP backend compiles and runs in simulation, so an artifact is checked on
the simulator and labelled that way: never as verified on a device.
"""

from __future__ import annotations

import platform
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from phi_edge.runtimes.errors import PhiEdgeError

from .. import ExportOptions, FormatResult, merged_quant, require_tool

FORMAT = "qnn"
OPTIONS = frozenset({"block_size", "calibration_text", "soc", "prefill_chunk", "compile"})
TOOLS = ("onnxruntime", "onnxruntime-qnn", "onnx", "onnxscript", "torch", "transformers", "tokenizers")
BLOCK_SIZES = (32, 64, 128)
MIN_BLOCK_QUANT_ARCH = 73  # HTP v73+ runs 4-bit block-quantized weights
# Above this many parameters the HTP simulator is too slow to test-run the artifact here.
SIMULATE_MAX_PARAMS = 100_000_000
MIN_HTP_COSINE = 0.99  # below this the HTP graph computes something else than the QDQ model
GRAPHS = ("prefill", "decode")

_simulate_smoke = {"ok": True}  # whether the last export is small enough for the simulator smoke test


def settings(ckpt, target, opts: ExportOptions) -> dict[str, Any]:
    """Every choice of this export: the target's defaults, then the user's options."""
    from phi_edge.targets import get_soc

    q = merged_quant(target, opts)
    soc = get_soc(str(q.get("soc") or target.runtime.get("soc", "sm8650")))
    chunk = int(q.get("prefill_chunk") or target.runtime.get("prefill_chunk", 64))
    return {"soc": soc, "chunk": chunk, "compile": bool(q.get("compile", True)),
            "block_size": block_size(ckpt.config, q, "block_size" in opts.quant) if opts.precision == "int4" else 0,
            "calibration_text": q.get("calibration_text"), "weight_bits": 8 if opts.precision == "int8" else 4}


def block_size(config: dict[str, Any], q: dict[str, Any], explicit: bool) -> int:
    """The int4 block size: it must divide the input width of every MatMul (QNN has no partial
    blocks). The target's default steps down to the largest block that does; an explicit one must."""
    heads = config["num_attention_heads"]
    widths = {config["hidden_size"], config["intermediate_size"],
              heads * (config.get("head_dim") or config["hidden_size"] // heads)}
    wanted = int(q.get("block_size", 64))
    if wanted not in BLOCK_SIZES:
        raise PhiEdgeError(f"--block-size must be one of {', '.join(map(str, BLOCK_SIZES))} for qnn int4, got {wanted}")
    fits = [b for b in BLOCK_SIZES if b <= wanted and all(w % b == 0 for w in widths)]
    if explicit and wanted not in fits or not fits:
        ok = [b for b in BLOCK_SIZES if all(w % b == 0 for w in widths)]
        raise PhiEdgeError(f"--block-size {wanted} does not divide this model's layer widths "
                           f"({', '.join(map(str, sorted(widths)))}); "
                           + (f"use --block-size {max(ok)}" if ok else "use --precision int8"))
    return max(fits)


def check(ckpt, target, opts: ExportOptions) -> None:
    if opts.precision not in ("int8", "int4"):
        raise PhiEdgeError(f"the qualcomm-npu target quantizes to int8 (w8a16) or int4 (w4a16), not {opts.precision}")
    if ckpt.architecture != "Phi3ForCausalLM":
        raise PhiEdgeError(f"the qnn exporter handles dense Phi-3 models (Phi3ForCausalLM), not {ckpt.architecture}")
    if not (ckpt.path / "tokenizer.json").is_file():
        raise PhiEdgeError(f"'{ckpt.path}' has no tokenizer.json, which the qnn runtime tokenizes with on the "
                           f"device; copy it from the original repository")
    if opts.precision == "int8" and "block_size" in opts.quant:
        raise PhiEdgeError("--block-size applies to --precision int4 only (int8 weights are per channel)")
    s = settings(ckpt, target, opts)
    context = opts.context_length
    if not 1 <= s["chunk"] <= context:
        raise PhiEdgeError(f"--prefill-chunk must be between 1 and the context length ({context}), got {s['chunk']}")
    if opts.precision == "int4":
        if s["soc"].htp_arch < MIN_BLOCK_QUANT_ARCH:
            raise PhiEdgeError(f"int4 block weights need HTP v{MIN_BLOCK_QUANT_ARCH} or newer; {s['soc'].key} is "
                               f"v{s['soc'].htp_arch}: use --precision int8")
    if s["calibration_text"] and not Path(s["calibration_text"]).is_file():
        raise PhiEdgeError(f"calibration text '{s['calibration_text']}' is not a file; pass a local text file")


def smoke_device(target) -> str | None:
    """Where the post-export test runs: the HTP (the NPU on a Snapdragon, else the simulator),
    unless the model is too large for the simulator to finish in reasonable time."""
    return "htp" if _simulate_smoke["ok"] else None


# what a compiled HTP context binary holds beyond the weights (graph, op metadata, alignment):
# about 0.6 MB per graph, measured on the simulator's binaries for the fixtures at every SoC
CONTEXT_BINARY_OVERHEAD = 600 * 1024


def estimate_bytes(config: dict[str, Any], precision: str, q: dict[str, Any], target) -> int:
    """Both graphs carry their own weights: quantized MatMuls (a tied lm_head is a MatMul of its
    own), 16-bit embeddings and tables."""
    from ...sizing import QUANT_BITS, param_counts

    c = param_counts(config)
    matmuls = c.linear + (c.lm_head or c.embeddings)
    bits = QUANT_BITS[precision]
    block = config["hidden_size"] if precision == "int8" else int(q.get("block_size", 64))
    per_graph = matmuls * bits // 8 + matmuls // block * 4 + c.embeddings * 2 + c.other * 2
    if q.get("compile", True):
        per_graph += CONTEXT_BINARY_OVERHEAD
    return len(GRAPHS) * per_graph


def export(ckpt, target, opts: ExportOptions, out: Path, steps) -> FormatResult:
    require_tool("onnxruntime_qnn", "the qnn exporter")
    require_tool("onnxscript", "the qnn exporter (torch's ONNX exporter)")
    from phi_edge.runtimes.qnn.session import compile_context

    from . import graph as qnn_graph, quant as qnn_quant

    s = settings(ckpt, target, opts)
    soc, chunk, context = s["soc"], s["chunk"], opts.context_length
    work = out / ".qnn-work"
    work.mkdir()
    with steps.step(f"Exporting static prefill ({chunk} tokens) and decode graphs over a {context}-token window"):
        hf = qnn_graph.load_hf_model(ckpt)
        cfg = hf.config
        n_params = sum(p.numel() for p in hf.parameters())
        floats = {"prefill": qnn_graph.export_onnx(hf, context, chunk, work / "prefill_float.onnx"),
                  "decode": qnn_graph.export_onnx(hf, context, 1, work / "decode_float.onnx")}
        kv_shape = qnn_graph.build_module(hf, context, 1).kv_shape
        del hf
    sliding = int(getattr(cfg, "sliding_window", 0) or 0)
    layout = {"chunk": chunk, "context": context, "kv_shape": kv_shape, "num_layers": cfg.num_hidden_layers,
              "mask_value": qnn_graph.MASK_VALUE, "sliding_window": sliding if 0 < sliding < context else 0}
    ids, text_name = qnn_quant.calibration_tokens(ckpt, s["calibration_text"])
    qdq = {g: work / f"{g}.onnx" for g in GRAPHS}
    samples = {}
    label = "w8a16, per-channel" if opts.precision == "int8" else f"w4a16, blocks of {s['block_size']}"
    with steps.step(f"Calibrating on {len(ids)} tokens and quantizing ({label})"):
        for g in GRAPHS:
            feeds = qnn_quant.calibration_feeds(g, floats, ids, **layout)
            samples[g] = qnn_quant.quantize_graph(floats[g], qdq[g], feeds, opts.precision,
                                                  s["block_size"])["calibration_samples"]
    block_quant = opts.precision == "int4"
    if s["compile"]:
        with steps.step(f"Compiling HTP context binaries for {soc.key} ({soc.name}, v{soc.htp_arch})"):
            graphs = {g: compile_context(qdq[g], out / f"{g}_ctx.onnx", soc.htp_arch, soc.soc_model,
                                         block_quant).name for g in GRAPHS}
    else:
        for g in GRAPHS:  # the QDQ model and its external data
            for f in work.glob(f"{g}.onnx*"):
                shutil.move(str(f), out / f.name)
        qdq = {g: out / f"{g}.onnx" for g in GRAPHS}
        graphs = {g: f"{g}.onnx" for g in GRAPHS}
    checked: dict[str, Any] = {}
    _simulate_smoke["ok"] = n_params <= SIMULATE_MAX_PARAMS or on_snapdragon()
    if _simulate_smoke["ok"]:
        with steps.step("Checking the graphs on the QNN HTP backend against the QDQ model on the CPU"):
            checked = check_on_htp({g: out / graphs[g] for g in GRAPHS}, qdq, ids, layout, soc, block_quant, floats)
    shutil.rmtree(work, ignore_errors=True)
    quantization = {
        "tool": "onnxruntime.quantization (QNN QDQ config)", "format": "QDQ",
        "scheme": "w8a16" if opts.precision == "int8" else "w4a16",
        "weights": ({"bits": 8, "granularity": "per-channel", "symmetric": True} if opts.precision == "int8"
                    else {"bits": 4, "granularity": "block", "block_size": s["block_size"], "symmetric": True}),
        "activations": {"bits": 16, "symmetric": False, "calibration": f"minmax, widened {qnn_quant.RANGE_MARGIN:g}"},
        "attention": "float, run in fp16 by HTP: rotary embedding, KV cache, scores, softmax",
        "embeddings": "16-bit", "calibration_text": text_name, "calibration_tokens": len(ids),
        "calibration_samples": samples,
    }
    runtime = {"device": "htp", "soc": soc.key, "soc_name": soc.name, "htp_arch": soc.htp_arch,
               "soc_model": soc.soc_model, "compiled": s["compile"], "block_quant": block_quant,
               "graphs": graphs, "prefill_chunk": chunk, "kv_window": context,
               "num_layers": cfg.num_hidden_layers, "mask_value": qnn_graph.MASK_VALUE}
    if layout["sliding_window"]:
        runtime["sliding_window"] = layout["sliding_window"]
    notes = []
    if not s["calibration_text"] and n_params > 1_000_000_000:
        notes.append(f"calibrated on the built-in text ({len(ids)} tokens); for a {n_params / 1e9:.1f}B model, "
                     f"pass --calibration-text with a few thousand tokens of the text your app will see")
    return FormatResult(quantization=quantization, runtime=runtime, context_length=context, notes=notes,
                        verification={"qnn": verification_note(soc, s["compile"], checked, n_params), **checked})


def verification_note(soc, compiled: bool, checked: dict[str, Any], n_params: int = 0) -> str:
    """What was compared, where, in words: a workstation never claims a device."""
    device = on_snapdragon()
    where = "a Snapdragon device" if device else f"the QNN HTP simulator ({platform.machine()})"
    built = (f"compiled for {soc.key} (htp v{soc.htp_arch}, soc_model {soc.soc_model})" if compiled
             else f"QDQ graphs that QNN compiles on first load (checked for {soc.key}, htp v{soc.htp_arch})")
    if not checked:
        return (f"{built}; not run on the simulator ({n_params / 1e6:.0f}M parameters, over the "
                f"{SIMULATE_MAX_PARAMS / 1e6:.0f}M it runs in reasonable time); not verified on a device")
    return (f"{built}; on {where}, a prefill chunk and 3 decode steps agree with the same QDQ graphs run on "
            f"the CPU (logit cosine {checked['htp_vs_cpu_qdq_cosine_mean']:.6f}); the QDQ graphs against the "
            f"float graphs of the source model: cosine {checked['qdq_vs_float_cosine_mean']:.6f}"
            + ("" if device else "; not run on a device"))


def on_snapdragon() -> bool:
    """True where the QNN EP offers a real NPU (a Snapdragon device), not the x86-64 simulator."""
    from phi_edge.runtimes.qnn.session import engine, htp_devices

    ort, _ = engine()
    return any(str(d.device.type).endswith("NPU") for d in htp_devices(ort))


def check_on_htp(shipped: dict[str, Path], qdq: dict[str, Path], ids: list[int], layout: dict[str, Any], soc,
                 block_quant: bool, floats: dict[str, Path] | None = None) -> dict[str, Any]:
    """Run a prefill chunk and a few decode steps of the shipped graphs on HTP (CPU fallback
    disabled, so every node ran there) and compare the logits with the QDQ graphs run as written
    on the CPU, and those with the float graphs (the source model as traced). Refuses an artifact
    whose HTP results disagree with the CPU's."""
    import onnxruntime as ort

    from phi_edge.runtimes.qnn import StaticModel
    from phi_edge.runtimes.qnn.session import open_session

    from ...verify import cosine

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the QDQ model as written
    cpu = {g: ort.InferenceSession(str(p), sess_options=so, providers=["CPUExecutionProvider"]) for g, p in qdq.items()}
    htp = {g: open_session(p, soc.htp_arch, soc.soc_model, block_quant) for g, p in shipped.items()}
    runs = [("cpu", cpu), ("htp", htp)]
    if floats:
        runs.append(("float", {g: ort.InferenceSession(str(p), sess_options=so, providers=["CPUExecutionProvider"])
                               for g, p in floats.items()}))
    results = {}
    for name, sessions in runs:
        model = StaticModel(prefill=lambda f, s=sessions: s["prefill"].run(None, f),
                            decode=lambda f, s=sessions: s["decode"].run(None, f), **layout)
        prompt = ids[:min(layout["chunk"], layout["context"] - 4)]
        logits = [model.prefill(prompt)] + [model.decode(t)[None] for t in ids[len(prompt):len(prompt) + 3]]
        results[name] = np.concatenate(logits)
    cos = [cosine(a, b) for a, b in zip(results["htp"], results["cpu"])]
    report = {"htp_vs_cpu_qdq_cosine_mean": round(float(np.mean(cos)), 6),
              "htp_vs_cpu_qdq_cosine_min": round(float(np.min(cos)), 6),
              "cpu_fallback": "disabled: every node ran on HTP"}
    if floats:
        qcos = [cosine(a, b) for a, b in zip(results["cpu"], results["float"])]
        report["qdq_vs_float_cosine_mean"] = round(float(np.mean(qcos)), 6)
    if report["htp_vs_cpu_qdq_cosine_mean"] < MIN_HTP_COSINE:
        raise PhiEdgeError(f"the graphs compiled for HTP disagree with the quantized model on the CPU (logit "
                           f"cosine {report['htp_vs_cpu_qdq_cosine_mean']:.4f}, want >= {MIN_HTP_COSINE}); "
                           f"nothing was written: try --precision int8 or another --block-size, and report this")
    return report
