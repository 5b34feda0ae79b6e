"""Tiny deterministic Phi checkpoints: the built-in ``demo`` model and the test fixtures.

Each family mirrors its real repository's ``config.json`` (architecture names, rope fields,
LongRoPE factors, MoE routing, partial rotary, tied embeddings) at a size that exports in seconds.
Weights are random from a fixed seed; the tokenizer is :mod:`demo_tokenizer`'s.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from phi_edge.runtimes.errors import PhiEdgeError

from . import demo_tokenizer

FAMILIES = ("phi3", "phi3-128k", "phimoe", "phi4-mini")
FIXTURE_VERSION = 3  # bump when the fixtures change, so cached copies are rebuilt
SEED = 1234

_COMMON = {
    "attention_dropout": 0.0, "bos_token_id": 1, "embd_pdrop": 0.0, "eos_token_id": 32000,
    "hidden_act": "silu", "initializer_range": 0.02, "pad_token_id": 32000, "resid_pdrop": 0.0,
    "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "torch_dtype": "float32", "use_cache": True,
    "vocab_size": 32064,
}


def _factors(n: int, low: float, high: float) -> list[float]:
    return [round(low + (high - low) * (i / (n - 1)) ** 2, 4) for i in range(n)]


def family_config(family: str) -> dict:
    """``config.json`` for a tiny checkpoint shaped like the real ``family``."""
    if family == "phi3":  # microsoft/Phi-3-mini-4k-instruct
        return {**_COMMON, "architectures": ["Phi3ForCausalLM"], "model_type": "phi3",
                "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 4096,
                "original_max_position_embeddings": 4096, "rope_scaling": None, "sliding_window": 2047,
                "tie_word_embeddings": False}
    if family == "phi3-128k":  # microsoft/Phi-3.5-mini-instruct, LongRoPE; contexts scaled down 8x
        half = 16 // 2
        return {**_COMMON, "architectures": ["Phi3ForCausalLM"], "model_type": "phi3",
                "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 16384,
                "original_max_position_embeddings": 512, "sliding_window": 262144,
                "rope_scaling": {"type": "longrope", "short_factor": _factors(half, 1.0, 1.2),
                                 "long_factor": _factors(half, 1.0, 24.0)},
                "tie_word_embeddings": False}
    if family == "phimoe":  # microsoft/Phi-3.5-MoE-instruct: 16 experts top-2 -> 4 experts top-2
        half = 16 // 2
        return {**_COMMON, "architectures": ["PhiMoEForCausalLM"], "model_type": "phimoe",
                "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4,
                "num_experts_per_tok": 2, "router_jitter_noise": 0.01, "input_jitter_noise": 0.01,
                "router_aux_loss_coef": 0.0, "output_router_logits": False, "attention_bias": True,
                "lm_head_bias": True, "max_position_embeddings": 16384, "original_max_position_embeddings": 512,
                "sliding_window": 16384,
                "rope_scaling": {"type": "longrope", "short_factor": _factors(half, 1.0, 1.2),
                                 "long_factor": _factors(half, 1.0, 24.0),
                                 "short_mscale": 1.243163121016122, "long_mscale": 1.243163121016122,
                                 "original_max_position_embeddings": 512},
                "tie_word_embeddings": False}
    if family == "phi4-mini":  # microsoft/Phi-4-mini-instruct: GQA, partial rotary 0.75, tied embeddings
        # head_dim 64 is the smallest whose rotary half (24) meets ORT's multiple-of-8 rule, as 128 does
        head_dim = 64
        rot = int(head_dim * 0.75) // 2
        return {**_COMMON, "architectures": ["Phi3ForCausalLM"], "model_type": "phi3",
                "hidden_size": 2 * head_dim, "intermediate_size": 256, "num_hidden_layers": 2,
                "num_attention_heads": 2, "num_key_value_heads": 1, "partial_rotary_factor": 0.75,
                "max_position_embeddings": 16384, "original_max_position_embeddings": 512,
                "sliding_window": 262144, "rope_scaling": {"type": "longrope",
                                                          "short_factor": _factors(rot, 1.0, 1.2),
                                                          "long_factor": _factors(rot, 1.0, 24.0)},
                "tie_word_embeddings": True, "vocab_size": 200064, "bos_token_id": 199999,
                "eos_token_id": 199999, "pad_token_id": 199999}
    raise PhiEdgeError(f"unknown demo family '{family}'; choose one of {', '.join(FAMILIES)}")


def _generation_config(family: str) -> dict:
    if family == "phi4-mini":
        return {"bos_token_id": 199999, "eos_token_id": [200020, 199999], "pad_token_id": 199999}
    return {"bos_token_id": 1, "eos_token_id": [32007, 32001, 32000], "pad_token_id": 32000}


def _scale_weights(model, seed: int) -> None:
    """Wider weight spread than the default init, so next-token logits have clear winners and
    greedy decoding is not decided by float rounding on near-ties."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                fan_in = p.shape[-1]
                std = 1.0 if "embed" in name else 1.6 / fan_in**0.5
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif "bias" in name:
                p.zero_()


def write_checkpoint(folder: str | Path, family: str = "phi3", seed: int = SEED, shards: int = 2) -> Path:
    """Write a tiny ``family`` checkpoint (config, safetensors shards + index, tokenizer) to ``folder``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config_dict = family_config(family)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    hf_config = AutoConfig.for_model(**{k: v for k, v in config_dict.items() if k != "architectures"})
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    _scale_weights(model, seed)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(folder, max_shard_size=max(size // shards + 1, 1 << 16))
    # save_pretrained writes transformers' own field names and class name; the real repositories'
    # config.json is what the export tools key off, so write that instead.
    (folder / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")
    (folder / "generation_config.json").write_text(json.dumps(_generation_config(family), indent=2) + "\n")
    if family == "phi4-mini":
        demo_tokenizer.write_tokenizer(folder, vocab_size=200064, special=demo_tokenizer.PHI4_SPECIAL,
                                       model_max_length=config_dict["max_position_embeddings"], add_bos=False)
    else:
        demo_tokenizer.write_tokenizer(folder, model_max_length=config_dict["max_position_embeddings"])
    (folder / "README.md").write_text(
        f"# phi-edge demo checkpoint: {family}\n\nRandom weights (seed {seed}) in the shape of the real "
        f"{family} family, for tests and demos. It generates fluent-looking nonsense.\n")
    return folder


def cache_root() -> Path:
    base = os.environ.get("PHI_EDGE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "phi-edge")
    return Path(base)


def demo_checkpoint(family: str = "phi3") -> Path:
    """The built-in demo checkpoint for ``family``, built once into the cache and reused."""
    family_config(family)  # validates the name
    folder = cache_root() / f"demo-{family}-v{FIXTURE_VERSION}"
    if (folder / ".complete").exists():
        return folder
    import shutil
    import tempfile

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".demo-{family}-", dir=folder.parent))
    from .progress import tool_output_to_log

    try:
        with tool_output_to_log("building the demo checkpoint"):
            write_checkpoint(tmp, family)
        (tmp / ".complete").write_text("")
        try:
            tmp.rename(folder)
        except OSError:  # another process built it first
            if not (folder / ".complete").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
