"""Core ML for the Neural Engine (``--target apple-ane``): what Linux can check honestly. Core ML does not run
here, so: graph parity of both traced fixed-shape functions with transformers in torch (fed as the runtime
feeds them: padded prefill chunks, then 1-token decode through the same cache; LongRoPE both ways, Phi-4-mini),
the saved multifunction package's spec and weight ops read back with coremltools (``skip_model_load``), the
stored weights' quality on the trained fixture, the runtime's chunking and state on those weights, the refusal
on Linux, and bad input. The test that runs Core ML itself runs on macOS 15+ only."""

from __future__ import annotations

import json
import platform

import numpy as np
import pytest
from click.testing import CliRunner

from phi_edge.runtimes import load
from phi_edge.runtimes.errors import BackendUnavailableError, PhiEdgeError

ON_CORE_ML = platform.system() == "Darwin" and int((platform.mac_ver()[0] or "0").split(".")[0]) >= 15
CONTEXT, CHUNK = 128, 32
coremltools = pytest.importorskip("coremltools")


@pytest.fixture(scope="module")
def trained():
    from phi_edge.exporter.fixtures.trained import trained_checkpoint

    return trained_checkpoint()


@pytest.fixture(scope="module")
def ane_int4(trained, tmp_path_factory):
    """The trained fixture exported for the Neural Engine at the default int4 (one export for the module)."""
    from phi_edge.exporter.export import run_export

    out = tmp_path_factory.mktemp("coreml-ane") / "ane-int4"
    report = run_export(str(trained), "ane", out, context_length=CONTEXT, quant={"prefill_chunk": CHUNK})
    return out, report


@pytest.fixture(scope="module")
def stored(ane_int4):
    from phi_edge.exporter.formats.coreml.readback import stored_weights_runtime

    return stored_weights_runtime(ane_int4[0])


def test_export_records_what_was_checked(ane_int4):
    out, report = ane_int4
    m = json.loads((out / "phi-edge.json").read_text())
    assert (m["target"], m["format"], m["precision"], m["context_length"]) == ("apple-ane", "coreml", "int4", CONTEXT)
    assert m["quantization"]["mode"] == "int4-per-channel" and m["quantization"]["granularity"] == "per_channel"
    rt = m["runtime"]
    assert rt["functions"] == {"prefill": CHUNK, "decode": 1} and rt["prefill_length"] == CHUNK
    assert rt["compute_units"] == "CPU_AND_NE" and rt["outputs"] == ["logits_0", "logits_1"]
    assert rt["vocab_slices"] == [16032, 16032]  # Phi-3's 32064 in two slices below 16384
    v = m["verification"]
    parity = v["graph_parity"]
    assert parity["greedy_identical"] and parity["max_abs_logit_diff"] <= 1e-3
    assert parity["prefill_tokens"] > CHUNK  # more than one chunk, the last one padded
    assert v["weights_round_trip"]["matrices"] == 4 * 7 + 1 + 2 and v["weights_round_trip"]["min_cosine"] > 0.97
    assert v["structure"]["weights_stored_once"] and v["structure"]["weight_ops"] == {
        "constexpr_blockwise_shift_scale": 31}
    assert "Core ML itself did not run" in v["coreml"]
    assert any("prefill function of 32 tokens" in n for n in report.notes)


def test_spec_declares_two_fixed_shape_functions_sharing_the_state(ane_int4):
    """Read with coremltools itself (skip_model_load): no Core ML runtime needed."""
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load
    from coremltools.converters.mil.mil import types

    model = coremltools.models.MLModel(str(ane_int4[0] / "model.mlpackage"), skip_model_load=True)
    spec = model.get_spec()
    d = spec.description
    assert spec.specificationVersion >= 9 and d.defaultFunctionName == "decode"
    functions = {f.name: f for f in d.functions}
    assert sorted(functions) == ["decode", "prefill"]
    for name, t in (("prefill", CHUNK), ("decode", 1)):
        f = functions[name]
        inputs = {i.name: i.type.multiArrayType for i in f.input}
        assert {n: list(a.shape) for n, a in inputs.items()} == {
            "input_ids": [1, 1, 1, t], "position": [1, 1, 1, 1], "causal_mask": [1, 1, t, CONTEXT]}
        assert all(a.WhichOneof("ShapeFlexibility") is None for a in inputs.values())  # fixed shapes
        assert inputs["input_ids"].dataType == inputs["input_ids"].INT32
        assert [(o.name, list(o.type.multiArrayType.shape)) for o in f.output] == [
            ("logits_0", [1, 16032, 1, t]), ("logits_1", [1, 16032, 1, t])]
        for s in f.state:
            a = s.type.stateType.arrayType
            assert list(a.shape) == [4, 4 * 32, 1, CONTEXT] and a.dataType == a.FLOAT16
        assert sorted(s.name for s in f.state) == ["key_cache", "value_cache"]
    program = milproto_load(spec, specification_version=spec.specificationVersion, file_weights_dir=model.weights_dir)
    for name in ("prefill", "decode"):
        ops = program.functions[name].operations
        weights = [op for op in ops if op.op_type == "constexpr_blockwise_shift_scale"]
        assert len(weights) == 31 and {op.data.dtype for op in weights} == {types.int4}
        assert {op.scale.shape[1:] for op in weights} == {(1, 1, 1)}  # one scale per output channel
        assert all(len(op.outputs[0].shape) == 4 for op in weights)  # 1x1 convolution weights
        assert {"read_state", "coreml_update_state", "conv"} <= {op.op_type for op in ops}
        assert max(op.outputs[0].shape[1] for op in ops if op.op_type == "conv") < 16384


@pytest.mark.skipif(ON_CORE_ML, reason="Core ML runs here")
def test_load_refuses_clearly_where_core_ml_does_not_run(ane_int4):
    from phi_edge.runtimes.cli import main as phi_run

    with pytest.raises(BackendUnavailableError, match=r"macOS 15\+ and iOS/iPadOS 18\+.*graph parity"):
        load(ane_int4[0])
    result = CliRunner().invoke(phi_run, [str(ane_int4[0]), "Hello"])
    assert result.exit_code != 0 and "Core ML artifacts run on macOS 15+" in result.output


def test_stored_weights_quality_on_the_trained_fixture(ane_int4, trained):
    """``phi-export eval`` on the ANE artifact, on Linux: its stored int4 weights computing in torch through
    both functions (the measure that chose per-channel int4 over 4-bit palettization as the default)."""
    from phi_edge.exporter.evaluate import evaluate

    report = evaluate(str(ane_int4[0]), against=str(trained), text_file=str(trained / "eval.txt"), window=128,
                      stride=64, max_tokens=768)
    print(f"\ncoreml apple-ane int4-per-channel (stored weights): ratio {report.perplexity_ratio:.4f} "
          f"KL {report.mean_kl:.5f} top-1 {report.top1_agreement:.3f}")
    assert "stored weights" in report.logits and report.tokens_scored >= 767
    assert report.reference_perplexity < 100 and report.perplexity_ratio <= 1.01


def test_runtime_feeds_chunks_and_keeps_one_state(stored):
    """A prompt of several chunks (the last padded), then decode, through one state, gives the logits of one
    fresh pass; a follow-up whose padded chunk runs past the context feeds only its new tokens."""
    rt = stored
    ids = rt.encode("import os\nimport sys\n\ndef main(argv):\n    parser = argparse.ArgumentParser(")
    assert CHUNK < len(ids) < 2 * CHUNK
    first = rt.generate(ids, max_new_tokens=6, temperature=0)
    whole = rt.logits(ids + first.token_ids)
    assert first.token_ids == whole[len(ids) - 1:-1].argmax(-1).tolist()
    more = rt.encode("\n    return 0\n\n\ndef helper(x):\n    return x + 1\n" * 8, add_special_tokens=False)
    follow = (ids + first.token_ids + more)[:CONTEXT - 4]
    rt.generate(ids, max_new_tokens=6, temperature=0)
    state, held = rt._state, len(rt._state_ids)
    last = list(range(held, len(follow), CHUNK))[-1]  # the follow-up's last chunk starts here
    assert len(follow) - last > 1 and last + CHUNK > CONTEXT  # a padded chunk that runs past the context
    again = rt.generate(follow, max_new_tokens=4, temperature=0)
    assert rt._state is state and rt._state_ids[:len(follow)] == follow  # extended, not rebuilt
    fresh = rt.logits(follow + again.token_ids)
    assert again.token_ids == fresh[len(follow) - 1:-1].argmax(-1).tolist()
    np.testing.assert_allclose(rt.logits(ids), whole[:len(ids)], atol=1e-4)


@pytest.mark.skipif(not ON_CORE_ML, reason="Core ML runs on macOS 15+ only")
def test_core_ml_runs_both_functions(ane_int4, stored):
    rt = load(ane_int4[0])
    ids = rt.encode("import os\nimport sys\n\ndef main(argv):\n    parser = argparse.ArgumentParser(")
    np.testing.assert_allclose(rt.logits(ids), stored.logits(ids), atol=0.15)  # fp16 on the device
    assert rt.generate(ids, max_new_tokens=8, temperature=0).token_ids == stored.generate(
        ids, max_new_tokens=8, temperature=0).token_ids


def test_phi4_mini_in_parts_with_tied_embeddings_in_thirteen_slices(checkpoint, tmp_path):
    """Phi-4-mini's 200064-token vocabulary in 13 slices, the embedding gathered from those same slices, the
    model converted in parts of whole layers (here forced: one layer per part) that run in sequence with a
    state each: the format's own export (the orchestrator around it is tested above; its tokenizer checks are
    slow on a 200k vocabulary), then the stored fp16 weights, fed through both functions of both parts,
    compute what transformers does with the same fp16-rounded weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from phi_edge.exporter.checkpoint import validate
    from phi_edge.exporter.formats import ExportOptions
    from phi_edge.exporter.formats.coreml import ane, ane_export
    from phi_edge.exporter.formats.coreml.ane_readback import decoder_from_package, torch_functions
    from phi_edge.exporter.formats.coreml.decoder import Shape, rope_tables
    from phi_edge.exporter.formats.coreml.parity import FixedSteps, check, probe_ids
    from phi_edge.exporter.progress import Steps
    from phi_edge.runtimes.coreml import Chain
    from phi_edge.targets import get_target

    ckpt, target = validate(checkpoint("phi4-mini")), get_target("ane")
    opts = ExportOptions(precision="fp16", context_length=64, quant={"prefill_chunk": 16})
    ane_export.check(target, opts)
    _, runtime, verification, _ = ane_export.export(ckpt, target, opts, tmp_path, Steps(False), parity_max_params=0,
                                                    n_params=1, part_max_params=3_000_000)  # parity: tested below
    assert runtime["packages"] == ["model-part1-of-2.mlpackage", "model-part2-of-2.mlpackage"]
    assert runtime["parts"] == [[0, 1], [1, 1]] and runtime["vocab_slices"] == [15390] * 12 + [15384]
    first, second = verification["structure"]
    assert first["inputs"][0] == "input_ids" and first["outputs"] == ["output_hidden_states"]
    assert second["inputs"][0] == "hidden_states" and len(second["outputs"]) == 13
    assert verification["weights_round_trip"]["matrices"] == (7 + 13) * 2  # each part its copy of the slices
    assert verification["weights_round_trip"]["min_cosine"] > 0.99999
    shape = Shape.of(ckpt.config)
    parts = [decoder_from_package(tmp_path / name, shape, 64, 16, tuple(part))
             for name, part in zip(runtime["packages"], runtime["parts"])]
    hf = AutoModelForCausalLM.from_pretrained(str(ckpt.path), dtype=torch.float32).eval()
    for p in hf.parameters():
        p.data = p.data.half().float()  # the weights the package stores
    prompt = probe_ids(shape.vocab, 20)

    def run():
        engine = Chain([torch_functions(part) for part in parts])
        return check(None, hf, prompt, 6, 0, steps=FixedSteps(engine, 16, 64, 0, ane.output_names(shape)))

    result = run()
    assert result["greedy_identical"], result  # with the stored fp16 rotary tables: logits within about 0.25
    exact = rope_tables(AutoConfig.from_pretrained(str(ckpt.path)), 64)
    for part in parts:
        part.set_rope(*exact)  # the exact tables instead: the rest is exactly the fp16 weights
    result = run()
    assert result["ok"] and result["max_abs_logit_diff"] <= 1e-3, result


# ---- graph parity in torch: both traced functions against transformers -----------------------------------

@pytest.mark.parametrize("family,context,chunk,prompt,factors", [
    ("phi3", 64, 16, 21, None),
    ("phi3-128k", 512, 64, 100, "short"),  # within the original window: the short factors, as transformers
    ("phi3-128k", 1024, 128, 520, "long"),  # past it: the long factors, as transformers on sequences past 512
    ("phi4-mini", 256, 32, 40, "short"),  # partial rotary, grouped-query attention, tied embeddings
])
def test_graph_parity_with_transformers(checkpoint, family, context, chunk, prompt, factors):
    import torch
    from transformers import AutoModelForCausalLM

    from phi_edge.exporter.formats.coreml import ane
    from phi_edge.exporter.formats.coreml.ane_convert import trace
    from phi_edge.exporter.formats.coreml.ane_readback import torch_functions
    from phi_edge.exporter.formats.coreml.parity import FixedSteps, check, probe_ids

    folder = checkpoint(family)
    config = json.loads((folder / "config.json").read_text())
    module, rope = ane.build(folder, config, context, chunk, cache_dtype=torch.float32)
    assert rope.get("factors") == factors
    engine = torch_functions(module, traced={chunk: trace(module), 1: trace(ane.with_tokens(module, 1))})
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    steps = FixedSteps(engine, chunk, context, 0, ane.output_names(module.shape))
    result = check(None, hf, probe_ids(config["vocab_size"], prompt), 6, 0, steps=steps)
    assert result["ok"] and result["greedy_identical"] and result["max_abs_logit_diff"] <= 1e-3, result


def test_vocab_slices_stay_below_16384():
    from phi_edge.exporter.formats.coreml.ane import vocab_slices

    for vocab in (32064, 200064, 100352, 16383, 16384):
        slices = vocab_slices(vocab)
        assert sum(n for _, n in slices) == vocab and max(n for _, n in slices) < 16384
        assert [a for a, _ in slices] == [sum(n for _, n in slices[:i]) for i in range(len(slices))]
    assert len(vocab_slices(32064)) == 2 and len(vocab_slices(200064)) == 13


# ---- bad input: one line, nothing written --------------------------------------------------------------

@pytest.mark.parametrize("target,args,message", [
    ("apple-ane", ["--context-length", "100"], "context length 100 is not a multiple of the prefill length 64"),
    ("ane", ["--context-length", "256", "--prefill-chunk", "48"], "use --context-length 240 or 288"),
    ("apple-ane", ["--block-size", "32"], "--block-size does not apply to target 'apple-ane'"),
    ("apple-ane", ["--precision", "int8", "--quant", "palettize4"], "--quant chooses the 4-bit encoding"),
    ("apple-ane", ["--quant", "Q4_K_M"], "--quant q4_k_m is not a 4-bit encoding"),
    ("apple-ane", ["--prefill-chunk", "1"], "--prefill-chunk 1 is out of range"),
    ("apple-ane", ["--group-size", "64"], "--group-size does not apply to target 'apple-ane'"),
    ("iphone", ["--prefill-chunk", "64"], "--prefill-chunk does not apply to target 'iphone'"),
])
def test_bad_options_are_one_line_errors(checkpoint, tmp_path, target, args, message):
    from phi_edge.exporter.cli import main as phi_export

    out = tmp_path / "out"
    result = CliRunner().invoke(phi_export, [str(checkpoint("phi3")), "--target", target, "-o", str(out), *args])
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not out.exists()


def test_phi35_moe_is_refused_up_front(checkpoint, tmp_path):
    from phi_edge.exporter.export import run_export

    with pytest.raises(PhiEdgeError, match="Phi-3.5-MoE does not run on target 'apple-ane'.*apple-silicon"):
        run_export(str(checkpoint("phimoe")), "ane", tmp_path / "out")
    assert not (tmp_path / "out").exists()
