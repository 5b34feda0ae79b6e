"""The text decoder of a native ``phi4_multimodal`` checkpoint as a plain Phi-3 checkpoint folder.

onnxruntime-genai's builder knows the hub's remote-code ``Phi4MMForCausalLM`` (with its LoRA
layers), not transformers' native class; the native decoder is Phi-3's (same tensor names), so its tensors
are re-saved under a Phi3Config (the vision LoRA merged in, see lora_merge) and built as Phi-3 without the
embedding layer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from phi_edge.runtimes.errors import PhiEdgeError

TEXT_KEYS = ("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.")
PHI3_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "resid_pdrop", "embd_pdrop", "attention_dropout", "hidden_act",
               "max_position_embeddings", "original_max_position_embeddings", "initializer_range", "rms_norm_eps",
               "use_cache", "tie_word_embeddings", "rope_parameters", "rope_scaling", "rope_theta",
               "partial_rotary_factor", "bos_token_id", "eos_token_id", "pad_token_id", "sliding_window")


def phi3_config(config: dict[str, Any]) -> dict[str, Any]:
    text = {k: config[k] for k in PHI3_FIELDS if k in config}
    if not text.get("original_max_position_embeddings"):
        text["original_max_position_embeddings"] = text.get("max_position_embeddings", 4096)
    return {**text, "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "torch_dtype": config.get(
        "dtype") or config.get("torch_dtype") or "float32"}


def write_text_checkpoint(ckpt, folder: Path, lora=None) -> list[Path]:
    """Phi-3 ``config.json``, the decoder's tensors (shard by shard, so at most one source shard is in
    memory; vision and audio tensors left out; ``lora``, a lora_merge.VisionLora, merged into them) with an
    index, and the tokenizer files. Returns the shards."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    written, weight_map = [], {}
    for i, f in enumerate(ckpt.weight_files):
        with safe_open(str(f), "pt") as sf:
            tensors = {k: sf.get_tensor(k) for k in sf.keys() if k.startswith(TEXT_KEYS)}
        if not tensors:
            continue
        if lora is not None:
            lora.merge_into(tensors)
        out = folder / f"model-{i + 1:05d}.safetensors"
        save_file(tensors, str(out), metadata={"format": "pt"})
        weight_map.update({k: out.name for k in tensors})
        written.append(out)
        del tensors
    if lora is not None:
        lora.check_complete()
    if "model.embed_tokens.weight" not in weight_map:
        raise PhiEdgeError(f"{ckpt.path} has no model.embed_tokens.weight; is it a transformers-native "
                           f"phi4_multimodal checkpoint?")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(phi3_config(ckpt.config), indent=2) + "\n")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                 "generation_config.json", "chat_template.jinja", "tokenizer.model"):
        if (ckpt.path / name).is_file():
            shutil.copy2(ckpt.path / name, folder / name)
    return written
