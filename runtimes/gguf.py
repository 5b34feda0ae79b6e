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

``logits()`` (for ``phi-export eval`` and ``verify``): llama.cpp's completion API returns log-probabilities
of generated positions only (all of the vocabulary with ``n_probs`` = vocabulary size, but about half a
second of JSON per position, and none for prompt positions). So a second llama.cpp context in embedding
mode (pooling none) returns the final-norm hidden state of every position of the sequence in one pass
(xllamacpp's in-process server on 127.0.0.1, its non-OpenAI ``/embedding`` route), and the logits are
those states times the GGUF's own output matrix (``token_embd`` when tied; plus ``output.bias`` where
there is one), found with :mod:`.gguf_tensors` and dequantized with the ``gguf``
package and dequantized to float32 in numpy. Everything up to the last matmul is llama.cpp's; that
matmul is numpy's in float32, where llama.cpp's own quantizes the activations to 8 bits for a quantized
output matrix. ``gguf`` is a workstation package (the exporter's): it is not in the device extra, and
``logits()`` says so when it is missing.

Imports xllamacpp, numpy and tokenizers only (and ``gguf`` in ``logits()``).
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
        self._embedders: dict[tuple[int, int], object] = {}
        self._output: tuple | None = None
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

    logits_note = ("llama.cpp's final-norm hidden states (xllamacpp, embedding mode) times the GGUF's output "
                   "matrix dequantized to float32 by the gguf package")

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Next-token logits at every position of ``ids``, shape ``(len(ids), vocab)`` (see the module
        docstring: llama.cpp's hidden states, the stored output matrix applied in numpy)."""
        ids = [int(i) for i in ids]
        if not ids:
            raise PhiEdgeError("logits() needs at least one token")
        long = bool(self._original) and len(ids) > self._original  # transformers' rule for LongRoPE
        n_ctx = self.context_length if (long or not self._original) else self._original
        if len(ids) > n_ctx:
            raise PhiEdgeError(f"{len(ids)} tokens do not fit the artifact's context of {self.context_length}")
        batch = min(n_ctx, max(512, 1 << (len(ids) - 1).bit_length()))
        states = self._hidden_states(n_ctx, batch, ids)
        matrix, bias = self._output_matrix()
        logits = states @ matrix.T
        return logits + bias if bias is not None else logits

    def _hidden_states(self, n_ctx: int, batch: int, ids: list[int]) -> np.ndarray:
        import json
        import urllib.error
        import urllib.request

        key = (n_ctx, batch)
        if key not in self._embedders:
            x = self._x
            p = x.CommonParams()
            p.model.path = str(self._path)
            p.n_ctx = n_ctx
            p.n_batch = p.n_ubatch = batch  # embedding mode takes the whole sequence in one batch
            p.n_parallel = 1
            p.warmup = False
            p.verbosity = -1
            p.embedding = True
            p.pooling_type = x.llama_pooling_type.LLAMA_POOLING_TYPE_NONE
            p.embd_normalize = -1  # the states as they are, not scaled
            p.hostnames = ["127.0.0.1"]
            p.port = 0  # any free local port
            try:
                self._embedders[key] = x.Server(p)
            except Exception as e:
                raise PhiEdgeError(f"llama.cpp could not load {self._path} for logits: {e}") from None
        url = self._embedders[key].listening_address.rstrip("/") + "/embedding"
        req = urllib.request.Request(url, data=json.dumps({"content": ids}).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                answer = json.loads(r.read())
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise PhiEdgeError(f"llama.cpp's embedding pass for logits failed: {e}") from None
        states = np.asarray(answer[0]["embedding"], dtype=np.float32)
        if states.shape[0] != len(ids):
            raise PhiEdgeError(f"llama.cpp returned {states.shape[0]} hidden states for {len(ids)} tokens")
        return states

    def _output_matrix(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The GGUF's output matrix (``token_embd`` when tied) dequantized to float32, and its bias
        (Phi-3.5-MoE has one), read once."""
        if self._output is None:
            try:
                from gguf import quants
            except ImportError:
                raise PhiEdgeError("logits() of a gguf artifact reads its output matrix with the gguf package, a "
                                   "workstation package: pip install gguf (phi-export eval / verify need it)") from None
            from gguf import GGMLQuantizationType

            from .gguf_tensors import read_tensors

            found = read_tensors(self._path, {"output.weight", "token_embd.weight", "output.bias"})

            def dequantized(name: str) -> np.ndarray:
                kind, shape, raw = found[name]
                return quants.dequantize(raw, GGMLQuantizationType(kind)).reshape(shape).astype(np.float32)

            matrix = dequantized("output.weight" if "output.weight" in found else "token_embd.weight")
            bias = dequantized("output.bias") if "output.bias" in found else None
            self._output = matrix, bias
        return self._output


def open_artifact(folder: Path, manifest: Manifest, device: str | None = None) -> GgufRuntime:
    return GgufRuntime(folder, manifest, device)
