"""Bad input gets one clear line naming the problem and the fix, a non-zero exit, and leaves nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from phi_edge.exporter.cli import main as phi_export
from phi_edge.runtimes.cli import main as phi_run


def run_export_cli(*args):
    return CliRunner().invoke(phi_export, [str(a) for a in args])


def assert_clean_failure(result, message: str, out: Path):
    assert result.exit_code != 0, result.output
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), result.stderr
    assert message in err[0], err[0]
    assert not out.exists()
    assert not list(out.parent.glob(".phi-edge-staging-*"))


@pytest.fixture
def ckpt_copy(checkpoint, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(checkpoint("phi3"), dst)
    return dst


def test_unsupported_architecture(ckpt_copy, tmp_path):
    cfg = json.loads((ckpt_copy / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (ckpt_copy / "config.json").write_text(json.dumps(cfg))
    r = run_export_cli(ckpt_copy, "--target", "rpi5", "-o", tmp_path / "out")
    assert_clean_failure(r, "architecture LlamaForCausalLM is not supported; supported are: Phi3ForCausalLM", tmp_path / "out")
    assert "PhiMoEForCausalLM" in r.stderr
    cfg["architectures"], cfg["model_type"] = ["Phi3VForCausalLM"], "phi3_v"
    (ckpt_copy / "config.json").write_text(json.dumps(cfg))
    r = run_export_cli(ckpt_copy, "--target", "rpi5", "-o", tmp_path / "out", "--trust-remote-code")
    assert_clean_failure(r, "Phi-3-vision / Phi-3.5-vision (remote-code phi3_v) are not exported by phi-edge yet; "
                            "Phi-4-multimodal", tmp_path / "out")


def test_missing_and_malformed_config(ckpt_copy, tmp_path):
    (ckpt_copy / "config.json").write_text("{not json")
    r = run_export_cli(ckpt_copy, "--target", "rpi5", "-o", tmp_path / "out")
    assert_clean_failure(r, "config.json is not valid JSON", tmp_path / "out")
    (ckpt_copy / "config.json").unlink()
    r = run_export_cli(ckpt_copy, "--target", "rpi5", "-o", tmp_path / "out")
    assert_clean_failure(r, "has no config.json", tmp_path / "out")


def test_missing_shard(ckpt_copy, tmp_path):
    shard = sorted(ckpt_copy.glob("model-*.safetensors"))[-1]
    shard.unlink()
    r = run_export_cli(ckpt_copy, "--target", "rpi5", "-o", tmp_path / "out")
    assert_clean_failure(r, f"weight shard {shard.name} named in model.safetensors.index.json is missing", tmp_path / "out")


def test_truncated_safetensors(ckpt_copy, tmp_path):
    shard = sorted(ckpt_copy.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    r = run_export_cli(ckpt_copy, "--target", "rpi5", "-o", tmp_path / "out")
    assert_clean_failure(r, f"weight file {shard.name} is {len(data) - 1000} bytes but its header needs {len(data)}",
                         tmp_path / "out")
    shard.write_bytes(data[:5])
    r = run_export_cli(ckpt_copy, "--target", "rpi5", "-o", tmp_path / "out")
    assert_clean_failure(r, "is not a valid safetensors file", tmp_path / "out")


def test_missing_tokenizer(ckpt_copy, tmp_path):
    (ckpt_copy / "tokenizer.json").unlink()
    r = run_export_cli(ckpt_copy, "--target", "rpi5", "-o", tmp_path / "out")
    assert_clean_failure(r, "has no tokenizer (tokenizer.json or tokenizer.model)", tmp_path / "out")


def test_pickle_weights_refused_unless_allowed(ckpt_copy, tmp_path):
    for f in ckpt_copy.glob("model*.safetensors*"):
        f.unlink()
    (ckpt_copy / "pytorch_model.bin").write_bytes(b"not really a pickle")
    r = run_export_cli(ckpt_copy, "--target", "rpi5", "-o", tmp_path / "out")
    assert_clean_failure(r, "has only pickle weights (.bin)", tmp_path / "out")
    assert "--allow-pickle" in r.stderr


def test_unknown_target(checkpoint, tmp_path):
    r = run_export_cli(checkpoint("phi3"), "--target", "toaster", "-o", tmp_path / "out")
    assert_clean_failure(r, "unknown target 'toaster'; known targets: rpi5, android, cpu, cuda, apple-silicon", tmp_path / "out")


def test_unsupported_precision_for_target(checkpoint, tmp_path):
    r = run_export_cli(checkpoint("phi3"), "--target", "rpi5", "--precision", "fp16", "-o", tmp_path / "out")
    assert_clean_failure(r, "target 'rpi5' does not take precision fp16; it takes fp32, int8, int4", tmp_path / "out")


def test_existing_output_refused_then_forced(exported, checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = run_export_cli(checkpoint("phi3"), "--target", "rpi5", "-o", out)
    assert r.exit_code == 1
    assert "output folder" in r.stderr and "exists and is not empty; pass --force" in r.stderr
    assert (out / "keep.txt").read_text() == "mine"
    r = run_export_cli(checkpoint("phi3"), "--target", "rpi5", "-o", out, "--force", "--no-smoke-test")
    assert r.exit_code == 0, r.output
    assert not (out / "keep.txt").exists() and (out / "phi-edge.json").is_file()
    assert not list(tmp_path.glob(".phi-edge-staging-*"))


def test_tampered_artifact_is_caught(exported, tmp_path):
    out = tmp_path / "art"
    shutil.copytree(exported("rpi5", "int4"), out)
    data = out / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[1000] ^= 0xFF  # same size, different bytes: only the sha256 check sees it
    data.write_bytes(bytes(raw))
    from phi_edge.runtimes import load
    from phi_edge.runtimes.errors import ManifestError

    load(out)  # size check passes
    with pytest.raises(ManifestError, match="'model.onnx.data' fails its sha256 check"):
        load(out, verify=True)
    r = CliRunner().invoke(phi_run, [str(out), "--verify"])
    assert r.exit_code == 1 and "fails its sha256 check: it was altered or corrupted" in r.stderr
    data.write_bytes(bytes(raw[:-10]))
    r = CliRunner().invoke(phi_run, [str(out), "Hello"])
    assert r.exit_code == 1 and "is 9" in r.stderr and "manifest says" in r.stderr
    (out / "genai_config.json").unlink()
    r = CliRunner().invoke(phi_run, [str(out), "Hello"])
    assert r.exit_code == 1 and "artifact file 'genai_config.json' is missing" in r.stderr
    (out / "phi-edge.json").unlink()
    r = CliRunner().invoke(phi_run, [str(out), "Hello"])
    assert r.exit_code == 1 and "has no phi-edge.json; it is not a phi-edge artifact" in r.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupted_export_leaves_nothing(checkpoint, tmp_path, sig):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "phi_edge.exporter.cli", str(checkpoint("phi3")), "--target", "cpu",
                             "--precision", "fp32", "-o", str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".phi-edge-staging-*")):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "interrupted; nothing was written to the output folder" in stderr
    assert not out.exists()
    assert not list(tmp_path.glob(".phi-edge-staging-*"))


def test_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    r = run_export_cli("--target", "rpi", "--int4", "-o", tmp_path / "out")
    assert_clean_failure(r, "no model was named, so the default 'microsoft/Phi-3.5-mini-instruct' is not in the local "
                            "Hugging Face cache and the hub cannot be reached", tmp_path / "out")
    assert "pass a local checkpoint folder" in r.stderr and "phi-export demo" in r.stderr
    r = run_export_cli("someone/some-model", "--target", "rpi5", "-o", tmp_path / "out")
    assert_clean_failure(r, "'someone/some-model' is not in the local Hugging Face cache", tmp_path / "out")
    r = run_export_cli("./no/such/folder", "--target", "rpi5", "-o", tmp_path / "out")
    assert_clean_failure(r, "is neither a local folder nor a Hugging Face model id", tmp_path / "out")


def test_default_model_comes_from_the_local_hf_cache(checkpoint, tmp_path, monkeypatch):
    """`phi-export --target rpi --int4` exactly as written: Phi-3.5-mini-instruct from the HF cache."""
    hub = tmp_path / "hf" / "hub"
    snap = hub / "models--microsoft--Phi-3.5-mini-instruct" / "snapshots" / ("0" * 40)
    shutil.copytree(checkpoint("phi3-128k"), snap)
    (hub / "models--microsoft--Phi-3.5-mini-instruct" / "refs").mkdir()
    (hub / "models--microsoft--Phi-3.5-mini-instruct" / "refs" / "main").write_text("0" * 40)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    r = run_export_cli("--target", "rpi", "--int4", "--no-smoke-test")
    assert r.exit_code == 0, r.output
    out = tmp_path / "Phi-3.5-mini-instruct-rpi5-int4"
    m = json.loads((out / "phi-edge.json").read_text())
    assert m["source"]["model"] == "microsoft/Phi-3.5-mini-instruct" and m["target"] == "rpi5"
    assert m["family"] == "phi3-128k" and m["precision"] == "int4"


def test_an_unexpected_tool_error_names_the_step_the_model_and_what_to_try(checkpoint, tmp_path, monkeypatch):
    """A bug inside a tool never reaches the user as a bare TypeError."""
    from phi_edge.exporter.formats import onnx_genai

    def broken(ckpt, target, opts, out, steps):
        with steps.step("Building the ONNX graph (fp32, cpu) with onnxruntime-genai"):
            print("tool chatter before the crash")
            rope_scaling = ckpt.config.get("no such key")
            rope_scaling["short_factor"]  # what mlx-lm did with a transformers-5 MoE config

    monkeypatch.setattr(onnx_genai, "export", broken)
    out = tmp_path / "out"
    r = CliRunner().invoke(phi_export, [str(checkpoint("phi3")), "--target", "cpu", "--precision", "fp32",
                                        "-o", str(out)])
    assert r.exit_code == 1
    msg = r.stderr.strip()
    assert msg.count("\n") == 0 and msg.startswith(f"error: the export of {checkpoint('phi3')} for target 'cpu' "
                                                   f"failed while building the ONNX graph")
    assert "TypeError" in msg and "try another --precision or target" in msg and "tool log" in msg
    assert not out.exists()
    log = Path(msg.split("(tool log ", 1)[1].split(":", 1)[0])  # kept because the message names it
    assert log.read_text().startswith("tool chatter before the crash")
    log.unlink()
