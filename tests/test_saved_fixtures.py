"""Checkpoints as transformers 5's save_pretrained writes them (exporter/fixtures/saved.py): they
reload, keep BOS without ``add_bos_token``, carry ``rope_parameters``, and phi-edge accepts them."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from phi_edge.exporter import checkpoint  # noqa: E402
from phi_edge.exporter.fixtures.saved import EOS_TOKEN_IDS, SAVED_SHAPES, write_saved_checkpoint  # noqa: E402

IDS = [s.name for s in SAVED_SHAPES]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("saved")
    return {s.name: write_saved_checkpoint(root / s.name, s) for s in SAVED_SHAPES}


def test_shapes_cover_what_they_promise():
    ratios = {s.num_attention_heads // s.num_key_value_heads for s in SAVED_SHAPES}
    assert len(ratios - {1}) >= 2, "GQA at more than one ratio"
    assert {1, 3} <= {s.num_hidden_layers for s in SAVED_SHAPES}
    assert any(s.hidden_size & (s.hidden_size - 1) for s in SAVED_SHAPES), "a hidden size that is not a power of two"
    assert all(s.head_dim % 16 == 0 and s.head_dim * s.num_attention_heads == s.hidden_size for s in SAVED_SHAPES)
    assert any(s.longrope for s in SAVED_SHAPES)


@pytest.mark.parametrize("name", IDS)
def test_reloads_with_auto_classes(saved, name):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    shape = next(s for s in SAVED_SHAPES if s.name == name)
    folder = saved[name]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert type(model).__name__ == "Phi3ForCausalLM"
    assert model.config.num_key_value_heads == shape.num_key_value_heads
    assert model.config.num_hidden_layers == shape.num_hidden_layers
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok("Hello world")["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    top2 = torch.topk(logits, 2).values
    assert float(top2[0] - top2[1]) > 1e-3, "the scaled lm_head gives a clear top-1"
    assert sum(f.stat().st_size for f in folder.iterdir()) < 16 * 2**20
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == EOS_TOKEN_IDS


@pytest.mark.parametrize("name", IDS)
def test_bos_comes_from_the_post_processor(saved, name):
    from transformers import AutoTokenizer

    folder = saved[name]
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert "add_bos_token" not in tok_config
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok("Hello world")["input_ids"]
    assert ids[0] == 1 and ids.count(1) == 1
    assert tok.eos_token_id == 32000
    assert "<|assistant|>" in tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                                      add_generation_prompt=True)


def test_longrope_config_as_transformers_writes_it(saved):
    shape = next(s for s in SAVED_SHAPES if s.longrope)
    config = json.loads((saved[shape.name] / "config.json").read_text())
    assert "rope_scaling" not in config and "rope_theta" not in config
    rope = config["rope_parameters"]
    assert rope["rope_type"] == "longrope"
    # what transformers 5.5 writes for a LongRoPE Phi-3:
    assert set(rope) >= {"rope_type", "rope_theta", "short_factor", "long_factor", "original_max_position_embeddings",
                         "partial_rotary_factor"}
    assert len(rope["short_factor"]) == len(rope["long_factor"]) == shape.head_dim // 2
    assert config["original_max_position_embeddings"] == 512 and config["max_position_embeddings"] == 16384
    assert config["dtype"] == shape.dtype and "torch_dtype" not in config


@pytest.mark.parametrize("name", IDS)
def test_phi_edge_accepts_and_classifies(saved, name):
    shape = next(s for s in SAVED_SHAPES if s.name == name)
    ckpt = checkpoint.validate(saved[name])
    assert ckpt.architecture == "Phi3ForCausalLM"
    assert ckpt.weight_format == "safetensors"
    assert ckpt.max_context == shape.max_position_embeddings
    # transformers 5 writes rope_parameters (rope_type longrope), never rope_scaling
    assert ckpt.family == shape.family
    assert checkpoint.family_of(json.loads((saved[name] / "config.json").read_text())) == shape.family
