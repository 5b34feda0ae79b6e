"""The device side stands alone: phi-edge[onnx] in a fresh venv runs artifacts without torch or transformers."""

from __future__ import annotations

import json
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

CHECK = """
import json, sys, time
t = time.perf_counter()
import phi_edge.runtimes as rt
import_s = time.perf_counter() - t
assert "onnxruntime_genai" not in sys.modules, "backends load lazily"
r = rt.load(sys.argv[1]).generate("Hello", max_new_tokens=6)
print(json.dumps({"tokens": r.token_ids, "torch": "torch" in sys.modules,
                  "transformers": "transformers" in sys.modules, "import_s": import_s}))
"""


def test_runtime_imports_no_torch_in_this_environment(exported):
    """Here torch and transformers are installed, and still the runtime path never imports them."""
    out = subprocess.run([sys.executable, "-c", CHECK, str(exported("rpi5", "int4"))], capture_output=True,
                         text=True, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(report["tokens"]) == 6
    assert report["torch"] is False and report["transformers"] is False


@pytest.fixture(scope="session")
def onnx_only_venv(session_dir) -> Path:
    """A fresh venv with nothing but `pip install phi-edge[onnx]` (no system site-packages)."""
    env_dir = session_dir / "venv-onnx"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", f"{REPO}[onnx]"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"pip install phi-edge[onnx] failed:\n{r.stderr[-2000:]}")
    return env_dir


def test_onnx_extra_alone_runs_artifacts(onnx_only_venv, exported):
    py = onnx_only_venv / "bin" / "python"
    freeze = subprocess.run([str(py), "-m", "pip", "freeze"], capture_output=True, text=True, check=True).stdout.lower()
    assert "onnxruntime-genai" in freeze
    for heavy in ("torch", "transformers", "optimum", "openvino", "mlx"):
        assert f"\n{heavy}==" not in "\n" + freeze, f"{heavy} was pulled by phi-edge[onnx]"
    art = exported("rpi5", "int4")
    out = subprocess.run([str(py), "-c", CHECK, str(art)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(report["tokens"]) == 6 and not report["torch"]
    run = subprocess.run([str(onnx_only_venv / "bin" / "phi-run"), str(art), "Hello", "-n", "5", "--json"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert len(json.loads(run.stdout)["token_ids"]) == 5
    help_ = subprocess.run([str(onnx_only_venv / "bin" / "phi-run"), "--help"], capture_output=True, text=True)
    assert help_.returncode == 0 and "Run an exported Phi artifact" in help_.stdout
    # an artifact of a backend that is not installed gets a clear error naming the extra
    other = onnx_only_venv.parent / "fake-openvino-artifact"
    other.mkdir(exist_ok=True)
    m = json.loads((art / "phi-edge.json").read_text())
    m.update(format="openvino", files=[])
    (other / "phi-edge.json").write_text(json.dumps(m))
    run = subprocess.run([str(onnx_only_venv / "bin" / "phi-run"), str(other), "Hello"], capture_output=True, text=True)
    assert run.returncode == 1
    assert "pip install 'phi-edge[openvino]'" in run.stderr, run.stderr
