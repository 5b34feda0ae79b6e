"""The ONNX Runtime GenAI path end to end: export, load, generate, compare with transformers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import assert_matches_reference
from phi_edge.exporter.cli import main as phi_export
from phi_edge.runtimes import load
from phi_edge.runtimes.errors import ContextLengthError, PhiEdgeError

PROMPT = "Hello world! The Raspberry Pi 5 runs small language models, 2026."
LONG_PROMPT = " ".join(["The quick brown fox jumps over the lazy dog."] * 70)  # ~700 tokens > 512


@pytest.mark.parametrize("family,prompt", [("phi3", PROMPT), ("phi3-128k", PROMPT), ("phi3-128k", LONG_PROMPT)],
                         ids=["phi3", "phi3-128k", "phi3-128k-past-original-context"])
def test_fp32_greedy_matches_transformers(exported, reference, family, prompt):
    rt = load(exported("cpu", "fp32", family=family, context_length=4096 if family == "phi3" else 2048))
    ref = reference(family)
    ids = assert_matches_reference(rt, ref, prompt)
    if prompt is LONG_PROMPT:
        assert len(ids) > ref.ckpt.config["original_max_position_embeddings"]


def test_int4_loads_generates_and_verify_reports(exported, checkpoint):
    out = exported("rpi5", "int4")
    manifest = json.loads((out / "phi-edge.json").read_text())
    q = manifest["quantization"]
    assert (q["bits"], q["block_size"], q["symmetric"], q["accuracy_level"]) == (4, 32, True, 4)
    result = load(out).generate("Hello", max_new_tokens=8)
    assert len(result.token_ids) == 8 and result.text
    # random tiny weights quantize badly (top-1 ~47%): lower bars than the int4 defaults, which fail it
    loose = ["--min-cosine", "0.8", "--min-top1", "0.3"]
    run = CliRunner().invoke(phi_export, ["verify", str(out), "--against", str(checkpoint("phi3"))])
    assert run.exit_code == 1 and "FAILED: top-1 agreement" in run.output
    run = CliRunner().invoke(phi_export, ["verify", str(out), "--against", str(checkpoint("phi3")), *loose])
    assert run.exit_code == 0, run.output
    print(run.output)
    assert "checksums  ok" in run.output
    assert "tokenizer  agrees" in run.output
    assert "top-1" in run.output and "cosine" in run.output
    run = CliRunner().invoke(phi_export, ["verify", str(out), "--against", str(checkpoint("phi3")), "--json", *loose])
    report = json.loads(run.stdout)
    assert 0 < report["against"]["top1_agreement"] <= 1
    assert 0.5 < report["against"]["logit_cosine_mean"] <= 1.0


def test_fp32_verify_is_exact(exported, checkpoint):
    out = exported("cpu", "fp32", family="phi3", context_length=4096)
    from phi_edge.exporter.verify import verify

    a = verify(out, against=str(checkpoint("phi3")))["against"]
    assert a["greedy_tokens_equal"] and a["tokenizer_agrees"]
    assert a["top1_agreement"] == 1.0 and a["logit_cosine_min"] > 0.99999


def test_quantization_options_reach_the_builder(exported):
    out = exported("cpu", "int4", block_size=32, symmetric=False, accuracy_level=0, lm_head="int8",
                   algorithm="k_quant")
    m = json.loads((out / "phi-edge.json").read_text())
    q = m["quantization"]
    assert (q["block_size"], q["symmetric"], q["accuracy_level"], q["lm_head"], q["algorithm"]) == \
        (32, False, 0, "int8", "k_quant")
    import onnx

    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    nbits = {n.name: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
             for n in graph.node if n.op_type == "MatMulNBits"}
    body = [a for name, a in nbits.items() if "lm_head" not in name]
    assert body and all(a["bits"] == 4 and a["block_size"] == 32 and a.get("accuracy_level", 0) == 0 for a in body)
    assert any(a["bits"] == 8 for name, a in nbits.items() if "lm_head" in name)
    # asymmetric quantization carries zero points
    assert all(len(n.input) >= 4 and n.input[3] for n in graph.node if n.op_type == "MatMulNBits")
    assert load(out).generate("Hi", max_new_tokens=4).token_ids


def test_block_size_and_quantized_tied_embeddings(exported, checkpoint, tmp_path):
    import onnx

    def nodes(out):
        graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
        return [(n.op_type, {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}) for n in graph.node
                if n.op_type in ("MatMulNBits", "GatherBlockQuantized")]

    out = exported("cpu", "int8", block_size=64)
    assert all(a["bits"] == 8 and a["block_size"] == 64 for _, a in nodes(out))
    assert load(out).generate("Hi", max_new_tokens=4).token_ids
    # Phi-4-mini ties embeddings to the lm_head: both are int4 and share one quantized matrix
    out = exported("cpu", "int4", family="phi4-mini", embeddings="int4")
    assert "GatherBlockQuantized" in {op for op, _ in nodes(out)}
    assert load(out).generate("Hi", max_new_tokens=4).token_ids

    from phi_edge.exporter.export import run_export

    with pytest.raises(PhiEdgeError, match="quantizes embeddings only at int4 and only for models that tie"):
        run_export(str(checkpoint("phi3")), "cpu", tmp_path / "x", quant={"embeddings": "int4"})
    with pytest.raises(PhiEdgeError, match="even number of blocks.*64"):
        run_export(str(checkpoint("phi3")), "cpu", tmp_path / "x", quant={"symmetric": False, "block_size": 64})
    with pytest.raises(PhiEdgeError, match="--group-size does not apply to target 'rpi5'"):
        run_export(str(checkpoint("phi3")), "rpi5", tmp_path / "x", quant={"group_size": 64})
    assert not (tmp_path / "x").exists()


def test_streaming_stop_strings_chat_and_sampling(exported):
    rt = load(exported("rpi5", "int4"))
    full = rt.generate(PROMPT, max_new_tokens=24)
    result = rt.new_result()
    pieces = list(rt.stream(PROMPT, max_new_tokens=24, result=result))
    assert "".join(pieces) == full.text == result.text and len(pieces) > 1
    assert result.token_ids == full.token_ids and result.timings.time_to_first_token_s > 0
    word = full.text.split()[3]
    stopped = rt.generate(PROMPT, max_new_tokens=24, stop=[word])
    assert stopped.finish_reason == "stop" and word not in stopped.text
    assert full.text.startswith(stopped.text)
    # sampling: a seed reproduces, and greedy differs from a hot sample
    a = rt.generate(PROMPT, max_new_tokens=16, temperature=1.5, top_k=50, top_p=0.95, seed=7)
    b = rt.generate(PROMPT, max_new_tokens=16, temperature=1.5, top_k=50, top_p=0.95, seed=7)
    assert a.token_ids == b.token_ids
    assert a.token_ids != full.token_ids[:16]
    prompt = rt.chat_prompt([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert prompt == "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n"
    reply = rt.chat([{"role": "user", "content": "Hi"}], max_new_tokens=6)
    # apply_chat_template's ids: the template writes every special token, and this one writes no BOS
    assert reply.prompt_token_ids == rt.encode("<|user|>\nHi<|end|>\n<|assistant|>\n", add_special_tokens=False)
    assert 32010 in reply.prompt_token_ids and 32001 in reply.prompt_token_ids  # special tokens, not text


def test_stop_tokens_end_generation(exported):
    rt = load(exported("rpi5", "int4"))
    assert {32007, 32000} <= set(rt.manifest.stop_token_ids)
    first = rt.generate(PROMPT, max_new_tokens=8).token_ids
    # make the artifact's first greedy token a stop token: generation ends at once, with no text
    rt.stop_token_ids = frozenset({first[0]})
    r = rt.generate(PROMPT, max_new_tokens=8)
    assert r.finish_reason == "stop" and r.token_ids == [] and r.text == ""


def test_prompt_longer_than_context_is_a_clear_error(exported):
    rt = load(exported("rpi5", "int4", context_length=64))
    assert rt.context_length == 64
    with pytest.raises(ContextLengthError, match="prompt is .* tokens but this artifact's context is 64"):
        rt.generate(LONG_PROMPT)
    r = rt.generate("Hi", max_new_tokens=500)
    assert r.finish_reason == "length" and len(r.prompt_token_ids) + len(r.token_ids) <= 64


def test_bad_sampling_parameters(exported):
    rt = load(exported("rpi5", "int4"))
    with pytest.raises(PhiEdgeError, match="top_p must be in"):
        rt.generate("Hi", top_p=0)
    with pytest.raises(PhiEdgeError, match="temperature must be >= 0"):
        rt.generate("Hi", temperature=-1)


def test_manifest_records_everything(exported, checkpoint):
    out = exported("rpi5", "int4")
    m = json.loads((out / "phi-edge.json").read_text())
    assert m["schema_version"] == 2
    assert m["format"] == "onnx-genai" and m["target"] == "rpi5" and m["family"] == "phi3"
    import hashlib

    cfg = (checkpoint("phi3") / "config.json").read_bytes()
    assert m["source"]["config_sha256"] == hashlib.sha256(cfg).hexdigest()
    names = {f["path"] for f in m["files"]}
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json"} <= names
    for f in m["files"]:
        p = out / f["path"]
        assert p.stat().st_size == f["size"] and hashlib.sha256(p.read_bytes()).hexdigest() == f["sha256"]
    assert m["chat_template"].startswith("{% for message in messages %}")
    assert m["context_length"] == 4096
    mem = m["memory"]
    assert mem["estimated_runtime_bytes"] > mem["weights_bytes"] > 0 and mem["kv_cache_bytes"] > 0
    assert {"onnxruntime-genai", "transformers", "phi-edge"} <= set(m["tools"])
    assert m["generation"]["max_new_tokens"] > 0
    genai = json.loads((out / "genai_config.json").read_text())
    assert genai["model"]["context_length"] == 4096 and 32007 in genai["model"]["eos_token_id"]


def test_moe_exports_for_cuda_only(checkpoint, tmp_path):
    from phi_edge.exporter.export import run_export

    for target in ("rpi5", "android", "cpu"):
        with pytest.raises(PhiEdgeError, match="Phi-3.5-MoE does not run on target .*OpenVINO.*MLX"):
            run_export(str(checkpoint("phimoe")), target, tmp_path / target)
        assert not (tmp_path / target).exists()
    with pytest.raises(PhiEdgeError, match="int4 only"):
        run_export(str(checkpoint("phimoe")), "cuda", tmp_path / "fp16", precision="fp16")
    report = run_export(str(checkpoint("phimoe")), "cuda", tmp_path / "moe", precision="int4")
    assert report.format == "onnx-genai" and report.family == "phimoe"
    import onnx

    ops = {n.op_type for n in onnx.load(str(tmp_path / "moe" / "model.onnx"), load_external_data=False).graph.node}
    assert "QMoE" in ops
    m = json.loads((tmp_path / "moe" / "phi-edge.json").read_text())
    assert m["runtime"]["device"] == "cuda" and m["family"] == "phimoe"
    assert any("cuda" in n for n in report.notes)  # not test-loaded on a machine without CUDA


def test_real_phi3_tokenizer_survives_export(real_tokenizer, checkpoint, tmp_path):
    """The real Phi-3 vocabulary through an export: the runtime tokenizes llama.cpp's 47 vectors exactly."""
    import shutil

    from conftest import real_tokenizer_vectors
    from phi_edge.exporter.export import run_export

    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint("phi3"), ckpt)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(real_tokenizer / f, ckpt / f)
    run_export(str(ckpt), "rpi5", tmp_path / "out", smoke_test=False)
    rt = load(tmp_path / "out")
    vectors = real_tokenizer_vectors(real_tokenizer)
    assert len(vectors) == 47
    for text, expected in vectors:
        assert rt.encode(text) == [1] + expected, text
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(ckpt)
    for text, _ in vectors:
        assert rt.encode(text) == hf(text)["input_ids"], text


@pytest.mark.slow
def test_generation_runs_past_the_sliding_window(exported, reference):
    """Phi-3-mini-4k's 2047-token window: onnxruntime-genai 0.18 failed one step past it when
    genai_config kept its sliding_window section; now it decodes on, and every decoded token is the
    reference's argmax (teacher-forced on the artifact's own output), past the window too."""
    rt, ref = load(exported("cpu", "fp32", family="phi3", context_length=4096)), reference("phi3")
    assert ref.ckpt.config["sliding_window"] == 2047
    ids = rt.encode("Hello")
    out = rt.generate(ids, max_new_tokens=2100, temperature=0).token_ids
    assert len(out) == 2100
    seq = ids + out
    want = ref.logits(seq).argmax(-1)
    assert all(want[p - 1] == seq[p] for p in range(len(ids), 2047))
    assert np.mean([want[p - 1] == seq[p] for p in range(2047, len(seq))]) > 0.99


def test_sliding_window_is_transformers_window(checkpoint, tmp_path):
    """The builder windows only layers that ``layer_types`` marks, which transformers 5's Phi-3 config lacks:
    without the bridge the graph attended to everything (logits ~10 apart past the window)."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from phi_edge.exporter.export import run_export

    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint("phi3"), ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "sliding_window": 48}))
    run_export(str(ckpt), "cpu", tmp_path / "out", precision="fp32", context_length=256, smoke_test=False)
    ids = [int(i) for i in np.random.default_rng(0).integers(10, 1000, 160)]
    got = np.asarray(load(tmp_path / "out").logits(ids))
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(got - want)[48:].max() < 1e-3
