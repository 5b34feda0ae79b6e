"""ONNX Runtime GenAI backend: runs ``onnx-genai`` artifacts (Raspberry Pi, Android, CPU, CUDA).

Imports onnxruntime_genai (model, KV cache, sampling, encode) and tokenizers (decode) only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from . import require
from .base import Runtime, SamplingParams
from .errors import PhiEdgeError
from .manifest import Manifest

FORMAT = "onnx-genai"
DEVICES = ("cpu", "cuda")


class OnnxGenaiRuntime(Runtime):
    format = FORMAT

    def __init__(self, folder: Path, manifest: Manifest, device: str | None = None):
        device = (device or manifest.runtime.get("device", "cpu")).lower()
        if device not in DEVICES:
            raise PhiEdgeError(f"onnx-genai artifacts run on {', '.join(DEVICES)}, not '{device}'")
        super().__init__(folder, manifest, device)
        og = require("onnxruntime_genai", FORMAT)
        self._og = og
        built_for = manifest.runtime.get("device", "cpu")
        config = og.Config(str(folder))
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
        gen.append_tokens(np.asarray(prompt_ids, dtype=np.int32))
        while not gen.is_done():
            gen.generate_next_token()
            yield int(gen.get_next_tokens()[0])

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        gen = self._generator(min(self.context_length, len(ids) + 1))
        gen.append_tokens(np.asarray(ids, dtype=np.int32))
        out = np.asarray(gen.get_output("logits"), dtype=np.float32)
        return out.reshape(-1, out.shape[-1])[-len(ids):]


def open_artifact(folder: Path, manifest: Manifest, device: str | None = None) -> OnnxGenaiRuntime:
    return OnnxGenaiRuntime(folder, manifest, device)
