"""The two commands as a user types them: phi-export (targets, plan, demo, export) and phi-run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from phi_edge.exporter.cli import main as phi_export
from phi_edge.runtimes.cli import main as phi_run


def test_targets_table_and_json():
    r = CliRunner().invoke(phi_export, ["targets"])
    assert r.exit_code == 0, r.output
    for name in ("rpi5", "android", "cpu", "cuda", "apple-silicon", "intel-cpu", "intel-gpu", "intel-npu",
                 "qualcomm-npu"):
        assert name in r.output
    assert "phi-edge[onnx]" in r.output and "int4 only" in r.output
    assert "OpenVINO" in r.output and "MLX" in r.output  # where MoE runs on a CPU
    data = json.loads(CliRunner().invoke(phi_export, ["targets", "--json"]).stdout)
    rpi = next(t for t in data["targets"] if t["name"] == "rpi5")
    assert "rpi" in rpi["aliases"] and rpi["format"] == "onnx-genai" and rpi["extra"] == "phi-edge[onnx]"
    assert rpi["quantization"]["int4"]["block_size"] == 32 and rpi["ram_gb"] == 8
    cuda = next(t for t in data["targets"] if t["name"] == "cuda")
    assert cuda["moe"] == "yes" and cuda["moe_precisions"] == ["int4"]
    assert {s["key"] for s in data["socs"]} >= {"sm8650", "sm8750", "x-elite"}


def test_plan_shows_size_fit_and_moe(checkpoint):
    r = CliRunner().invoke(phi_export, ["plan", str(checkpoint("phi3")), "--target", "rpi5", "--json"])
    assert r.exit_code == 0, r.output
    p = json.loads(r.stdout)
    assert p["fits"] is True and p["context_length"] == 4096 and p["parameters"] > 4_000_000
    assert p["moe"] == "n/a (dense model)"
    r = CliRunner().invoke(phi_export, ["plan", str(checkpoint("phimoe")), "--target", "rpi5"])
    assert r.exit_code == 1
    assert "Phi-3.5-MoE       no: onnxruntime-genai runs Phi-3.5-MoE only with CUDA kernels" in r.stdout
    r = CliRunner().invoke(phi_export, ["plan", str(checkpoint("phimoe")), "--target", "cuda", "--int4"])
    assert r.exit_code == 0 and "Phi-3.5-MoE       yes" in r.stdout


def test_demo_is_the_readme_first_command(tmp_path):
    """README's first command: the built-in demo model, exported and generating, no download."""
    out = tmp_path / "demo-out"
    r = subprocess.run([sys.executable, "-m", "phi_edge.exporter.cli", "demo", "--target", "rpi5", "--int4", "-o",
                        str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "Exported demo (phi3) for rpi5 as onnx-genai int4" in r.stdout
    assert "sample (cpu" in r.stdout and "->" in r.stdout
    assert r.stderr == ""  # the tools' own chatter stays out of the terminal
    r = subprocess.run([sys.executable, "-m", "phi_edge.runtimes.cli", str(out), "Hello", "-n", "8"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip()


def test_export_json_is_clean(checkpoint, tmp_path):
    r = subprocess.run([sys.executable, "-m", "phi_edge.exporter.cli", str(checkpoint("phi3")), "--target", "android",
                        "-o", str(tmp_path / "a"), "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["target"] == "android" and report["precision"] == "int4" and report["sample"]["tokens"] == 16
    steps = report["step_times_s"]
    assert report["size_bytes"] > 0 and any(s.startswith("Quantizing to int4 layer by layer") for s in steps), steps
    assert "Building the ONNX graph (int4, cpu) with onnxruntime-genai from the quantized weights" in steps, steps


def test_demo_checkpoint_command(tmp_path):
    r = CliRunner().invoke(phi_export, ["demo-checkpoint", str(tmp_path / "moe"), "--family", "phimoe"])
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert cfg["architectures"] == ["PhiMoEForCausalLM"] and cfg["num_local_experts"] == 4
    assert cfg["num_experts_per_tok"] == 2 and cfg["rope_scaling"]["type"] == "longrope"
    from phi_edge.exporter.checkpoint import validate

    assert validate(tmp_path / "moe").family == "phimoe"


@pytest.mark.parametrize("family,expect", [("phi3", {"rope_scaling": None, "max_position_embeddings": 4096}),
                                           ("phi3-128k", {"original_max_position_embeddings": 512}),
                                           ("phi4-mini", {"partial_rotary_factor": 0.75, "tie_word_embeddings": True})])
def test_fixtures_mirror_the_real_configs(checkpoint, family, expect):
    from phi_edge.exporter.checkpoint import validate

    ck = validate(checkpoint(family))
    assert ck.family == family and ck.architecture == "Phi3ForCausalLM"
    for k, v in expect.items():
        assert ck.config[k] == v
    if family != "phi3":
        rope = ck.config["rope_scaling"]
        assert rope["type"] == "longrope" and len(rope["short_factor"]) == len(rope["long_factor"])


def test_fixtures_are_deterministic(tmp_path):
    from phi_edge.exporter.fixtures import write_checkpoint

    a = write_checkpoint(tmp_path / "a", "phi3")
    b = write_checkpoint(tmp_path / "b", "phi3")
    for f in sorted(p.name for p in a.iterdir()):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_phi_run_json_stop_and_template(exported):
    out = str(exported("rpi5", "int4"))
    r = CliRunner().invoke(phi_run, [out, "Hello", "-n", "6", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert len(d["token_ids"]) == 6 and d["finish_reason"] == "length"
    assert set(d["timings"]) >= {"time_to_first_token_s", "decode_tokens_per_s", "prefill_tokens_per_s"}
    r = CliRunner().invoke(phi_run, [out, "Hi", "--template", "--system", "Be brief.", "-n", "4", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["prompt_tokens"] > 8
    r = CliRunner().invoke(phi_run, [out, "--chat", "-n", "4"], input="Hello there\nAnd again\n\n")
    assert r.exit_code == 0, r.output
    assert r.stdout.count("> ") >= 2
    r = CliRunner().invoke(phi_run, [out, "Hello", "--top-p", "0"])
    assert r.exit_code == 1 and "top_p must be in (0, 1]" in r.stderr
    r = CliRunner().invoke(phi_run, [out, "--verify", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["ok"] is True
