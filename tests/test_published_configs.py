"""``plan`` on the published Phi configurations (their config.json values, no weights): every target either
fits at a stated context or refuses only where no context from 2048 up could fit, with a suggestion that works."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from phi_edge.exporter.cli import main as phi_export
from phi_edge.targets import all_targets

_COMMON = {"vocab_size": 32064, "bos_token_id": 1, "eos_token_id": 32000, "rms_norm_eps": 1e-05,
           "hidden_act": "silu", "rope_theta": 10000.0, "tie_word_embeddings": False}


def _longrope(rot: int, mscale: bool = False) -> dict:
    rope = {"type": "longrope", "short_factor": [1.0] * rot, "long_factor": [1.5] * rot}
    if mscale:
        rope.update(short_mscale=1.243163121016122, long_mscale=1.243163121016122)
    return rope


def _mini(max_pos: int, rope) -> dict:
    return {**_COMMON, "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_size": 3072,
            "intermediate_size": 8192, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
            "max_position_embeddings": max_pos, "original_max_position_embeddings": 4096, "rope_scaling": rope,
            "sliding_window": 2047 if max_pos == 4096 else 262144}


def _medium(max_pos: int, rope) -> dict:
    return {**_COMMON, "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_size": 5120,
            "intermediate_size": 17920, "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 10,
            "max_position_embeddings": max_pos, "original_max_position_embeddings": 4096, "rope_scaling": rope,
            "sliding_window": 2047 if max_pos == 4096 else 131072}


PUBLISHED = {
    "Phi-3-mini-4k-instruct": _mini(4096, None),
    "Phi-3-mini-128k-instruct": _mini(131072, _longrope(48)),
    "Phi-3.5-mini-instruct": _mini(131072, _longrope(48)),
    "Phi-3-medium-4k-instruct": _medium(4096, None),
    "Phi-3-medium-128k-instruct": _medium(131072, _longrope(64)),
    "Phi-3.5-MoE-instruct": {**_COMMON, "architectures": ["PhiMoEForCausalLM"], "model_type": "phimoe",
                             "hidden_size": 4096, "intermediate_size": 6400, "num_hidden_layers": 32,
                             "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 16,
                             "num_experts_per_tok": 2, "attention_bias": True, "lm_head_bias": True,
                             "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
                             "rope_scaling": _longrope(64, mscale=True), "sliding_window": 131072},
    "Phi-4-mini-instruct": {**_COMMON, "architectures": ["Phi3ForCausalLM"], "model_type": "phi3",
                            "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
                            "num_attention_heads": 24, "num_key_value_heads": 8, "partial_rotary_factor": 0.75,
                            "vocab_size": 200064, "tie_word_embeddings": True, "max_position_embeddings": 131072,
                            "original_max_position_embeddings": 4096, "rope_scaling": _longrope(48),
                            "sliding_window": 262144, "bos_token_id": 199999, "eos_token_id": 199999},
}
TARGETS = [t.name for t in all_targets()]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("published")
    out = {}
    for name, cfg in PUBLISHED.items():
        (base / name).mkdir()
        (base / name / "config.json").write_text(json.dumps(cfg))
        out[name] = base / name
    return out


def plan(folder, target, *extra):
    r = CliRunner().invoke(phi_export, ["plan", str(folder), "--target", target, "--json", *extra])
    return r, json.loads(r.stdout)


@pytest.mark.parametrize("model", list(PUBLISHED))
@pytest.mark.parametrize("target", TARGETS)
def test_default_plan_fits_at_a_stated_context_or_refuses_usefully(folders, model, target):
    r, p = plan(folders[model], target)
    if "refused" in p and "Phi-3.5-MoE" in p["refused"]:
        assert r.exit_code == 1  # MoE on a target that cannot run it: said up front (tested elsewhere)
        return
    cap = next(t.context_length for t in all_targets() if t.name == target)
    if p["fits"]:
        # the QNN target's static window is capped by design (512): the cap is the stated context there
        assert r.exit_code == 0 and p["context_length"] >= min(2048, cap or 2048), p
        assert p["context_note"].startswith(f"context {p['context_length']}")
        if p["context_length"] < PUBLISHED[model]["max_position_embeddings"]:
            assert "pass --context-length" in p["context_note"]
        return
    # refused: nothing from 2048 up fits, and the suggestion works where it can
    assert r.exit_code == 1 and p["context_length"] == min(2048, cap or 2048), p
    assert "int4" in p["refused"] or "smaller model" in p["refused"]
    if p["precision"] != "int4" and "int4" in [t.precisions for t in all_targets() if t.name == target][0]:
        r4, p4 = plan(folders[model], target, "--precision", "int4")
        assert p4["fits"] or "smaller model" in p4["refused"]


def test_the_mac_users_first_command_plans_a_context_that_fits(folders):
    """Phi-3.5-mini at int4 on a 16 GB Mac: the full 128k KV cache would be 48 GiB; a context that fits is chosen."""
    r, p = plan(folders["Phi-3.5-mini-instruct"], "apple-silicon", "--int4")
    assert r.exit_code == 0 and p["fits"]
    assert 2048 <= p["context_length"] < 131072
    assert p["context_note"] == (f"context {p['context_length']} of 131072: chosen to fit 16.0 GiB; "
                                 f"pass --context-length to change")
    r2, p2 = plan(folders["Phi-3.5-mini-instruct"], "apple-silicon", "--int4", "--context-length",
                  str(p["context_length"] * 2))
    assert not p2["fits"]  # the next power of two would not have fitted


def test_kv_cache_precision_follows_the_backend(folders):
    cfg = folders["Phi-3-mini-4k-instruct"]
    widths = {t: plan(cfg, t, "--context-length", "4096")[1]["kv_cache_dtype_bytes"]
              for t in ("cpu", "cuda", "intel-cpu", "intel-gpu", "intel-npu", "apple-silicon", "qualcomm-npu")}
    assert widths == {"cpu": 4, "cuda": 2, "intel-cpu": 1, "intel-gpu": 2, "intel-npu": 2, "apple-silicon": 2,
                      "qualcomm-npu": 2}
