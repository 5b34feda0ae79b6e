"""The shape every export format module has, and the registry of them.

A format module (``onnx_genai``, ``openvino``, ``mlx``, ``qnn``) defines:

- ``FORMAT``: the manifest format name it writes (the runtime with the same name loads it);
- ``OPTIONS``: the quantization option keys (see :class:`ExportOptions.quant`) it accepts;
- ``TOOLS``: distribution names whose versions go into the manifest;
- ``check(ckpt, target, opts)``: refuse early, before heavy work, with a :class:`PhiEdgeError`;
- ``export(ckpt, target, opts, out, steps) -> FormatResult``: write the model files into ``out``
  (a fresh staging folder) through the real tool's Python API.

The orchestrator (:mod:`phi_edge.exporter.export`) does everything around it: checkpoint
validation, staging and the atomic move, tokenizer files, the manifest, the smoke test.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phi_edge.runtimes.errors import PhiEdgeError

# format name -> module under phi_edge.exporter.formats: the one place a new format is added
FORMAT_MODULES = {
    "onnx-genai": "phi_edge.exporter.formats.onnx_genai",
    "openvino": "phi_edge.exporter.formats.openvino",
    "mlx": "phi_edge.exporter.formats.mlx",
    "qnn": "phi_edge.exporter.formats.qnn",
    "gguf": "phi_edge.exporter.formats.gguf",
    "coreml": "phi_edge.exporter.formats.coreml",
}

# every quantization option the CLI knows, with the flag that sets it (for error messages)
OPTION_FLAGS = {
    "block_size": "--block-size",
    "group_size": "--group-size",
    "symmetric": "--sym/--asym",
    "accuracy_level": "--accuracy-level",
    "algorithm": "--algorithm",
    "lm_head": "--lm-head",
    "embeddings": "--embeddings",
    "int8_layers": "--int8-layers",
    "ratio": "--ratio",
    "backup_precision": "--backup-precision",
    "awq": "--awq",
    "scale_estimation": "--scale-estimation",
    "gptq": "--gptq",
    "calibration_text": "--calibration-text",
    "soc": "--soc",
    "prefill_chunk": "--prefill-chunk",
    "compile": "--compile/--no-compile",
    "quant": "--quant",
}


@dataclass
class ExportOptions:
    """What the user asked for. ``quant`` holds only options the user set explicitly; a format
    merges them over the target's defaults (``target.quantization_defaults(precision)``)."""

    precision: str
    context_length: int = 0  # 0: the target's cap, else the model's own
    quant: dict[str, Any] = field(default_factory=dict)
    force: bool = False


@dataclass
class FormatResult:
    """What a format module reports back for the manifest."""

    quantization: dict[str, Any] = field(default_factory=dict)  # every parameter actually used
    runtime: dict[str, Any] = field(default_factory=dict)  # settings the runtime backend reads
    context_length: int | None = None  # if the format fixed it (e.g. a static KV window)
    verification: dict[str, Any] = field(default_factory=dict)  # e.g. {"qnn": "simulator-verified"}
    notes: list[str] = field(default_factory=list)  # said to the user after the export


def format_module(fmt: str):
    if fmt not in FORMAT_MODULES:
        raise PhiEdgeError(f"no exporter for format '{fmt}'; known: {', '.join(FORMAT_MODULES)}")
    try:
        return importlib.import_module(FORMAT_MODULES[fmt])
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("phi_edge"):
            raise PhiEdgeError(f"the '{fmt}' exporter is not part of this phi-edge build") from None
        raise


def merged_quant(target, opts: ExportOptions) -> dict[str, Any]:
    """The target's defaults for the chosen precision with the user's explicit options on top."""
    return {**target.quantization_defaults(opts.precision), **opts.quant}


def check_options(module, opts: ExportOptions, target_name: str) -> None:
    unknown = sorted(set(opts.quant) - set(module.OPTIONS))
    if unknown:
        flags = ", ".join(OPTION_FLAGS.get(k, k) for k in unknown)
        raise PhiEdgeError(
            f"{flags} does not apply to target '{target_name}' (format {module.FORMAT}); "
            f"its options are: {', '.join(OPTION_FLAGS[k] for k in sorted(module.OPTIONS)) or 'none'}"
        )


def tool_versions(names: tuple[str, ...]) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            pass
    return out


def require_tool(module_name: str, what: str, load: bool = True):
    """Import an export tool, or say how to install it. ``load=False`` only checks that it is installed
    (an export that writes its model in a worker process keeps torch out of the parent)."""
    try:
        if not load:
            if importlib.util.find_spec(module_name) is None:
                raise ImportError(f"No module named {module_name!r}")
            return None
        return importlib.import_module(module_name)
    except ImportError as e:
        raise PhiEdgeError(
            f"{what} needs {module_name.split('.')[0]}, which is not installed ({e}); "
            f"install the workstation extra: pip install 'phi-edge[export]'"
        ) from None


def copy_into(src: Path, dst: Path, names: tuple[str, ...]) -> list[str]:
    """Copy the named files that exist in ``src`` into ``dst``; returns what was copied."""
    import shutil

    done = []
    for n in names:
        if (Path(src) / n).is_file():
            shutil.copy2(Path(src) / n, Path(dst) / n)
            done.append(n)
    return done
