"""The MLX path on MLX's Linux CPU build: mlx-lm export, the mlx runtime, agreement with transformers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("mlx_lm")

from phi_edge.exporter.export import run_export  # noqa: E402
from phi_edge.exporter.verify import VERIFY_PROMPT  # noqa: E402
from phi_edge.runtimes import load  # noqa: E402
from phi_edge.runtimes.errors import PhiEdgeError  # noqa: E402

pytestmark = pytest.mark.slow
TARGET = "apple-silicon"
LONG_TEXT = " ".join([VERIFY_PROMPT] * 32)  # about 640 tokens: past the 128k fixtures' original 512


@pytest.mark.parametrize("family", ["phi3", "phi3-128k", "phimoe"])
def test_fp32_greedy_matches_transformers(exported, reference, family):
    rt, ref = load(exported(TARGET, "fp32", family=family)), reference(family)
    ids = ref.encode(VERIFY_PROMPT)
    assert rt.encode(VERIFY_PROMPT) == ids and ids[0] == 1
    assert rt.generate(ids, max_new_tokens=32).token_ids == ref.greedy(ids, 32)


@pytest.mark.parametrize("family", ["phi3-128k", "phimoe"])
def test_fp32_long_prompt_uses_long_rope_like_transformers(exported, reference, family):
    rt, ref = load(exported(TARGET, "fp32", family=family)), reference(family)
    ids = ref.encode(LONG_TEXT)
    assert 512 < len(ids) < 1024
    assert rt.encode(LONG_TEXT) == ids
    assert rt.generate(ids, max_new_tokens=32).token_ids == ref.greedy(ids, 32)


def test_crossing_the_original_context_recomputes_like_a_full_forward(exported, reference):
    """Generation that crosses 512 tokens: every token is what transformers' own forward pass over
    the sequence so far picks (its generate() drops the cache there and forgets the context)."""
    rt, ref = load(exported(TARGET, "fp32", family="phi3-128k")), reference("phi3-128k")
    ids = ref.encode(LONG_TEXT)[:500]
    ours = rt.generate(ids, max_new_tokens=24).token_ids
    assert len(ours) == 24
    expected = [int(ref.logits(ids + ours[:k])[-1].argmax()) for k in range(len(ours))]
    assert ours == expected


def test_logits_match_transformers(exported, reference):
    rt, ref = load(exported(TARGET, "fp32", family="phimoe")), reference("phimoe")
    ids = ref.encode(LONG_TEXT)[:600]
    ours, theirs = rt.logits(ids), ref.logits(ids)
    assert ours.dtype == np.float32 and ours.shape == theirs.shape == (600, 32064)
    np.testing.assert_allclose(ours, theirs, atol=2e-3)


@pytest.mark.parametrize("precision,bits", [("int4", 4), ("int8", 8)])
def test_quantized_loads_and_generates(exported, precision, bits):
    folder = exported(TARGET, precision, family="phi3")
    config = json.loads((folder / "config.json").read_text())
    q = config["quantization"]
    assert (q["bits"], q["group_size"], q["mode"]) == (bits, 64, "affine")
    rt = load(folder)
    assert rt.manifest.quantization["bits"] == bits
    assert rt._model.lm_head.bits == 8  # the target's default: lm_head at 8 bits
    result = rt.generate("Hello", max_new_tokens=12)
    assert len(result.token_ids) == 12 and result.text.strip()
    assert type(rt._model.model.layers[0].self_attn.qkv_proj).__name__ == "QuantizedLinear"


def test_verify_against_reports_agreement_and_cosine(exported, checkpoint):
    from click.testing import CliRunner

    from phi_edge.exporter.cli import main

    def verify(precision):
        # random tiny weights: int4 agrees on ~25% of top-1 picks, below the int4 default bar
        loose = ["--min-cosine", "0.8", "--min-top1", "0"] if precision == "int4" else []
        out = CliRunner().invoke(main, ["verify", str(exported(TARGET, precision, family="phi3")),
                                        "--against", str(checkpoint("phi3")), "--json", *loose])
        assert out.exit_code == 0, out.output
        return json.loads(out.output)["against"]

    fp32, q8, q4 = verify("fp32"), verify("int8"), verify("int4")
    assert fp32["tokenizer_agrees"] and fp32["greedy_tokens_equal"] and fp32["top1_agreement"] == 1.0
    assert fp32["logit_cosine_min"] > 0.99999
    assert q8["tokenizer_agrees"] and q8["top1_agreement"] > 0.8 and q8["logit_cosine_mean"] > 0.99
    assert q4["tokenizer_agrees"] and 0.8 < q4["logit_cosine_mean"] < q8["logit_cosine_mean"]


def test_mixed_precision_per_layer(exported, reference):
    folder = exported(TARGET, "int4", family="phi3", group_size=32, int8_layers="down_proj", embeddings="int8",
                      lm_head="fp")
    q = json.loads((folder / "config.json").read_text())["quantization"]
    assert (q["bits"], q["group_size"]) == (4, 32)
    assert q["model.layers.0.mlp.down_proj"] == q["model.embed_tokens"] == {"group_size": 32, "bits": 8,
                                                                             "mode": "affine"}
    assert "model.layers.0.self_attn.qkv_proj" not in q  # the body: the default 4 bits
    rt = load(folder)
    assert rt.manifest.quantization["kept_float"] == []  # 160-wide down_proj fits groups of 32
    layer = rt._model.model.layers[1]
    assert (layer.mlp.down_proj.bits, layer.mlp.gate_up_proj.bits, rt._model.model.embed_tokens.bits) == (8, 4, 8)
    assert type(rt._model.lm_head).__name__ == "Linear"
    ref = reference("phi3")
    ids = ref.encode(VERIFY_PROMPT)
    assert len(rt.generate(ids, max_new_tokens=8).token_ids) == 8
    # closer to the reference than the plain int4 export
    plain = load(exported(TARGET, "int4", family="phi3"))
    theirs = ref.logits(ids)
    assert _mean_cosine(rt.logits(ids), theirs) > _mean_cosine(plain.logits(ids), theirs) + 0.02


def _mean_cosine(a, b) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.mean(np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))))


def test_phimoe_int4_keeps_router_at_8_bits(exported):
    folder = exported(TARGET, "int4", family="phimoe")
    q = json.loads((folder / "config.json").read_text())["quantization"]
    assert q["model.layers.0.block_sparse_moe.gate"]["bits"] == 8
    rt = load(folder)
    experts = rt._model.model.layers[0].block_sparse_moe.switch_mlp.down_proj
    assert type(experts).__name__ == "QuantizedSwitchLinear" and experts.bits == 4
    assert len(rt.generate("Hello", max_new_tokens=8).token_ids) == 8


def test_sampling_seed_stream_and_stops(exported):
    rt = load(exported(TARGET, "fp32", family="phi3"))
    kw = dict(max_new_tokens=20, temperature=0.9, top_p=0.9, top_k=40, repetition_penalty=1.2)
    a, b = rt.generate("Hello", seed=7, **kw), rt.generate("Hello", seed=7, **kw)
    assert a.token_ids == b.token_ids
    assert rt.generate("Hello", seed=8, **kw).token_ids != a.token_ids
    greedy = rt.generate("Hello", max_new_tokens=20)
    result = rt.new_result()
    pieces = list(rt.stream("Hello", max_new_tokens=20, result=result))
    assert "".join(pieces) == result.text == greedy.text and len(pieces) > 1
    assert result.timings.generated_tokens == 20 and result.timings.decode_tokens_per_s > 0
    word = greedy.text.split()[2]
    cut = rt.generate("Hello", max_new_tokens=20, stop=[word])
    assert cut.finish_reason == "stop" and cut.text == greedy.text[:greedy.text.index(word)]
    # a stop token ends generation: make the first greedy token a stop token
    rt.stop_token_ids = frozenset({greedy.token_ids[0]})
    stopped = rt.generate("Hello", max_new_tokens=20)
    assert stopped.token_ids == [] and stopped.finish_reason == "stop"


def test_repetition_penalty_matches_transformers(exported, reference):
    import torch

    rt, ref = load(exported(TARGET, "fp32", family="phi3")), reference("phi3")
    ids, penalty = ref.encode(VERIFY_PROMPT), 0.5  # < 1 favours prompt tokens: greedy changes at once
    with torch.no_grad():
        theirs = ref.model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, repetition_penalty=penalty,
                                    eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    ours = rt.generate(ids, max_new_tokens=24, repetition_penalty=penalty).token_ids
    assert ours == theirs and ours != rt.generate(ids, max_new_tokens=24).token_ids


def test_real_tokenizer_and_chat_template(checkpoint, session_dir, real_tokenizer):
    from conftest import real_tokenizer_vectors
    from transformers import AutoTokenizer

    ckpt = session_dir / "mlx-real-tokenizer-ckpt"
    if not ckpt.exists():
        shutil.copytree(checkpoint("phi3"), ckpt)
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            shutil.copy(real_tokenizer / name, ckpt / name)
    out = session_dir / "mlx-real-tokenizer"
    if not out.exists():
        run_export(str(ckpt), TARGET, out, precision="fp32", smoke_test=False)
    rt, hf = load(out), AutoTokenizer.from_pretrained(str(ckpt))
    for text, expected in real_tokenizer_vectors(real_tokenizer):
        assert rt.encode(text) == [1] + expected == hf(text)["input_ids"], text
    ids = rt.encode(rt.chat_prompt([{"role": "user", "content": "Hi"}]))
    assert ids[:2] == [1, 32010] and ids[-1] == 32001 and 32007 in ids
    assert rt.decode(ids[1:]).startswith("<|user|>")


def test_runtime_imports_no_torch(exported):
    """As on a device with only phi-edge[mlx] installed: torch absent, the runtime loads and generates
    (mlx-lm imports transformers for the tokenizer; transformers imports torch whenever it is installed,
    so this machine's torch is hidden from the child process)."""
    folder = exported(TARGET, "fp32", family="phi3")
    script = f"""
import importlib.machinery, json, sys

class NoTorch(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] in ("torch", "torchvision", "torchgen", "functorch"):
            return None
        return super().find_spec(name, path, target)

sys.meta_path = [NoTorch if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
import phi_edge.runtimes
rt = phi_edge.runtimes.load({str(folder)!r})
ids = rt.generate("Hello there", max_new_tokens=8).token_ids
print(json.dumps({{"ids": ids, "torch": [m for m in sys.modules if m.partition(".")[0] == "torch"]}}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    child = json.loads(done.stdout.strip().splitlines()[-1])
    assert child["torch"] == []
    assert child["ids"] == load(folder).generate("Hello there", max_new_tokens=8).token_ids


def test_device_gpu_on_the_cpu_build_is_a_clear_error(exported):
    import mlx.core as mx

    if mx.is_available(mx.gpu):
        pytest.skip("this MLX has a GPU")
    folder = exported(TARGET, "fp32", family="phi3")
    with pytest.raises(PhiEdgeError, match="runs on the cpu only"):
        load(folder, device="gpu")
    assert load(folder).device == "cpu"


def _broken(checkpoint, session_dir, name, change):
    folder = session_dir / "mlx-broken" / name
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(checkpoint("phi3"), folder)
    config = json.loads((folder / "config.json").read_text())
    change(folder, config)
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


@pytest.mark.parametrize("precision,quant,message", [
    ("int4", {"group_size": 48}, "--group-size for mlx must be one of 32, 64, 128"),
    ("int4", {"group_size": 128}, "does not divide the model's hidden size 64"),
    ("fp16", {"lm_head": "int8"}, "quantization options need --precision int4 or int8"),
    ("int8", {"int8_layers": "down_proj"}, "--int8-layers keeps layers at 8 bits inside an int4 model"),
    ("int4", {"int8_layers": "down_prj"}, "no layer of this model; its layers are: down_proj, gate_up_proj"),
])
def test_option_errors(checkpoint, tmp_path, precision, quant, message):
    with pytest.raises(PhiEdgeError, match=message):
        run_export(str(checkpoint("phi3")), TARGET, tmp_path / "out", precision=precision, quant=quant)
    assert not (tmp_path / "out").exists()


def test_what_mlx_lm_cannot_convert(checkpoint, session_dir, tmp_path):
    def rope(folder, config):
        config["rope_scaling"] = {"type": "yarn", "factor": 4.0, "long_factor": [1.0]}

    def bin_weights(folder, config):
        for f in folder.glob("model*.safetensors*"):
            f.unlink()
        (folder / "pytorch_model.bin").write_bytes(b"\0")

    def quantized(folder, config):
        config["quantization_config"] = {"quant_method": "gptq", "bits": 4}

    cases = [(rope, "does not apply rope_scaling type 'yarn'"), (quantized, "already quantized \\(gptq\\)"),
             (bin_weights, "mlx-lm reads weights only from model\\*.safetensors")]
    for change, message in cases:
        ckpt = _broken(checkpoint, session_dir, change.__name__, change)
        with pytest.raises(PhiEdgeError, match=message):
            run_export(ckpt, TARGET, tmp_path / change.__name__, precision="fp32", allow_pickle=True)
