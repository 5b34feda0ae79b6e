"""Checkpoints written by transformers 5's save_pretrained (what users' fine-tunes look like), in shapes the
suite did not design for itself, match transformers through text on every format."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_text_parity

from phi_edge.exporter.fixtures.saved import SAVED_SHAPES, write_saved_checkpoint
from phi_edge.runtimes import load

PROMPTS = ("The Raspberry Pi 5 is a small computer, and", " Numbers 3.14 and dates 2026-12-03:\n\t")
NEW_TOKENS = 24
SHAPES = {s.name: s for s in SAVED_SHAPES}
LONGROPE = next(s.name for s in SAVED_SHAPES if s.longrope)
GQA = SAVED_SHAPES[0].name
# fp32 text-path parity: every shape on the cheap exports, a GQA and the LongRoPE shape on the slow ones
CASES = ([("cpu", name) for name in SHAPES] + [("apple-silicon", name) for name in SHAPES]
         + [("intel-cpu", GQA), ("intel-cpu", LONGROPE)])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    built = {}

    def get(name: str):
        if name not in built:
            built[name] = write_saved_checkpoint(tmp_path_factory.mktemp("saved") / name, SHAPES[name])
        return built[name]

    return get


@pytest.fixture(scope="module")
def saved_reference(saved):
    from phi_edge.exporter.checkpoint import validate
    from phi_edge.exporter.reference import Reference

    loaded = {}

    def get(name: str):
        if name not in loaded:
            loaded[name] = Reference(validate(saved(name)))
        return loaded[name]

    return get


def _export(ckpt, target, out, **kw):
    from phi_edge.exporter.export import run_export

    return run_export(str(ckpt), target, out, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("target,shape", CASES, ids=[f"{t}-{s}" for t, s in CASES])
def test_fp32_text_path_parity(saved, saved_reference, tmp_path, target, shape):
    ckpt, ref = saved(shape), saved_reference(shape)
    assert "add_bos_token" not in (ckpt / "tokenizer_config.json").read_text()  # as transformers 5 writes it
    out = tmp_path / "out"
    _export(ckpt, target, out, precision="fp32")
    rt = load(out)
    assert rt.manifest.tokenizer["prefix_ids"] == [1]  # BOS from the post-processor
    assert_text_parity(rt, ref, PROMPTS, NEW_TOKENS)


@pytest.mark.slow
@pytest.mark.parametrize("shape", [GQA, LONGROPE])
def test_qnn_top1_on_saved_checkpoints(saved, saved_reference, tmp_path, shape):
    """w8a16 on the HTP simulator: the text path encodes like transformers, and the next-token
    argmax agrees at (nearly) every position of a teacher-forced continuation."""
    ckpt, ref = saved(shape), saved_reference(shape)
    out = tmp_path / "out"
    _export(ckpt, "qualcomm-npu", out, precision="int8", context_length=128)
    rt = load(out)
    prompt = PROMPTS[0]
    ids = rt.encode(prompt)
    assert ids == ref.encode(prompt)
    seq = ids + ref.greedy(ids, NEW_TOKENS)
    ours, theirs = rt.logits(seq), ref.logits(seq)
    top1 = float(np.mean(ours.argmax(-1) == theirs.argmax(-1)))
    print(f"qnn w8a16 {shape}: top-1 {top1:.3f} over {len(seq)} positions")
    assert top1 >= 0.95
