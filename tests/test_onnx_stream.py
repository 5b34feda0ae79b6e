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


class _NeedsTwoArguments(Exception):
    def __init__(self, what, why):  # pickles but cannot be unpickled: the worker sends its name and text
        super().__init__(f"{what}: {why}")


def _in_a_step(kind: str, *, steps):
    """What the worker test runs in the worker process."""
    import os

    with steps.step("Doing the thing"):
        steps.note("a note from the worker")
        if kind == "error":
            raise PhiEdgeError("the thing failed; do the other thing")
        if kind == "unpicklable":
            raise _NeedsTwoArguments("gadget", "broke")
        if kind == "dies":
            os._exit(3)
        if kind == "interrupted":
            raise KeyboardInterrupt
    return {"pid": os.getpid()}


def test_worker_relays_steps_results_and_errors():
    import os

    from phi_edge.exporter.progress import Steps
    from phi_edge.exporter.worker import run_in_worker

    steps = Steps(enabled=False)
    assert run_in_worker(_in_a_step, "ok", steps=steps)["pid"] != os.getpid()
    assert "Doing the thing" in steps.times and steps.current == ""
    with pytest.raises(PhiEdgeError, match="^the thing failed; do the other thing$"):
        run_in_worker(_in_a_step, "error", steps=steps)
    assert steps.current == "Doing the thing"  # the failing step is named, as in-process
    with pytest.raises(RuntimeError, match="^_NeedsTwoArguments: gadget: broke$"):
        run_in_worker(_in_a_step, "unpicklable", steps=Steps(enabled=False))
    with pytest.raises(RuntimeError, match=r"worker process ended without a result \(exit code 3\)"):
        run_in_worker(_in_a_step, "dies", steps=Steps(enabled=False))
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C in the worker: the export's own Ctrl-C handling takes over
        run_in_worker(_in_a_step, "interrupted", steps=Steps(enabled=False))


def test_export_in_a_worker_writes_the_same_artifact(exported, checkpoint, tmp_path):
    """Large models write their files in a worker process (the artifact check then runs without torch):
    the same bytes as in-process, the worker's steps in the report, nothing left beside the output."""
    in_process = exported("rpi5")
    out = tmp_path / "worker"
    report = run_export(str(checkpoint("phi3")), "rpi5", out, worker=True)
    assert (out / "model.onnx.data").read_bytes() == (in_process / "model.onnx.data").read_bytes()
    assert (out / "model.onnx").read_bytes() == (in_process / "model.onnx").read_bytes()
    assert any(k.startswith("Quantizing to int4 layer by layer") for k in report.step_times_s)
    assert report.sample and report.sample["tokens"] > 0
    manifest = json.loads((out / "phi-edge.json").read_text())
    assert manifest["verification"]["tokenizer"].startswith("all ")
    _no_staging_left(tmp_path)


def test_artifact_check_loads_memory_mapped_when_the_repacked_model_would_crowd_the_workstation(
        exported, checkpoint, tmp_path, monkeypatch):
    """Phi-3-medium int4 on this 24 GiB box: ONNX Runtime's repacked load needs ~12 GiB, so the export's check
    opens it memory-mapped as stored (~the file's size) and generates one token; the manifest says so."""
    import numpy as np

    from phi_edge.exporter.formats import onnx_genai
    from phi_edge.runtimes import load

    gib = 1024**3
    assert onnx_genai.check_load(int(8.65 * gib), int(23.5 * gib))[0] == {"prepack_weights": False}
    assert onnx_genai.check_load(int(2.54 * gib), int(23.5 * gib)) == ({}, None)  # Phi-3-mini: as the device
    assert onnx_genai.check_load(int(2.54 * gib), 8 * gib)[0] == {"prepack_weights": False}

    monkeypatch.setattr(onnx_genai, "CHECK_RAM_SHARE", 0.0)
    out = tmp_path / "light"
    report = run_export(str(checkpoint("phi3")), "rpi5", out)
    assert report.sample["tokens"] == 1
    note = json.loads((out / "phi-edge.json").read_text())["verification"]["artifact_check"]
    assert note.startswith("artifact check: loaded without ONNX Runtime's weight repacking") and note in report.notes
    # the option reaches the engine: its unpacked fp32 kernels differ from the repacked int8-activation ones
    ids = list(range(5, 30))
    packed = np.asarray(load(out).logits(ids))
    mapped = np.asarray(load(out, engine_options={"prepack_weights": False}).logits(ids))
    assert 0 < np.abs(packed - mapped).max() < 1.0
    assert (packed.argmax(-1) == mapped.argmax(-1)).mean() > 0.9


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
