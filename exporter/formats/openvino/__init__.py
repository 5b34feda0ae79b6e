"""OpenVINO format: optimum-intel's export and NNCF's weight compression, called in-process, for
Intel CPUs, GPUs and NPUs (Core Ultra).

Writes the stateful IR (``openvino_model.xml/.bin``) and the openvino-tokenizers tokenizer and
detokenizer models, the folder OpenVINO GenAI's ``LLMPipeline`` loads. int4/int8 are NNCF weight
compression through ``OVWeightQuantizationConfig``; AWQ, scale estimation and GPTQ calibrate on a
local text file (:mod:`.calibration`), never on a dataset from the hub.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from phi_edge.runtimes.errors import PhiEdgeError

from .. import OPTION_FLAGS, ExportOptions, FormatResult, merged_quant, require_tool

FORMAT = "openvino"
OPTIONS = frozenset({"group_size", "symmetric", "ratio", "backup_precision", "awq", "scale_estimation", "gptq",
                     "calibration_text"})
TOOLS = ("optimum-intel", "optimum", "nncf", "openvino", "openvino-tokenizers", "transformers", "torch")
TASK = "text-generation-with-past"
BITS = {"int4": 4, "int8": 8}
DATA_AWARE = ("awq", "scale_estimation", "gptq")
INT4_ONLY = ("ratio", "backup_precision") + DATA_AWARE + ("calibration_text",)
BACKUP_PRECISIONS = ("int8_asym", "int8_sym", "none")
NPU_CHANNELWISE_ABOVE = 1_000_000_000  # parameters; above this the NPU plugin needs --group-size -1
TOKENIZER_IR = ("openvino_tokenizer.xml", "openvino_detokenizer.xml")


def settings(precision: str, q: dict[str, Any]) -> dict[str, Any]:
    """The weight compression actually used: the target's defaults with the user's options on top."""
    s: dict[str, Any] = {"bits": BITS[precision], "symmetric": bool(q.get("symmetric", False)),
                         "group_size": int(q.get("group_size", -1 if precision == "int8" else 128))}
    if precision == "int4":
        s.update(ratio=float(q.get("ratio", 1.0)), backup_precision=q.get("backup_precision", "int8_asym"),
                 **{k: bool(q.get(k)) for k in DATA_AWARE}, calibration_text=q.get("calibration_text"))
    return s


def check(ckpt, target, opts: ExportOptions) -> None:
    check_architecture(ckpt)
    if opts.precision not in BITS:
        if opts.quant:
            raise PhiEdgeError(f"{_flags(sorted(opts.quant))} only to --precision int4 or int8, not {opts.precision}")
        return
    q = merged_quant(target, opts)
    s = settings(opts.precision, q)
    if opts.precision == "int8":
        given = [k for k in INT4_ONLY if opts.quant.get(k) not in (None, False)]
        if given:
            raise PhiEdgeError(f"{_flags(given)} only to --precision int4; "
                               f"int8 compresses every layer channel-wise without calibration")
        if s["group_size"] != -1:
            raise PhiEdgeError(f"int8 weights are compressed channel-wise in OpenVINO; drop --group-size "
                               f"(or pass --group-size -1), got {s['group_size']}")
        return
    if s["group_size"] != -1 and s["group_size"] <= 0:
        raise PhiEdgeError(f"--group-size must be a positive number of weights or -1 (channel-wise), "
                           f"got {s['group_size']}")
    if not 0 < s["ratio"] <= 1:
        raise PhiEdgeError(f"--ratio is the share of layers at int4 and must be in (0, 1], got {s['ratio']}")
    if s["backup_precision"] not in BACKUP_PRECISIONS:
        raise PhiEdgeError(f"--backup-precision must be one of {', '.join(BACKUP_PRECISIONS)}, "
                           f"got {s['backup_precision']}")
    wanted = [k for k in DATA_AWARE if s[k]]
    if wanted and not s["calibration_text"]:
        raise PhiEdgeError(f"{_flags(wanted, 'needs')} calibration data: pass --calibration-text FILE "
                           f"(a local text file of the kind of text the model will see)")
    if s["calibration_text"] and not wanted and s["ratio"] >= 1:
        raise PhiEdgeError("--calibration-text is used by --awq, --scale-estimation, --gptq or a --ratio below 1; "
                           "add one of them or drop --calibration-text")
    if s["calibration_text"]:
        from .calibration import read_text

        read_text(s["calibration_text"])
    if target.device == "NPU":
        check_npu(ckpt, s)


def _flags(keys, verb: str = "applies") -> str:
    """``--awq applies`` / ``--awq, --gptq apply``: the flags for option keys, with the verb."""
    keys = list(keys)
    plural = {"applies": "apply", "needs": "need"}[verb]
    return ", ".join(OPTION_FLAGS[k] for k in keys) + " " + (verb if len(keys) == 1 else plural)


def check_npu(ckpt, s: dict[str, Any]) -> None:
    """The Intel NPU plugin runs symmetric int4, and channel-wise int4 for models over 1B parameters."""
    if not s["symmetric"]:
        raise PhiEdgeError("the Intel NPU runs symmetric int4 weights only; drop --asym "
                           "(or export for --target intel-cpu / intel-gpu)")
    from ...sizing import param_counts

    params = param_counts(ckpt.config).total
    if s["group_size"] != -1 and params > NPU_CHANNELWISE_ABOVE:
        raise PhiEdgeError(f"the Intel NPU needs channel-wise int4 (--group-size -1) for models over 1B "
                           f"parameters; this one has {params / 1e9:.1f}B, got --group-size {s['group_size']}")


def check_architecture(ckpt) -> None:
    """Refuse, before any heavy work, a model type optimum-intel has no OpenVINO export for."""
    require_tool("optimum.exporters.openvino", "the openvino exporter")
    from optimum.exporters.tasks import TasksManager

    model_type = ckpt.config.get("model_type", "")
    try:
        tasks = TasksManager.get_supported_tasks_for_model_type(model_type, exporter="openvino",
                                                                library_name="transformers")
    except (KeyError, ValueError):
        tasks = {}
    if TASK not in tasks:
        raise PhiEdgeError(f"optimum-intel has no OpenVINO export for model_type '{model_type}' "
                           f"({ckpt.architecture}); export it for another target (phi-export targets)")


def smoke_device(target) -> str:
    """Where the post-export test runs: the target's device where this machine has it, else the CPU
    (an IR for the GPU or the NPU runs on the CPU too, so the export is still tested)."""
    import openvino as ov

    available = {d.split(".")[0] for d in ov.Core().available_devices}
    return target.device if target.device in available else "CPU"


def estimate_bytes(config: dict[str, Any], precision: str, q: dict[str, Any], target) -> int:
    """Artifact bytes: NNCF keeps the embeddings and lm_head at the backup precision, compresses
    ``ratio`` of the decoder layers to int4 and the rest to the backup; scales are fp16."""
    from ...sizing import FLOAT_BYTES, param_counts, quantized_bytes

    c = param_counts(config)
    # beside the weights: the tokenizer and detokenizer IRs (about 18 bytes per vocabulary entry
    # each) and the model's XML graph (about 100 KB per decoder layer), measured on our exports
    beside = 2 * 18 * config["vocab_size"] + 100_000 * config["num_hidden_layers"]
    return beside + _weight_bytes(config, c, precision, q)


def _weight_bytes(config: dict[str, Any], c, precision: str, q: dict[str, Any]) -> int:
    from ...sizing import FLOAT_BYTES, quantized_bytes

    if precision in FLOAT_BYTES:
        return c.total * FLOAT_BYTES[precision]
    s = settings(precision, q)
    group = s["group_size"] if s["group_size"] > 0 else config["hidden_size"]
    asym = not s["symmetric"]
    if precision == "int8":
        return quantized_bytes(c.total - c.other, 8, config["hidden_size"], 2, asym) + c.other * 4
    backup = s["backup_precision"]

    def at_backup(n: int) -> int:
        return n * 2 if backup == "none" else quantized_bytes(n, 8, config["hidden_size"], 2, backup == "int8_asym")

    int4 = int(c.linear * s["ratio"])
    return (quantized_bytes(int4, 4, group, 2, asym) + at_backup(c.linear - int4)
            + at_backup(c.embeddings + c.lm_head) + c.other * 4)


def export(ckpt, target, opts: ExportOptions, out: Path, steps) -> FormatResult:
    require_tool("optimum.intel", "the openvino exporter")
    require_tool("openvino_tokenizers", "the openvino exporter")
    import torch
    from optimum.intel import OVModelForCausalLM

    precision = opts.precision
    # as optimum-cli's --weight-format: fp32/fp16 load the checkpoint at that precision; int4/int8 at
    # the checkpoint's own (bf16 for the real Phi models) before NNCF compresses the weights
    dtype = {"fp32": torch.float32, "fp16": torch.float16}.get(precision)
    load = {"torch_dtype": dtype} if dtype else {}
    with steps.step("Converting to OpenVINO IR with optimum-intel"):
        model = OVModelForCausalLM.from_pretrained(str(ckpt.path), export=True, compile=False, load_in_8bit=False,
                                                   trust_remote_code=ckpt.trust_remote_code, **load)
    used: dict[str, Any] = {"tool": "optimum-intel", "weights": precision}
    if precision == "fp16":
        with steps.step("Compressing weights to fp16"):
            model.half()
    elif precision in BITS:
        s = settings(precision, merged_quant(target, opts))
        used = compress(model, ckpt, s, steps)
    with steps.step("Writing the IR, tokenizer and detokenizer"):
        model.save_pretrained(out)
        write_tokenizers(ckpt, out)
    return FormatResult(quantization=used, runtime=runtime_settings(target, precision, opts.context_length))


def compress(model, ckpt, s: dict[str, Any], steps) -> dict[str, Any]:
    """Compress ``model``'s weights in place with NNCF (through optimum-intel's OVQuantizer)."""
    from optimum.intel import OVConfig, OVQuantizer, OVWeightQuantizationConfig

    kwargs: dict[str, Any] = {"bits": s["bits"], "sym": s["symmetric"], "group_size": s["group_size"]}
    if s["bits"] == 4:
        kwargs.update(ratio=s["ratio"], backup_precision=s["backup_precision"], group_size_fallback="adjust",
                      quant_method="awq" if s["awq"] else "default",
                      scale_estimation=s["scale_estimation"] or None, gptq=s["gptq"] or None)
    used = {"tool": "optimum-intel + NNCF", "mode": f"int{s['bits']}_{'sym' if s['symmetric'] else 'asym'}",
            **{k: v for k, v in s.items() if v is not None}}
    data, samples = None, 0
    if s.get("calibration_text"):
        from .calibration import dataset

        with steps.step("Building the calibration data"):
            data, samples = dataset(model, ckpt.path, s["calibration_text"], ckpt.trust_remote_code)
        kwargs["num_samples"] = samples
        used.update(calibration_text=Path(s["calibration_text"]).name, calibration_samples=samples)
    if s["bits"] == 4:
        used["group_size_fallback"] = "adjust"  # layers the group does not divide get the largest that does
    config = OVWeightQuantizationConfig(**kwargs)
    what = ", ".join([used["mode"], "channel-wise" if s["group_size"] == -1 else f"groups of {s['group_size']}"]
                     + [k.replace("_", " ") for k in DATA_AWARE if s.get(k)])
    with steps.step(f"Compressing weights with NNCF ({what})"):
        OVQuantizer(model).quantize(calibration_dataset=data, ov_config=OVConfig(quantization_config=config))
    return used


def write_tokenizers(ckpt, out: Path) -> None:
    """The checkpoint's tokenizer as openvino-tokenizers models (what LLMPipeline tokenizes with),
    converted from its files as written (not from transformers' possibly rebuilt reading of them)."""
    import openvino as ov
    from openvino_tokenizers import convert_tokenizer

    from ...source_tokenizer import SourceTokenizer

    hf = SourceTokenizer(ckpt.path).as_transformers()
    try:
        tokenizer, detokenizer = convert_tokenizer(hf, with_detokenizer=True)
    except Exception as e:  # openvino-tokenizers raises several types for tokenizers it cannot convert
        raise PhiEdgeError(f"openvino-tokenizers cannot convert this checkpoint's tokenizer "
                           f"({type(hf).__name__}: {e}); export it for another target") from None
    for model, name in zip((tokenizer, detokenizer), TOKENIZER_IR):
        ov.save_model(model, str(out / name))


def runtime_settings(target, precision: str, context_length: int) -> dict[str, Any]:
    """What the runtime passes to OpenVINO: fp32 artifacts compute in fp32 (the CPU's default is
    bf16 where it has it, the GPU's fp16); the NPU's static prompt and response lengths."""
    runtime: dict[str, Any] = {}
    if precision == "fp32":
        runtime["properties"] = {"CPU": {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"},
                                 "GPU": {"INFERENCE_PRECISION_HINT": "f32"}}
    if target.device == "NPU":
        response = int(target.runtime.get("min_response_len", 128))
        prompt = int(target.runtime.get("max_prompt_len", 1024))
        runtime.update(max_prompt_len=max(min(prompt, context_length - response), 16), min_response_len=response)
    return runtime
