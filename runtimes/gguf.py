"""GGUF backend: runs ``gguf`` artifacts with llama.cpp through ``xllamacpp`` (prebuilt CPU wheels for
x86-64 and aarch64, so a Raspberry Pi installs it without a compiler).

xllamacpp embeds llama.cpp's server in-process: a ``Server`` loads the GGUF and answers
``handle_completions`` requests (llama.cpp's OpenAI-style completion API) given token ids. Encoding is
the artifact's tokenizer.json through the ``tokenizers`` library, as the export checked it; the ids go
to llama.cpp as they are. Each streamed chunk carries the sampled token's id (``n_probs: 1`` after
sampling); returning True from the callback stops llama.cpp early. Greedy is a top-k 1 sampler chain,
so the output is the argmax exactly; sampling is llama.cpp's top-k / top-p / temperature with its seed.

LongRoPE: llama.cpp picks the long or short factors from the context it allocates, transformers from
the current sequence length. A LongRoPE artifact therefore runs a context of the original window
(short factors) while the sequence fits it, and re-prefills the whole sequence in a full-size context
(long factors) once it outgrows it, as transformers recomputes it then. One token differs from
transformers: the one after a sequence of exactly the original length (transformers: short factors),
because llama.cpp's server stops one token before its context is full.

Not available: ``logits()``. The binding's API returns log-probabilities of sampled positions only,
never the raw logits of the prompt positions.

Imports xllamacpp, numpy and tokenizers only.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from . import require
from .base import Runtime, SamplingParams
from .errors import PhiEdgeError
from .manifest import Manifest

FORMAT = "gguf"
DEVICES = ("cpu",)
_DONE = object()


class GgufRuntime(Runtime):
    format = FORMAT

    def __init__(self, folder: Path, manifest: Manifest, device: str | None = None):
        self._x = require("xllamacpp", FORMAT)
        tokenizers = require("tokenizers", FORMAT)
        device = (device or "cpu").lower()
        if device not in DEVICES:
            raise PhiEdgeError(f"gguf artifacts run on the cpu here, not '{device}'")
        super().__init__(folder, manifest, device)
        self._path = Path(folder) / manifest.runtime.get("gguf_file", "model.gguf")
        if not self._path.is_file():
            raise PhiEdgeError(f"{self._path} is missing; re-export or re-copy the artifact")
        original = manifest.runtime.get("original_context_length")
        self._original = int(original) if manifest.runtime.get("longrope") and original else 0
        if self._original >= self.context_length:
            self._original = 0  # the whole context fits the original window: short factors throughout
        self._servers: dict[int, object] = {}
        self._server(self._original or self.context_length)  # load now: a broken file fails here
        self._tokenizer = tokenizers.Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))

    def _server(self, n_ctx: int):
        if n_ctx not in self._servers:
            import os

            x = self._x
            p = x.CommonParams()
            p.model.path = str(self._path)
            p.n_ctx = n_ctx
            p.n_batch = p.n_ubatch = min(512, n_ctx)
            p.n_parallel = 1
            p.warmup = False
            p.verbosity = -1  # llama.cpp logs only errors: phi-run prints the text, not the engine's chatter
            p.cache_prompt = True
            threads = max(1, min(8, os.cpu_count() or 1))
            p.cpuparams.n_threads = p.cpuparams_batch.n_threads = threads
            try:
                self._servers[n_ctx] = x.Server(p)
            except Exception as e:  # llama.cpp's own message: bad magic, truncated file, unknown tensors
                raise PhiEdgeError(f"llama.cpp could not load {self._path}: {e}; re-export or re-copy the "
                                   f"artifact (phi-run OUT --verify checks every file)") from None
        return self._servers[n_ctx]

    def _encode_plain(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def _request(self, ids: list[int], n: int, params: SamplingParams) -> dict:
        req = {"prompt": list(ids), "n_predict": int(n), "stream": True, "cache_prompt": True,
               "n_probs": 1, "post_sampling_probs": True, "repeat_penalty": float(params.repetition_penalty),
               "repeat_last_n": self.context_length}
        if params.greedy:
            req.update(temperature=0.0, samplers=["top_k"], top_k=1)
        else:
            req.update(temperature=float(params.temperature), top_k=int(params.top_k), top_p=float(params.top_p),
                       min_p=0.0, samplers=["penalties", "top_k", "top_p", "temperature"])
            if params.seed is not None:
                req["seed"] = int(params.seed)
        if params.repetition_penalty != 1.0 and params.greedy:
            req["samplers"] = ["penalties", "top_k"]
        return req

    def _run_server(self, n_ctx: int, ids: list[int], n: int, params: SamplingParams) -> Iterator[int]:
        """Stream up to ``n`` new token ids from llama.cpp in a context of ``n_ctx`` tokens."""
        server = self._server(n_ctx)
        out: queue.Queue = queue.Queue()
        stop = threading.Event()
        errors: list[str] = []

        def on_chunk(chunk) -> bool:
            if "error" in chunk or "code" in chunk:
                errors.append(str(chunk.get("error", chunk)))
                return True
            for c in chunk.get("choices", []):
                for t in (c.get("logprobs") or {}).get("content") or []:
                    out.put(int(t["id"]))
            return stop.is_set()

        def work() -> None:
            try:
                server.handle_completions(self._request(ids, n, params), on_chunk)
            except Exception as e:  # noqa: BLE001 - reported to the caller below
                errors.append(str(e))
            finally:
                out.put(_DONE)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        try:
            while True:
                item = out.get()
                if item is _DONE:
                    break
                yield item
        finally:
            stop.set()
            thread.join()
        if errors:
            raise PhiEdgeError(f"llama.cpp failed to generate: {errors[0]}")

    def _token_ids(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[int]:
        ids, left = list(prompt_ids), params.max_new_tokens
        while left > 0:
            long = not self._original or len(ids) >= self._original
            n_ctx = self.context_length if long else self._original
            # short factors for the tokens that follow sequences shorter than the original window
            # (llama.cpp's server keeps one context slot free, so the token after a sequence of exactly
            # the original length comes from the full-size context, with the long factors)
            steps = left if long else min(left, self._original - len(ids))
            if steps <= 0:
                long, n_ctx, steps = True, self.context_length, left
            made = 0
            for token in self._run_server(n_ctx, ids, steps, params):
                ids.append(token)
                made += 1
                left -= 1
                yield token
            if made < steps:  # llama.cpp stopped (an end-of-generation token it knows)
                return

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        raise PhiEdgeError("the gguf runtime cannot return logits: xllamacpp's API gives log-probabilities of "
                           "sampled tokens only; compare GGUF artifacts by greedy tokens and text")


def open_artifact(folder: Path, manifest: Manifest, device: str | None = None) -> GgufRuntime:
    return GgufRuntime(folder, manifest, device)
