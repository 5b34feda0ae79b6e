"""Phi-4-mini is tested like Phi-3 (byte-level BPE tokenizer with its own special tokens, no BOS, tied
embeddings, partial rotary), and configs written by transformers 5 (``rope_parameters``) export and match
transformers on every backend, Phi-3.5-MoE's included."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import assert_text_parity

from phi_edge.runtimes import load

PROMPTS = ("The Raspberry Pi 5 is a small computer, and", "Numbers 3.14 and dates 2026-12-03:\n\tdone")
NEW_TOKENS = 24
DENSE_TARGETS = ["cpu", "intel-cpu", "apple-silicon"]


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    """``native(family)``: the family's fixture with config.json exactly as transformers 5 writes it."""
    from phi_edge.exporter.fixtures import write_checkpoint

    built = {}

    def get(family: str):
        if family not in built:
            built[family] = write_checkpoint(tmp_path_factory.mktemp("native") / family, family, native_config=True)
        return built[family]

    return get


def _reference(folder):
    from phi_edge.exporter.checkpoint import validate
    from phi_edge.exporter.reference import Reference

    return Reference(validate(folder))


def _assert_text_parity(rt, ref):
    assert_text_parity(rt, ref, PROMPTS, NEW_TOKENS)


def _export(ckpt, target, out, **kw):
    from phi_edge.exporter.export import run_export

    run_export(str(ckpt), target, out, **kw)
    return load(out)


@pytest.mark.slow
@pytest.mark.parametrize("target", DENSE_TARGETS)
def test_phi4_mini_fp32_text_parity(checkpoint, reference, exported, target):
    rt, ref = load(exported(target, "fp32", family="phi4-mini")), reference("phi4-mini")
    tok = rt.manifest.tokenizer
    assert tok["prefix_ids"] == [] and tok["bos_token_id"] == 199999  # Phi-4-mini adds no BOS
    assert json.loads((checkpoint("phi4-mini") / "tokenizer.json").read_text())["decoder"]["type"] == "ByteLevel"
    _assert_text_parity(rt, ref)


@pytest.mark.slow
@pytest.mark.parametrize("target", DENSE_TARGETS)
def test_transformers5_phi4_mini_config_exports_and_matches(native, tmp_path, target):
    ckpt = native("phi4-mini")
    cfg = json.loads((ckpt / "config.json").read_text())
    assert "rope_scaling" not in cfg and cfg["rope_parameters"]["rope_type"] == "longrope"
    assert "type" not in cfg["rope_parameters"]
    rt = _export(ckpt, target, tmp_path / "out", precision="fp32")
    assert rt.manifest.family == "phi4-mini"
    _assert_text_parity(rt, _reference(ckpt))


@pytest.mark.slow
@pytest.mark.parametrize("target", ["intel-cpu", "apple-silicon"])
def test_transformers5_phimoe_config_exports_and_matches(native, tmp_path, target):
    ckpt = native("phimoe")
    assert "rope_parameters" in json.loads((ckpt / "config.json").read_text())
    rt = _export(ckpt, target, tmp_path / "out", precision="fp32")
    assert rt.manifest.family == "phimoe"
    _assert_text_parity(rt, _reference(ckpt))


@pytest.mark.slow
def test_transformers5_phi4_mini_on_qnn_top1(native, tmp_path):
    ckpt = native("phi4-mini")
    rt = _export(ckpt, "qualcomm-npu", tmp_path / "out", precision="int8", context_length=128)
    ref = _reference(ckpt)
    ids = rt.encode(PROMPTS[0])
    assert ids == ref.encode(PROMPTS[0])
    seq = ids + ref.greedy(ids, NEW_TOKENS)
    ours, theirs = rt.logits(seq), ref.logits(seq)
    agree = ours.argmax(-1) == theirs.argmax(-1)
    top2 = np.sort(theirs, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 1.0  # positions without a near-tie in the reference
    print(f"phi4-mini w8a16 top-1 {agree.mean():.3f}, {clear.sum()} clear positions")
    assert agree.mean() >= 0.85 and agree[clear].all() and clear.sum() >= len(seq) // 2


@pytest.mark.slow
def test_transformers5_phimoe_exports_for_cuda(native, tmp_path):
    """transformers 5 names the class PhimoeForCausalLM; the genai builder is bridged to it. Exported and
    checked structurally (no GPU here: the CUDA artifact is not run)."""
    import onnx

    from phi_edge.exporter.export import run_export

    ckpt = native("phimoe")
    assert json.loads((ckpt / "config.json").read_text())["architectures"] == ["PhimoeForCausalLM"]
    report = run_export(str(ckpt), "cuda", tmp_path / "moe", precision="int4")
    assert report.family == "phimoe"
    model = onnx.load(tmp_path / "moe" / "model.onnx", load_external_data=False)
    assert "QMoE" in {n.op_type for n in model.graph.node}
