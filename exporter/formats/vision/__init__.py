"""Phi-4-multimodal (transformers' native ``phi4_multimodal``) for ONNX Runtime GenAI: vision input.

The builder writes the text decoder (``exclude_embeds``) from a Phi-3 view of the checkpoint; we
export the vision encoder and the embedding-merge model with torch.onnx and write the ``phi4mm``
genai_config.json sections and the image processor config. A ``vision-lora/`` adapter is merged into the
decoder (always on, as in onnxruntime-genai's own Phi-4-MM export). Audio (and ``speech-lora/``) is not exported.
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Iterator

MODEL_TYPE = "phi4_multimodal"
IMAGE_MEAN = IMAGE_STD = (0.5, 0.5, 0.5)  # transformers' Phi4MultimodalImageProcessor


# Why each other format refuses Phi-4-multimodal (checked against our pins, not guessed)
REFUSALS = {
    "openvino": "optimum-intel 2.2 (our pin) exports Phi vision-language models only with transformers <= 4.53, "
                "and phi-edge runs transformers 5.5",
    "mlx": "mlx-vlm 0.6.4 matches our mlx-lm 0.31 / transformers 5.5 pins but has no phi4_multimodal model "
           "(only Phi-3.5-vision's phi3_v), and phi-edge does not drive mlx-vlm yet",
    "gguf": "phi-edge writes no llama.cpp vision projector (mmproj) for Phi-4-multimodal",
    "qnn": "the QNN path builds static text graphs only",
    "coreml": "the Core ML path converts the text decoder only",
}


def is_multimodal(config: dict) -> bool:
    return config.get("model_type") == MODEL_TYPE


def format_refusal(config: dict, fmt: str) -> str | None:
    """The one-line refusal for exporting a Phi-4-multimodal checkpoint to ``fmt`` (None for onnx-genai)."""
    if not is_multimodal(config) or fmt == "onnx-genai":
        return None
    why = REFUSALS.get(fmt, "phi-edge exports its vision parts for onnx-genai only")
    return (f"Phi-4-multimodal exports for onnx-genai targets only (cpu, rpi5, android, cuda), not {fmt}: {why}; "
            f"pass --target cpu|rpi5|android|cuda")


def check_geometry(config: dict) -> None:
    """onnxruntime-genai 0.18's phi4mm processor fixes the image token (200010) and 14-pixel patches."""
    from phi_edge.runtimes.errors import PhiEdgeError

    v = config.get("vision_config") or {}
    if int(v.get("image_token_id", 200010)) != 200010 or int(v.get("patch_size", 14)) != 14:
        raise PhiEdgeError(f"this Phi-4-multimodal config has image token {v.get('image_token_id')} and patch size "
                           f"{v.get('patch_size')}; onnxruntime-genai 0.18's phi4mm processor fixes them at 200010 "
                           f"and 14, so it could not feed this model")


def extra_bytes(config: dict, precision: str, float_bytes: int) -> int:
    """What a phi4mm artifact holds beyond the text estimate: the fp32 vision.onnx, and (below fp32) the
    embedding table stored at fp16 in embedding.onnx instead of at the decoder's float width."""
    from ...sizing import param_counts

    c = param_counts(config)
    if not c.vision:
        return 0
    table = -c.embeddings * (float_bytes - 2) if precision != "fp32" else 0
    return 4 * c.vision + table


def export_phi4mm(ckpt, target, opts, out: Path, steps, export_text):
    """Decoder via ``export_text`` (the onnx-genai format's export) on the Phi-3 view, then the vision parts."""
    import torch

    from . import genai_config, lora_merge, onnx_export, text_checkpoint

    check_geometry(ckpt.config)
    lora = lora_merge.find(ckpt.path, ckpt.weight_files)  # checked against the weights before anything is written
    view = out / ".phi3-text-view"
    try:
        label = " (vision LoRA merged)" if lora else ""
        with steps.step(f"Writing the text decoder's tensors as a Phi-3 checkpoint{label}"):
            shards = text_checkpoint.write_text_checkpoint(ckpt, view, lora)
        text_ckpt = replace(ckpt, path=view, config=text_checkpoint.phi3_config(ckpt.config),
                            weight_files=shards, architecture="Phi3ForCausalLM")
        with _exclude_embeds():
            result = export_text(text_ckpt, target, opts, out, steps)
    finally:
        shutil.rmtree(view, ignore_errors=True)
    vision_cfg = ckpt.config.get("vision_config") or {}
    token = int(vision_cfg.get("image_token_id", 200010))
    io_dtype = _decoder_input_dtype(out / "model.onnx")
    with steps.step("Exporting the vision encoder (fp32) with torch.onnx"):
        image_embed = onnx_export.load_image_embed(ckpt.path, ckpt.weight_files)
        onnx_export.export_vision(image_embed, out / genai_config.VISION_FILE)
        crop = int(image_embed.crop_size)
        del image_embed
    with steps.step("Exporting the embedding-merge model with torch.onnx"):
        table = torch.float32 if opts.precision == "fp32" else torch.float16
        onnx_export.export_embedding(ckpt.weight_files, token, out / genai_config.EMBEDDING_FILE, table, io_dtype)
    genai_config.make_phi4mm(out, token, crop, IMAGE_MEAN, IMAGE_STD)
    result.runtime = {**result.runtime, "vision": {"type": "phi4mm", "image_token_id": token,
                                                  "vision_precision": "fp32",
                                                  **lora_merge.manifest_entry(ckpt.path, lora)}}
    result.notes = (list(result.notes) + ["vision: Phi-4-multimodal image input; audio is not exported"]
                    + lora_merge.notes(ckpt.path, lora))
    return result


def _decoder_input_dtype(model_path: Path):
    import onnx
    import torch

    model = onnx.load(str(model_path), load_external_data=False)
    for inp in model.graph.input:
        if inp.name == "inputs_embeds":
            return {onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.FLOAT16: torch.float16,
                    onnx.TensorProto.BFLOAT16: torch.bfloat16}[inp.type.tensor_type.elem_type]
    from phi_edge.runtimes.errors import PhiEdgeError

    raise PhiEdgeError("the builder's decoder takes no inputs_embeds; its embedding layer was not excluded")


@contextlib.contextmanager
def _exclude_embeds() -> Iterator[None]:
    """Add ``exclude_embeds=true`` to the builder's extra options for one export."""
    from onnxruntime_genai.models import builder

    original = builder.parse_extra_options

    def parse(*args):
        args = list(args)
        args[-1] = list(args[-1] or []) + ["exclude_embeds=true"]
        return original(*args)

    builder.parse_extra_options = parse
    try:
        yield
    finally:
        builder.parse_extra_options = original
