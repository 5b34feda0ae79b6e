"""Read a saved ``.mlpackage`` with coremltools' own MIL loader, without compiling or running it: its
spec and program, the values of its weight ops as the device materializes them, and the refusal that ends
a structure check."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def load_program(package: Path):
    """(spec, MIL program) of the package, without compiling or loading it (``skip_model_load``)."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load

    model = ct.models.MLModel(str(package), skip_model_load=True)
    spec = model.get_spec()
    program = milproto_load(spec, specification_version=spec.specificationVersion, file_weights_dir=model.weights_dir)
    return spec, program


def stored_values(program, names: set[str]) -> dict[str, np.ndarray]:
    """Op name -> its value as the device materializes it (constexpr ops dequantized), for ``names``."""
    out = {}
    for function in program.functions.values():
        for op in function.operations:
            if op.name not in names:
                continue
            if op.op_type == "const":
                out[op.name] = np.asarray(op.outputs[0].val)
            elif op.op_type.startswith("constexpr_"):
                out[op.name] = np.asarray(op.materialized_val_inference())
    return out


def refuse_problems(package: Path, spec, problems: list[str]) -> None:
    """End a structure check: states need specification 9 (iOS 18); any problem refuses the export."""
    from phi_edge.runtimes.errors import PhiEdgeError

    if spec.specificationVersion < 9:
        problems.append(f"specification version {spec.specificationVersion}, expected 9 (iOS 18) for states")
    if problems:
        raise PhiEdgeError(f"the saved Core ML package {package.name} is not what the runtime expects: "
                           f"{'; '.join(problems)}; nothing was written, please report this")
