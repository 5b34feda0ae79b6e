"""GGUF on the CPU device targets: ``--format gguf`` for rpi5, android and cpu (the same device profile in
llama.cpp's format), refused where a target does not offer it, and benched beside the ONNX artifact."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

pytest.importorskip("gguf")
pytest.importorskip("xllamacpp")

from phi_edge.exporter.cli import main as phi_export  # noqa: E402
from phi_edge.runtimes import load  # noqa: E402
from phi_edge.targets import get_target  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def rpi5_gguf(checkpoint, tmp_path_factory):
    """``phi-export CKPT --target rpi5 --format gguf --int4 -o OUT``, as a Pi user types it."""
    out = tmp_path_factory.mktemp("rpi5-gguf") / "out"
    r = CliRunner().invoke(phi_export, [str(checkpoint("phi3")), "--target", "rpi", "--format", "gguf", "--int4",
                                        "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    return out, json.loads(r.stdout)


def test_rpi5_gguf_export_is_the_pi_profile_in_llama_cpp_format(rpi5_gguf):
    out, report = rpi5_gguf
    assert (report["target"], report["format"], report["precision"]) == ("rpi5", "gguf", "int4")
    m = json.loads((out / "phi-edge.json").read_text())
    assert (m["target"], m["format"], m["precision"]) == ("rpi5", "gguf", "int4")
    # the profile's own GGUF default (Q4_K_M), not the ONNX table's block_size / accuracy_level
    assert m["quantization"]["scheme"] == get_target("rpi5", "gguf").quantization["int4"]["quant"] == "Q4_K_M"
    assert "block_size" not in m["quantization"] and m["context_length"] == get_target("rpi5").context_length
    assert (out / "model.gguf").is_file() and not list(out.glob("*.onnx"))
    rt = load(out)  # the backend comes from the manifest's format
    assert type(rt).__module__ == "phi_edge.runtimes.gguf"
    assert len(rt.generate("Hello", max_new_tokens=6, temperature=0).token_ids) == 6
    assert report["sample"]["tokens"] > 0


def test_plan_takes_the_format(checkpoint):
    def plan(*args):
        r = CliRunner().invoke(phi_export, ["plan", str(checkpoint("phi3")), *args, "--json"])
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout)

    pi, ollama, onnx = plan("-t", "rpi5", "-f", "gguf"), plan("-t", "ollama"), plan("-t", "rpi5")
    assert (pi["target"], pi["format"], onnx["format"]) == ("rpi5", "gguf", "onnx-genai")
    # sized by the gguf exporter's own estimate (Q4_K_M), the KV cache as llama.cpp keeps it (f16)
    assert pi["artifact_bytes"] == ollama["artifact_bytes"] != onnx["artifact_bytes"]
    assert pi["kv_cache_dtype_bytes"] == 2 and onnx["kv_cache_dtype_bytes"] == 4
    assert pi["device_ram_bytes"] == onnx["device_ram_bytes"] and pi["context_length"] == onnx["context_length"]


@pytest.mark.parametrize("args,message", [
    (["--target", "rpi5", "--format", "mlx"],
     "error: target 'rpi5' does not offer format 'mlx'; it offers onnx-genai (default), gguf"),
    (["--target", "intel-cpu", "--format", "gguf"],
     "error: target 'intel-cpu' does not offer format 'gguf'; it offers openvino (default)"),
    (["--target", "rpi5", "--format", "gguf", "--int4", "--block-size", "32"],
     "error: --block-size does not apply to target 'rpi5' (format gguf); its options are:"),
    (["--target", "android", "--int4", "--quant", "Q4_K_M"],
     "error: --quant does not apply to target 'android' (format onnx-genai); its options are:"),
])
def test_bad_format_or_flag_is_one_line_and_writes_nothing(checkpoint, tmp_path, args, message):
    out = tmp_path / "out"
    r = CliRunner().invoke(phi_export, [str(checkpoint("phi3")), *args, "-o", str(out)])
    assert r.exit_code == 1
    assert r.stderr.startswith(message) and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []
    r = CliRunner().invoke(phi_export, ["plan", str(checkpoint("phi3")), *args])
    assert r.exit_code == 1 and r.stderr.startswith(message), r.stderr


def test_targets_lists_the_alternatives():
    data = json.loads(CliRunner().invoke(phi_export, ["targets", "--json"]).stdout)
    by_name = {t["name"]: t for t in data["targets"]}
    for name in ("rpi5", "android", "cpu"):
        t = by_name[name]
        assert t["format"] == "onnx-genai" and t["extra"] == "phi-edge[onnx]"  # the default is unchanged
        assert set(t["formats"]) == {"gguf"} and t["formats"]["gguf"]["extra"] == "phi-edge[gguf]"
        assert t["formats"]["gguf"]["quantization"]["int4"] == {"quant": "Q4_K_M"}
    assert by_name["ollama"]["formats"] == {} and by_name["intel-cpu"]["formats"] == {}
    text = CliRunner().invoke(phi_export, ["targets"]).output
    assert text.count("--format gguf") == 3


def test_bench_puts_onnx_and_gguf_side_by_side(exported, checkpoint, rpi5_gguf):
    """decode tokens/s, first token, peak RSS, size and perplexity ratio in one table; where eval cannot
    score an artifact (here: a reference with another tokenizer) the cell says why and bench still exits 0."""
    onnx, (gguf, _) = exported("rpi5", "int4"), rpi5_gguf
    fast = ["--prompt-tokens", "16", "--gen-tokens", "8", "--warmup", "0", "--repeats", "2"]
    r = CliRunner().invoke(phi_export, ["bench", str(onnx), str(gguf), *fast, "--against", str(checkpoint("phi3"))])
    assert r.exit_code == 0, r.output
    table = r.output.split("Side by side (medians):\n")[1].splitlines()
    assert table[0].split() == ["rpi5", "onnx-genai", "int4", "rpi5", "gguf", "Q4_K_M"]
    rows = {line[:18].strip(): line[18:].split() for line in table[1:]}
    assert set(rows) == {"size on disk", "decode tokens/s", "first token", "prefill tokens/s", "peak RSS",
                         "perplexity ratio"}
    ratios = [float(x) for x in rows["perplexity ratio"]]
    assert len(ratios) == 2 and all(0.9 < x < 1.5 for x in ratios), ratios
    # peak RSS is each child's own (not the parent's, which holds the transformers reference by now)
    rss_mib = [float(x) for x in rows["peak RSS"][::2]]
    assert all(20 < x < 400 for x in rss_mib), rss_mib

    r = CliRunner().invoke(phi_export, ["bench", str(gguf), *fast, "--against", str(checkpoint("phi4-mini")),
                                        "--json"])
    assert r.exit_code == 0, r.output
    q = json.loads(r.stdout)["quality"]
    assert q["perplexity_ratio"] is None and q["error"].startswith("n/a: the artifact's tokenizer disagrees")
