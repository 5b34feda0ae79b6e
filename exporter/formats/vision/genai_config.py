"""genai_config.json's ``phi4mm`` sections and the image processor config onnxruntime-genai reads.

onnxruntime-genai 0.18's ``phi4mm`` pipeline runs vision.onnx on the processor's tensors
(pixel_values, image_sizes, image_attention_mask), embedding.onnx on the prompt ids (each
``<|image_N|>`` expanded to its token count as 200010) and the builder's decoder on inputs_embeds.
Speech is left empty: the pipeline then loads vision-only.
"""

from __future__ import annotations

import json
from pathlib import Path

VISION_FILE = "vision.onnx"
EMBEDDING_FILE = "embedding.onnx"
PROCESSOR_FILE = "vision_processor.json"
MAX_CROPS = 36  # transformers' Phi4MultimodalImageProcessor.dynamic_hd


def processor_config(crop_size: int, mean, std, max_crops: int = MAX_CROPS) -> dict:
    """onnxruntime-extensions' Phi-4 image pipeline: decode → dynamic HD crop grid → rescale →
    normalize → crops, global view, masks and token counts."""
    def op(name, kind, attrs=None, inputs=None):
        body = {"name": name, "type": kind}
        if attrs:
            body["attrs"] = attrs
        if inputs:
            body["inputs"] = inputs
        return {"operation": body}

    return {"processor": {"name": "phi_4_image_processor", "transforms": [
        op("decode_image", "DecodeImage", {"color_space": "RGB"}),
        op("phi4_vision_dynamic_preprocess", "Phi4VisionDynamicPreprocess",
           {"dynamic_hd": max_crops, "dyhd_base_resolution": crop_size}),
        op("rescale", "Rescale", inputs=[":0"]),
        op("normalize", "Normalize", {"mean": list(mean), "std": list(std)}),
        op("phi4_vision_processor", "Phi4VisionProcessor", {"dyhd_base_resolution": crop_size},
           inputs=[":0", "phi4_vision_dynamic_preprocess:1"]),
    ]}}


def make_phi4mm(out: Path, image_token_id: int, crop_size: int, mean, std) -> None:
    """Turn the builder's text genai_config.json into the phi4mm pipeline's and write the processor config."""
    path = out / "genai_config.json"
    cfg = json.loads(path.read_text())
    model = cfg["model"]
    model["type"] = "phi4mm"
    model["image_token_id"] = image_token_id
    model["vision"] = {
        "filename": VISION_FILE, "config_filename": PROCESSOR_FILE,
        "inputs": {"pixel_values": "pixel_values", "attention_mask": "image_attention_mask",
                   "image_sizes": "image_sizes"},
        "outputs": {"image_features": "image_features"},
    }
    model["embedding"] = {
        "filename": EMBEDDING_FILE,
        "inputs": {"input_ids": "input_ids", "image_features": "image_features"},
        "outputs": {"inputs_embeds": "inputs_embeds"},
    }
    model["speech"] = {"filename": "", "config_filename": ""}
    path.write_text(json.dumps(cfg, indent=4) + "\n")
    (out / PROCESSOR_FILE).write_text(json.dumps(processor_config(crop_size, mean, std), indent=4) + "\n")
