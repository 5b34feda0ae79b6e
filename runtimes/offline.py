"""Turns off the tools' and engines' usage telemetry in phi-edge's processes: phi-edge sends nothing anywhere by default."""

from __future__ import annotations

import os
import sys

# Environment opt-outs, read by the tools (and inherited by any child process they start):
#   ORT_DISABLE_TELEMETRY     onnxruntime and onnxruntime-genai (libonnxruntime*.so): their 1DS telemetry
#                             client resolves mobile.events.data.microsoft.com and writes a ``.ses``
#                             session file in the temp folder
#   HF_HUB_DISABLE_TELEMETRY  huggingface_hub's send_telemetry() and user-agent extras, hf_xet's telemetry
#   DO_NOT_TRACK              the cross-tool convention (huggingface_hub, hf_xet and others honour it)
ENVIRONMENT = {
    "ORT_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
}

# Set to 1 to leave the tools' own telemetry settings alone.
ALLOW_VARIABLE = "PHI_EDGE_ALLOW_TELEMETRY"


def disable_telemetry() -> None:
    """Opt this process (and its children) out of the export tools' telemetry; cheap, imports nothing heavy.

    openvino-telemetry (used by OpenVINO's converter, optimum-intel's export and NNCF) has no
    environment opt-out, only a user-wide consent file in the home folder; both of its users fall
    back to a no-op stub when it cannot be imported, so it is made unimportable here. Were it
    already imported, its consent is withdrawn instead.
    """
    if os.environ.get(ALLOW_VARIABLE, "").strip().lower() in ("1", "true", "yes", "on"):
        return
    for key, value in ENVIRONMENT.items():
        os.environ[key] = value
    _huggingface_hub_already_imported()
    _onnxruntime_already_imported()
    _openvino_telemetry()


def _huggingface_hub_already_imported() -> None:
    # huggingface_hub reads HF_HUB_DISABLE_TELEMETRY once, when huggingface_hub.constants is imported
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_DISABLE_TELEMETRY = True


def _onnxruntime_already_imported() -> None:
    ort = sys.modules.get("onnxruntime")
    if ort is not None and hasattr(ort, "disable_telemetry_events"):
        try:
            ort.disable_telemetry_events()
        except Exception:  # noqa: BLE001 - an old or partial onnxruntime: the environment opt-out still holds
            pass


def _openvino_telemetry() -> None:
    module = sys.modules.get("openvino_telemetry")
    if module is None:
        if "openvino_telemetry" not in sys.modules:
            # openvino.tools.ovc and nncf.telemetry import it in try/except ImportError and use a stub
            sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]
        return
    try:  # already imported by someone: no sends from the singleton, no consent for later instances
        from openvino_telemetry.utils.opt_in_checker import ConsentCheckResult, OptInChecker

        OptInChecker.check = lambda self, *args, **kwargs: ConsentCheckResult.DECLINED
        instance = getattr(module.Telemetry, "_SingletonMetaClass__single_instance", None)
        if instance is not None:
            instance.consent = False
    except Exception:  # noqa: BLE001 - a different openvino-telemetry version: nothing more to do
        pass
