"""ONNX Runtime sessions on the Qualcomm HTP through the QNN execution provider plugin.

``onnxruntime-qnn`` ships the EP as a plugin library: it is registered once per process and
chosen through ``get_ep_devices()``; the legacy ``providers=[("QNNExecutionProvider", ...)]``
form is silently ignored, so it is never used here. Every session disables the CPU fallback,
so a session that opens is a graph that runs entirely on HTP. On an x86-64 or Windows-on-Arm
workstation the same HTP backend runs the graph in simulation; on a Snapdragon device, on the NPU.

Shared by the runtime (:mod:`phi_edge.runtimes.qnn`) and the exporter (compilation, checks).
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any, Iterator

from .. import require
from ..errors import PhiEdgeError

EP_NAME = "QNNExecutionProvider"
FORMAT = "qnn"
_registered = False


def engine():
    """(onnxruntime, onnxruntime_qnn), with the QNN EP library registered."""
    global _registered
    ort = require("onnxruntime", FORMAT)
    qnn = require("onnxruntime_qnn", FORMAT)
    if not _registered:
        try:
            ort.register_execution_provider_library(EP_NAME, qnn.get_library_path())
        except Exception as e:  # registering twice in one process (another module did it) is fine
            if "already" not in str(e).lower():
                raise PhiEdgeError(f"could not load the QNN execution provider ({e}); "
                                   f"reinstall it with: pip install 'phi-edge[qnn]'") from None
        _registered = True
    return ort, qnn


def htp_devices(ort) -> list:
    """The QNN EP's devices, the NPU first (a workstation lists the simulator as a CPU device)."""
    devices = [d for d in ort.get_ep_devices() if d.ep_name == EP_NAME]
    if not devices:
        raise PhiEdgeError("onnxruntime lists no QNN device; install a matching onnxruntime and onnxruntime-qnn "
                           "(pip install 'phi-edge[qnn]')")
    npu = [d for d in devices if str(d.device.type).endswith("NPU")]
    return npu or devices


def provider_options(htp_arch: int, soc_model: int, block_quant: bool = False) -> dict[str, str]:
    qnn = require("onnxruntime_qnn", FORMAT)
    opts = {"backend_path": qnn.get_qnn_htp_path(), "htp_arch": str(htp_arch), "soc_model": str(soc_model),
            "htp_performance_mode": "burst", "htp_graph_finalization_optimization_mode": "3"}
    if block_quant:
        opts["enable_block_quant_weight_optimization"] = "1"
    return opts


def session_options(htp_arch: int, soc_model: int, block_quant: bool = False,
                    config: dict[str, str] | None = None):
    """SessionOptions that put every node on HTP (or fail) for the given SoC profile."""
    ort, _ = engine()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    for k, v in (config or {}).items():
        so.add_session_config_entry(k, v)
    so.add_provider_for_devices(htp_devices(ort), provider_options(htp_arch, soc_model, block_quant))
    return so


@contextlib.contextmanager
def _native_stdout_to_stderr() -> Iterator[None]:
    """The x86-64 HTP simulator prints a banner on stdout when it starts; keep stdout for our
    output (``phi-run --json``) by sending fd 1 to stderr while QNN loads a graph."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):  # no real stdout (embedded interpreters, some test runners)
        yield
        return
    os.dup2(2, 1)
    try:
        yield
    finally:
        _flush_c_stdio()
        os.dup2(saved, 1)
        os.close(saved)


def _flush_c_stdio() -> None:
    try:
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):
        pass


def open_session(model: Path, htp_arch: int, soc_model: int, block_quant: bool = False,
                 record_assignment: bool = False):
    """An InferenceSession of ``model`` (a QDQ model or an EPContext model) entirely on HTP."""
    ort, _ = engine()
    config = {"session.record_ep_graph_assignment_info": "1"} if record_assignment else None
    so = session_options(htp_arch, soc_model, block_quant, config)
    try:
        with _native_stdout_to_stderr():
            return ort.InferenceSession(str(model), sess_options=so)
    except Exception as e:
        raise PhiEdgeError(f"the QNN HTP backend could not load {Path(model).name} for htp v{htp_arch} "
                           f"(soc_model {soc_model}): {_first_line(e)}; re-export for this device's --soc, "
                           f"or with --no-compile") from None


def compile_context(model: Path, out: Path, htp_arch: int, soc_model: int, block_quant: bool = False) -> Path:
    """Compile ``model`` for HTP into ``out`` (an EPContext model) plus its ``*_qnn.bin`` beside it."""
    ort, _ = engine()
    so = session_options(htp_arch, soc_model, block_quant)
    try:
        with _native_stdout_to_stderr():
            ort.ModelCompiler(so, str(model), embed_compiled_data_into_model=False).compile_to_file(str(out))
    except Exception as e:
        raise PhiEdgeError(f"QNN could not compile {Path(model).name} for htp v{htp_arch} (soc_model {soc_model}): "
                           f"{_first_line(e)}") from None
    return Path(out)


def cache_dir() -> Path:
    """Where QDQ artifacts keep the context binaries QNN compiled on their first load."""
    base = os.environ.get("PHI_EDGE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "phi-edge")
    return Path(base) / "qnn-contexts"


def compiled_once(model: Path, fingerprint: str, htp_arch: int, soc_model: int, block_quant: bool = False) -> Path:
    """The EPContext model of a QDQ ``model``: compiled on the first call, reused after that.
    ``fingerprint`` (e.g. the model file's sha256) names the cache entry with the SoC profile and
    the QNN version, so a changed model or backend compiles afresh."""
    _, qnn = engine()
    key = f"{fingerprint[:16]}-v{htp_arch}-{soc_model}-{int(block_quant)}-qnn{getattr(qnn, '__version__', '')}"
    folder = cache_dir() / key
    ctx = folder / f"{Path(model).stem}_ctx.onnx"
    if ctx.is_file() and (folder / ".complete").is_file():
        return ctx
    folder.mkdir(parents=True, exist_ok=True)
    compile_context(model, ctx, htp_arch, soc_model, block_quant)
    (folder / ".complete").write_text("")
    return ctx


def assignment(session) -> dict[str, list[str]]:
    """Execution provider -> op types of the nodes it runs (needs ``record_assignment=True``)."""
    out: dict[str, list[str]] = {}
    for sub in session.get_provider_graph_assignment_info():
        out.setdefault(sub.ep_name, []).extend(n.op_type for n in sub.get_nodes())
    return out


def _first_line(e: Any) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
