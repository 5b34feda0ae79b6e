"""The Raspberry Pi 5 artifacts, exported here on x86, run on arm64: Debian's aarch64 Python under
user-mode QEMU (Cortex-A76) with the aarch64 wheels of phi-edge[onnx] or phi-edge[gguf] (tests/device/arm64.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from device import arm64 as harness
from device import unavailable
from phi_edge.runtimes import load

PROMPT = "Hello! What can you do on a Raspberry Pi?"
LOGITS_TEXT = "The quick brown fox jumps over the lazy dog. Raspberry Pi runs small language models at the edge."

# Runs in the arm64 Python: next-token logits of each artifact for the same ids, saved as .npy
LOGITS_SNIPPET = """
import json, platform, sys
import numpy as np
import onnxruntime_genai
from phi_edge.runtimes import load
ids = json.loads(sys.argv[1])
for art, out in zip(sys.argv[2::2], sys.argv[3::2]):
    np.save(out, load(art).logits(ids))
print(json.dumps({"machine": platform.machine(), "engine": onnxruntime_genai.__file__}))
"""


@pytest.fixture(scope="module")
def arm64():
    try:
        return harness.build()
    except harness.HarnessUnavailable as e:
        unavailable(f"arm64 harness: {e}")


@pytest.fixture(scope="module")
def artifacts(exported):
    # rpi5 int4 as shipped (MatMulNBits accuracy_level 4: int8 kernels that differ between x86 and
    # arm) and with accuracy_level 0 (fp32 compute: the same math on both)
    return exported("rpi5", "int4"), exported("rpi5", "int4", accuracy_level=0)


def test_phi_run_generates_on_arm64(arm64, artifacts):
    art, _ = artifacts
    p = arm64.phi_run(str(art), PROMPT, "--json", "-n", "16")
    r = json.loads(p.stdout)
    assert r["device"] == "cpu" and r["prompt_tokens"] == len(load(art).encode(PROMPT))
    assert len(r["token_ids"]) == 16 and r["finish_reason"] == "length" and r["text"].strip()
    check = json.loads(arm64.phi_run(str(art), "--verify", "--json").stdout)
    assert check["ok"] and check["checksums"] == "ok" and check["generated_tokens"] == 8


def test_logits_and_greedy_tokens_match_x86(arm64, artifacts, tmp_path):
    art4, art0 = artifacts
    x86_4, x86_0 = load(art4), load(art0)
    ids = x86_4.encode(LOGITS_TEXT)
    out4, out0 = tmp_path / "arm-4.npy", tmp_path / "arm-0.npy"
    p = arm64.python("-c", LOGITS_SNIPPET, json.dumps(ids), str(art4), str(out4), str(art0), str(out0))
    where = json.loads(p.stdout.strip().splitlines()[-1])
    assert where["machine"] == "aarch64" and where["engine"].startswith(str(harness.cache_dir()))

    # accuracy_level 0: fp32 compute, the same logits up to float rounding
    ref, a0 = x86_0.logits(ids), np.load(out0)
    assert np.abs(ref - a0).max() < 1e-3
    assert np.array_equal(ref.argmax(-1), a0.argmax(-1))

    # accuracy_level 4: activations quantized to int8, differently by the x86 and the arm kernels.
    # Each platform's result sits as close to the fp32-compute result as x86's own does.
    x4, a4 = x86_4.logits(ids), np.load(out4)
    assert a4.shape == x4.shape == ref.shape and ref.shape[0] == len(ids)
    err_x86, err_arm = np.abs(x4 - ref), np.abs(a4 - ref)
    assert err_arm.mean() <= 1.5 * err_x86.mean() and err_arm.max() <= 1.5 * err_x86.max(), \
        (err_arm.mean(), err_x86.mean(), err_arm.max(), err_x86.max())
    cosine = (x4 * a4).sum(-1) / np.linalg.norm(x4, axis=-1) / np.linalg.norm(a4, axis=-1)
    assert cosine.min() > 0.99, cosine.min()

    # accuracy_level 0 again: the same greedy tokens through phi-run
    r = json.loads(arm64.phi_run(str(art0), PROMPT, "--json", "-n", "24").stdout)
    assert r["token_ids"] == x86_0.generate(PROMPT, max_new_tokens=24).token_ids
    assert len(r["token_ids"]) == 24


@pytest.fixture(scope="module")
def arm64_gguf():
    try:
        return harness.build(extra="gguf")
    except harness.HarnessUnavailable as e:
        unavailable(f"arm64 harness: {e}")


@pytest.fixture(scope="module")
def rpi5_gguf(tmp_path_factory):
    """``--target rpi5 --format gguf --int4`` (Q4_K_M) of the trained fixture: its greedy choices have
    real margins (on the random-weight fixtures llama.cpp's x86 and arm 4-bit kernels flip near-ties)."""
    pytest.importorskip("gguf")
    from phi_edge.exporter.export import run_export
    from phi_edge.exporter.fixtures.trained import trained_checkpoint

    out = tmp_path_factory.mktemp("arm64-gguf") / "rpi5-gguf-int4"
    run_export(str(trained_checkpoint()), "rpi5", out, precision="int4", fmt="gguf", smoke_test=False)
    return out


def test_phi_run_gguf_on_arm64_equals_x86(arm64_gguf, rpi5_gguf):
    """phi-run on the rpi5 GGUF artifact under qemu-aarch64 (llama.cpp from xllamacpp's aarch64 wheel)
    gives the x86 run's greedy tokens and text."""
    from click.testing import CliRunner

    from phi_edge.runtimes.cli import main as phi_run

    m = json.loads((rpi5_gguf / "phi-edge.json").read_text())
    assert (m["target"], m["format"], m["quantization"]["scheme"]) == ("rpi5", "gguf", "Q4_K_M")
    args = [str(rpi5_gguf), "    if not isinstance(", "--json", "-n", "16"]
    arm = json.loads(arm64_gguf.phi_run(*args).stdout)
    x86 = CliRunner().invoke(phi_run, args)
    assert x86.exit_code == 0, x86.output
    x86 = json.loads(x86.stdout)
    assert arm["token_ids"] == x86["token_ids"] and arm["text"] == x86["text"], (arm["text"], x86["text"])
    assert len(arm["token_ids"]) == 16 and arm["device"] == "cpu" and arm["prompt_tokens"] == x86["prompt_tokens"]
