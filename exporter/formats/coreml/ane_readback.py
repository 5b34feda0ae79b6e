"""Read a saved ANE package (:mod:`.ane_convert`) back with coremltools' own loader, without Core ML:
its two functions' declared interface and states, their weight ops (shared, at the right bit width),
and every stored weight dequantized into our torch decoder, run as Core ML runs the functions."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from phi_edge.runtimes.errors import PhiEdgeError

from .ane import CACHE_NAMES, AneDecoder, empty, vocab_slices, with_tokens
from .ane_convert import FUNCTIONS, INPUTS, io_names, weight_const_names
from .convert import parameter_of
from .decoder import Shape
from .milread import load_program, refuse_problems, stored_values

WEIGHT_OPS = {"int4-per-channel": "constexpr_blockwise_shift_scale",
              "int8-per-channel": "constexpr_blockwise_shift_scale",
              "palettize4": "constexpr_lut_to_dense", "float16": "const"}


def weight_ops(program, function: str, names: dict[str, str]) -> dict[str, str]:
    """Op name -> our parameter name, for every op of ``function`` holding a whole matrix."""
    ops = {}
    for op in program.functions[function].operations:
        if op.op_type == "const" or op.op_type.startswith("constexpr_"):
            ours = parameter_of(op.name.removesuffix("_palettized"), names)
            if ours:
                ops[op.name] = ours
    return ops


def decoder_from_package(package: Path, shape: Shape, context: int, tokens: int,
                         part: tuple[int, int] | None = None) -> AneDecoder:
    """The ANE decoder (or its ``part``) for calls of ``tokens`` tokens holding exactly the weights and
    rotary tables the package stores (dequantized as Core ML materializes them), in float32 with a
    float32 cache."""
    import torch

    _, program = load_program(package)
    module = empty(shape, context, tokens, cache_dtype=torch.float32, part=part)
    names = weight_const_names(module)
    ops = weight_ops(program, FUNCTIONS[0], names)
    consts = {op.name: op for op in program.functions[FUNCTIONS[0]].operations if op.op_type == "const"}
    stored = stored_values(program, set(ops))
    params = dict(module.named_parameters())
    values = {ours: stored[op] for op, ours in ops.items()}
    for name, p in params.items():
        if name not in values and p.shape[0] == 1:  # a norm; ones where the converter dropped it as a no-op
            base = name.replace(".", "_")
            found = [consts[n] for n in (base, base + "_to_fp16", base + "_promoted_to_fp16") if n in consts]
            values[name] = np.asarray(found[0].outputs[0].val) if found else np.ones(tuple(p.shape), np.float32)
    missing = sorted(set(params) - set(values))
    if missing:
        raise PhiEdgeError(f"{package.name} holds no weights for {', '.join(missing[:3])}; re-export the model")
    for name, p in params.items():
        p.data = torch.from_numpy(np.asarray(values[name], dtype=np.float32).reshape(tuple(p.shape)))
    tables = [_table(consts, which) for which in ("rope_cos", "rope_sin")]
    module.set_rope(*(torch.from_numpy(t.astype(np.float32))[0, 0].t() for t in tables))
    return module.eval()


def _table(consts: dict, prefix: str) -> np.ndarray:
    found = [op for n, op in consts.items() if n.startswith(prefix)]
    if len(found) != 1:
        raise PhiEdgeError(f"the package holds {len(found)} '{prefix}' tables, expected 1; re-export the model")
    return np.asarray(found[0].outputs[0].val)


class TorchFunctions:
    """Decoders in torch (eager or traced) by call length, with Core ML's ``make_state``/``predict``
    interface: each call copies the state in and the updated cache back out (one state, both functions)."""

    def __init__(self, by_length: dict[int, Any], cache_shape: tuple[int, ...], io: tuple[list[str], list[str]]):
        self.by_length, self.cache_shape, (self.in_names, self.out_names) = by_length, cache_shape, io

    def make_state(self) -> dict:
        import torch

        return {name: torch.zeros(self.cache_shape) for name in CACHE_NAMES}

    def predict(self, inputs: dict, state: dict) -> dict:
        import torch

        module = self.by_length[int(inputs[INPUTS[2]].shape[2])]
        for name in CACHE_NAMES:
            getattr(module, name).copy_(state[name])
        x, position, mask = (np.asarray(inputs[n]) for n in self.in_names)
        with torch.no_grad():
            out = module(torch.from_numpy(x if x.dtype == np.int32 else x.astype(np.float32)),
                         torch.from_numpy(position), torch.from_numpy(mask.astype(np.float32)))
        for name in CACHE_NAMES:
            state[name].copy_(getattr(module, name))
        return {n: o.float().numpy() for n, o in zip(self.out_names, out if isinstance(out, tuple) else (out,))}


def torch_functions(prefill: AneDecoder, traced: dict[int, Any] | None = None) -> TorchFunctions:
    """The prefill decoder (or part) and its 1-token sibling (or their traces) as one engine."""
    by_length = traced or {prefill.tokens: prefill, 1: with_tokens(prefill, 1)}
    return TorchFunctions(by_length, tuple(prefill.key_cache.shape), io_names(prefill))


def stored_weights_runtime(folder: Path, manifest, note: str):
    """The ANE artifact's runtime with its packages' stored weights computing in torch (for ``eval``): the
    same runtime and chain of parts a Mac runs, each part's two functions replaced by its weights."""
    from phi_edge.runtimes.coreml import Chain, CoreMLRuntime

    from ...progress import tool_output_to_log

    rt = manifest.runtime
    shape = Shape(**rt["decoder"])
    parts = rt.get("parts") or [[0, shape.layers]]
    with tool_output_to_log("reading the Core ML package back with coremltools"):
        engines = [torch_functions(decoder_from_package(Path(folder) / name, shape, manifest.context_length,
                                                        int(rt["prefill_length"]), tuple(part)))
                   for name, part in zip(rt["packages"], parts)]
    return CoreMLRuntime(Path(folder), manifest, device="torch (cpu)", engine=Chain(engines), engine_note=note)


def _blob_offsets(spec, function: str) -> dict[str, tuple[int, ...]]:
    """Weight op name -> the offsets in weight.bin its data is read from, in ``function``."""
    f = spec.mlProgram.functions[function]
    out = {}
    for op in f.block_specializations[f.opset].operations:
        offsets = [v.blobFileValue.offset for v in op.attributes.values() if v.WhichOneof("value") == "blobFileValue"]
        for arg in op.inputs.values():
            offsets += [a.value.blobFileValue.offset for a in arg.arguments
                        if a.WhichOneof("binding") == "value" and a.value.WhichOneof("value") == "blobFileValue"]
        if offsets:
            out[op.outputs[0].name] = tuple(offsets)
    return out


def structure(package: Path, shape: Shape, context: int, tokens: int, mode: str,
              part: tuple[int, int] | None = None) -> dict[str, Any]:
    """What the package's spec declares, checked against what the runtime feeds it: both functions,
    fixed 4-D inputs and outputs, the states (shape, fp16) in each, every matrix as a weight op of the
    mode's kind and bit width, the weights stored once for both functions, iOS 18. Raises on any
    difference; returns what was checked."""
    spec, program = load_program(package)
    d = spec.description
    problems = []
    functions = {f.name: f for f in d.functions}
    if sorted(functions) != sorted(FUNCTIONS) or d.defaultFunctionName != FUNCTIONS[1]:
        problems.append(f"functions {sorted(functions)} (default '{d.defaultFunctionName}'), expected "
                        f"{list(FUNCTIONS)} (default 'decode')")
    part = part or (0, shape.layers)
    meta = empty(shape, 1, 1, part=part)
    (x_name, *_), outputs = io_names(meta)
    want_cache = [part[1], shape.kv_heads * shape.head_dim, 1, context]
    slices = vocab_slices(shape.vocab) if meta.heads else [(0, shape.hidden)]
    for fn, t in zip(FUNCTIONS, (tokens, 1)):
        f = functions.get(fn)
        if f is None:
            continue
        want_in = {x_name: [1, 1, 1, t] if meta.embeds else [1, shape.hidden, 1, t], INPUTS[1]: [1, 1, 1, 1],
                   INPUTS[2]: [1, 1, t, context]}
        got_in = {i.name: i.type.multiArrayType for i in f.input}
        for name, dims in want_in.items():
            a = got_in.get(name)
            if a is None or list(a.shape) != dims or a.WhichOneof("ShapeFlexibility") is not None:
                problems.append(f"{fn}: input '{name}' is {list(a.shape) if a else 'missing'}, expected fixed {dims}")
        if len(got_in) != len(want_in):
            problems.append(f"{fn}: inputs {sorted(got_in)}, expected {sorted(want_in)}")
        got_out = [(o.name, list(o.type.multiArrayType.shape)) for o in f.output]
        want_out = [(name, [1, n, 1, t]) for name, (_, n) in zip(outputs, slices)]
        if got_out != want_out:
            problems.append(f"{fn}: outputs {got_out}, expected {want_out}")
        states = {s.name: s.type.stateType.arrayType for s in f.state}
        for name in CACHE_NAMES:
            a = states.get(name)
            if a is None or list(a.shape) != want_cache or a.dataType != a.FLOAT16:
                problems.append(f"{fn}: state '{name}' is {list(a.shape) if a else 'missing'}, expected "
                                f"{want_cache} fp16")
    names = weight_const_names(meta)
    n_matrices = len(names)
    kinds: dict[str, dict[str, int]] = {}
    for fn in program.functions:
        ops = weight_ops(program, fn, names)
        by_op = {op.name: op.op_type for op in program.functions[fn].operations}
        kinds[fn] = {}
        for op in ops:
            kinds[fn][by_op[op]] = kinds[fn].get(by_op[op], 0) + 1
        if kinds[fn] != {WEIGHT_OPS[mode]: n_matrices}:
            problems.append(f"{fn}: weight ops {kinds[fn]}, expected {n_matrices} {WEIGHT_OPS[mode]}")
    blocked = [op.name for f in program.functions.values() for op in f.operations
               if op.op_type == "constexpr_blockwise_shift_scale" and op.scale.shape[1] != 1]
    if blocked:
        problems.append(f"{len(blocked)} weights are quantized in blocks, expected one scale per output channel")
    bits = _bits(program, mode)
    if bits and bits != {"4" if mode != "int8-per-channel" else "8"}:
        problems.append(f"compressed weights are stored at {sorted(bits)} bits, expected {mode}")
    offsets = {fn: _blob_offsets(spec, fn) for fn in functions}
    if FUNCTIONS[0] in offsets and FUNCTIONS[1] in offsets:
        shared = {op for op in weight_ops(program, FUNCTIONS[1], names)
                  if offsets[FUNCTIONS[0]].get(op) == offsets[FUNCTIONS[1]].get(op) is not None}
        if len(shared) != n_matrices:
            problems.append(f"{len(shared)} of {n_matrices} matrices are stored once for both functions")
    refuse_problems(package, spec, problems)
    return {"functions": {FUNCTIONS[0]: tokens, FUNCTIONS[1]: 1}, "fixed_shapes": True, "io_rank": 4,
            "states": {n: want_cache + ["fp16"] for n in CACHE_NAMES}, "inputs": [x_name, *INPUTS[1:]],
            "outputs": outputs, "weight_ops": kinds[FUNCTIONS[1]], "matrices": n_matrices,
            "weights_stored_once": True, "specification_version": spec.specificationVersion}


def _bits(program, mode: str) -> set[str]:
    """The bit widths of the compressed weights: quantized data's dtype, palettized indices' width."""
    from coremltools.converters.mil.mil import types

    bits = set()
    for function in program.functions.values():
        for op in function.operations:
            if op.op_type == "constexpr_blockwise_shift_scale":
                bits.add(re.sub(r"\D", "", types.builtin_to_string(op.data.dtype)))
            elif op.op_type == "constexpr_lut_to_dense":
                bits.add(str(int(np.log2(op.lut.shape[-2]))))
    return bits


def weights_round_trip(package: Path, module: AneDecoder, mode: str, min_cosine: float) -> dict[str, Any]:
    """Every matrix as the package stores it (dequantized by coremltools' constexpr code) against the
    weights that went in: cosine and relative RMS error, worst of all."""
    _, program = load_program(package)
    names = weight_const_names(module)
    ops = weight_ops(program, FUNCTIONS[0], names)
    params = dict(module.named_parameters())
    stored = stored_values(program, set(ops))
    worst_cos, worst_rel = 1.0, 0.0
    for op, ours in ops.items():
        got = stored[op].astype(np.float32).ravel()
        source = params[ours].detach().float().numpy().ravel()
        cos = float(got @ source / (np.linalg.norm(got) * np.linalg.norm(source) + 1e-30))
        rel = float(np.sqrt(np.mean((got - source) ** 2)) / (np.sqrt(np.mean(source ** 2)) + 1e-30))
        worst_cos, worst_rel = min(worst_cos, cos), max(worst_rel, rel)
    if len(ops) != len(names):
        raise PhiEdgeError(f"the saved package holds {len(ops)} of the model's {len(names)} matrices; nothing was "
                           f"written, please report this")
    if worst_cos < min_cosine:
        raise PhiEdgeError(f"a stored {mode} weight differs from the checkpoint's (cosine {worst_cos:.5f}, below "
                           f"{min_cosine}); nothing was written, please report this")
    return {"matrices": len(ops), "min_cosine": round(worst_cos, 6), "max_relative_rms_error": round(worst_rel, 6),
            "against": "the fp16 weights converted (the checkpoint's, rounded to fp16)",
            "read_with": "coremltools' MIL loader (milproto) and its constexpr dequantization"}
