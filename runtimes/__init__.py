"""Run an exported artifact on this device: ``load(folder).generate(prompt)``.

Importing this package is cheap: each backend module imports its engine (onnxruntime-genai,
OpenVINO GenAI, MLX, ONNX Runtime QNN) only when an artifact of its format is loaded, and none of
them imports torch or transformers.

- ``base.py``: the runtime contract (generate, stream, chat, logits); ``manifest.py``: ``phi-edge.json``;
- ``onnx_genai.py``, ``openvino.py``, ``mlx.py``, ``qnn/``: one backend each, importing only its engine;
- ``cli.py``: ``phi-run``; ``bench.py``: speed and memory; ``chat_template.py``: chat prompts;
  ``offline.py``: the engines' and tools' telemetry turned off;
- ``remote.py``: an OpenAI-compatible endpoint as a runtime; ``fallback.py``: artifact or endpoint;
  ``serve/``: ``phi-run serve``, an OpenAI-compatible server for one artifact.
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path

from .base import GenerationResult, Runtime, SamplingParams, Timings
from .errors import BackendUnavailableError, ContextLengthError, ManifestError, PhiEdgeError
from .manifest import MANIFEST_NAME, Manifest, read_manifest
from .offline import disable_telemetry

disable_telemetry()  # before any engine is imported: phi-edge sends nothing anywhere by default

__all__ = ["load", "Runtime", "GenerationResult", "SamplingParams", "Timings", "Manifest", "read_manifest",
           "PhiEdgeError", "ManifestError", "BackendUnavailableError", "ContextLengthError", "BACKENDS"]

# format -> (module, the phi-edge extra that installs its engine)
BACKENDS = {
    "onnx-genai": ("phi_edge.runtimes.onnx_genai", "onnx"),
    "openvino": ("phi_edge.runtimes.openvino", "openvino"),
    "mlx": ("phi_edge.runtimes.mlx", "mlx"),
    "qnn": ("phi_edge.runtimes.qnn", "qnn"),
    "gguf": ("phi_edge.runtimes.gguf", "gguf"),
    "coreml": ("phi_edge.runtimes.coreml", "coreml"),
}


def backend_module(fmt: str):
    if fmt not in BACKENDS:
        raise ManifestError(f"no runtime for artifact format '{fmt}'; known formats: {', '.join(BACKENDS)}")
    module_name, _ = BACKENDS[fmt]
    return importlib.import_module(module_name)


def load(path: str | Path | None, device: str | None = None, verify: bool = False, *, model: str | None = None,
         api_key: str | None = None, provider: str | None = None, fallback: str | None = None,
         engine_options: dict | None = None, **remote_options) -> Runtime:
    """Load the artifact folder at ``path``, or an OpenAI-compatible endpoint.

    Checks the manifest and every file's size (``verify=True`` also every sha256), then opens it
    with the backend its format names. ``device`` overrides the manifest's device (e.g. ``"CPU"``
    for an OpenVINO NPU artifact, ``"cpu"`` for a CUDA one).

    ``path`` an ``http(s)://…/v1`` URL (or None with ``provider=``): that endpoint, serving ``model``
    (see :mod:`.remote`; ``remote_options``: ``timeout``, ``max_retries``, ``max_wait_s``...).
    ``fallback=URL`` (or ``fallback=True`` with ``provider=``): the artifact when it loads and fits the
    available RAM, the endpoint otherwise; ``runtime.source`` is ``"local"`` or ``"remote"``.
    ``engine_options``: keyword arguments of the artifact's backend (onnx-genai: ``prepack_weights``).
    """
    if path is None or str(path).startswith(("http://", "https://")):
        if path is None and provider is None:
            raise PhiEdgeError("load() needs an artifact folder, an http(s):// URL, or provider=")
        from .remote import open_endpoint

        return open_endpoint(None if path is None else str(path), model, api_key=api_key, provider=provider,
                             **remote_options)
    if fallback:
        from .fallback import load_with_fallback
        from .remote import open_endpoint

        url = None if fallback is True else str(fallback)
        return load_with_fallback(path, lambda: load(path, device=device, verify=verify),
                                  lambda: open_endpoint(url, model, api_key=api_key, provider=provider,
                                                        **remote_options))
    if model is not None or provider is not None or remote_options:
        raise PhiEdgeError(f"model=/provider= name an endpoint, but '{path}' is an artifact folder; pass an "
                           f"http(s):// URL, or fallback=URL to use the endpoint when the artifact cannot run")
    folder = Path(path)
    manifest = read_manifest(folder, verify=verify)
    module = backend_module(manifest.format)
    start = time.perf_counter()
    runtime = module.open_artifact(folder, manifest, device, **(engine_options or {}))
    runtime.load_s = time.perf_counter() - start
    runtime.source = "local"
    return runtime


def require(module_name: str, fmt: str):
    """Import a backend's engine, or say which extra installs it."""
    try:
        return importlib.import_module(module_name)
    except ImportError as e:
        extra = BACKENDS[fmt][1]
        raise BackendUnavailableError(
            f"this artifact's format '{fmt}' needs {module_name.split('.')[0]}, which is not installed "
            f"({e}); install it with: pip install 'phi-edge[{extra}]'"
        ) from None
