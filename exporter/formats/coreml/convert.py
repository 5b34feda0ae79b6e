"""Trace our decoder and convert it with coremltools' Python API: a stateful ML program for iOS 18,
then its weights compressed with ``coremltools.optimize.coreml`` and the package saved."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from phi_edge.runtimes.errors import PhiEdgeError

from .decoder import CACHE_NAMES, PhiDecoder

PACKAGE = "model.mlpackage"  # a model converted whole; a large one is converted in parts (part_name)
INPUTS = ("input_ids", "causal_mask")
HIDDEN_IN, HIDDEN_OUT = "hidden_states", "output_hidden_states"  # between the parts of a model in parts
OUTPUT = "logits"
BLOCK_SIZES = (16, 32, 64, 128)


SUFFIXES = ("_quantized", "_promoted_to_fp16", "_to_fp16", "_promoted")


def weight_const_names(module: PhiDecoder) -> dict[str, str]:
    """Our parameter name with ``.`` as ``_`` (how the torch frontend names its const op) -> the name."""
    return {name.replace(".", "_"): name for name, p in module.named_parameters() if p.dim() == 2}


def parameter_of(op_name: str, names: dict[str, str]) -> str | None:
    """The parameter a weight op holds: the frontend and the passes add suffixes to the const's name
    (``_to_fp16`` for a cast, ``_promoted_to_fp16`` for a float16 parameter, ``_quantized``)."""
    base = op_name
    while True:
        for suffix in SUFFIXES:
            if base.endswith(suffix):
                base = base[:-len(suffix)]
                break
        else:
            return names.get(base)


def part_name(index: int, parts: int) -> str:
    return PACKAGE if parts == 1 else f"model-part{index + 1}-of-{parts}.mlpackage"


def io_names(module: PhiDecoder) -> tuple[list[str], str]:
    """(inputs, output) of a whole model or of one part."""
    return [INPUTS[0] if module.embeds else HIDDEN_IN, INPUTS[1]], OUTPUT if module.heads else HIDDEN_OUT


def trace(module: PhiDecoder):
    """TorchScript of ``module`` over a 2-token step (the shapes stay symbolic in the trace)."""
    import torch

    x = (torch.zeros((1, 2), dtype=torch.int32) if module.embeds
         else torch.zeros((1, 2, module.shape.hidden), dtype=module.dtype))
    mask = torch.zeros((1, 1, 2, 2), dtype=module.dtype)
    with torch.no_grad():
        traced = torch.jit.trace(module, (x, mask), check_trace=False)
    module.reset()
    return traced


def convert(module: PhiDecoder):
    """The Core ML program (not loaded: ``skip_model_load``) of our decoder: flexible query and cache
    lengths up to the context, the KV cache as fp16 states, fp16 compute, iOS 18."""
    import coremltools as ct

    context = module.context
    query = ct.RangeDim(lower_bound=1, upper_bound=context, default=1, symbol="query_length")
    end = ct.RangeDim(lower_bound=1, upper_bound=context, default=1, symbol="end")
    cache = tuple(module.key_cache.shape)
    (x_name, mask_name), out_name = io_names(module)
    x = (ct.TensorType(x_name, shape=(1, query), dtype=np.int32) if module.embeds
         else ct.TensorType(x_name, shape=(1, query, module.shape.hidden), dtype=np.float16))
    traced = trace(module)
    try:
        return ct.convert(
            traced,
            inputs=[x, ct.TensorType(mask_name, shape=(1, 1, query, end), dtype=np.float16)],
            outputs=[ct.TensorType(out_name, dtype=np.float16)],
            states=[ct.StateType(wrapped_type=ct.TensorType(shape=cache, dtype=np.float16), name=n)
                    for n in CACHE_NAMES],
            minimum_deployment_target=ct.target.iOS18, convert_to="mlprogram",
            compute_precision=ct.precision.FLOAT16, skip_model_load=True)
    except TypeError as e:
        raise versions_error(e) from None


def versions_error(e: Exception) -> PhiEdgeError:
    """coremltools 9.0 fails on numpy >= 2.4 where a trace folds a shape to a constant (``int()`` of a
    1-element array); say which versions and what fixes it."""
    import numpy
    import torch

    return PhiEdgeError(f"coremltools could not convert this graph with numpy {numpy.__version__} and torch "
                        f"{torch.__version__.split('+')[0]} ({e}); coremltools 9.0 converts fixed shapes with numpy "
                        f"<= 2.3 and is tested up to torch 2.7: pip install 'numpy<2.4' in the export environment")


def quantize(mlmodel, module: PhiDecoder, precision: str, block_size: int):
    """int4: block-wise linear symmetric (blocks of ``block_size`` along the input); int8: per output
    channel, symmetric. Every matrix (embedding and lm_head included), nothing else (norms, rotary
    tables and zero biases stay fp16)."""
    from coremltools.optimize.coreml import OpLinearQuantizerConfig, OptimizationConfig, linear_quantize_weights

    if precision == "int4":
        config = OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4", granularity="per_block",
                                         block_size=block_size, weight_threshold=0)
    else:
        config = OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel",
                                         weight_threshold=0)
    names = weight_const_names(module)
    consts = {op.name for f in mlmodel._mil_program.functions.values() for op in f.operations if op.op_type == "const"}
    chosen = {name: config for name in consts if parameter_of(name, names)}
    return linear_quantize_weights(mlmodel, OptimizationConfig(op_name_configs=chosen))


def settings(precision: str, q: dict[str, Any]) -> dict[str, Any]:
    if precision == "int4":
        return {"mode": "linear_symmetric", "dtype": "int4", "granularity": "per_block",
                "block_size": int(q.get("block_size", 32)), "tool": "coremltools.optimize.coreml"}
    if precision == "int8":
        return {"mode": "linear_symmetric", "dtype": "int8", "granularity": "per_channel",
                "tool": "coremltools.optimize.coreml"}
    return {"dtype": "float16"}


def save(mlmodel, path: Path) -> Path:
    mlmodel.save(str(path))
    return path
