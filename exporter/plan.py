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

    def runtime_bytes_for(self, weights: int) -> int:
        return runtime_bytes(weights, self.kv_cache_bytes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def refusal(self) -> str:
        return (f"this model will not fit target '{self.target}': it needs about {human(self.runtime_bytes)} at run "
                f"time (weights {human(self.artifact_bytes)} + KV cache {human(self.kv_cache_bytes)} at "
                f"{self.context_length} tokens + runtime) but the device has {human(self.device_ram_bytes)}; "
                f"try a smaller --context-length, --precision int4, or a smaller model (or --force to export anyway)")


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


def kv_dtype_bytes(target, precision: str) -> int:
    return 2 if target.device in ("cuda", "gpu", "GPU", "NPU", "htp") or precision == "fp16" else 4


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
    kv = kv_cache_bytes(config, context, kv_dtype_bytes(target, precision))
    need = runtime_bytes(size, kv)
    moe = "n/a (dense model)"
    if config.get("model_type") == "phimoe" or (config.get("architectures") or [""])[0] == "PhiMoEForCausalLM":
        moe = "yes" if target.moe else f"no: {target.moe_note}"
    return Plan(target=target.name, format=target.format, precision=precision, context_length=context,
                parameters=param_counts(config).total, artifact_bytes=size, kv_cache_bytes=kv,
                runtime_bytes=need, device_ram_bytes=target.ram_bytes, fits=need <= target.ram_bytes, moe=moe)
