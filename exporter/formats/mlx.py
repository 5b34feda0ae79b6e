"""MLX format: mlx-lm's loader, quantizer and writer, called in-process, for Apple Silicon.

Writes ``model*.safetensors`` and the ``config.json`` mlx-lm loads (with its ``quantization``
table). int4/int8 are mlx-lm's affine group quantization; which layers get which bits is one
``quant_predicate``: the body at the chosen bits, embeddings and lm_head at their own precision,
``--int8-layers`` at 8 bits, MoE router gates at 8 bits (as mlx-lm's newer MoE models do).
The tokenizer files are the checkpoint's own, copied by the orchestrator.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from phi_edge.runtimes.errors import PhiEdgeError

from . import ExportOptions, FormatResult, merged_quant, require_tool

FORMAT = "mlx"
OPTIONS = frozenset({"group_size", "lm_head", "embeddings", "int8_layers"})
TOOLS = ("mlx", "mlx-lm")
GROUP_SIZES = (32, 64, 128)
BITS = {"int4": 4, "int8": 8}
ROPE_TYPES = (None, "longrope", "su", "linear")  # what mlx-lm's Phi models apply; others it drops
RANK = {"int4": 0, "int8": 1, "fp": 2}  # more precise is higher


def settings(precision: str, q: dict[str, Any], tied: bool) -> dict[str, Any]:
    """The quantization actually used: the target's defaults, the user's options, and the rules."""
    layers = [n.strip() for n in str(q.get("int8_layers") or "").split(",") if n.strip()]
    lm_head, embeddings = q.get("lm_head", precision), q.get("embeddings", precision)
    if tied:  # one matrix is both: it keeps the more precise of the two settings
        embeddings = lm_head = max(lm_head, embeddings, key=lambda v: RANK.get(v, -1))
    return {"bits": BITS[precision], "group_size": int(q.get("group_size", 64)), "lm_head": lm_head,
            "embeddings": embeddings, "int8_layers": layers}


def check(ckpt, target, opts: ExportOptions) -> None:
    config = ckpt.config
    model_type = config.get("model_type", "")
    if importlib.util.find_spec("mlx_lm") is None:
        require_tool("mlx_lm", "the mlx exporter")
    if not model_type.isidentifier() or importlib.util.find_spec(f"mlx_lm.models.{model_type}") is None:
        raise PhiEdgeError(f"mlx-lm cannot convert model_type '{model_type}' ({ckpt.architecture}); "
                           f"export it for another target, e.g. --target intel-cpu")
    from ..checkpoint import rope_settings

    rope = rope_settings(config)
    rope_type = (rope.get("type") or rope.get("rope_type")) if rope else None
    if rope_type not in ROPE_TYPES:
        raise PhiEdgeError(f"mlx-lm's {model_type} model does not apply rope_scaling type '{rope_type}' "
                           f"(it takes longrope, su or linear); export this checkpoint for another target")
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "?")
        raise PhiEdgeError(f"the checkpoint is already quantized ({method}); export from its float "
                           f"(fp32/fp16/bf16) checkpoint and let --precision quantize it")
    if ckpt.weight_format != "safetensors" or any(not (f.name.startswith("model") and f.suffix == ".safetensors")
                                                    for f in ckpt.weight_files):
        raise PhiEdgeError("mlx-lm reads weights only from model*.safetensors files; convert the checkpoint "
                           "to safetensors (transformers' save_pretrained) and export that folder")
    if opts.precision not in BITS:
        if opts.quant:
            raise PhiEdgeError(f"quantization options need --precision int4 or int8, not {opts.precision}")
        return
    q = merged_quant(target, opts)
    s = settings(opts.precision, q, bool(config.get("tie_word_embeddings")))
    if s["group_size"] not in GROUP_SIZES:
        raise PhiEdgeError(f"--group-size for mlx must be one of {', '.join(map(str, GROUP_SIZES))}, "
                           f"got {s['group_size']}")
    if config["hidden_size"] % s["group_size"]:
        raise PhiEdgeError(f"--group-size {s['group_size']} does not divide the model's hidden size "
                           f"{config['hidden_size']}, so mlx-lm would quantize almost nothing; use a smaller one")
    for flag, value in (("--lm-head", s["lm_head"]), ("--embeddings", s["embeddings"])):
        if value not in RANK:
            raise PhiEdgeError(f"{flag} must be int4, int8 or fp, got {value}")
    if s["int8_layers"] and opts.precision != "int4":
        raise PhiEdgeError("--int8-layers keeps layers at 8 bits inside an int4 model; use it with --precision int4")


def hub_rope_keys(config: dict[str, Any]) -> dict[str, Any]:
    """mlx-lm reads LongRoPE from the hub's ``rope_scaling`` only; a config written by transformers 5
    keeps it in ``rope_parameters``: hand mlx-lm the hub's spelling (the artifact's config.json gets it too)."""
    from ..checkpoint import rope_settings

    if config.get("rope_scaling") or not rope_settings(config):
        return {}
    rope = dict(rope_settings(config))
    rope.setdefault("type", rope.get("rope_type"))
    return {"rope_scaling": {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}}


def smoke_device(target) -> str:
    """Where the post-export test runs: the GPU where MLX has one, else MLX's CPU build."""
    import mlx.core as mx

    return "gpu" if mx.is_available(mx.gpu) else "cpu"


def estimate_bytes(config: dict[str, Any], precision: str, q: dict[str, Any], target) -> int:
    """Weights as mlx-lm writes them: float32 for fp32, float16 otherwise, and per quantized group
    one float16 scale and one float16 bias."""
    from ..sizing import FLOAT_BYTES, param_counts

    c = param_counts(config)
    if precision in FLOAT_BYTES:
        return c.total * FLOAT_BYTES[precision]
    s = settings(precision, q, bool(config.get("tie_word_embeddings")))

    def size(n: int, level: str | int) -> int:
        bits = {"fp": 16, "int4": 4, "int8": 8}.get(level, level)
        return n * 2 if bits == 16 else n * bits // 8 + n // s["group_size"] * 4

    named = sum(_layer_params(config).get(name, 0) for name in s["int8_layers"])
    return (size(c.linear - named, s["bits"]) + size(named, 8) + size(c.embeddings, s["embeddings"])
            + size(c.lm_head, s["lm_head"]) + c.other * 2)


def _layer_params(config: dict[str, Any]) -> dict[str, int]:
    """Parameters per projection name over all layers (for the --int8-layers estimate)."""
    from ..sizing import head_dim

    h, inter, n = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    hd = head_dim(config)
    experts = config.get("num_local_experts") or 1
    per = {"q_proj": h * heads * hd, "k_proj": h * kv * hd, "v_proj": h * kv * hd, "o_proj": heads * hd * h,
           "gate_proj": experts * h * inter, "up_proj": experts * h * inter, "down_proj": experts * inter * h}
    per["qkv_proj"] = per["q_proj"] + per["k_proj"] + per["v_proj"]
    per["gate_up_proj"] = per["gate_proj"] + per["up_proj"]
    return {k: v * n for k, v in per.items()}


def quant_predicate(s: dict[str, Any]):
    """mlx-lm's per-layer choice: False keeps a layer in float, True uses the body's bits, a dict
    gives the layer its own (recorded per layer in config.json, which mlx-lm's loader reads)."""
    def level(path: str) -> int | None:
        name = path.rsplit(".", 1)[-1]
        if name == "embed_tokens":
            return BITS.get(s["embeddings"])
        if path == "lm_head":
            return BITS.get(s["lm_head"])
        if path.endswith("block_sparse_moe.gate"):
            return 8
        if any(path == n or path.endswith("." + n) for n in s["int8_layers"]):
            return 8
        return s["bits"]

    def predicate(path: str, module) -> bool | dict:
        bits = level(path)
        if bits is None:
            return False
        return True if bits == s["bits"] else {"group_size": s["group_size"], "bits": bits, "mode": "affine"}

    return predicate


def export(ckpt, target, opts: ExportOptions, out: Path, steps) -> FormatResult:
    require_tool("mlx_lm", "the mlx exporter")
    import mlx.core as mx
    from mlx.utils import tree_map
    from mlx_lm.utils import load_model, quantize_model, save_config, save_model

    dtype = mx.float32 if opts.precision == "fp32" else mx.float16
    with steps.step(f"Loading the checkpoint with mlx-lm ({ckpt.config.get('model_type')})"):
        try:
            model, config = load_model(Path(ckpt.path), lazy=True, model_config=hub_rope_keys(ckpt.config))
        except ValueError as e:  # mlx-lm's own message: unsupported type, weights that do not fit the model
            raise PhiEdgeError(f"mlx-lm cannot convert this checkpoint: {e}") from None
        model.update(tree_map(lambda v: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v,
                              model.parameters()))
    used: dict[str, Any] = {"tool": "mlx-lm", "dtype": "float32" if dtype == mx.float32 else "float16"}
    if opts.precision in BITS:
        s = settings(opts.precision, merged_quant(target, opts), bool(config.get("tie_word_embeddings")))
        _check_layer_names(model, s["int8_layers"])
        with steps.step(f"Quantizing to {opts.precision} (group size {s['group_size']}) with mlx-lm"):
            model, config = quantize_model(model, config, s["group_size"], s["bits"], mode="affine",
                                           quant_predicate=quant_predicate(s))
        used.update(mode="affine", **s, kept_float=_float_layers(model, s))
    with steps.step("Writing the MLX weights"):
        save_model(out, model, donate_model=True)
        save_config(config, out / "config.json")
    return FormatResult(quantization=used)


def _quantizable(model) -> dict[str, Any]:
    return {path: m for path, m in model.named_modules() if hasattr(m, "to_quantized") or hasattr(m, "scales")}


def _check_layer_names(model, names: list[str]) -> None:
    paths = _quantizable(model)
    for n in names:
        if not any(p == n or p.endswith("." + n) for p in paths):
            known = sorted({p.rsplit(".", 1)[-1] for p in paths if ".layers." in p})
            raise PhiEdgeError(f"--int8-layers names '{n}', which is no layer of this model; "
                               f"its layers are: {', '.join(known)}")


def _float_layers(model, s: dict[str, Any]) -> list[str]:
    """Layers we asked to quantize that mlx-lm left in float: their input width is not a multiple
    of the group size (mlx-lm skips those)."""
    wanted = quant_predicate(s)
    return sorted(p for p, m in _quantizable(model).items() if not hasattr(m, "scales") and wanted(p, m))
