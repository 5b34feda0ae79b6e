"""The streamed int4 ONNX export: bytes equal to ONNX Runtime's own quantizer, logits equal to the builder's
float route, the export's RAM in the plan, and bad input midway (shards, disk, Ctrl-C) leaving nothing."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from phi_edge.exporter.artifact import STAGING_PREFIX
from phi_edge.exporter.cli import main as phi_export
from phi_edge.exporter.export import run_export
from phi_edge.exporter.formats.onnx_genai import rtn, stream
from phi_edge.runtimes.errors import PhiEdgeError


@pytest.mark.parametrize("bits,symmetric,io", [(4, True, "float32"), (4, False, "float32"), (8, True, "float16"),
                                               (4, True, "float16"), (8, False, "float32")])
def test_rtn_is_onnxruntimes_quantizer_byte_for_byte(bits, symmetric, io):
    import onnx
    import torch
    from onnxruntime.quantization.neural_compressor.weight_only import make_matmul_weight_only_node, quant_tensor

    rng = np.random.default_rng(bits + symmetric)
    w = torch.from_numpy((rng.standard_normal((48, 256)) * 0.05).astype(np.float32)).to(torch.bfloat16)
    w[5, :32] = 0  # an all-zero block: scale 1
    graph_weight = w.float().numpy().astype(io).T.copy()  # (in, out), as the builder's MatMul holds it
    q, s, z = quant_tensor(graph_weight.T, bits, 32, "sym" if symmetric else "asym", "uint", 1)
    node = onnx.helper.make_node("MatMul", ["a", "w"], ["y"], name="n")
    _, inits = make_matmul_weight_only_node(node, graph_weight.shape, bits, 32, 256 // 32, q.astype("uint8"),
                                            s.astype(io), None if symmetric else z)
    want = {t.name: onnx.numpy_helper.to_array(t) for t in inits}
    got = rtn.quantize(w, bits, 32, symmetric, getattr(torch, io))
    assert np.array_equal(want[f"w_Q{bits}G32"].reshape(48, -1), got.qweight.numpy())
    assert np.array_equal(want["w_scale"], got.scales.numpy())
    if symmetric:
        assert got.zeros is None
    else:
        assert np.array_equal(want["w_zp"].reshape(-1), got.zeros.numpy().reshape(-1))


def test_shard_reader_matches_safetensors(checkpoint):
    from safetensors import safe_open

    from phi_edge.exporter.checkpoint import validate
    from phi_edge.exporter.formats.onnx_genai.shards import list_tensors, read_tensor

    ckpt = validate(checkpoint("phi3"))
    entries = list_tensors(ckpt.weight_files)
    assert len({e.shard for e in entries.values()}) == 3
    for f in ckpt.weight_files:
        with safe_open(str(f), "pt") as st:
            for name in st.keys():
                assert np.array_equal(read_tensor(entries[name]).numpy(), st.get_tensor(name).numpy()), name


def _session_logits(folder: Path) -> np.ndarray:
    import onnxruntime as ort

    decoder = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = np.array([[1, 15043, 3186, 29991, 450, 390, 4692, 29875, 29871, 29945]], dtype=np.int64)
    feeds = {}
    for i in session.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = ids
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones_like(ids)
        elif i.name.startswith("past_key_values"):
            dtype = np.float16 if "float16" in i.type else np.float32
            feeds[i.name] = np.zeros((1, decoder["num_key_value_heads"], 0, decoder["head_size"]), dtype=dtype)
    return session.run(["logits"], feeds)[0]


@pytest.fixture(scope="module")
def builder_route(tmp_path_factory, checkpoint):
    """``builder_route(target, **quant)``: the same export through the builder's float route."""
    built = {}

    def get(target: str, **quant) -> Path:
        key = (target, tuple(sorted(quant.items())))
        if key not in built:
            out = tmp_path_factory.mktemp("builder") / target
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(stream, "refusal", lambda *a: "forced for the test")
                run_export(str(checkpoint("phi3")), target, out, quant=quant, smoke_test=False)
            built[key] = out
        return built[key]

    return get


@pytest.mark.parametrize("target,quant", [("rpi5", {}), ("cuda", {}), ("cpu", {"lm_head": "int8"}),
                                          ("cpu", {"lm_head": "fp"})],
                         ids=["rpi5-defaults", "cuda-fp16-io", "cpu-int8-lm-head", "cpu-float-lm-head"])
def test_streamed_logits_equal_the_builders(exported, builder_route, target, quant):
    streamed = exported(target, "int4", **quant)
    manifest = json.loads((streamed / "phi-edge.json").read_text())
    assert manifest["quantization"]["route"].startswith("streamed")
    float_route = builder_route(target, **quant)
    assert json.loads((float_route / "phi-edge.json").read_text())["quantization"]["route"].startswith("builder")
    assert np.array_equal(_session_logits(streamed), _session_logits(float_route))
    import onnx

    def ops(folder):
        return sorted(n.op_type for n in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node)

    assert ops(streamed) == ops(float_route)


def test_what_does_not_stream_says_why(exported):
    # asymmetric k_quant with an int8 lm_head goes the builder's way, and the manifest says why
    out = exported("cpu", "int4", block_size=32, symmetric=False, accuracy_level=0, lm_head="int8",
                   algorithm="k_quant")
    route = json.loads((out / "phi-edge.json").read_text())["quantization"]["route"]
    assert route == "builder on the float model (not streamed: --algorithm k_quant)"


def _no_staging_left(parent: Path) -> None:
    assert not [p.name for p in parent.iterdir() if p.name.startswith(STAGING_PREFIX)]


def _copy(checkpoint, tmp_path: Path) -> Path:
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint("phi3"), ckpt)
    return ckpt


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_shard_damaged_midway_is_one_line_and_leaves_nothing(checkpoint, tmp_path, monkeypatch, damage):
    from phi_edge.exporter.formats.onnx_genai import shards

    ckpt = _copy(checkpoint, tmp_path)
    last = ckpt / "model-00003-of-00003.safetensors"
    real = shards.read_tensor

    def read_then_damage(entry):
        if last.exists() and last.stat().st_size > 100 and entry.shard != last:
            if damage == "missing":
                last.unlink()
            else:
                with open(last, "r+b") as fh:
                    fh.truncate(last.stat().st_size // 2)
        return real(entry)

    monkeypatch.setattr(stream, "read_tensor", read_then_damage)
    out = tmp_path / "out"
    run = CliRunner().invoke(phi_export, [str(ckpt), "--target", "rpi5", "-o", str(out)])
    assert run.exit_code != 0
    error = run.output.strip()
    assert "\n" not in error and "model-00003-of-00003.safetensors" in error
    assert ("truncated during the export" if damage == "truncated" else "disappeared") in error
    assert not out.exists()
    _no_staging_left(tmp_path)


def test_disk_full_and_ctrl_c_leave_nothing(checkpoint, tmp_path, monkeypatch):
    import safetensors.torch

    calls = []

    def full_disk(tensors, path, *a, **k):
        calls.append(path)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, path, *a, **k)

    real_save = safetensors.torch.save_file
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    out = tmp_path / "out"
    run = CliRunner().invoke(phi_export, [str(checkpoint("phi3")), "--target", "rpi5", "-o", str(out)])
    assert run.exit_code != 0 and "disk" in run.output and "full" in run.output
    assert "\n" not in run.output.strip() and not out.exists()
    _no_staging_left(tmp_path)
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(rtn, "quantize", interrupted)
    run = CliRunner().invoke(phi_export, [str(checkpoint("phi3")), "--target", "rpi5", "-o", str(out)])
    assert run.exit_code == 130 and "interrupted; nothing was written" in run.output
    assert "\n" not in run.output.strip() and not out.exists()
    _no_staging_left(tmp_path)


def test_plan_reports_the_exports_ram_and_the_export_refuses_what_will_not_fit(checkpoint, tmp_path, monkeypatch):
    run = CliRunner().invoke(phi_export, ["plan", str(checkpoint("phi3")), "--target", "rpi5", "--json"])
    d = json.loads(run.stdout)
    assert d["export_route"] == "streamed int4" and 0 < d["export_peak_bytes"] < d["workstation_ram_bytes"]
    run = CliRunner().invoke(phi_export, ["plan", str(checkpoint("phi3")), "--target", "rpi5", "--int8"])
    assert "export RAM" in run.output and "the builder on the float model; not streamed: precision int8" in run.output

    from phi_edge.exporter import plan

    monkeypatch.setattr(plan, "workstation_ram_bytes", lambda: 512 * 1024**2)
    with pytest.raises(PhiEdgeError, match=r"needs about [\d.]+ [MG]iB of RAM on this workstation \(streamed int4\) "
                                           r"but it has 512\.0 MiB.*--force"):
        run_export(str(checkpoint("phi3")), "rpi5", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_streamed_memory_model_for_full_size_shapes():
    """The plan's estimate for the benchmark's shapes: what the issue's targets are checked against."""
    from phi_edge.exporter.formats.onnx_genai import builder_peak_bytes, export_memory
    from phi_edge.exporter.plan import make_plan
    from phi_edge.targets import get_target

    mini = {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_size": 3072,
            "intermediate_size": 8192, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 32, "vocab_size": 32064, "max_position_embeddings": 4096,
            "torch_dtype": "bfloat16"}
    medium = {**mini, "hidden_size": 5120, "intermediate_size": 17920, "num_hidden_layers": 40,
              "num_attention_heads": 40, "num_key_value_heads": 10}
    for config, cap in ((mini, 6), (medium, 12)):
        p = make_plan(config, get_target("cpu"), "int4", 4096)
        assert p.export_route == "streamed int4" and p.export_peak_bytes <= cap * 1024**3, p.export_peak_bytes
        assert builder_peak_bytes(config) > 3 * p.export_peak_bytes
    peak, route = export_memory(mini, "int8", {}, get_target("cpu"), 0)
    assert route.startswith("the builder") and peak > 20 * 1024**3


def test_data_aware_int4_flags(checkpoint, tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("The Raspberry Pi 5 runs small language models on the edge. " * 40)
    out = tmp_path / "gptq"
    run = CliRunner().invoke(phi_export, [str(checkpoint("phi3")), "--target", "rpi5", "-o", str(out), "--gptq",
                                          "--awq", "--calibration-text", str(text), "--no-smoke-test"])
    assert run.exit_code == 0, run.output
    q = json.loads((out / "phi-edge.json").read_text())["quantization"]
    assert q["gptq"] and q["awq"] and q["calibration_text"] == "corpus.txt"
    assert q["route"].startswith("streamed") and "AWQ+GPTQ on" in q["route"]
    from phi_edge.runtimes import load

    assert load(out).generate("Hi", max_new_tokens=4).token_ids
    cases = [(["--gptq"], "--gptq needs calibration data: pass --calibration-text"),
             (["--calibration-text", str(text)], "--calibration-text is used by --awq or --gptq"),
             (["--awq", "--calibration-text", str(text), "--asym"], "--awq write symmetric int4 here; drop --asym"),
             (["--gptq", "--calibration-text", str(text), "--algorithm", "k_quant"],
              r"--gptq run in the streamed int4 export, which this export cannot take \(--algorithm k_quant\)"),
             (["--awq", "--calibration-text", str(text), "--int8"], "--awq quantize to int4; pass --precision int4")]
    import re

    for flags, message in cases:
        run = CliRunner().invoke(phi_export, [str(checkpoint("phi3")), "--target", "cpu", "-o", str(tmp_path / "x"),
                                              *flags])
        assert run.exit_code != 0 and re.search(message, run.output), (flags, run.output)
        assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_trained_fixture_gptq_beats_rtn(tmp_path):
    """GPTQ from a local text lowers the perplexity ratio of the trained fixture (tests/test_quality.py's measure).
    (RTN streamed = RTN builder is bit-exact: test_streamed_logits_equal_the_builders.)"""
    from phi_edge.exporter.evaluate import evaluate, open_scorer
    from phi_edge.exporter.fixtures.trained import TRAIN_FILES, stdlib_text, trained_checkpoint

    trained = trained_checkpoint()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(stdlib_text(TRAIN_FILES[:6])[:60000])  # training-side text, never the held-out one

    def export(name, quant=None):
        run_export(str(trained), "cpu", tmp_path / name, precision="int4", quant=quant or {}, smoke_test=False)
        return tmp_path / name

    streamed = export("streamed")
    gptq = export("gptq", {"gptq": True, "calibration_text": str(corpus)})
    reference = open_scorer(str(trained))

    def ratio(out):
        return evaluate(str(out), against=str(trained), text_file=str(trained / "eval.txt"), window=128, stride=64,
                        max_tokens=768, scorer=open_scorer(str(out)), reference=reference).perplexity_ratio

    rtn_ratio, gptq_ratio = ratio(streamed), ratio(gptq)
    print(f"\nperplexity ratio vs fp32: RTN {rtn_ratio:.5f}, GPTQ {gptq_ratio:.5f}")
    assert gptq_ratio < rtn_ratio
