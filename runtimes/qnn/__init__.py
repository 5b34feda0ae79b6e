"""ONNX Runtime QNN backend: runs ``qnn`` artifacts on a Snapdragon Hexagon NPU (HTP).

The artifact holds two static graphs over one fixed KV window (see the exporter's
``phi_edge.exporter.formats.qnn.graph``): a prefill graph taking a chunk of tokens and a one-token decode graph, either as
EPContext models with their compiled ``*_qnn.bin`` binaries or as QDQ models QNN compiles on
load (once: the binaries are cached). This module keeps the KV cache (fp16) on the host, builds
the attention bias, drives the two graphs, and samples on the host with numpy. Tokenization is
the ``tokenizers`` package on the artifact's ``tokenizer.json``. On an x86-64 workstation the
same code runs on the QNN HTP simulator. Imports only onnxruntime, onnxruntime_qnn, tokenizers
and numpy.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from .. import require
from ..base import Runtime, SamplingParams
from ..errors import ContextLengthError, ManifestError, PhiEdgeError
from ..manifest import Manifest

FORMAT = "qnn"
DEVICES = ("htp", "cpu")  # cpu: the QDQ graphs on ONNX Runtime's CPU provider (uncompiled artifacts only)
RUNTIME_KEYS = ("graphs", "compiled", "prefill_chunk", "num_layers", "mask_value", "htp_arch", "soc_model")


class StaticModel:
    """Prefill and decode steps of a static-shape graph pair over a host-side KV cache.

    ``prefill`` and ``decode`` are callables ``feeds -> outputs`` (an InferenceSession's run);
    ``record`` (optional) sees every feed dict, which is how the exporter collects calibration data.
    """

    def __init__(self, prefill: Callable[[dict], list], decode: Callable[[dict], list], chunk: int, context: int,
                 kv_shape: tuple[int, ...], num_layers: int, mask_value: float, sliding_window: int = 0,
                 record: Callable[[str, dict], None] | None = None):
        self._run = {"prefill": prefill, "decode": decode}
        self.chunk, self.context, self.mask_value = chunk, context, float(mask_value)
        self.sliding_window = int(sliding_window or 0)
        self.record = record
        self.cache = [np.zeros(kv_shape, dtype=np.float16) for _ in range(2 * num_layers)]  # as the graphs take it
        self.length = 0

    def reset(self) -> None:
        for c in self.cache:
            c.fill(0)
        self.length = 0

    def _bias(self, positions: np.ndarray) -> np.ndarray:
        """Additive mask [1, 1, T, C + T]: the filled cache slots (slot j holds position j), then the
        chunk itself, each causally (and within the sliding window, where the model has one)."""
        key_pos = np.concatenate([np.arange(self.context), positions])
        filled = np.concatenate([np.arange(self.context) < self.length, np.ones(len(positions), dtype=bool)])
        distance = positions[:, None] - key_pos[None, :]
        ok = filled[None, :] & (distance >= 0)
        if self.sliding_window:
            ok &= distance < self.sliding_window
        return np.where(ok, 0.0, self.mask_value).astype(np.float32)[None, None]

    def _step(self, graph: str, ids: Sequence[int], size: int) -> np.ndarray:
        n = len(ids)
        if self.length + n > self.context:
            raise ContextLengthError(f"{self.length + n} tokens do not fit this artifact's KV window of "
                                     f"{self.context}; shorten the prompt or re-export with a longer --context-length")
        tokens = np.zeros((1, size), dtype=np.int32)
        tokens[0, :n] = ids
        positions = np.arange(self.length, self.length + size, dtype=np.int32)
        feeds = {"input_ids": tokens, "position_ids": positions[None],
                 "attention_bias": self._bias(positions)}
        names = [f"past_{kind}_{i}" for i in range(len(self.cache) // 2) for kind in ("key", "value")]
        feeds.update(zip(names, self.cache))
        if self.record is not None:
            self.record(graph, feeds)
        logits, *presents = self._run[graph](feeds)
        for cache, new in zip(self.cache, presents):
            cache[:, :, self.length:self.length + n] = new[:, :, :n]
        self.length += n
        return np.asarray(logits[0, :n], dtype=np.float32)

    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        """Logits after each of ``ids`` [len(ids), vocab], appended to what the cache holds."""
        out = [self._step("prefill", ids[i:i + self.chunk], self.chunk) for i in range(0, len(ids), self.chunk)]
        return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)

    def decode(self, token: int) -> np.ndarray:
        """Logits after one more token [vocab]."""
        return self._step("decode", [token], 1)[0]


def sample(logits: np.ndarray, params: SamplingParams, history: Sequence[int], rng: np.random.Generator) -> int:
    """The next token from ``logits`` [vocab] the way transformers' sampling does it."""
    scores = np.asarray(logits, dtype=np.float64).copy()
    if params.repetition_penalty != 1.0 and len(history):
        seen = np.unique(np.asarray(history, dtype=np.int64))
        seen = seen[seen < scores.shape[0]]
        s = scores[seen]
        scores[seen] = np.where(s < 0, s * params.repetition_penalty, s / params.repetition_penalty)
    if params.greedy:
        return int(np.argmax(scores))
    scores /= params.temperature
    if 0 < params.top_k < scores.shape[0]:
        kth = np.partition(scores, -params.top_k)[-params.top_k]
        scores[scores < kth] = -np.inf
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    if params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        keep = cumulative - probs[order] < params.top_p  # the smallest head whose mass reaches top_p
        keep[0] = True
        cut = np.zeros_like(probs)
        cut[order[keep]] = probs[order[keep]]
        probs = cut / cut.sum()
    return int(rng.choice(probs.shape[0], p=probs))


class QnnRuntime(Runtime):
    format = FORMAT

    def __init__(self, folder: Path, manifest: Manifest, device: str | None = None):
        device = (device or manifest.runtime.get("device", "htp")).lower()
        if device not in DEVICES:
            raise PhiEdgeError(f"qnn artifacts run on {', '.join(DEVICES)}, not '{device}'")
        super().__init__(folder, manifest, device)
        rt = manifest.runtime
        missing = [k for k in RUNTIME_KEYS if k not in rt]
        if missing:
            raise ManifestError(f"the manifest's runtime section lacks {', '.join(missing)}; re-export the model")
        tokenizers = require("tokenizers", FORMAT)
        tok_path = self.folder / "tokenizer.json"
        if not tok_path.is_file():
            raise PhiEdgeError(f"{folder} has no tokenizer.json; re-export the model (the qnn runtime needs it)")
        self._tokenizer = tokenizers.Tokenizer.from_file(str(tok_path))
        graphs = rt["graphs"]
        sessions = {name: self._open(self.folder / graphs[name]) for name in ("prefill", "decode")}
        past = next(i for i in sessions["decode"].get_inputs() if i.name == "past_key_0")
        kv_shape = tuple(int(d) for d in past.shape)
        self.model = StaticModel(
            prefill=lambda feeds: sessions["prefill"].run(None, feeds),
            decode=lambda feeds: sessions["decode"].run(None, feeds),
            chunk=int(rt["prefill_chunk"]), context=self.context_length, kv_shape=kv_shape,
            num_layers=int(rt["num_layers"]), mask_value=float(rt["mask_value"]),
            sliding_window=int(rt.get("sliding_window") or 0))
        self.sessions = sessions

    def _open(self, path: Path):
        rt = self.manifest.runtime
        if self.device == "cpu":
            if rt.get("compiled"):
                raise PhiEdgeError("this artifact holds compiled HTP context binaries, which only the QNN HTP "
                                   "backend runs; load it with device='htp', or re-export with --no-compile")
            ort = require("onnxruntime", FORMAT)
            so = ort.SessionOptions()
            so.log_severity_level = 3
            # unfused: ORT's fused int kernels round differently; this is the QDQ model as written
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
        from .session import compiled_once, open_session

        arch, soc, block_quant = int(rt["htp_arch"]), int(rt["soc_model"]), bool(rt.get("block_quant"))
        if not rt.get("compiled"):  # QDQ graphs: compile on the first load, reuse the binary after that
            shas = "".join(f.sha256 for f in self.manifest.files if f.path.startswith(path.name))  # + .data
            path = compiled_once(path, hashlib.sha256(shas.encode()).hexdigest(), arch, soc, block_quant)
        return open_session(path, arch, soc, block_quant)

    def _encode_plain(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def _token_ids(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[int]:
        rng = np.random.default_rng(params.seed)
        self.model.reset()
        logits = self.model.prefill(prompt_ids)[-1]
        history = list(prompt_ids)
        for i in range(params.max_new_tokens):
            token = sample(logits, params, history, rng)
            yield token
            history.append(token)
            if i + 1 == params.max_new_tokens or self.model.length >= self.context_length:
                return
            logits = self.model.decode(token)

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        ids = [int(i) for i in ids]
        if len(ids) > self.context_length:
            raise ContextLengthError(f"{len(ids)} tokens exceed this artifact's context of {self.context_length}")
        self.model.reset()
        return self.model.prefill(ids)


def open_artifact(folder: Path, manifest: Manifest, device: str | None = None) -> QnnRuntime:
    return QnnRuntime(folder, manifest, device)
