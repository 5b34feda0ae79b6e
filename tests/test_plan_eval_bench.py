"""Know before you ship: plan's estimates hold, eval measures quality, bench reports every number."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from phi_edge.exporter.cli import main as phi_export

# (family, target, precision) whose plan estimate is checked against the real export: every format
# and precision on phi3, and the ONNX ones on the LongRoPE family too
ONNX = [("cpu", "fp32"), ("cpu", "fp16"), ("rpi5", "int8"), ("rpi5", "int4")]
OTHERS = [("apple-silicon", "fp32"), ("apple-silicon", "fp16"), ("apple-silicon", "int8"), ("apple-silicon", "int4"),
          ("intel-cpu", "fp32"), ("intel-cpu", "fp16"), ("intel-cpu", "int8"), ("intel-cpu", "int4"),
          ("intel-npu", "int4"), ("qualcomm-npu", "int8"), ("qualcomm-npu", "int4")]
ESTIMATED = [(f, t, p) for f in ("phi3", "phi3-128k") for t, p in ONNX] + [("phi3", t, p) for t, p in OTHERS]


@pytest.mark.parametrize("family,target,precision", ESTIMATED)
def test_plan_size_estimate_within_10_percent(exported, checkpoint, family, target, precision):
    context = 256 if target == "qualcomm-npu" else 4096 if family == "phi3" else 2048
    out = exported(target, precision, family=family, context_length=context)
    args = ["plan", str(checkpoint(family)), "--target", target, "--precision", precision, "--json",
            "--context-length", str(context)]
    r = CliRunner().invoke(phi_export, args)
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)
    actual = json.loads((out / "phi-edge.json").read_text())
    size = sum(f["size"] for f in actual["files"])
    assert abs(plan["artifact_bytes"] - size) / size < 0.10, (plan["artifact_bytes"], size)
    assert plan["kv_cache_bytes"] == actual["memory"]["kv_cache_bytes"]
    assert plan["runtime_bytes"] > plan["artifact_bytes"] + plan["kv_cache_bytes"]


def test_too_big_for_the_device_is_refused_with_numbers(checkpoint, tmp_path):
    big = tmp_path / "phi3-medium-shaped"
    shutil.copytree(checkpoint("phi3"), big)
    cfg = json.loads((big / "config.json").read_text())
    cfg.update(hidden_size=5120, intermediate_size=17920, num_hidden_layers=40, num_attention_heads=40,
               num_key_value_heads=10)  # Phi-3-medium: 14B parameters
    (big / "config.json").write_text(json.dumps(cfg))
    r = CliRunner().invoke(phi_export, ["plan", str(big), "--target", "rpi5", "--precision", "fp32", "--json"])
    plan = json.loads(r.stdout)
    assert plan["parameters"] > 13e9 and plan["fits"] is False
    r = CliRunner().invoke(phi_export, [str(big), "--target", "rpi5", "--precision", "fp32", "-o", str(tmp_path / "o")])
    assert r.exit_code == 1
    msg = r.stderr.strip()
    assert "this model will not fit target 'rpi5': it needs about" in msg and "GiB at run time" in msg
    assert "but the device has 8.0 GiB" in msg
    # no context from 2048 up fits, so the suggestion is the one that can work
    assert "KV cache" in msg and "at 2048 tokens" in msg and "--precision int4" in msg and "smaller model" in msg
    assert not (tmp_path / "o").exists()


def test_eval_reference_against_itself_is_exact(checkpoint):
    ck = str(checkpoint("phi3"))
    r = CliRunner().invoke(phi_export, ["eval", ck, "--against", ck, "--json"])
    assert r.exit_code == 0, r.output
    e = json.loads(r.stdout)
    assert e["perplexity_ratio"] == 1.0 and e["mean_kl"] == 0.0 and e["top1_agreement"] == 1.0
    assert e["tokens_scored"] > 200 and e["windows"] > 1


def test_eval_of_artifacts_through_the_runtime(exported, checkpoint, tmp_path):
    ck = str(checkpoint("phi3"))
    fp32 = CliRunner().invoke(phi_export, ["eval", str(exported("cpu", "fp32", context_length=4096)), "--against", ck,
                                           "--json"])
    e = json.loads(fp32.stdout)
    assert abs(e["perplexity_ratio"] - 1.0) < 1e-3 and e["mean_kl"] < 1e-4 and e["top1_agreement"] == 1.0
    text = tmp_path / "mine.txt"
    text.write_text("Edge devices run small models. " * 40)
    int4 = CliRunner().invoke(phi_export, ["eval", str(exported("rpi5", "int4")), "--against", ck, "--text", str(text),
                                           "--window", "64", "--stride", "32", "--json"])
    q = json.loads(int4.stdout)
    assert q["text"] == str(text) and q["window"] == 64 and q["stride"] == 32
    assert q["mean_kl"] > e["mean_kl"] and q["perplexity_ratio"] != 1.0
    r = CliRunner().invoke(phi_export, ["eval", ck, "--against", ck, "--text", str(tmp_path / "none.txt")])
    assert r.exit_code == 1 and "does not exist; pass a local text file with --text" in r.stderr


def test_bench_json_has_every_field_and_plots(exported, tmp_path):
    a, b = exported("rpi5", "int4"), exported("cpu", "fp32", context_length=4096)
    r = CliRunner().invoke(phi_export, ["bench", str(a), "--prompt-tokens", "32", "--gen-tokens", "16", "--repeats", "3",
                                        "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    for key in ("artifact", "format", "target", "precision", "device", "size_bytes", "prompt_tokens", "gen_tokens",
                "warmup", "repeats", "load_s", "peak_rss_bytes"):
        assert key in d, key
    for key in ("time_to_first_token_s", "prefill_tokens_per_s", "decode_tokens_per_s"):
        assert set(d[key]) == {"median", "min", "max", "stdev"} and d[key]["median"] > 0
    assert d["prompt_tokens"] == 32 and d["repeats"] == 3 and d["peak_rss_bytes"] > 10 * 2**20
    png = tmp_path / "variants.png"
    r = CliRunner().invoke(phi_export, ["bench", str(a), str(b), "--prompt-tokens", "16", "--gen-tokens", "8",
                                        "--repeats", "2", "--plot", str(png), "--json"])
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.stdout)) == 2
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
