"""Read a saved ``.mlpackage`` back with coremltools' own MIL loader (no Core ML runtime needed):
its declared interface, its weight ops, and every weight dequantized, loaded into our torch decoder.

This is how Linux checks what a device will run: the stored weights (after int4/int8 compression)
computing in torch, and how ``phi-export eval`` scores a Core ML artifact here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from phi_edge.runtimes.errors import PhiEdgeError

from .convert import parameter_of, weight_const_names
from .decoder import CACHE_NAMES, PhiDecoder, Shape
from .milread import load_program, refuse_problems, stored_values


def weight_ops(program) -> dict[str, str]:
    """Op name -> op type of every weight op (const and constexpr) holding a matrix."""
    ops = {}
    for function in program.functions.values():
        for op in function.operations:
            if (op.op_type == "const" or op.op_type.startswith("constexpr_")) and len(op.outputs[0].shape or ()) == 2:
                ops[op.name] = op.op_type
    return ops


def part_module(shape: Shape, part: tuple[int, int], cache_dtype=None):
    """An empty (meta) decoder part: its parameter names and its interface, without memory."""
    import torch

    with torch.device("meta"):
        return PhiDecoder(shape, torch.zeros(1, shape.rotary_dim), torch.zeros(1, shape.rotary_dim),
                          cache_dtype=cache_dtype or torch.float16, first_layer=part[0], n_layers=part[1])


def decoder_from_package(package: Path, part: tuple[int, int], shape: Shape) -> PhiDecoder:
    """The decoder part ``part`` (first layer, layer count) holding exactly the weights and rotary tables
    the package stores, dequantized as Core ML materializes them, in float32 with a float32 cache."""
    import torch

    _, program = load_program(package)
    meta = part_module(shape, part)
    ops = weight_ops(program)
    names = weight_const_names(meta)
    wanted = {op: parameter_of(op, names) for op in ops if parameter_of(op, names)}
    tables = {n: n for n in ops if n.startswith(("rope_cos", "rope_sin"))}
    stored = stored_values(program, set(wanted) | set(tables))
    values = {ours: stored[op] for op, ours in wanted.items()}
    for name, p in meta.named_parameters():
        if p.dim() == 1:  # norms: small 1-D consts, read by name
            base = name.replace(".", "_")
            values[name] = _vector(program, (base, base + "_to_fp16", base + "_promoted_to_fp16"), p.shape[0])
    cos = torch.from_numpy(stored[_one(tables, "rope_cos")].astype(np.float32))
    sin = torch.from_numpy(stored[_one(tables, "rope_sin")].astype(np.float32))
    del program, stored
    with torch.device("meta"):
        module = PhiDecoder(shape, cos.to("meta"), sin.to("meta"), cache_dtype=torch.float32,
                            first_layer=part[0], n_layers=part[1])
    module.to_empty(device="cpu")
    module.rope_cos.copy_(cos)
    module.rope_sin.copy_(sin)
    module.reset()
    params = dict(module.named_parameters())
    missing = sorted(set(params) - set(values))
    if missing:
        raise PhiEdgeError(f"{package.name} holds no weights for {', '.join(missing[:3])}; re-export the model")
    for name, p in params.items():
        p.data = torch.from_numpy(values[name].astype(np.float32))
    return module.eval()


def _one(ops: dict[str, str], prefix: str) -> str:
    found = [n for n in ops if n.startswith(prefix)]
    if len(found) != 1:
        raise PhiEdgeError(f"the package holds {len(found)} '{prefix}' tables, expected 1; re-export the model")
    return found[0]


def _vector(program, names: tuple[str, ...], size: int) -> np.ndarray:
    """A norm's weight; ones where the converter removed the multiplication as a no-op (all ones)."""
    for function in program.functions.values():
        for op in function.operations:
            if op.name in names and op.op_type == "const":
                return np.asarray(op.outputs[0].val)
    return np.ones(size, dtype=np.float32)


def structure(package: Path, shape: Shape, part: tuple[int, int], context: int, precision: str) -> dict[str, Any]:
    """What one package's spec declares, checked against what the runtime feeds it: the states (name,
    shape, fp16), inputs, output, iOS 18, and the weight ops of the precision. Raises on any difference;
    returns what was checked."""
    from .convert import io_names

    spec, program = load_program(package)
    meta = part_module(shape, part)
    (x_name, mask_name), out_name = io_names(meta)
    d = spec.description
    want_cache = [part[1], 1, shape.kv_heads, context, shape.head_dim]
    states = {s.name: s.type.stateType.arrayType for s in d.state}
    problems = []
    for name in CACHE_NAMES:
        a = states.get(name)
        if a is None:
            problems.append(f"no state '{name}'")
        elif list(a.shape) != want_cache or a.dataType != a.FLOAT16:
            problems.append(f"state '{name}' is {list(a.shape)} dtype {a.dataType}, expected {want_cache} fp16")
    inputs = {i.name: i.type.multiArrayType for i in d.input}
    if sorted(inputs) != sorted([x_name, mask_name]):
        problems.append(f"inputs are {sorted(inputs)}, expected {sorted([x_name, mask_name])}")
    else:
        x, mask = inputs[x_name], inputs[mask_name]
        if x.dataType != (x.INT32 if meta.embeds else x.FLOAT16) or mask.dataType != mask.FLOAT16:
            problems.append(f"{x_name} must be {'int32' if meta.embeds else 'fp16'} and {mask_name} fp16")
        bounds = [(r.lowerBound, r.upperBound) for r in mask.shapeRange.sizeRanges]
        if bounds != [(1, 1), (1, 1), (1, context), (1, context)]:
            problems.append(f"{mask_name}'s flexible shape is {bounds}, expected up to {context} on the last two")
    if [o.name for o in d.output] != [out_name]:
        problems.append(f"outputs are {[o.name for o in d.output]}, expected ['{out_name}']")
    kinds: dict[str, int] = {}
    for op_type in weight_ops(program).values():
        kinds[op_type] = kinds.get(op_type, 0) + 1
    matrices = len([p for p in meta.parameters() if p.dim() == 2])
    if precision in ("int4", "int8"):
        found = kinds.get("constexpr_blockwise_shift_scale", 0)
        if found != matrices:
            problems.append(f"{found} constexpr_blockwise_shift_scale weight ops, expected {matrices} (every matrix)")
        bits = _weight_bits(program)
        if bits != {precision}:
            problems.append(f"compressed weights are stored as {sorted(bits)}, expected {precision}")
    refuse_problems(package, spec, problems)
    return {"states": {n: want_cache + ["fp16"] for n in CACHE_NAMES}, "inputs": [x_name, mask_name],
            "output": out_name, "specification_version": spec.specificationVersion,
            "compressed_matrices": kinds.get("constexpr_blockwise_shift_scale", 0), "matrices": matrices,
            "query_and_cache_length": f"1..{context}"}


def _weight_bits(program) -> set[str]:
    from coremltools.converters.mil.mil import types

    bits = set()
    for function in program.functions.values():
        for op in function.operations:
            if op.op_type == "constexpr_blockwise_shift_scale":
                bits.add(types.builtin_to_string(op.data.dtype))  # "int4", "int8"
    return bits


class StoredWeightsEngine:
    """One package's stored weights computing in torch, with Core ML's ``make_state``/``predict``
    interface, so :class:`phi_edge.runtimes.coreml.CoreMLRuntime` (and its chain of parts) runs them
    where Core ML cannot."""

    def __init__(self, module: PhiDecoder):
        from .convert import io_names

        self.module = module
        (self.x_name, self.mask_name), self.out_name = io_names(module)

    def make_state(self) -> dict:
        return {name: getattr(self.module, name).clone().zero_() for name in CACHE_NAMES}

    def predict(self, inputs: dict, state: dict) -> dict:
        import torch

        for name in CACHE_NAMES:
            setattr(self.module, name, state[name])  # the module writes this state in place
        x = np.asarray(inputs[self.x_name])
        with torch.no_grad():
            out = self.module(torch.from_numpy(x if self.module.embeds else x.astype(np.float32)),
                              torch.from_numpy(np.asarray(inputs[self.mask_name], dtype=np.float32)))
        return {self.out_name: out.numpy()}


STORED_NOTE = ("logits from the Core ML package's stored weights (read back with coremltools and dequantized) "
               "computed in torch at float32 on {os}: Core ML itself does not run here (on the device it computes "
               "in fp16)")


def stored_weights_runtime(folder: Path):
    """The artifact's runtime with its packages' stored weights computing in torch (for ``eval``): the
    same runtime and chain of parts a Mac runs, with each part's ``MLModel`` replaced by its weights."""
    import platform

    from phi_edge.runtimes.coreml import Chain, CoreMLRuntime
    from phi_edge.runtimes.manifest import read_manifest

    from ...progress import tool_output_to_log

    manifest = read_manifest(folder)
    rt = manifest.runtime
    if rt.get("functions"):  # --target apple-ane: one package, fixed-shape prefill and decode functions
        from .ane_readback import stored_weights_runtime as ane_runtime

        return ane_runtime(Path(folder), manifest, STORED_NOTE.format(os=platform.system()))
    shape = Shape(**rt["decoder"])
    with tool_output_to_log("reading the Core ML package back with coremltools"):
        engines = [StoredWeightsEngine(decoder_from_package(Path(folder) / name, tuple(part), shape))
                   for name, part in zip(rt["packages"], rt["parts"])]
    return CoreMLRuntime(Path(folder), manifest, device="torch (cpu)", engine=Chain(engines),
                         engine_note=STORED_NOTE.format(os=platform.system()))
