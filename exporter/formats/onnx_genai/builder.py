"""The onnxruntime-genai model builder, run in-process, with the bridges 0.18 needs for transformers 5."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Iterator


def run_builder(input_path: Path, out: Path, precision: str, ep: str, extra: list[str], hf_remote: bool,
                skip_empty_quantization: bool = False) -> None:
    """``builder.create_model`` on ``input_path`` (a Hugging Face or pre-quantized checkpoint folder)."""
    import shutil

    from onnxruntime_genai.models import builder

    cache = out / ".builder-cache"
    try:
        with _builder_compat(builder), _no_empty_requantization(builder, skip_empty_quantization):
            # windowed layers (:func:`_sliding_layers`) keep a max_length KV cache: the bounded ring needs genai_config's
            # sliding_window section, which 0.18 cannot run past the window with (finalize drops it)
            extra = [*extra, "windowed_kv_cache=false"]
            options = builder.parse_extra_options(None, str(input_path), str(out), precision, ep, str(cache), extra)
            options["hf_remote"] = bool(hf_remote)
            builder.create_model(None, str(input_path), str(out), precision, ep, str(cache), **options)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        # the builder's model is a web of reference cycles holding every weight (for a pre-quantized checkpoint,
        # its memory-mapped tensors): free it now, before the artifact is loaded to check it, or both are resident
        # together (Phi-3-mini int4: 6.35 GiB peak instead of 3.99)
        import gc

        gc.collect()


@contextlib.contextmanager
def _builder_compat(builder) -> Iterator[None]:
    """onnxruntime-genai 0.18's builders predate transformers 5: the LongRoPE init reads the hub's old
    ``rope_scaling["type"]``, which a config written by transformers 5 (``rope_parameters`` with
    ``rope_type`` only) lacks; it knows Phi-3.5-MoE only by the hub's class name; the MoE builder also
    misses the LongRoPE init its dense sibling has, and reads the old per-expert layout; it windows
    attention only where ``layer_types`` says so (:func:`_sliding_layers`). Bridge all five for one export."""
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
        _sliding_layers(config)
        return config

    AutoConfig.from_pretrained = from_pretrained
    try:
        yield
    finally:
        builder.Phi3MoELongRoPEModel, builder.Phi3MiniLongRoPEModel = original_moe, original_dense
        AutoConfig.from_pretrained = load_config


def _sliding_layers(config) -> None:
    """Phi-3's attention is windowed in every layer (``sliding_window``, 2047 for Phi-3-mini-4k); the builder
    windows only layers that ``layer_types`` marks ``sliding_attention``, which transformers 5's Phi configs do
    not carry, so without this its graph attends to the whole context (measured: logits 9.9 apart from
    transformers past the window; with it, 1e-5)."""
    window = getattr(config, "sliding_window", None)
    if window and int(window) > 0 and getattr(config, "layer_types", None) is None:
        config.layer_types = ["sliding_attention"] * int(config.num_hidden_layers)


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


@contextlib.contextmanager
def _no_empty_requantization(builder, enabled: bool) -> Iterator[None]:
    """For a pre-quantized checkpoint whose every MatMul already is MatMulNBits, skip the builder's final
    ``to_nbits`` pass: it would copy the whole model into a protobuf and back to quantize nothing."""
    if not enabled:
        yield
        return
    Model = builder.Model  # the builder imports its own copy of builders.base (``builders.base``)
    original, original_packed = Model.to_nbits, Model.make_packed_matmul_int4_class

    def to_nbits(self):
        excluded = set(self.quant_attrs.get("nodes_to_exclude", ()))
        wanted = set(self.quant_attrs.get("op_types_to_quantize", ("MatMul",)))
        left = [n for n in self.model.graph if n.op_type in wanted and n.name not in excluded
                and _const_weight(n, 0 if n.op_type == "Gather" else 1)]
        return original(self) if left else self.model

    def make_packed_matmul_int4_class(self, q_matmul, k_matmul, v_matmul):
        # 0.18 concatenates the three zero-point tensors even when symmetric weights carry none
        if getattr(q_matmul, "qweight", None) is None or q_matmul.qzeros is not None:
            return original_packed(self, q_matmul, k_matmul, v_matmul)
        return _packed_symmetric(q_matmul, k_matmul, v_matmul)

    Model.to_nbits, Model.make_packed_matmul_int4_class = to_nbits, make_packed_matmul_int4_class
    try:
        yield
    finally:
        Model.to_nbits, Model.make_packed_matmul_int4_class = original, original_packed


def _const_weight(node, index: int) -> bool:
    """Whether input ``index`` of an onnx_ir node is a constant (an initializer the quantizer could pack)."""
    inputs = list(node.inputs)
    return index < len(inputs) and inputs[index] is not None and inputs[index].const_value is not None


def _packed_symmetric(*parts):
    """Q, K and V's symmetric pre-quantized weights as one MatMulNBits weight (rows stacked). Where the
    checkpoint held them fused (the loader's row slices of one tensor), the fused tensor is reused as it is
    instead of copied: at 14B that copy is ~1 GiB of the export's peak."""
    from types import SimpleNamespace

    import torch

    first = parts[0]
    if len({(p.bits, p.group_size) for p in parts}) != 1:
        raise ValueError("Q, K and V must share bits and block size to be packed")
    return SimpleNamespace(qweight=_stacked([p.qweight for p in parts]) if _adjacent([p.qweight for p in parts])
                           else torch.cat([p.qweight for p in parts], dim=0),
                           scales=_stacked([p.scales for p in parts]) if _adjacent([p.scales for p in parts])
                           else torch.cat([p.scales for p in parts], dim=0), qzeros=None, g_idx=None,
                           in_features=first.in_features, out_features=sum(p.out_features for p in parts),
                           bits=first.bits, group_size=first.group_size)


def _adjacent(tensors) -> bool:
    """Contiguous row blocks that follow each other in one storage."""
    base = tensors[0]
    if not all(t.is_contiguous() and t.dtype == base.dtype and t.shape[1:] == base.shape[1:] for t in tensors):
        return False
    if len({t.untyped_storage().data_ptr() for t in tensors}) != 1:
        return False
    end = base.data_ptr()
    for t in tensors:
        if t.data_ptr() != end:
            return False
        end += t.numel() * t.element_size()
    return True


def _stacked(tensors):
    """The rows of adjacent ``tensors`` as one tensor viewing their storage (no copy)."""
    import torch

    base = tensors[0]
    rows = sum(t.shape[0] for t in tensors)
    out = torch.empty(0, dtype=base.dtype)
    out.set_(base.untyped_storage(), base.storage_offset(), (rows, *base.shape[1:]), base.stride())
    return out
