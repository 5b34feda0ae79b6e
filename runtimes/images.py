"""Image inputs for vision artifacts: decode what users pass, split chat messages' image parts.

Takes a path, bytes, a PIL image or a numpy array; gives an RGB PIL image (alpha dropped, as
transformers' Phi-4-multimodal image processor does) and its PNG bytes. Also Phi-4-multimodal's crop
layout, mask and pixel tensors as transformers computes them. PIL is imported only here, only when an
image is given.
"""

from __future__ import annotations

import base64
import io
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from .errors import PhiEdgeError

TAG = re.compile(r"<\|image_(\d+)\|>")


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise PhiEdgeError("image input needs Pillow: pip install 'phi-edge[onnx]' (or pip install pillow)") from None
    return Image


def load_image(item: Any, what: str = "image"):
    """An RGB PIL image from a path, bytes, a PIL image or an HxW / HxWxC uint8 array."""
    Image = _pil()
    if isinstance(item, Image.Image):
        image = item
    elif isinstance(item, np.ndarray):
        array = item
        if array.dtype != np.uint8:
            if array.dtype.kind == "f" and array.size and 0 <= array.min() and array.max() <= 1:
                array = np.round(array * 255)
            array = np.clip(array, 0, 255).astype(np.uint8)
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
            raise PhiEdgeError(f"{what}: a numpy image must be HxW, HxWx3 or HxWx4, got shape {item.shape}")
        image = Image.fromarray(array)
    elif isinstance(item, (bytes, bytearray, memoryview)):
        image = _open(io.BytesIO(bytes(item)), what)
    elif isinstance(item, (str, Path)):
        path = Path(item)
        if not path.is_file():
            raise PhiEdgeError(f"{what}: no such file {path}")
        image = _open(path, what)
    else:
        raise PhiEdgeError(f"{what}: pass a file path, bytes, a PIL image or a numpy array, not {type(item).__name__}")
    return to_rgb(image)


def _open(source, what: str):
    Image = _pil()
    try:
        image = Image.open(source)
        image.load()
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError... for bad files
        raise PhiEdgeError(f"{what} is not an image Pillow can read ({type(e).__name__}: {e}); "
                           f"pass a PNG, JPEG, BMP, GIF or WebP file") from None
    if image.width < 1 or image.height < 1:
        raise PhiEdgeError(f"{what} is empty ({image.width}x{image.height})")
    return image


def to_rgb(image):
    """RGB as transformers' Phi-4-multimodal processor converts (``convert("RGB")``: alpha is dropped, not
    composited), so the model sees the pixels it would see there."""
    return image if image.mode == "RGB" else image.convert("RGB")


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def with_image_tags(prompt: str, count: int) -> str:
    """The prompt with ``<|image_1|>``... tags: as given when it has them (they must match the images),
    else prepended."""
    tags = [int(n) for n in TAG.findall(prompt)]
    if not tags:
        return "".join(f"<|image_{i + 1}|>" for i in range(count)) + prompt
    if sorted(tags) != list(range(1, count + 1)):
        raise PhiEdgeError(f"the prompt's image tags {', '.join(f'<|image_{n}|>' for n in tags)} do not match the "
                           f"{count} image(s) given; use <|image_1|> to <|image_{count}|>, once each, or no tags")
    return prompt


def split_chat_images(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Any]]:
    """OpenAI-shaped messages → (messages with string content and ``<|image_N|>`` tags, the images in order).

    Image parts: ``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..." | path}}``,
    or ``{"type": "image", "image": <path|bytes|PIL|array>}``."""
    out, images = [], []
    for message in messages:
        content = message.get("content")
        if not isinstance(content, list):
            out.append(message)
            continue
        text = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                text.append(str(part.get("text", "")))
            elif kind in ("image_url", "image"):
                images.append(_image_from_part(part, kind))
                text.append(f"<|image_{len(images)}|>")
            elif kind in ("input_audio", "audio"):
                raise PhiEdgeError("audio input is not supported: phi-edge exports Phi-4-multimodal's text and "
                                   "vision parts only; send text and image parts")
            else:
                raise PhiEdgeError(f"message content part {part!r} is not a text or image part; use "
                                   f"{{'type': 'text', 'text': ...}} or "
                                   f"{{'type': 'image_url', 'image_url': {{'url': ...}}}}")
        out.append({**message, "content": "".join(text)})
    return out, images


def _image_from_part(part: dict[str, Any], kind: str):
    if kind == "image":
        return part.get("image")
    spec = part.get("image_url")
    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str) or not url:
        raise PhiEdgeError("an image_url part needs {'image_url': {'url': 'data:image/...;base64,...'}}")
    if url.startswith("data:"):
        header, _, data = url.partition(",")
        if ";base64" not in header:
            raise PhiEdgeError("image data URLs must be base64 (data:image/png;base64,...)")
        try:
            return base64.b64decode(data, validate=True)
        except ValueError:
            raise PhiEdgeError("the image data URL's base64 payload is malformed") from None
    if url.startswith(("http://", "https://")):
        raise PhiEdgeError("image URLs are not fetched (the device may be offline); pass a data: URL or a file path")
    return url[7:] if url.startswith("file://") else url


def phi4_crop_grid(width: int, height: int, crop: int = 448, max_crops: int = 36) -> tuple[int, int]:
    """(columns, rows) of 448-pixel crops for an image: enough to cover it, or the closest aspect ratio
    with at most ``max_crops`` crops (transformers' and onnxruntime-extensions' dynamic HD rule, float32)."""
    f = np.float32
    cols, rows = math.ceil(width / float(crop)), math.ceil(height / float(crop))
    if cols * rows <= max_crops:
        return cols, rows
    ratios = sorted({(i, j) for n in range(1, max_crops + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                     if 1 <= i * j <= max_crops}, key=lambda r: r[0] * r[1])
    aspect, best, best_diff = f(width) / f(height), (1, 1), f(np.inf)
    for r in ratios:
        diff = abs(aspect - f(r[0]) / f(r[1]))
        if diff < best_diff:
            best_diff, best = diff, r
        elif diff == best_diff and width * height > 0.5 * crop * crop * r[0] * r[1]:
            best = r
    return best


def phi4_crop_mask(width: int, height: int, crop: int = 448, patch: int = 14,
                   max_crops: int = 36) -> tuple[np.ndarray, int]:
    """Phi-4-multimodal's per-crop patch mask [1 + crops, crop/patch, crop/patch] (global view first) for a
    ``width`` x ``height`` image, computed as onnxruntime-extensions' Phi4VisionDynamicPreprocess does
    (float32), and the image's token count: 256 global + 16 newlines + 1 separator + the kept 2x2-pooled
    sub-crop grid with one newline per row."""
    f = np.float32
    side = crop // patch
    w_crops, h_crops = phi4_crop_grid(width, height, crop, max_crops)
    tw, th = crop * w_crops, crop * h_crops
    rw, rh = f(tw) / f(width), f(th) / f(height)
    if rw < rh:
        pad_w, pad_h = 0, th - int(f(height) * rw)
    else:
        pad_w, pad_h = tw - int(f(width) * rh), 0
    mask = np.ones((side * h_crops, side * w_crops), dtype=np.float32)
    if pad_w >= patch:
        mask[:, mask.shape[1] - pad_w // patch:] = 0
    if pad_h >= patch:
        mask[mask.shape[0] - pad_h // patch:, :] = 0
    crops = mask.reshape(h_crops, side, w_crops, side).transpose(0, 2, 1, 3).reshape(-1, side, side)
    pooled = mask[0::2, 0::2]
    rows, cols = int(pooled[:, 0].sum()), int(pooled[0, :].sum())
    g = side // 2
    tokens = g * g + g + 1 + rows * (cols + 1)
    return np.concatenate([np.ones((1, side, side), dtype=np.float32), crops], axis=0), tokens


def phi4_pixels(image, crop: int = 448, max_crops: int = 36, mean: float = 0.5, std: float = 0.5) -> np.ndarray:
    """Phi-4-multimodal's pixel tensor [1 + crops, 3, crop, crop] as transformers' image processor makes it:
    an antialiased bilinear resize of the RGB image into the crop grid (Pillow's, which torchvision's
    antialiased resize follows), white padding right/bottom, rescale and normalize, then the global view
    as a bicubic resize of the normalized canvas without antialiasing (torch's kernel, a = -0.75)."""
    Image = _pil()
    width, height = image.size
    cols, rows = phi4_crop_grid(width, height, crop, max_crops)
    tw, th = crop * cols, crop * rows
    if tw / width < th / height:
        size = (tw, int(height * (tw / width)))
    else:
        size = (int(width * (th / height)), th)
    canvas = Image.new("RGB", (tw, th), (255, 255, 255))
    canvas.paste(image.resize(size, Image.BILINEAR), (0, 0))
    chw = ((np.asarray(canvas, dtype=np.float32) / 255.0 - mean) / std).transpose(2, 0, 1)
    glob = _bicubic_matrix(th, crop) @ chw @ _bicubic_matrix(tw, crop).T
    crops = chw.reshape(3, rows, crop, cols, crop).transpose(1, 3, 0, 2, 4).reshape(-1, 3, crop, crop)
    return np.concatenate([glob[None], crops]).astype(np.float32)


def _bicubic_matrix(size_in: int, size_out: int, a: float = -0.75) -> np.ndarray:
    """[size_out, size_in] weights of torch's bicubic interpolation (align_corners=False, edge-clamped)."""
    def kernel(d: float) -> float:
        d = abs(d)
        if d <= 1:
            return ((a + 2) * d - (a + 3)) * d * d + 1
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a if d < 2 else 0.0

    weights = np.zeros((size_out, size_in), dtype=np.float64)
    scale = size_in / size_out
    for i in range(size_out):
        x = (i + 0.5) * scale - 0.5
        x0 = math.floor(x)
        t = x - x0
        for j, d in zip(range(x0 - 1, x0 + 3), (1 + t, t, 1 - t, 2 - t)):
            weights[i, min(max(j, 0), size_in - 1)] += kernel(d)
    return weights.astype(np.float32)
