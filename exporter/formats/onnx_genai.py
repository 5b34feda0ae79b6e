"""ONNX Runtime GenAI format: the onnxruntime-genai model builder, called in-process.

Writes ``model.onnx`` (+ external data) and ``genai_config.json`` for the Raspberry Pi, Android,
generic CPU and CUDA targets. Our options map onto the builder's ``extra_options``.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Iterator

from phi_edge.runtimes.errors import PhiEdgeError

from . import ExportOptions, FormatResult, merged_quant, require_tool

FORMAT = "onnx-genai"
OPTIONS = frozenset({"block_size", "symmetric", "accuracy_level", "algorithm", "lm_head", "embeddings"})
TOOLS = ("onnxruntime-genai", "onnxruntime", "onnx", "onnx-ir", "transformers", "torch")
ALGORITHMS = ("rtn", "k_quant")
BLOCK_SIZES = (16, 32, 64, 128, 256)


def check(ckpt, target, opts: ExportOptions) -> None:
    require_tool("onnxruntime_genai.models.builder", "the onnx-genai exporter")
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
    from ..plan import default_estimate
    from ..sizing import head_dim, param_counts, quantized_bytes

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
    from ..checkpoint import rope_settings

    if rope_settings(config):  # LongRoPE: a long cache and a short one
        positions += config.get("original_max_position_embeddings", positions)
    size += 2 * positions * rotary * fb
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
    from onnxruntime_genai.models import builder

    ep = "cuda" if target.device == "cuda" else "cpu"
    q = merged_quant(target, opts)
    tied = bool(ckpt.config.get("tie_word_embeddings"))
    extra = builder_options(opts.precision, q, tied)
    cache = out / ".builder-cache"
    with steps.step(f"Building the ONNX graph ({opts.precision}, {ep}) with onnxruntime-genai"), _builder_compat(builder):
        options = builder.parse_extra_options(None, str(ckpt.path), str(out), opts.precision, ep, str(cache), extra)
        options["hf_remote"] = bool(ckpt.trust_remote_code)
        builder.create_model(None, str(ckpt.path), str(out), opts.precision, ep, str(cache), **options)
    import shutil

    shutil.rmtree(cache, ignore_errors=True)
    used = {"tool": "onnxruntime-genai builder", "execution_provider": ep, "builder_options": extra}
    if opts.precision in ("int4", "int8"):
        used.update(bits=4 if opts.precision == "int4" else 8, block_size=q.get("block_size", 32),
                    symmetric=bool(q.get("symmetric", True)), accuracy_level=q.get("accuracy_level", 4),
                    algorithm=q.get("algorithm", "rtn"), lm_head=q.get("lm_head", opts.precision),
                    embeddings=q.get("embeddings", _default_embeddings(ckpt.config, opts.precision)))
    return FormatResult(quantization=used, runtime={"device": ep})


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


@contextlib.contextmanager
def _builder_compat(builder) -> Iterator[None]:
    """onnxruntime-genai 0.18's builders predate transformers 5: the LongRoPE init reads the hub's old
    ``rope_scaling["type"]``, which a config written by transformers 5 (``rope_parameters`` with
    ``rope_type`` only) lacks; it knows Phi-3.5-MoE only by the hub's class name; the MoE builder also
    misses the LongRoPE init its dense sibling has, and reads the old per-expert layout. Bridge all
    four for one export."""
    phi = sys.modules[builder.Phi3MoELongRoPEModel.__module__]
    original_moe, original_dense = phi.Phi3MoELongRoPEModel, phi.Phi3MiniLongRoPEModel
    dense_rope_init = original_dense.make_rope_init

    def make_rope_init(self, config):
        params = getattr(config, "rope_parameters", None)
        if isinstance(params, dict) and "rope_type" in params:
            params.setdefault("type", params["rope_type"])
        return dense_rope_init(self, config)

    class PhiMini(original_dense):
        pass

    class PhiMoE(original_moe):
        def get_moe_module(self, layer_id, layer):
            return _legacy_moe(layer)

    PhiMini.make_rope_init = PhiMoE.make_rope_init = make_rope_init
    builder.Phi3MoELongRoPEModel, builder.Phi3MiniLongRoPEModel = PhiMoE, PhiMini

    # transformers 5 names Phi-3.5-MoE's class PhimoeForCausalLM; the builder only knows PhiMoEForCausalLM
    from transformers import AutoConfig

    load_config = AutoConfig.from_pretrained

    def from_pretrained(*args, **kwargs):
        config = load_config(*args, **kwargs)
        if (getattr(config, "architectures", None) or [""])[0] == "PhimoeForCausalLM":
            config.architectures = ["PhiMoEForCausalLM"]
        return config

    AutoConfig.from_pretrained = from_pretrained
    try:
        yield
    finally:
        builder.Phi3MoELongRoPEModel, builder.Phi3MiniLongRoPEModel = original_moe, original_dense
        AutoConfig.from_pretrained = load_config


def _legacy_moe(layer):
    """transformers 5's fused PhimoeSparseMoeBlock seen as the 4.x ``block_sparse_moe`` layout."""
    from types import SimpleNamespace

    moe = getattr(layer, "block_sparse_moe", None)
    if moe is not None:
        return moe
    mlp = layer.mlp
    gate_up, down = mlp.experts.gate_up_proj, mlp.experts.down_proj
    inter = down.shape[-1]
    experts = [SimpleNamespace(w1=SimpleNamespace(weight=gate_up[i, :inter]),
                               w3=SimpleNamespace(weight=gate_up[i, inter:]),
                               w2=SimpleNamespace(weight=down[i]))
               for i in range(gate_up.shape[0])]
    return SimpleNamespace(gate=SimpleNamespace(weight=mlp.router.weight, bias=None), experts=experts)
