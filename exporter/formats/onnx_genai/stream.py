"""The streamed int4 export: quantize a checkpoint tensor by tensor into a pre-quantized checkpoint that the
onnxruntime-genai builder reads directly (its ``olive`` loader: ORT's MatMulNBits layout, taken as it is).

Peak memory is one source tensor plus one layer's quantized output here, then the quantized model in the
builder, never the float model. Same RTN scheme and bytes as the builder's own quantizer (see :mod:`.rtn`).
"""

from __future__ import annotations

import errno
import json
import re
import shutil
from pathlib import Path
from typing import Any, Callable

from phi_edge.runtimes.errors import PhiEdgeError

from . import rtn
from .shards import TensorEntry, list_tensors, read_tensor

LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# per-layer tensors: quantized projections (fused ones split first), and tensors copied as they are
PROJECTIONS = {"self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
               "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"}
FUSED = {"self_attn.qkv_proj.weight", "mlp.gate_up_proj.weight"}
COPIED = {"input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.bias",
          "self_attn.k_proj.bias", "self_attn.v_proj.bias", "self_attn.qkv_proj.bias", "self_attn.o_proj.bias",
          "mlp.down_proj.bias"}
SKIPPED = {"self_attn.rotary_emb.inv_freq"}
TOP = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}


class DiskFullError(PhiEdgeError):
    """The output disk filled up while the quantized checkpoint was written."""


def refusal(ckpt, precision: str, q: dict[str, Any]) -> str | None:
    """Why this export cannot stream (it then runs the builder on the float model), or None."""
    why = config_refusal(ckpt.config, precision, q)
    if why:
        return why
    if ckpt.weight_format != "safetensors":
        return "pickle weights"
    unknown = [n for n in list_tensors(ckpt.weight_files) if not _known(n)]
    if unknown:
        return f"tensor {unknown[0]} (not a Phi-3 dense layout)"
    return None


def config_refusal(cfg: dict[str, Any], precision: str, q: dict[str, Any]) -> str | None:
    """The part of :func:`refusal` that the config alone decides (what ``plan`` can say)."""
    if precision != "int4":
        return f"precision {precision}: only int4 streams"
    if cfg.get("num_local_experts") or cfg.get("model_type") == "phimoe":
        return "Phi-3.5-MoE (the builder's QMoE path)"
    if (cfg.get("architectures") or [""])[0] != "Phi3ForCausalLM":
        return f"architecture {(cfg.get('architectures') or ['?'])[0]}"
    if cfg.get("tie_word_embeddings"):
        return "tied embeddings (the builder shares one quantized matrix between embeddings and lm_head)"
    if q.get("algorithm", "rtn") != "rtn":
        return f"--algorithm {q['algorithm']}"
    if q.get("embeddings", "fp") != "fp":
        return "quantized embeddings"
    block = int(q.get("block_size", 32))
    if any(k % block for k in (cfg["hidden_size"], cfg["intermediate_size"])):
        return f"input sizes not a multiple of --block-size {block}"
    return None


def _known(name: str) -> bool:
    m = LAYER.match(name)
    if m:
        return m.group(2) in PROJECTIONS | FUSED | COPIED | SKIPPED
    return name in TOP


def write_checkpoint(ckpt, dst: Path, q: dict[str, Any], io_dtype, *, calibrator=None,
                     progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write ``dst``: config.json with an ``olive`` quantization_config, the small files the builder reads
    (tokenizer, generation config), and one safetensors file per decoder layer plus one for the rest.

    ``calibrator`` (:class:`.calibrate.Calibrator`), if given, sees each layer's float tensors first: it may
    rescale them (AWQ) and quantize projections itself (GPTQ)."""
    cfg = ckpt.config
    bits, block, sym = 4, int(q.get("block_size", 32)), bool(q.get("symmetric", True))
    lm_head = q.get("lm_head", "int4")
    entries = list_tensors(ckpt.weight_files)
    dst.mkdir(parents=True, exist_ok=True)
    _copy_small_files(ckpt.path, dst)
    quant_config = {"quant_method": "olive", "bits": bits, "group_size": block, "desc_act": False,
                    "overrides": {"lm_head": {"bits": 8}} if lm_head == "int8" else {}}
    _write_json(dst / "config.json", {**cfg, "quantization_config": quant_config})

    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    hd = int(cfg.get("head_dim") or cfg["hidden_size"] // heads)
    splits = {"self_attn.qkv_proj.weight": [("self_attn.q_proj", heads * hd), ("self_attn.k_proj", kv * hd),
                                            ("self_attn.v_proj", kv * hd)],
              "mlp.gate_up_proj.weight": [("mlp.gate_proj", cfg["intermediate_size"]),
                                          ("mlp.up_proj", cfg["intermediate_size"])]}
    by_layer: dict[int, list[TensorEntry]] = {}
    for name, e in entries.items():
        m = LAYER.match(name)
        if m and m.group(2) not in SKIPPED:
            by_layer.setdefault(int(m.group(1)), []).append(e)
    for layer in range(cfg["num_hidden_layers"]):
        if progress is not None:
            progress(f"Streaming layer {layer}")
        prefix = f"model.layers.{layer}."
        tensors = {e.name[len(prefix):]: read_tensor(e) for e in by_layer.get(layer, [])}
        done: dict[str, rtn.Quantized] = {}
        if calibrator is not None:
            tensors, done = calibrator.layer(layer, tensors)
        out: dict[str, Any] = {}
        for local in sorted(tensors):
            w = tensors.pop(local)
            if local in COPIED:
                out[prefix + local] = w.contiguous()  # as read (float32 where AWQ rescaled it)
                continue
            qt = done.pop(local, None) or rtn.quantize(w, bits, block, sym, io_dtype)
            del w
            parts = splits.get(local, [(local[: -len(".weight")], qt.qweight.shape[0])])
            if local == "self_attn.qkv_proj.weight" and qt.zeros is None:
                # kept fused: the loader slices it into Q, K, V and the builder packs them back without a copy
                # (0.18's loader splits fused zero points wrongly, so asymmetric ones are written split)
                parts = [("self_attn.qkv_proj", qt.qweight.shape[0])]
            row = 0
            for base, rows in parts:
                _put_quantized(out, prefix + base, _rows(qt, row, row + rows))
                row += rows
            del qt
        _save(out, dst / f"model-layer-{layer:05d}.safetensors")
        del out, tensors
    rest: dict[str, Any] = {}
    for name in ("model.embed_tokens.weight", "model.norm.weight"):
        rest[name] = read_tensor(entries[name]).contiguous()
    _save(rest, dst / "model-rest.safetensors")
    del rest
    head: dict[str, Any] = {}
    w = read_tensor(entries["lm_head.weight"])
    if lm_head == "fp":
        head["lm_head.weight"] = w.contiguous()
    else:
        _put_quantized(head, "lm_head", rtn.quantize(w, 8 if lm_head == "int8" else 4, block, sym, io_dtype))
    del w
    _save(head, dst / "model-lm-head.safetensors")
    return {"bits": bits, "block_size": block, "symmetric": sym, "lm_head": lm_head}


def _rows(qt: rtn.Quantized, start: int, stop: int) -> rtn.Quantized:
    """Output rows ``start:stop`` of a quantized matrix (a fused projection split back into its parts)."""
    if start == 0 and stop == qt.qweight.shape[0]:
        return qt
    zeros = None
    if qt.zeros is not None:
        if qt.zeros.shape[1] * 2 < qt.scales.shape[1]:
            raise ValueError("zero points of an odd number of blocks per row cannot be split by rows")
        zeros = qt.zeros[start:stop].contiguous()
    return rtn.Quantized(qweight=qt.qweight[start:stop].contiguous(), scales=qt.scales[start:stop].contiguous(),
                         zeros=zeros)


def _put_quantized(out: dict, base: str, qt: rtn.Quantized) -> None:
    out[base + ".qweight"] = qt.qweight
    out[base + ".scales"] = qt.scales
    if qt.zeros is not None:
        out[base + ".qzeros"] = qt.zeros


def _save(tensors: dict, path: Path) -> None:
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path))
    except OSError as e:
        raise disk_full(e, path.parent, "writing the quantized checkpoint") or e


def disk_full(e: OSError, folder: Path, doing: str) -> DiskFullError | None:
    """``e`` as a one-line disk-full error naming the output's folder, or None if it is another error."""
    if e.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    from ...sizing import human

    # ``folder`` lies in the staging folder beside the output: name the folder the output goes to
    where = next((p for p in Path(folder).parents if not p.name.startswith((".", "phi-edge-staging"))), folder)
    try:
        free = human(shutil.disk_usage(folder).free)
    except OSError:
        free = "unknown"
    return DiskFullError(f"the disk holding '{where}' is full ({doing}; {free} free); free space or pass -o "
                         f"on a larger disk")


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


SMALL_FILE_BYTES = 64 * 1024**2


def _copy_small_files(src: Path, dst: Path) -> None:
    """Tokenizer, generation config, chat template, remote code: what the builder reads besides weights."""
    for p in Path(src).iterdir():
        if (p.is_file() and p.name != "config.json" and not p.name.endswith((".safetensors", ".bin", ".pt", ".pth"))
                and p.name != "model.safetensors.index.json" and p.stat().st_size < SMALL_FILE_BYTES):
            shutil.copy2(p, dst / p.name)
