"""The GGUF path: our Phi -> GGUF writer on the ``gguf`` package, run by llama.cpp through xllamacpp."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

pytest.importorskip("gguf")
pytest.importorskip("xllamacpp")

from phi_edge.exporter.export import run_export  # noqa: E402
from phi_edge.exporter.verify import VERIFY_PROMPT  # noqa: E402
from phi_edge.runtimes import load  # noqa: E402
from phi_edge.runtimes.errors import PhiEdgeError  # noqa: E402

pytestmark = pytest.mark.slow
TARGET = "ollama"


def test_fp32_greedy_text_matches_transformers(exported, reference):
    out = exported(TARGET, "fp32")
    rt, ref = load(out), reference("phi3")
    want = ref.generate_text(VERIFY_PROMPT, 32, stop_token_ids=sorted(rt.stop_token_ids))
    got = rt.generate(VERIFY_PROMPT, max_new_tokens=32, temperature=0)
    assert rt.encode(VERIFY_PROMPT) == ref.encode(VERIFY_PROMPT)
    assert got.token_ids == want.token_ids
    assert got.text == want.text
    # streaming gives the same text in pieces, and stopping early stops llama.cpp
    assert "".join(rt.stream(VERIFY_PROMPT, max_new_tokens=32, temperature=0)) == want.text
    assert len(rt.generate(VERIFY_PROMPT, max_new_tokens=3, temperature=0).token_ids) == 3


def test_manifest_and_tokenizer_probes(exported, checkpoint):
    from phi_edge.exporter.source_tokenizer import PROBES, SourceTokenizer

    out = exported(TARGET, "fp32")
    rt = load(out)
    m = rt.manifest
    assert m.format == "gguf" and (out / "model.gguf").is_file()
    assert m.verification["tokenizer"].startswith(f"all {len(PROBES)} probe texts")
    assert "match the checkpoint" in m.verification["gguf_readback"]
    src = SourceTokenizer(checkpoint("phi3"))
    for text in PROBES:
        assert rt.encode(text) == src.encode(text), text


# int4 is Q4_K_M; the fixture's hidden size 64 is not a multiple of 256, so its qkv falls back from Q5_K
# to Q5_1 and the output to Q8_0, while ffn_down (width 256) is a real Q4_K / Q6_K (tests/test_gguf_kquants.py)
@pytest.mark.parametrize("precision,body,qkv", [("int8", "Q8_0", "Q8_0"), ("int4", "Q4_K", "Q5_1")])
def test_quantized_load_and_generate(exported, precision, body, qkv):
    from gguf import GGUFReader

    out = exported(TARGET, precision)
    rt = load(out)
    assert rt.manifest.quantization["body"] == body
    types = {t.name: t.tensor_type.name for t in GGUFReader(str(out / "model.gguf")).tensors}
    assert types["blk.0.attn_qkv.weight"] == qkv and types["blk.0.attn_norm.weight"] == "F32"
    assert types["output.weight"] == "Q8_0"
    if precision == "int4":
        assert rt.manifest.quantization["scheme"] == "Q4_K_M"
        assert (types["blk.0.ffn_down.weight"], types["blk.1.ffn_down.weight"]) == ("Q4_K", "Q6_K")
        assert any(f.startswith("blk.0.attn_qkv.weight: row width 64") for f in rt.manifest.quantization["fallbacks"])
    r = rt.generate(VERIFY_PROMPT, max_new_tokens=8, temperature=0)
    assert len(r.token_ids) == 8 or r.finish_reason == "stop"
    a = rt.generate(VERIFY_PROMPT, max_new_tokens=8, temperature=0.9, seed=3).token_ids
    assert a == rt.generate(VERIFY_PROMPT, max_new_tokens=8, temperature=0.9, seed=3).token_ids


def test_readback_round_trip(exported, checkpoint):
    """Every tensor read back with gguf.GGUFReader and dequantized with gguf's dequantizer is the
    checkpoint's (exact at fp32, within a 4-bit step at int4); metadata says what llama.cpp needs."""
    from gguf import GGUFReader, quants
    from safetensors.numpy import load_file

    src = {}
    for f in sorted(checkpoint("phi3").glob("*.safetensors")):
        src.update(load_file(str(f)))
    for precision, tol in (("fp32", 0.0), ("int4", 1 / 7)):
        reader = GGUFReader(str(exported(TARGET, precision) / "model.gguf"))
        t = {x.name: x for x in reader.tensors}
        for name, gname in (("model.layers.1.self_attn.qkv_proj.weight", "blk.1.attn_qkv.weight"),
                            ("model.layers.0.mlp.gate_up_proj.weight", "blk.0.ffn_up.weight"),
                            ("model.embed_tokens.weight", "token_embd.weight")):
            want = src[name].astype(np.float32)
            got = quants.dequantize(t[gname].data, t[gname].tensor_type).reshape(want.shape)
            assert np.abs(got - want).max() <= tol * np.abs(want).max() + 1e-7, (precision, gname)
        fields = reader.fields
        assert bytes(fields["general.architecture"].parts[-1]).decode() == "phi3"
        assert "phi-3" in bytes(fields["general.name"].parts[-1]).decode().lower()
        assert bool(fields["tokenizer.ggml.add_bos_token"].parts[-1][0]) is True


def test_real_tokenizer_vectors(checkpoint, session_dir, real_tokenizer):
    from conftest import real_tokenizer_vectors

    ckpt = session_dir / "gguf-real-tokenizer-ckpt"
    if not ckpt.exists():
        shutil.copytree(checkpoint("phi3"), ckpt)
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            if (real_tokenizer / name).is_file():
                shutil.copy(real_tokenizer / name, ckpt / name)
    out = session_dir / "gguf-real-tokenizer"
    if not out.exists():
        run_export(str(ckpt), TARGET, out, precision="fp32", smoke_test=False)
    rt = load(out)
    vectors = real_tokenizer_vectors(real_tokenizer)
    assert len(vectors) == 47
    for text, expected in vectors:
        assert rt.encode(text) == [1] + expected, text
    assert rt.generate("Hi", max_new_tokens=4, temperature=0).token_ids


def test_truncated_file_is_a_clear_error(exported, session_dir):
    out = session_dir / "gguf-truncated"
    if not out.exists():
        shutil.copytree(exported(TARGET, "fp32"), out)
    data = (out / "model.gguf").read_bytes()
    (out / "model.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(PhiEdgeError):
        load(out)


def test_logits_match_transformers_and_llama_cpp(exported, reference):
    """logits(): llama.cpp's hidden states times the stored output matrix. fp32 equals transformers; at int4
    its distribution at the last position equals llama.cpp's own pre-sampling log-probabilities (top 20)."""
    rt, ref = load(exported(TARGET, "fp32")), reference("phi3")
    ids = ref.encode(VERIFY_PROMPT)
    # llama.cpp keeps its KV cache in f16, as when it generates: within 0.03 on this random-weight fixture
    np.testing.assert_allclose(rt.logits(ids), ref.logits(ids), atol=3e-2)
    assert "output matrix" in rt.logits_note
    q = load(exported(TARGET, "int4"))
    lp = q.logits(ids)[-1].astype(np.float64)
    lp -= lp.max() + np.log(np.exp(lp - lp.max()).sum())
    got: list = []
    q._server(q.context_length).handle_completions(
        {"prompt": ids, "n_predict": 1, "n_probs": 20, "post_sampling_probs": False, "temperature": 0.0,
         "samplers": ["top_k"], "top_k": 1}, lambda chunk: got.append(chunk) or False)
    top = got[-1]["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    theirs = {t["id"]: t["logprob"] for t in top}
    # llama.cpp's own matmul quantizes the activations to 8 bits against the Q8_0 output matrix, so near-ties
    # of this random-weight fixture may swap places; the values agree within 0.05 nats
    assert int(np.argmax(lp)) == next(iter(theirs)) and len(set(np.argsort(-lp)[:20]) & set(theirs)) >= 17
    np.testing.assert_allclose([lp[i] for i in theirs], list(theirs.values()), atol=0.05)


@pytest.mark.parametrize("family", ["phi4-mini", "phi3-128k"])
@pytest.mark.parametrize("long", [False, True])
def test_longrope_greedy_matches_transformers(exported, reference, family, long):
    """LongRoPE (original window 512 in both fixtures; Phi-4-mini adds partial rotary and tied embeddings):
    short factors in a 512-token context while the sequence fits, the long ones after a re-prefill past it."""
    rt, ref = load(exported(TARGET, "fp32", family=family)), reference(family)
    prompt = " ".join([VERIFY_PROMPT] * 32) if long else VERIFY_PROMPT
    ids = ref.encode(prompt)
    assert (len(ids) > 512) == long and (long or len(ids) + 24 < 512)
    assert rt.encode(prompt) == ids
    assert rt.generate(ids, max_new_tokens=24).token_ids == ref.greedy(ids, 24)


def test_phi4_mini_logits_on_both_sides_of_the_switch(exported, reference):
    """Tied embeddings (token_embd is the output matrix) and LongRoPE: short factors up to the original
    window, long ones past it, as transformers picks them from the sequence length."""
    rt, ref = load(exported(TARGET, "fp32", family="phi4-mini")), reference("phi4-mini")
    ids = ref.encode(" ".join([VERIFY_PROMPT] * 32))
    for n in (100, 530):  # logits up to about 20 here; the wrong factors would be off by whole units
        ours, theirs = rt.logits(ids[:n])[::8], ref.logits(ids[:n])[::8]  # every 8th position (200k vocab)
        np.testing.assert_allclose(ours, theirs, atol=0.3)
        assert np.mean(ours.argmax(-1) == theirs.argmax(-1)) >= 0.98


def test_phi4_mini_greedy_across_the_switch(exported, reference):
    rt, ref = load(exported(TARGET, "fp32", family="phi4-mini")), reference("phi4-mini")
    ids = ref.encode(" ".join([VERIFY_PROMPT] * 32))[:500]
    got, want = rt.generate(ids, max_new_tokens=24).token_ids, ref.greedy(ids, 24)
    # short factors up to a 511-token sequence; the token after exactly 512 comes from the long context
    # (llama.cpp's server keeps a context slot free), where transformers still uses the short factors
    assert got[:12] == want[:12] and len(got) == 24
