"""Traceable torch rewrites of Phi-4-multimodal's image path and its embedding merge.

``VisionGraph`` is transformers' ``Phi4MultimodalImageEmbedding`` (SigLIP crops → 2x2 pooled patch
grid → HD layout with newline/separator rows → projection), written without ``.item()``, ``bucketize``
or boolean index writes; the per-image layout is a scripted loop (an ONNX Loop), so the image count,
crop count, crop grid and padding crop-off all stay dynamic. ``EmbeddingGraph`` is the token embedding with the image features
written at the image-token positions, in order.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn


def _hd_layout(feats: torch.Tensor, mask: torch.Tensor, sizes: torch.Tensor, newline: torch.Tensor,
              separator: torch.Tensor, crop: int) -> torch.Tensor:
    """Per image: the sub-crops' pooled grid cut to its unpadded rows/columns, a newline after each row,
    the separator, the global view with its newlines; all images concatenated. feats [images, crops, g, g, D]."""
    g, d = feats.shape[2], feats.shape[4]
    pieces = []
    for i in range(feats.shape[0]):
        glob = torch.cat([feats[i, 0], newline.expand(g, 1, d)], dim=1).reshape(-1, d)
        rows = int(sizes[i, 0]) // crop
        cols = int(sizes[i, 1]) // crop
        area = rows * cols
        sub = feats[i, 1:area + 1].reshape(rows, cols, g, g, d).transpose(1, 2).reshape(rows * g, cols * g, d)
        keep = mask[i, 1:area + 1, 0::2, 0::2].reshape(rows, cols, g, g).transpose(1, 2).reshape(rows * g, cols * g)
        useful_h = int((keep[:, 0] > 0).sum())
        useful_w = int((keep[0, :] > 0).sum())
        sub = torch.cat([sub[:useful_h, :useful_w], newline.expand(useful_h, 1, d)], dim=1).reshape(-1, d)
        pieces.append(torch.cat([sub, separator, glob], dim=0))
    return torch.cat(pieces, dim=0)


with warnings.catch_warnings():  # TorchScript is deprecated, but the TorchScript exporter turns this loop into a Loop
    warnings.simplefilter("ignore", FutureWarning)
    hd_layout = torch.jit.script(_hd_layout)


class VisionGraph(nn.Module):
    """pixel_values [images, crops, 3, S, S], image_attention_mask [images, crops, S/14, S/14] (float),
    image_sizes [images, 2] (int64) → image_features [tokens, hidden]."""

    def __init__(self, image_embed: nn.Module):
        super().__init__()
        vision = image_embed.img_processor
        cfg = vision.config
        self.patch_embedding = vision.embeddings.patch_embedding
        self.position_embedding = vision.embeddings.position_embedding
        self.side = vision.embeddings.num_patches_per_side
        layers = len(vision.encoder.layers)
        keep = layers + 1 + image_embed.layer_idx if image_embed.layer_idx < 0 else image_embed.layer_idx
        self.layers = nn.ModuleList(vision.encoder.layers[:keep])
        self.crop = image_embed.crop_size
        self.pool = image_embed.image_token_compression
        self.padding = getattr(image_embed, "img_processor_padding", None)
        self.up, self.down = image_embed.img_projection_up, image_embed.img_projection_down
        self.sub_newline = image_embed.sub_img_feature_extensor  # [1, 1, 1, D]
        self.separator = image_embed.global_img_feature_extensor  # [1, 1, D]
        self.dim = cfg.hidden_size
        self.register_buffer("boundaries", torch.arange(1 / self.side, 1.0, 1 / self.side), persistent=False)

    def encode(self, pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """SigLIP up to the feature layer, then the 2x2 average pooling: [crops, g, g, D]."""
        b = pixels.shape[0]
        embeds = self.patch_embedding(pixels).flatten(2).transpose(1, 2)
        keep = mask > 0
        rows = keep[:, :, 0].sum(dim=1).to(torch.float32)
        cols = keep[:, 0, :].sum(dim=1).to(torch.float32)
        index = torch.arange(self.side, dtype=torch.float32)
        frac_h = torch.clamp(index[None, :] * (1.0 / rows)[:, None], max=1.0 - 1e-6).to(pixels.dtype)
        frac_w = torch.clamp(index[None, :] * (1.0 / cols)[:, None], max=1.0 - 1e-6).to(pixels.dtype)
        # torch.bucketize(x, boundaries, right=True) is the count of boundaries <= x
        bucket_h = (frac_h[..., None] >= self.boundaries).sum(-1)
        bucket_w = (frac_w[..., None] >= self.boundaries).sum(-1)
        positions = (bucket_h[:, :, None] * self.side + bucket_w[:, None, :]).reshape(b, -1)
        flat_keep = keep.reshape(b, -1)
        positions = torch.where(flat_keep, positions, torch.zeros_like(positions))
        hidden = embeds + self.position_embedding(positions)
        additive = (~flat_keep).to(hidden.dtype)[:, None, None, :] * torch.finfo(hidden.dtype).min
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=additive)
        grid = hidden.reshape(b, self.side, self.side, self.dim).permute(0, 3, 1, 2)
        if self.padding is not None:
            grid = self.padding(grid)
        return self.pool(grid).permute(0, 2, 3, 1)

    def forward(self, pixel_values, image_attention_mask, image_sizes):
        images, crops = pixel_values.shape[0], pixel_values.shape[1]
        feats = self.encode(pixel_values.flatten(0, 1), image_attention_mask.flatten(0, 1))
        feats = feats.reshape(images, crops, feats.shape[1], feats.shape[2], feats.shape[3])
        merged = hd_layout(feats, image_attention_mask, image_sizes, self.sub_newline[0, 0].reshape(1, 1, -1)[0],
                           self.separator[0], self.crop)
        return self.down(nn.functional.gelu(self.up(merged)))


class EmbeddingGraph(nn.Module):
    """input_ids [batch, seq] (int64), image_features [tokens, hidden] → inputs_embeds [batch, seq, hidden]."""

    def __init__(self, embed_tokens: nn.Module, image_token_id: int, table_dtype: torch.dtype,
                 out_dtype: torch.dtype):
        super().__init__()
        self.table = nn.Parameter(embed_tokens.weight.detach().to(table_dtype), requires_grad=False)
        self.image_token_id = image_token_id
        self.out_dtype = out_dtype

    def forward(self, input_ids, image_features):
        embeds = self.table[input_ids].to(torch.float32)
        hidden = embeds.shape[-1]
        is_image = (input_ids == self.image_token_id).reshape(-1)
        count = image_features.shape[0]
        # one zero row past the features: decode steps (no features) and extra image tokens land there
        feats = torch.cat([image_features.to(torch.float32), torch.zeros(1, hidden, dtype=torch.float32)], dim=0)
        order = torch.cumsum(is_image.to(torch.int64), dim=0) - 1
        order = torch.where(is_image, torch.clamp(order, max=count), torch.full_like(order, count))
        picked = feats[order].reshape(embeds.shape)
        merged = torch.where(is_image.reshape(embeds.shape[:-1])[..., None], picked, embeds)
        return merged.to(self.out_dtype)
