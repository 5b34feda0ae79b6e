"""A tiny random native ``phi4_multimodal`` checkpoint (transformers 5's Phi4MultimodalForCausalLM) for tests.

Real vision geometry (448-pixel crops, 14-pixel patches, the 200010 image token) at a width that
exports in seconds; the audio tower is the smallest transformers builds (phi-edge drops it). Like the hub's
native revision it carries ``vision-lora/`` and ``speech-lora/`` PEFT adapters (random, non-zero).
"""

from __future__ import annotations

import json
from pathlib import Path

from ...fixtures import tokenizer as demo_tokenizer

IMAGE_TOKEN_ID = 200010
AUDIO_TOKEN_ID = 200011
LORA_TARGETS = r"model.layers.\d+.((self_attn.(qkv|o)_proj)|(mlp.(gate_up|down)_proj))"  # the conversion script's
PHI4MM_SPECIAL = {**demo_tokenizer.PHI4_SPECIAL, "<|endoftext10|>": IMAGE_TOKEN_ID,
                  "<|endoftext11|>": AUDIO_TOKEN_ID}


def tiny_config() -> dict:
    """transformers' Phi4MultimodalConfig keyword arguments for the tiny model."""
    return dict(
        vocab_size=200064, hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=8192, original_max_position_embeddings=8192,
        rope_parameters={"rope_theta": 10000.0, "partial_rotary_factor": 1.0, "rope_type": "default"},
        bos_token_id=199999, eos_token_id=[199999, 200020], pad_token_id=199999, tie_word_embeddings=False,
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=448, patch_size=14, crop_size=448, image_token_id=IMAGE_TOKEN_ID,
                           feature_layer=-2),
        audio_config=dict(hidden_size=32, intermediate_size=32, num_blocks=1, num_attention_heads=2,
                          ext_pw_out_channel=32, depthwise_separable_out_channel=32, nemo_conv_channels=32,
                          audio_token_id=AUDIO_TOKEN_ID),
    )


def write_tiny_phi4mm(folder: str | Path, seed: int = 1234, adapters: bool = True) -> Path:
    """Config, safetensors, a Phi-4 byte-level tokenizer (with the image/audio tokens) and (``adapters``) the
    vision and speech LoRA folders in ``folder``."""
    import torch
    from transformers import Phi4MultimodalConfig, Phi4MultimodalForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = Phi4MultimodalConfig(**tiny_config())
    model = Phi4MultimodalForCausalLM(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a wide spread, so greedy decoding has clear winners (as the text fixtures)
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "audio" not in name:
                std = 1.0 if "embed_tokens.weight" in name else 1.6 / p.shape[-1] ** 0.5
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif p.dim() >= 2 or "extensor" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    model.save_pretrained(folder)
    if adapters:
        write_tiny_lora(folder / "vision-lora", model, rank=8, alpha=16, dropout=0.0, seed=seed + 1)
        write_tiny_lora(folder / "speech-lora", model, rank=4, alpha=8, dropout=0.01, seed=seed + 2)
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 199999, "eos_token_id": [200020, 199999], "pad_token_id": 199999}, indent=2) + "\n")
    spec = demo_tokenizer.build_bytelevel_tokenizer_json(200064, PHI4MM_SPECIAL)
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    tok_config = {
        "add_bos_token": False, "add_eos_token": False, "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "model_max_length": 8192,
        "clean_up_tokenization_spaces": False, "tokenizer_class": "GPT2Tokenizer",
        "chat_template": demo_tokenizer.PHI4_CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    return folder


def write_tiny_lora(folder: Path, model, rank: int, alpha: int, dropout: float, seed: int) -> Path:
    """A PEFT LoRA adapter folder as transformers' convert_phi4_multimodal_weights_to_hf.py writes it (keys
    without PEFT's ``base_model.model.`` prefix), random with B != 0 so it changes the model's answers."""
    import re

    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in model.named_modules():
        if re.fullmatch(LORA_TARGETS, name) and isinstance(module, torch.nn.Linear):
            n_in, n_out = module.in_features, module.out_features
            tensors[f"{name}.lora_A.weight"] = torch.randn(rank, n_in, generator=g) / n_in ** 0.5
            tensors[f"{name}.lora_B.weight"] = torch.randn(n_out, rank, generator=g) * 0.5 / rank ** 0.5
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": dropout,
              "target_modules": LORA_TARGETS, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
              "use_dora": False, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
              "init_lora_weights": True, "layers_to_transform": None, "base_model_name_or_path": None}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder
