"""ONNX Runtime GenAI backend: runs ``onnx-genai`` artifacts (Raspberry Pi, Android, CPU, CUDA).

Imports onnxruntime_genai (model, KV cache, sampling, encode) and tokenizers (decode) only; for
Phi-4-multimodal artifacts, the engine's multimodal processor and Pillow (only when images are given).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from . import require
from .base import Runtime, SamplingParams
from .errors import ContextLengthError, PhiEdgeError
from .manifest import Manifest

FORMAT = "onnx-genai"
DEVICES = ("cpu", "cuda")


class OnnxGenaiRuntime(Runtime):
    format = FORMAT

    def __init__(self, folder: Path, manifest: Manifest, device: str | None = None, prepack_weights: bool = True):
        """``prepack_weights=False``: ONNX Runtime keeps the int4 weights memory-mapped as stored instead of
        repacking them for its kernels: about the file's size in RAM instead of ~1.35x, far slower to run."""
        device = (device or manifest.runtime.get("device", "cpu")).lower()
        if device not in DEVICES:
            raise PhiEdgeError(f"onnx-genai artifacts run on {', '.join(DEVICES)}, not '{device}'")
        super().__init__(folder, manifest, device)
        og = require("onnxruntime_genai", FORMAT)
        self._og = og
        built_for = manifest.runtime.get("device", "cpu")
        config = og.Config(str(folder))
        if not prepack_weights:
            config.overlay(json.dumps({"model": {"decoder": {"session_options": {"session.disable_prepacking": "1"}}}}))
        if device != built_for:
            config.clear_providers()
            if device != "cpu":
                config.append_provider(device)
        if device == "cuda" and not og.is_cuda_available():
            raise PhiEdgeError("this artifact runs on CUDA but onnxruntime-genai has no CUDA here; "
                               "install onnxruntime-genai-cuda on a machine with an NVIDIA GPU, "
                               "or export for --target cpu")
        try:
            self._model = og.Model(config)
        except Exception as e:  # the engine raises plain RuntimeError/OrtException
            raise PhiEdgeError(f"onnxruntime-genai could not load {folder}: {e}") from None
        self._tokenizer = og.Tokenizer(self._model)
        # decoding through the tokenizers library on the same tokenizer.json: onnxruntime-genai 0.18's
        # decoder drops everything after a byte sequence that is not valid UTF-8, and skips the
        # tokenizer's Strip step, so its text could differ from the source's
        self._decoder = require("tokenizers", FORMAT).Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
        self.vision = dict(manifest.runtime.get("vision") or {})
        self._processor = None
        self._image_inputs = None  # (prompt ids, the processor's tensors) for the generation of those ids

    def _prepare_images(self, prompt: str, images: list) -> list[int]:
        """The engine's multimodal processor on the prompt and the images (decoded and made RGB by Pillow)."""
        if not self.vision:
            return super()._prepare_images(prompt, images)
        from . import images as image_inputs

        decoded = [image_inputs.load_image(img, f"image {i + 1}") for i, img in enumerate(images)]
        prompt = image_inputs.with_image_tags(prompt, len(decoded))
        if self._processor is None:
            self._processor = self._model.create_multimodal_processor()
        try:
            inputs = self._processor(prompt, images=self._og.Images.open_bytes(
                *[image_inputs.png_bytes(img) for img in decoded]))
        except Exception as e:  # the engine raises RuntimeError for what its image pipeline rejects
            raise PhiEdgeError(f"onnxruntime-genai could not process the image(s): {e}") from None
        self._fix_image_inputs(inputs, decoded)
        ids = [int(i) for i in inputs["input_ids"].as_numpy().reshape(-1)]
        if len(ids) >= self.context_length:
            image_tokens = int(inputs["num_image_tokens"].as_numpy().sum())
            raise ContextLengthError(
                f"the prompt with its image(s) is {len(ids)} tokens ({image_tokens} for the image(s)) but this "
                f"artifact's context is {self.context_length}; use fewer or smaller images, or re-export with a "
                f"longer --context")
        self._image_inputs = (ids, inputs)
        return ids

    def _forget_images(self) -> None:
        self._image_inputs = None

    def _fix_image_inputs(self, inputs, decoded) -> None:
        """Two of the processor's tensors are rewritten, the crop layout and token counts kept:

        - the image mask: onnxruntime-genai 0.18 hands the processor's int64 mask to the vision model's float
          input by copying its bytes (1 reads as 1e-45, every other value 0); it is recomputed from the image
          size as onnxruntime-extensions computed it, and checked against the processor's token count;
        - the pixels: onnxruntime-extensions resizes without antialiasing, transformers (what the model was
          trained with) with; they are made as transformers makes them (Pillow and numpy)."""
        from . import images as image_inputs

        masks, counts = zip(*(image_inputs.phi4_crop_mask(img.width, img.height) for img in decoded))
        want = [int(n) for n in inputs["num_image_tokens"].as_numpy().reshape(-1)]
        if list(counts) != want:
            raise PhiEdgeError(f"the image mask phi-edge computes gives {list(counts)} image tokens but the engine's "
                               f"processor gives {want}; please report this with the image's size")
        shape = inputs["pixel_values"].as_numpy().shape
        mask = np.ones(shape[:2] + masks[0].shape[1:], dtype=np.float32)
        pixels = np.zeros(shape, dtype=np.float32)
        for i, (m, img) in enumerate(zip(masks, decoded)):
            mask[i, :m.shape[0]] = m
            p = image_inputs.phi4_pixels(img)
            if p.shape[0] != m.shape[0]:
                raise PhiEdgeError(f"phi-edge lays out {p.shape[0]} crops for image {i + 1} but the engine's "
                                   f"processor {m.shape[0]}; please report this with the image's size")
            pixels[i, :p.shape[0]] = p
        inputs["image_attention_mask"] = mask
        inputs["pixel_values"] = pixels

    def _encode_plain(self, text: str) -> list[int]:
        # the engine's tokenizer never adds BOS/EOS itself: the base class adds what the manifest says
        return self._tokenizer.encode(text).tolist()

    def decode(self, ids: Sequence[int]) -> str:
        return self._decoder.decode([int(i) for i in ids], skip_special_tokens=False)

    def _generator(self, max_length: int, params: SamplingParams | None = None):
        og = self._og
        gp = og.GeneratorParams(self._model)
        options = {"max_length": max_length, "batch_size": 1}
        if params is not None:
            options.update(do_sample=not params.greedy, repetition_penalty=params.repetition_penalty)
            if not params.greedy:
                options.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
            if params.seed is not None:
                options["random_seed"] = int(params.seed)
        gp.set_search_options(**options)
        return og.Generator(self._model, gp)

    def _token_ids(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[int]:
        gen = self._generator(len(prompt_ids) + params.max_new_tokens, params)
        pending, self._image_inputs = self._image_inputs, None
        if pending is not None and pending[0] == list(prompt_ids):
            gen.set_inputs(pending[1])
        else:
            gen.append_tokens(np.asarray(prompt_ids, dtype=np.int32))
        while not gen.is_done():
            gen.generate_next_token()
            yield int(gen.get_next_tokens()[0])

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        gen = self._generator(min(self.context_length, len(ids) + 1))
        gen.append_tokens(np.asarray(ids, dtype=np.int32))
        out = np.asarray(gen.get_output("logits"), dtype=np.float32)
        return out.reshape(-1, out.shape[-1])[-len(ids):]


def open_artifact(folder: Path, manifest: Manifest, device: str | None = None,
                  prepack_weights: bool = True) -> OnnxGenaiRuntime:
    return OnnxGenaiRuntime(folder, manifest, device, prepack_weights)
