"""``phi-export plan``: what an export will weigh and whether it fits the device, from the config
alone, before any heavy work. The export runs the same check and refuses what will not fit."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .formats import format_module, merged_quant, ExportOptions
from .sizing import (FLOAT_BYTES, QUANT_BITS, ParamCounts, human, kv_cache_bytes, param_counts,
                     quantized_bytes, runtime_bytes)


@dataclass
class Plan:
    target: str
    format: str
    precision: str
    context_length: int
    parameters: int
    artifact_bytes: int
    kv_cache_bytes: int
    runtime_bytes: int
    device_ram_bytes: int
    fits: bool
    moe: str  # for a Phi-3.5-MoE model: "yes", or why not
    kv_cache_dtype_bytes: int = 4
    kv_allocation: str = ""  # how the backend allocates the KV cache
    context_note: str = ""  # how the context was chosen
    export_peak_bytes: int | None = None  # the export's own peak RAM on this workstation (None: not modelled)
    export_route: str = ""  # how the export will run, which the estimate is for
    workstation_ram_bytes: int = 0  # this machine's physical memory

    @property
    def export_fits(self) -> bool:
        return self.export_peak_bytes is None or self.export_peak_bytes <= self.workstation_ram_bytes

    def export_refusal(self) -> str:
        return (f"this export needs about {human(self.export_peak_bytes)} of RAM on this workstation "
                f"({self.export_route}) but it has {human(self.workstation_ram_bytes)}; export on a machine with "
                f"more memory (or --force to try anyway)")

    def runtime_bytes_for(self, weights: int) -> int:
        return runtime_bytes(weights, self.kv_cache_bytes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def refusal(self) -> str:
        return (f"this model will not fit target '{self.target}': it needs about {human(self.runtime_bytes)} at run "
                f"time (weights {human(self.artifact_bytes)} + KV cache {human(self.kv_cache_bytes)} at "
                f"{self.context_length} tokens + runtime) but the device has {human(self.device_ram_bytes)}; "
                f"{self._suggestion()} (or --force to export anyway)")

    def _suggestion(self) -> str:
        if self.context_length > MIN_DEFAULT_CONTEXT:
            return f"pass a smaller --context-length (e.g. {MIN_DEFAULT_CONTEXT}), --precision int4, or a smaller model"
        if self.precision != "int4":
            return "export with --precision int4, or a smaller model"
        return "choose a smaller model (e.g. Phi-3.5-mini or Phi-4-mini) or a device with more memory"


def default_estimate(config: dict[str, Any], precision: str, quant: dict[str, Any], float_bytes: int = 4) -> int:
    """Artifact bytes for a weight-only quantized model with float scales per block."""
    c: ParamCounts = param_counts(config)
    if precision in FLOAT_BYTES:
        return c.total * FLOAT_BYTES[precision]
    bits = QUANT_BITS[precision]
    block = int(quant.get("block_size", quant.get("group_size", 32)) or 32)
    if block <= 0:  # channel-wise
        block = config["hidden_size"]
    asym = not quant.get("symmetric", quant.get("sym", True))

    def q(n: int, b: int = bits) -> int:
        return quantized_bytes(n, b, block, float_bytes, asym)

    lm = quant.get("lm_head", precision)
    lm_bytes = c.lm_head * float_bytes if lm == "fp" else q(c.lm_head, QUANT_BITS.get(lm, bits))
    emb = quant.get("embeddings", "fp")
    emb_bytes = c.embeddings * float_bytes if emb == "fp" else q(c.embeddings, QUANT_BITS.get(emb, bits))
    return q(c.linear) + lm_bytes + emb_bytes + c.other * float_bytes


def workstation_ram_bytes() -> int:
    """Physical memory of this machine (what an export can use at most)."""
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows): psutil, else unknown (never refuse)
        try:
            import psutil

            return int(psutil.virtual_memory().total)
        except ImportError:
            return 1 << 62


MIN_DEFAULT_CONTEXT = 2048  # a default context below this is not useful: refuse instead

# how each format's engine allocates its KV cache
KV_ALLOCATION = {
    "onnx-genai": "preallocated per generation, up to prompt + max_new_tokens",
    "openvino": "grows as the conversation does",
    "mlx": "grows as the conversation does (in steps of 256 tokens)",
    "qnn": "preallocated at load: the static window",
    "gguf": "preallocated at load: the whole context (llama.cpp's default f16 cache)",
    "coreml": "preallocated at load: the Core ML state holds the whole context (fp16)",
}


def kv_dtype_bytes(target, precision: str) -> int:
    """Bytes per KV cache element as each backend really stores it: ONNX Runtime GenAI in the model's
    io type (fp16 on CUDA and for fp16 models, else fp32); OpenVINO on the CPU as u8 (its default KV
    cache precision) except fp32 artifacts, which carry f32, and fp16 on GPU/NPU; MLX in the
    activations' type (fp32 for fp32 artifacts, else fp16); QNN in fp16 on the HTP; llama.cpp (gguf) in f16; Core ML's state in fp16."""
    fmt = target.format
    if fmt == "openvino":
        if str(target.device).upper() == "CPU":
            return 4 if precision == "fp32" else 1
        return 2
    if fmt == "mlx":
        return 4 if precision == "fp32" else 2
    if fmt in ("qnn", "gguf", "coreml"):  # llama.cpp: type_k / type_v f16 unless set otherwise
        return 2
    return 2 if target.device == "cuda" or precision == "fp16" else 4


def make_plan(config: dict[str, Any], target, precision: str, context: int, quant: dict[str, Any] | None = None,
              extra_bytes: int = 0) -> Plan:
    """``extra_bytes``: files copied as they are (tokenizer, configs)."""
    module = format_module(target.format)
    q = merged_quant(target, ExportOptions(precision=precision, quant=dict(quant or {})))
    if hasattr(module, "estimate_bytes"):
        size = module.estimate_bytes(config, precision, q, target)
    else:
        size = default_estimate(config, precision, q)
    size += extra_bytes
    kv_bytes = kv_dtype_bytes(target, precision)
    kv = kv_cache_bytes(config, context, kv_bytes)
    need = runtime_bytes(size, kv)
    moe = "n/a (dense model)"
    if config.get("model_type") == "phimoe" or (config.get("architectures") or [""])[0] in ("PhiMoEForCausalLM",
                                                                                            "PhimoeForCausalLM"):
        moe = "yes" if target.moe else f"no: {target.moe_note}"
    peak, route = (module.export_memory(config, precision, q, target, size) if hasattr(module, "export_memory")
                   else (None, "not modelled for this format"))
    return Plan(target=target.name, format=target.format, precision=precision, context_length=context,
                parameters=param_counts(config).total, artifact_bytes=size, kv_cache_bytes=kv,
                runtime_bytes=need, device_ram_bytes=target.ram_bytes, fits=need <= target.ram_bytes, moe=moe,
                kv_cache_dtype_bytes=kv_bytes, kv_allocation=KV_ALLOCATION.get(target.format, ""),
                export_peak_bytes=peak, export_route=route, workstation_ram_bytes=workstation_ram_bytes())


def choose_context(config: dict[str, Any], target, precision: str, requested: int = 0,
                   quant: dict[str, Any] | None = None, extra_bytes: int = 0) -> Plan:
    """The plan at the context to export for. ``requested`` (``--context-length``) is taken as it is;
    otherwise the largest context that fits the target's RAM: the model's maximum (or the target's
    cap), else the largest power of two below it, down to :data:`MIN_DEFAULT_CONTEXT`. When nothing
    fits, the plan at the smallest candidate (its ``fits`` is False, its refusal says what to do)."""
    from phi_edge.runtimes.errors import PhiEdgeError

    model_max = int(config.get("max_position_embeddings", 4096))
    if requested:
        if requested > model_max:
            raise PhiEdgeError(f"--context-length {requested} exceeds the model's maximum of {model_max}")
        if requested < 16:
            raise PhiEdgeError(f"--context-length must be at least 16, got {requested}")
        plan = make_plan(config, target, precision, requested, quant, extra_bytes)
        plan.context_note = f"context {requested} of {model_max}: from --context-length"
        return plan
    cap = min(target.context_length or model_max, model_max)
    candidates = [cap] + [1 << k for k in range(cap.bit_length() - 1, 0, -1)
                          if (1 << k) < cap and (1 << k) >= MIN_DEFAULT_CONTEXT]
    plan = None
    for context in candidates:
        plan = make_plan(config, target, precision, context, quant, extra_bytes)
        if plan.fits:
            break
    if context == model_max:
        plan.context_note = f"context {context}: the model's maximum"
    elif context == cap:
        plan.context_note = f"context {context} of {model_max}: target '{target.name}' caps it; pass --context-length to change"
    else:
        plan.context_note = (f"context {context} of {model_max}: chosen to fit {human(target.ram_bytes)}; "
                             f"pass --context-length to change")
    return plan
