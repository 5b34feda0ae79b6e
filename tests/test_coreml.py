"""Core ML (``--target iphone``): what Linux can check honestly. Core ML itself does not run here, so:
graph parity of our traced decoder with transformers in torch (LongRoPE both ways, Phi-4-mini, the sliding
window), the saved package's spec and weight ops read back with coremltools (``skip_model_load``), the stored
weights' quality on the trained fixture, the runtime's state handling on those weights, the refusal on
Linux, and bad input. The test that runs Core ML itself runs on macOS 15+ only."""

from __future__ import annotations

import json
import platform
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from phi_edge.runtimes import load
from phi_edge.runtimes.errors import BackendUnavailableError, PhiEdgeError

ON_CORE_ML = platform.system() == "Darwin" and int((platform.mac_ver()[0] or "0").split(".")[0]) >= 15
CONTEXT = 256
coremltools = pytest.importorskip("coremltools")


@pytest.fixture(scope="module")
def trained():
    from phi_edge.exporter.fixtures.trained import trained_checkpoint

    return trained_checkpoint()


@pytest.fixture(scope="module")
def int4(trained, tmp_path_factory):
    """The trained fixture exported for the iPhone at the default int4 (one export for the module)."""
    from phi_edge.exporter.export import run_export

    out = tmp_path_factory.mktemp("coreml") / "iphone-int4"
    report = run_export(str(trained), "iphone", out, context_length=CONTEXT)
    return out, report


@pytest.fixture(scope="module")
def stored(int4):
    from phi_edge.exporter.formats.coreml.readback import stored_weights_runtime

    return stored_weights_runtime(int4[0])


def test_export_records_what_was_checked(int4):
    out, report = int4
    m = json.loads((out / "phi-edge.json").read_text())
    assert (m["format"], m["precision"], m["context_length"]) == ("coreml", "int4", CONTEXT)
    assert m["quantization"] == {"mode": "linear_symmetric", "dtype": "int4", "granularity": "per_block",
                                 "block_size": 32, "tool": "coremltools.optimize.coreml"}
    v = m["verification"]
    assert v["graph_parity"]["greedy_identical"] and v["graph_parity"]["max_abs_logit_diff"] <= 1e-3
    assert v["weights_round_trip"]["matrices"] == 7 * 4 + 2 and v["weights_round_trip"]["min_cosine"] > 0.99
    assert "Core ML itself did not run" in v["coreml"]
    assert m["runtime"]["packages"] == ["model.mlpackage"] and m["runtime"]["parts"] == [[0, 4]]
    assert m["runtime"]["sliding_window"] == 0  # the fixture's 2047 is past the context
    assert any(f["path"].startswith("model.mlpackage/") for f in m["files"])
    assert any("Core ML did not run on this machine" in n for n in report.notes)


def test_spec_declares_states_inputs_and_int4_weight_ops(int4):
    """Read with coremltools itself (skip_model_load): no Core ML runtime needed."""
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load
    from coremltools.converters.mil.mil import types

    model = coremltools.models.MLModel(str(int4[0] / "model.mlpackage"), skip_model_load=True)
    spec = model.get_spec()
    d = spec.description
    assert spec.specificationVersion >= 9  # iOS 18: states
    for state in d.state:
        a = state.type.stateType.arrayType
        assert list(a.shape) == [4, 1, 4, CONTEXT, 32] and a.dataType == a.FLOAT16
    assert sorted(s.name for s in d.state) == ["key_cache", "value_cache"]
    inputs = {i.name: i.type.multiArrayType for i in d.input}
    assert inputs["input_ids"].dataType == inputs["input_ids"].INT32
    mask = inputs["causal_mask"]
    assert mask.dataType == mask.FLOAT16
    ranges = [(r.lowerBound, r.upperBound) for r in mask.shapeRange.sizeRanges]
    assert ranges == [(1, 1), (1, 1), (1, CONTEXT), (1, CONTEXT)]
    assert [o.name for o in d.output] == ["logits"]
    program = milproto_load(spec, specification_version=spec.specificationVersion, file_weights_dir=model.weights_dir)
    ops = [op for op in program.functions["main"].operations if op.op_type == "constexpr_blockwise_shift_scale"]
    assert len(ops) == 30 and {op.data.dtype for op in ops} == {types.int4}
    assert {op.data.shape[1] // op.scale.shape[1] for op in ops} == {32}  # blocks of 32 along the input
    assert {"read_state", "coreml_update_state", "scaled_dot_product_attention"} <= {
        op.op_type for op in program.functions["main"].operations}


@pytest.mark.skipif(ON_CORE_ML, reason="Core ML runs here")
def test_load_refuses_clearly_where_core_ml_does_not_run(int4):
    from phi_edge.runtimes.cli import main as phi_run

    with pytest.raises(BackendUnavailableError, match=r"macOS 15\+ and iOS/iPadOS 18\+.*graph parity"):
        load(int4[0])
    result = CliRunner().invoke(phi_run, [str(int4[0]), "Hello"])
    assert result.exit_code != 0 and "Core ML artifacts run on macOS 15+" in result.output


def test_stored_weights_quality_on_the_trained_fixture(int4, trained):
    """``phi-export eval`` on a Core ML artifact, on Linux: the package's stored int4 weights computing in torch."""
    from phi_edge.exporter.evaluate import evaluate

    report = evaluate(str(int4[0]), against=str(trained), text_file=str(trained / "eval.txt"), window=128,
                      stride=64, max_tokens=768)
    print(f"\ncoreml iphone int4 (stored weights): ratio {report.perplexity_ratio:.4f} KL {report.mean_kl:.5f} "
          f"top-1 {report.top1_agreement:.3f}")
    assert "stored weights" in report.logits and report.tokens_scored >= 767
    assert report.reference_perplexity < 100 and report.perplexity_ratio <= 1.02


def test_runtime_keeps_one_state_per_conversation(stored):
    """Prefill and decode through the state give the logits of one fresh pass; a prompt that extends the
    conversation feeds only its new tokens and generates what a fresh state would."""
    rt = stored
    ids = rt.encode("def fibonacci(n):\n    ")
    first = rt.generate(ids, max_new_tokens=6, temperature=0)
    chain = rt.logits(ids + first.token_ids)[len(ids) - 1:-1].argmax(-1).tolist()
    assert first.token_ids == chain
    follow = ids + first.token_ids + rt.encode("\n    return", add_special_tokens=False)
    rt.generate(ids, max_new_tokens=6, temperature=0)  # the conversation so far, in the state
    state = rt._state
    again = rt.generate(follow, max_new_tokens=5, temperature=0)
    assert rt._state is state and rt._state_ids[:len(follow)] == follow  # the state was extended, not rebuilt
    fresh = rt.logits(follow + again.token_ids)[len(follow) - 1:-1].argmax(-1).tolist()
    assert again.token_ids == fresh


@pytest.mark.skipif(not ON_CORE_ML, reason="Core ML runs on macOS 15+ only")
def test_core_ml_runs_the_package(int4, stored):
    rt = load(int4[0])
    ids = rt.encode("import os\n")
    np.testing.assert_allclose(rt.logits(ids), stored.logits(ids), atol=0.15)  # fp16 on the device
    assert rt.generate(ids, max_new_tokens=8, temperature=0).token_ids == stored.generate(
        ids, max_new_tokens=8, temperature=0).token_ids


def test_a_large_model_is_converted_in_parts(checkpoint, reference, tmp_path, monkeypatch):
    """Parts of whole layers (here forced on the tiny fixture) run in sequence with a state each; their stored
    fp16 weights together compute what transformers does."""
    import phi_edge.exporter.formats.coreml as coreml_format
    from phi_edge.exporter.export import run_export
    from phi_edge.exporter.formats.coreml.readback import stored_weights_runtime

    monkeypatch.setattr(coreml_format, "PART_MAX_PARAMS", 3_000_000)  # the embedding + one layer per part
    out = tmp_path / "parts"
    run_export(str(checkpoint("phi3")), "iphone", out, precision="fp16", context_length=64)
    rt = json.loads((out / "phi-edge.json").read_text())["runtime"]
    assert rt["packages"] == ["model-part1-of-2.mlpackage", "model-part2-of-2.mlpackage"]
    assert rt["parts"] == [[0, 1], [1, 1]]
    first, second = (coremltools.models.MLModel(str(out / p), skip_model_load=True).get_spec().description
                     for p in rt["packages"])
    assert [i.name for i in first.input] == ["input_ids", "causal_mask"]
    assert [o.name for o in first.output] == ["output_hidden_states"]
    assert [i.name for i in second.input] == ["hidden_states", "causal_mask"]
    assert [o.name for o in second.output] == ["logits"]
    assert [list(s.type.stateType.arrayType.shape) for s in second.state] == [[1, 1, 4, 64, 16]] * 2
    ours, ref = stored_weights_runtime(out), reference("phi3")
    ids = ref.encode("The Raspberry Pi 5 is a small computer, and")
    assert ours.generate(ids, max_new_tokens=12, temperature=0).token_ids == ref.greedy(ids, 12)
    np.testing.assert_allclose(ours.logits(ids), ref.logits(ids), atol=0.05)


# ---- graph parity in torch: our traced decoder against transformers ----------------------------------

def _parity(folder, context: int, prompt: int, window: int | None = None):
    import torch
    from transformers import AutoModelForCausalLM

    from phi_edge.exporter.formats.coreml.convert import trace
    from phi_edge.exporter.formats.coreml.decoder import build
    from phi_edge.exporter.formats.coreml.parity import check, probe_ids

    config = json.loads((folder / "config.json").read_text())
    module, rope = build(folder, config, context, cache_dtype=torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    window = int(config.get("sliding_window") or 0) if window is None else window
    return check(trace(module), hf, probe_ids(config["vocab_size"], prompt), 6, window), rope


@pytest.mark.parametrize("family,context,prompt,factors", [
    ("phi3", 64, 20, None),
    ("phi3-128k", 512, 20, "short"),  # context within the original window: the short factors, as transformers
    ("phi3-128k", 1024, 520, "long"),  # past it: the long factors, as transformers on sequences past 512
    ("phi4-mini", 256, 20, "short"),  # partial rotary, grouped-query attention, tied embeddings
])
def test_graph_parity_with_transformers(checkpoint, family, context, prompt, factors):
    result, rope = _parity(checkpoint(family), context, prompt)
    assert rope.get("factors") == factors
    assert result["ok"] and result["greedy_identical"] and result["max_abs_logit_diff"] <= 1e-3, result


def test_sliding_window_is_honoured_in_the_mask(checkpoint, tmp_path):
    folder = tmp_path / "windowed"
    shutil.copytree(checkpoint("phi3"), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "sliding_window": 8}))
    assert _parity(folder, 64, 24)[0]["ok"]
    unwindowed, _ = _parity(folder, 64, 24, window=0)
    assert unwindowed["max_abs_logit_diff"] > 1e-2  # the check sees a mask without the window


# ---- bad input: one line, nothing written --------------------------------------------------------------

@pytest.mark.parametrize("args,message", [
    (["--group-size", "64"], "--group-size does not apply to target 'iphone'"),
    (["--precision", "int8", "--block-size", "32"], "--block-size applies to --precision int4"),
    (["--block-size", "48"], "--block-size 48 does not fit this model"),
    (["--precision", "fp32"], "does not take precision fp32"),
])
def test_bad_options_are_one_line_errors(checkpoint, tmp_path, args, message):
    from phi_edge.exporter.cli import main as phi_export

    out = tmp_path / "out"
    result = CliRunner().invoke(phi_export, [str(checkpoint("phi3")), "--target", "iphone", "-o", str(out), *args])
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not out.exists()


def test_phi35_moe_is_refused_up_front(checkpoint, tmp_path):
    from phi_edge.exporter.export import run_export

    with pytest.raises(PhiEdgeError, match="Phi-3.5-MoE does not run on target 'iphone'.*apple-silicon"):
        run_export(str(checkpoint("phimoe")), "iphone", tmp_path / "out")
    assert not (tmp_path / "out").exists()
