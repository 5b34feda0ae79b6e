"""Convert the ANE decoder (:mod:`.ane`) with coremltools: each call length (prefill N, decode 1) as a
fixed-shape stateful program, its weights compressed (per-channel int4/int8 or 4-bit palettization),
and both saved as one multifunction package sharing the KV-cache state and the weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .ane import CACHE_NAMES, AneDecoder, output_names
from .convert import parameter_of, versions_error

PACKAGE = "model.mlpackage"  # a model converted whole; a large one in parts (convert.part_name)
INPUTS = ("input_ids", "position", "causal_mask")
HIDDEN_IN, HIDDEN_OUT = "hidden_states", "output_hidden_states"  # between the parts of a model in parts
FUNCTIONS = ("prefill", "decode")  # prefill: N tokens per call; decode: 1 (the package's default function)
MODES = ("int4-per-channel", "palettize4")  # the two 4-bit encodings --quant chooses between


def weight_const_names(module: AneDecoder) -> dict[str, str]:
    """The torch frontend's const name of each matrix (``.`` as ``_``) -> our parameter name."""
    return {name.replace(".", "_"): name for name, p in module.named_parameters() if p.shape[0] > 1}


def io_names(module: AneDecoder) -> tuple[list[str], list[str]]:
    """(inputs, outputs) of a whole model or of one part."""
    inputs = [INPUTS[0] if module.embeds else HIDDEN_IN, *INPUTS[1:]]
    return inputs, output_names(module.shape) if module.heads else [HIDDEN_OUT]


def example_inputs(module: AneDecoder):
    import torch

    t = module.tokens
    x = (torch.zeros((1, 1, 1, t), dtype=torch.int32) if module.embeds
         else torch.zeros((1, module.shape.hidden, 1, t), dtype=module.dtype))
    return (x, torch.zeros((1, 1, 1, 1), dtype=torch.int32), torch.zeros((1, 1, t, module.context), dtype=module.dtype))


def trace(module: AneDecoder):
    """TorchScript of ``module`` at its fixed call length."""
    import torch

    with torch.no_grad():
        traced = torch.jit.trace(module, example_inputs(module), check_trace=False)
    module.reset()
    return traced


def convert(module: AneDecoder):
    """The fixed-shape Core ML program of one call length: 4-D inputs, the KV cache as fp16 states,
    fp16 compute, iOS 18 (not loaded: ``skip_model_load``)."""
    import coremltools as ct

    t, context = module.tokens, module.context
    cache = tuple(module.key_cache.shape)
    (x_name, *_), out_names = io_names(module)
    x = (ct.TensorType(x_name, shape=(1, 1, 1, t), dtype=np.int32) if module.embeds
         else ct.TensorType(x_name, shape=(1, module.shape.hidden, 1, t), dtype=np.float16))
    traced = trace(module)
    try:
        return ct.convert(
            traced,
            inputs=[x, ct.TensorType(INPUTS[1], shape=(1, 1, 1, 1), dtype=np.int32),
                    ct.TensorType(INPUTS[2], shape=(1, 1, t, context), dtype=np.float16)],
            outputs=[ct.TensorType(name, dtype=np.float16) for name in out_names],
            states=[ct.StateType(wrapped_type=ct.TensorType(shape=cache, dtype=np.float16), name=n)
                    for n in CACHE_NAMES],
            minimum_deployment_target=ct.target.iOS18, convert_to="mlprogram",
            compute_precision=ct.precision.FLOAT16, skip_model_load=True)
    except TypeError as e:
        raise versions_error(e) from None


def compress(mlmodel, module: AneDecoder, precision: str, mode: str):
    """Every matrix (embedding and head slices included): int8 per output channel; int4 per output
    channel (``int4-per-channel``) or a 16-entry k-means lookup table per matrix (``palettize4``)."""
    from coremltools.optimize.coreml import (OpLinearQuantizerConfig, OpPalettizerConfig, OptimizationConfig,
                                             linear_quantize_weights, palettize_weights)

    names = weight_const_names(module)
    consts = {op.name for f in mlmodel._mil_program.functions.values() for op in f.operations if op.op_type == "const"}
    chosen = {name for name in consts if parameter_of(name, names)}
    if precision == "int4" and mode == "palettize4":
        config = OpPalettizerConfig(mode="kmeans", nbits=4, granularity="per_tensor", weight_threshold=0)
        return palettize_weights(mlmodel, OptimizationConfig(op_name_configs={n: config for n in chosen}))
    config = OpLinearQuantizerConfig(mode="linear_symmetric", dtype=precision, granularity="per_channel",
                                     weight_threshold=0)
    return linear_quantize_weights(mlmodel, OptimizationConfig(op_name_configs={n: config for n in chosen}))


def settings(precision: str, mode: str) -> dict[str, Any]:
    if precision == "int4" and mode == "palettize4":
        return {"mode": "palettize4", "algorithm": "kmeans", "nbits": 4, "granularity": "per_tensor",
                "tool": "coremltools.optimize.coreml"}
    if precision in ("int4", "int8"):
        return {"mode": f"{precision}-per-channel", "dtype": precision, "granularity": "per_channel",
                "symmetric": True, "tool": "coremltools.optimize.coreml"}
    return {"dtype": "float16"}


def save_single(mlmodel, path: Path) -> Path:
    mlmodel.save(str(path))
    return path


def join(singles: dict[str, Path], path: Path) -> Path:
    """Join the saved one-function packages into one package with coremltools' multifunction utilities
    (identical weights are stored once; the default function is ``decode``)."""
    import coremltools as ct

    desc = ct.utils.MultiFunctionDescriptor()
    for name, single in singles.items():
        desc.add_function(str(single), src_function_name="main", target_function_name=name)
    desc.default_function_name = FUNCTIONS[1]
    ct.utils.save_multifunction(desc, str(path))
    return path
