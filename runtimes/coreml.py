"""Core ML backend: runs ``coreml`` artifacts (a stateful ``.mlpackage``) with Apple's Core ML on
macOS 15+ (iOS 18+ apps load the same package from Swift).

The package takes ``input_ids`` int32 [1, T] and ``causal_mask`` fp16 [1, 1, T, end] and returns
``logits`` [1, T, vocab]; the KV cache is the model's state (``key_cache``/``value_cache``), written in
place at ``end - T .. end``. A large model is converted in parts (``model-partI-of-N.mlpackage``, whole
layers each) that run in sequence, handing on ``hidden_states``, each with its own state. One state per
conversation (``make_state()``): a prompt that extends the previous one only feeds its new tokens. The
mask is built here, with the model's sliding window.
Sampling is numpy on the host. Imports coremltools (its ``MLModel``), tokenizers and numpy only.

The Neural Engine variant (``--target apple-ane``, manifest ``runtime.prefill_length`` N) is one package
with two fixed-shape functions sharing the state: ``prefill`` takes N tokens (a prompt goes in chunks
of N, the last one padded and its padding's logits dropped), ``decode`` one token; each takes
``input_ids`` int32 [1, 1, 1, T], ``position`` int32 [1, 1, 1, 1] and ``causal_mask`` fp16 [1, 1, T,
context] and returns the vocabulary in slices (``logits_0``, ``logits_1``, ... [1, rows, 1, T]).

Elsewhere (Linux, older macOS) ``load()`` refuses with what was checked at export; the exporter
scores the package's stored weights in torch for ``phi-export eval`` by handing this class an
engine of its own (``engine=``): it needs only ``make_state()`` and ``predict(inputs, state)``.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from . import require
from .base import Runtime, SamplingParams
from .errors import BackendUnavailableError, ContextLengthError, ManifestError, PhiEdgeError
from .manifest import Manifest

FORMAT = "coreml"
COMPUTE_UNITS = ("ALL", "CPU_AND_GPU", "CPU_AND_NE", "CPU_ONLY")
MIN_MACOS = 15  # stateful models (ct.StateType) need macOS 15 / iOS 18


def causal_mask(start: int, t: int, window: int = 0, dtype=np.float16) -> np.ndarray:
    """Additive mask [1, 1, t, start + t] for ``t`` new tokens at positions ``start..start+t-1`` over the
    cache: 0 where a query may attend (causal, within the sliding window), -inf elsewhere."""
    query = np.arange(start, start + t)[:, None]
    key = np.arange(start + t)[None, :]
    ok = key <= query
    if window:
        ok &= key > query - window
    return np.where(ok, 0.0, -np.inf).astype(dtype)[None, None]


def where_it_runs(manifest: Manifest) -> str:
    """Why this machine cannot run the artifact, where it runs, and what the export verified."""
    here = f"macOS {platform.mac_ver()[0]}" if platform.system() == "Darwin" else platform.system() or "this OS"
    checked = manifest.verification.get("coreml", "")
    return (f"Core ML artifacts run on macOS {MIN_MACOS}+ and iOS/iPadOS 18+ (Apple's Core ML runtime), not on {here}"
            f"; copy the folder to a Mac (pip install 'phi-edge[coreml]') or load "
            f"{' + '.join(manifest.runtime.get('packages', []))} from Swift. "
            f"Checked at export here: {checked or 'see phi-edge.json verification'}; "
            f"'phi-export eval OUT --against CKPT' scores its stored weights on Linux")


def fixed_mask(start: int, t: int, context: int, window: int = 0, dtype=np.float16) -> np.ndarray:
    """Additive mask [1, 1, t, context] of the fixed-shape (ANE) functions for ``t`` tokens at
    ``start..start+t-1``: causal over the whole cache (padding past the prompt sees the prompt)."""
    query = np.arange(start, start + t)[:, None]
    key = np.arange(context)[None, :]
    ok = key <= query
    if window:
        ok &= key > query - window
    return np.where(ok, 0.0, -np.inf).astype(dtype)[None, None]


def joined_logits(out: dict, outputs: Sequence[str]) -> np.ndarray:
    """The vocabulary slices [1, rows, 1, T] joined: logits [T, vocab] as float32."""
    return np.concatenate([np.asarray(out[name], dtype=np.float32) for name in outputs], axis=1)[0, :, 0, :].T


def feed_fixed(engine, state, ids: Sequence[int], start: int, chunk: int, context: int, window: int,
               outputs: Sequence[str]) -> np.ndarray:
    """Feed ``ids`` at ``start`` through the fixed-shape functions: ``chunk`` tokens at a time through
    prefill (the last chunk padded with token 0, its padding's logits dropped; padding past the
    context is not written), a lone token through decode. Logits [len(ids), vocab]."""
    logits, i = [], 0
    while i < len(ids):
        part = [int(x) for x in ids[i:i + chunk]]
        t = 1 if len(part) == 1 else chunk
        inputs = {"input_ids": np.asarray(part + [0] * (t - len(part)), dtype=np.int32).reshape(1, 1, 1, t),
                  "position": np.full((1, 1, 1, 1), start + i, dtype=np.int32),
                  "causal_mask": fixed_mask(start + i, t, context, window)}
        logits.append(joined_logits(engine.predict(inputs, state=state), outputs)[:len(part)])
        i += len(part)
    return np.concatenate(logits)


class Functions:
    """The ANE package's two functions by call length (N: ``prefill``, 1: ``decode``); one state,
    made by either, serves both."""

    def __init__(self, by_length: dict):
        self.by_length = by_length

    def make_state(self):
        return self.by_length[1].make_state()

    def predict(self, inputs: dict, state) -> dict:
        return self.by_length[int(inputs["causal_mask"].shape[2])].predict(inputs, state=state)


class Chain:
    """A model converted in parts: each part's ``MLModel`` (or, for the ANE, its two :class:`Functions`) in
    turn, the hidden states handed on, one state per part (a model converted whole is a chain of one)."""

    def __init__(self, models: list):
        self.models = models

    def make_state(self) -> list:
        return [m.make_state() for m in self.models]

    def predict(self, inputs: dict, state: list) -> dict:
        feeds = dict(inputs)
        for i, (model, part_state) in enumerate(zip(self.models, state)):
            out = model.predict(feeds, state=part_state)
            if i == len(self.models) - 1:
                return out
            feeds = {k: v for k, v in inputs.items() if k != "input_ids"}  # the mask (and the ANE's position)
            feeds["hidden_states"] = out["output_hidden_states"]
        raise PhiEdgeError("the artifact lists no Core ML packages; re-export the model")


def open_engine(folder: Path, manifest: Manifest, device: str | None):
    """Core ML's MLModel for each package, on the manifest's compute units (or ``device``)."""
    if platform.system() != "Darwin" or int((platform.mac_ver()[0] or "0").split(".")[0]) < MIN_MACOS:
        raise BackendUnavailableError(where_it_runs(manifest))
    ct = require("coremltools", FORMAT)
    units = (device or manifest.runtime.get("compute_units", "ALL")).upper()
    if units not in COMPUTE_UNITS:
        raise PhiEdgeError(f"Core ML compute units are {', '.join(COMPUTE_UNITS)}, not '{device}'")
    functions = manifest.runtime.get("functions")  # the ANE variant: {"prefill": N, "decode": 1}
    models = []
    for name in manifest.runtime["packages"]:
        try:
            if functions:
                models.append(Functions({length: ct.models.MLModel(str(folder / name), function_name=fn,
                                                                   compute_units=ct.ComputeUnit[units])
                                         for fn, length in functions.items()}))
            else:
                models.append(ct.models.MLModel(str(folder / name), compute_units=ct.ComputeUnit[units]))
        except Exception as e:  # Core ML's own load errors (a package from a newer coremltools, a damaged file)
            raise PhiEdgeError(f"Core ML could not load {folder / name}: {e}; re-export the model") from None
    return Chain(models), units


class CoreMLRuntime(Runtime):
    format = FORMAT

    def __init__(self, folder: Path, manifest: Manifest, device: str | None = None, engine=None,
                 engine_note: str = ""):
        rt = manifest.runtime
        if not rt.get("packages"):
            raise ManifestError("the manifest's runtime section lacks 'packages'; re-export the model")
        if engine is None:
            engine, device = open_engine(Path(folder), manifest, device)
        super().__init__(folder, manifest, device)
        self.engine = engine
        self.engine_note = engine_note  # how logits are computed when not by Core ML ("" on a device)
        self.sliding_window = int(rt.get("sliding_window") or 0)
        self.prefill_length = int(rt.get("prefill_length") or 0)  # the ANE variant's fixed prefill N, else 0
        self.outputs = list(rt.get("outputs") or ["logits"])
        tokenizers = require("tokenizers", FORMAT)
        self._tokenizer = tokenizers.Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        self._state, self._state_ids = None, []  # the conversation's state and the ids it holds

    @property
    def logits_note(self) -> str:
        return self.engine_note

    def _encode_plain(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def _feed(self, ids: Sequence[int]) -> np.ndarray:
        """Feed ``ids`` after what the state holds; logits [len(ids), vocab] as float32."""
        start, t = len(self._state_ids), len(ids)
        if start + t > self.context_length:
            raise ContextLengthError(f"{start + t} tokens do not fit this artifact's context of {self.context_length}; "
                                     f"shorten the prompt or re-export with a longer --context-length")
        if self.prefill_length:
            logits = feed_fixed(self.engine, self._state, ids, start, self.prefill_length, self.context_length,
                                self.sliding_window, self.outputs)
            self._state_ids.extend(int(i) for i in ids)
            return logits
        inputs = {"input_ids": np.asarray([list(ids)], dtype=np.int32),
                  "causal_mask": causal_mask(start, t, self.sliding_window)}
        out = self.engine.predict(inputs, state=self._state)
        self._state_ids.extend(int(i) for i in ids)
        return np.asarray(out["logits"][0], dtype=np.float32)

    def _continue(self, ids: list[int]) -> np.ndarray:
        """Logits of the last of ``ids``: reuse the conversation's state when ``ids`` extends it."""
        held = self._state_ids
        if self._state is None or len(held) >= len(ids) or ids[:len(held)] != held:
            self._state, self._state_ids = self.engine.make_state(), []
        return self._feed(ids[len(self._state_ids):])[-1]

    def _token_ids(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[int]:
        from .qnn import sample  # transformers' sampling in numpy

        rng = np.random.default_rng(params.seed)
        logits = self._continue(list(prompt_ids))
        history = list(prompt_ids)
        for i in range(params.max_new_tokens):
            token = sample(logits, params, history, rng)
            yield token
            history.append(token)
            if i + 1 == params.max_new_tokens or len(self._state_ids) >= self.context_length:
                return
            logits = self._feed([token])[-1]

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        ids = [int(i) for i in ids]
        if len(ids) > self.context_length:
            raise ContextLengthError(f"{len(ids)} tokens exceed this artifact's context of {self.context_length}")
        self._state, self._state_ids = self.engine.make_state(), []
        return self._feed(ids)


def open_artifact(folder: Path, manifest: Manifest, device: str | None = None) -> CoreMLRuntime:
    return CoreMLRuntime(folder, manifest, device)
