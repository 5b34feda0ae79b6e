"""torch.onnx exports of Phi-4-multimodal's vision encoder and embedding-merge models.

Weights are read by prefix from the checkpoint's safetensors, so only the vision tower and the
embedding table are ever in memory (never the whole multimodal model).
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

VISION_PREFIX = "model.embed_tokens_extend.image_embed."
EMBED_KEY = "model.embed_tokens.weight"
OPSET = 17


def read_prefixed(weight_files, prefix: str) -> dict:
    from safetensors import safe_open

    out = {}
    for f in weight_files:
        with safe_open(str(f), "pt") as sf:
            for key in sf.keys():
                if key.startswith(prefix):
                    out[key[len(prefix):]] = sf.get_tensor(key)
    return out


def load_image_embed(ckpt_path: Path, weight_files):
    """transformers' own Phi4MultimodalImageEmbedding with the checkpoint's weights, fp32, eager attention."""
    import torch
    from transformers import Phi4MultimodalConfig
    from transformers.models.phi4_multimodal.modeling_phi4_multimodal import Phi4MultimodalImageEmbedding

    config = Phi4MultimodalConfig.from_pretrained(str(ckpt_path))
    config._attn_implementation = "eager"
    config.vision_config._attn_implementation = "eager"
    with torch.device("meta"):
        module = Phi4MultimodalImageEmbedding(config)
    state = {k: v.to(torch.float32) for k, v in read_prefixed(weight_files, VISION_PREFIX).items()}
    module.load_state_dict(state, strict=False, assign=True)
    missing = [n for n, p in module.named_parameters() if p.is_meta]
    if missing:
        from phi_edge.runtimes.errors import PhiEdgeError

        raise PhiEdgeError(f"the checkpoint lacks vision weights ({VISION_PREFIX}{missing[0]}, ...); "
                           f"re-download it")
    return module.eval()


def export_vision(image_embed, path: Path) -> None:
    """vision.onnx: the images' crops → their image features; image count, crop count and grid dynamic."""
    import torch

    from .phi4mm_graphs import VisionGraph

    graph = VisionGraph(image_embed).eval()
    size = image_embed.crop_size
    side = size // image_embed.img_processor.config.patch_size
    crops = 3  # 1x2 and 2x1 crop grids plus the global views: every dynamic part has a non-trivial size
    pixels = torch.randn(2, crops, 3, size, size)
    mask = torch.ones(2, crops, side, side)
    mask[0, 2, :, side - 3:] = 0
    sizes = torch.tensor([[size, 2 * size], [2 * size, size]], dtype=torch.int64)
    with torch.no_grad(), _quiet():
        torch.onnx.export(
            graph, (pixels, mask, sizes), str(path), dynamo=False, opset_version=OPSET,
            input_names=["pixel_values", "image_attention_mask", "image_sizes"], output_names=["image_features"],
            dynamic_axes={"pixel_values": {0: "num_images", 1: "num_crops"},
                          "image_attention_mask": {0: "num_images", 1: "num_crops"},
                          "image_sizes": {0: "num_images"}, "image_features": {0: "num_image_tokens"}})


def export_embedding(weight_files, image_token_id: int, path: Path, table_dtype, out_dtype) -> None:
    """embedding.onnx: token ids + image features → inputs_embeds (the decoder's input dtype)."""
    import torch

    from .phi4mm_graphs import EmbeddingGraph

    table = read_prefixed(weight_files, EMBED_KEY)[""]
    embed = torch.nn.Embedding.from_pretrained(table.to(torch.float32))
    graph = EmbeddingGraph(embed, image_token_id, table_dtype, out_dtype).eval()
    ids = torch.tensor([[5, image_token_id, image_token_id, 7]], dtype=torch.int64)
    feats = torch.randn(2, table.shape[1])
    with torch.no_grad(), _quiet():
        torch.onnx.export(
            graph, (ids, feats), str(path), dynamo=False, opset_version=OPSET,
            input_names=["input_ids", "image_features"], output_names=["inputs_embeds"],
            dynamic_axes={"input_ids": {0: "batch_size", 1: "sequence_length"},
                          "image_features": {0: "num_image_tokens"},
                          "inputs_embeds": {0: "batch_size", 1: "sequence_length"}})


@contextlib.contextmanager
def _quiet():
    """The TorchScript exporter (kept for its tracing of the data-dependent crop layout) warns that it is
    deprecated and that traced tensor-to-index conversions might not generalize; the component tests check
    the graphs on other crop layouts than the one traced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
