"""The runtime contract every backend fulfils: ``generate()``, ``stream()``, ``chat()``, ``logits()``.

A backend supplies four things: ``encode``, ``decode``, ``_token_ids`` (a generator of new token ids
for a prompt, sampling done by the backend's own engine) and ``logits``. Everything users see is
built here once: stop tokens and stop strings, incremental detokenization, the context check,
the chat template and the timings. That is what makes the API the same on every device.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator, Sequence

import numpy as np

from .chat_template import render_chat
from .errors import ContextLengthError, PhiEdgeError
from .manifest import Manifest


@dataclass
class SamplingParams:
    """How to pick each next token. ``temperature == 0`` means greedy."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise PhiEdgeError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise PhiEdgeError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise PhiEdgeError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise PhiEdgeError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise PhiEdgeError(f"repetition_penalty must be > 0 (1 disables it), got {self.repetition_penalty}")


@dataclass
class Timings:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    time_to_first_token_s: float = 0.0
    total_s: float = 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        t = self.time_to_first_token_s
        return self.prompt_tokens / t if t > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        t = self.total_s - self.time_to_first_token_s
        return (self.generated_tokens - 1) / t if self.generated_tokens > 1 and t > 0 else 0.0

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "prefill_tokens_per_s": self.prefill_tokens_per_s,
                "decode_tokens_per_s": self.decode_tokens_per_s}


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str  # "stop" (stop token or string), "length" (max_new_tokens or context full)
    timings: Timings = field(default_factory=Timings)

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "token_ids": self.token_ids, "prompt_tokens": len(self.prompt_token_ids),
                "finish_reason": self.finish_reason, "timings": self.timings.to_dict()}


class _TextStream:
    """Turns token ids into text pieces as they arrive, never splitting a multi-byte character.

    Seeded with the prompt's last token, so the pieces are the continuation of the prompt's text:
    a first token ``▁blue`` after ``The sky is`` reads `` blue``, as it does when appended."""

    def __init__(self, decode, context: Sequence[int] = ()):
        self._decode = decode
        self._ids: list[int] = [int(i) for i in context]
        self._prefix = 0  # start of the window we re-decode for context
        self._read = len(self._ids)  # tokens whose text has been emitted (or belongs to the prompt)

    def put(self, token_id: int) -> str:
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        if after.endswith("\ufffd") or len(after) <= len(before):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before):]

    def flush(self) -> str:
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        return after[len(before):] if len(after) > len(before) else ""


class Runtime:
    """An artifact loaded on this device. Get one with :func:`phi_edge.runtimes.load`."""

    format: ClassVar[str] = ""

    def __init__(self, folder: Path, manifest: Manifest, device: str | None = None):
        self.folder = Path(folder)
        self.manifest = manifest
        self.device = device
        self.stop_token_ids = frozenset(manifest.stop_token_ids)
        self.context_length = int(manifest.context_length)
        self.load_s = 0.0

    # ---- what a backend provides -------------------------------------------------------------
    def _encode_plain(self, text: str) -> list[int]:
        """Token ids of ``text`` alone, with no special tokens added (the engine's own tokenizer)."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def _token_ids(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[int]:
        """Yield new token ids one at a time until the caller stops asking or max_new_tokens."""
        raise NotImplementedError

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Next-token logits after each position of ``ids``: float32 array [len(ids), vocab]."""
        raise NotImplementedError

    # ---- tokens -------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for ``text`` exactly as the source tokenizer gives them: with
        ``add_special_tokens`` the tokens it adds around every text (BOS for Phi-3, none for
        Phi-4-mini), as the export measured and wrote into the manifest."""
        ids = self._encode_plain(text)
        if not add_special_tokens:
            return ids
        prefix, suffix = self.special_affixes()
        return prefix + ids + suffix

    def special_affixes(self) -> tuple[list[int], list[int]]:
        """(ids before, ids after) the text of every encode, from the manifest."""
        tok = self.manifest.tokenizer
        return [int(i) for i in tok.get("prefix_ids", [])], [int(i) for i in tok.get("suffix_ids", [])]

    def _text_stream(self, prompt_ids: Sequence[int]) -> _TextStream:
        return _TextStream(self.decode, context=prompt_ids[-1:])

    # ---- the API ------------------------------------------------------------------------------
    def params(self, **overrides: Any) -> SamplingParams:
        """Sampling parameters: the call's overrides over the manifest's generation defaults."""
        defaults = {k: v for k, v in self.manifest.generation.items()
                    if k in SamplingParams.__dataclass_fields__}
        given = {k: v for k, v in overrides.items() if v is not None}
        p = SamplingParams(**{**defaults, **given})
        p.check()
        return p

    def generate(self, prompt: str | Sequence[int], max_new_tokens: int | None = None,
                 temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                 repetition_penalty: float | None = None, stop: Sequence[str] | None = None,
                 seed: int | None = None, images: Sequence[Any] | None = None) -> GenerationResult:
        """Generate a completion of ``prompt`` (text, or token ids) and return it whole. ``images``
        (paths, bytes, PIL images or numpy arrays) go to vision artifacts; ``<|image_1|>``... tags in
        the prompt place them, else they come first."""
        result = self._start_images(prompt, images) if images else self._start(prompt)
        params = self.params(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                             top_k=top_k, repetition_penalty=repetition_penalty, seed=seed)
        for _ in self._run(result, params, stop or ()):
            pass
        return result

    def stream(self, prompt: str | Sequence[int], max_new_tokens: int | None = None,
               temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
               repetition_penalty: float | None = None, stop: Sequence[str] | None = None,
               seed: int | None = None, result: GenerationResult | None = None,
               images: Sequence[Any] | None = None) -> Iterator[str]:
        """Yield text pieces as they decode. Pass ``result=GenerationResult(...)`` via
        :meth:`new_result` to read token ids, finish reason and timings afterwards."""
        result = self._start_images(prompt, images, result) if images else self._start(prompt, result)
        params = self.params(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                             top_k=top_k, repetition_penalty=repetition_penalty, seed=seed)
        yield from self._run(result, params, stop or ())

    def chat(self, messages: list[dict[str, Any]], stream: bool = False, **kwargs: Any):
        """Apply the artifact's chat template to ``messages`` and generate the assistant's reply.
        Content may be a list of OpenAI-shaped parts: text and ``image_url`` (data: URLs or paths)."""
        if any(isinstance(m, dict) and isinstance(m.get("content"), list) for m in messages):
            from .images import split_chat_images

            messages, images = split_chat_images(messages)
            if images:
                prompt = self.chat_prompt(messages)
                return self.stream(prompt, images=images, **kwargs) if stream else self.generate(
                    prompt, images=images, **kwargs)
        ids = self.chat_ids(messages)
        return self.stream(ids, **kwargs) if stream else self.generate(ids, **kwargs)

    def chat_prompt(self, messages: list[dict[str, Any]]) -> str:
        """The chat template rendered for ``messages``, with the assistant's turn opened."""
        tok = self.manifest.tokenizer
        return render_chat(self.manifest.chat_template, messages, add_generation_prompt=True,
                           bos_token=tok.get("bos_token", ""), eos_token=tok.get("eos_token", ""))

    def chat_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        """The prompt ids of ``messages``: exactly transformers' ``apply_chat_template(messages,
        add_generation_prompt=True)``: the template writes every special token (a ``{{ bos_token }}``
        included), so nothing is added around it."""
        return self.encode(self.chat_prompt(messages), add_special_tokens=False)

    @staticmethod
    def new_result() -> GenerationResult:
        return GenerationResult(text="", token_ids=[], prompt_token_ids=[], finish_reason="")

    def _prepare_images(self, prompt: str, images: list[Any]) -> list[int]:
        """Vision backends: take the images, return the prompt's ids (image tokens expanded)."""
        raise PhiEdgeError(f"this {self.format} artifact is text-only and takes no images; export "
                           f"Phi-4-multimodal for an onnx-genai target to prompt with images")

    def image_prompt_ids(self, prompt: str, images: Sequence[Any]) -> list[int]:
        """The prompt's ids with its images' tokens (images decoded and checked), without keeping the
        processed images for a generation: what a server counts before it queues a request."""
        try:
            return self._prepare_images(prompt, list(images))
        finally:
            self._forget_images()

    def _forget_images(self) -> None:
        """Drop images prepared for the next generation (vision backends)."""

    def _start_images(self, prompt: str | Sequence[int], images: Sequence[Any],
                      result: GenerationResult | None = None) -> GenerationResult:
        if not isinstance(prompt, str):
            raise PhiEdgeError("with images, pass the prompt as text (the image tokens are placed while encoding)")
        ids = self._prepare_images(prompt, list(images))
        result = result or self.new_result()
        result.prompt_token_ids = ids
        return result

    # ---- the one generation loop --------------------------------------------------------------
    def _start(self, prompt: str | Sequence[int], result: GenerationResult | None = None) -> GenerationResult:
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
        if not ids:
            raise PhiEdgeError("the prompt is empty; pass some text")
        if len(ids) >= self.context_length:
            raise ContextLengthError(
                f"the prompt is {len(ids)} tokens but this artifact's context is {self.context_length}; "
                f"shorten the prompt or re-export with a longer context"
            )
        result = result or self.new_result()
        result.prompt_token_ids = ids
        return result

    def _run(self, result: GenerationResult, params: SamplingParams, stop: Sequence[str]) -> Iterator[str]:
        prompt_ids = result.prompt_token_ids
        room = self.context_length - len(prompt_ids)
        want = params.max_new_tokens
        params.max_new_tokens = min(want, room)
        text_stream = self._text_stream(prompt_ids)
        timings = result.timings
        timings.prompt_tokens = len(prompt_ids)
        strings = StopStrings(stop)
        finish = "length"
        start = time.perf_counter()
        tokens = self._token_ids(prompt_ids, params)
        try:
            for token in tokens:
                now = time.perf_counter()
                if not result.token_ids and timings.time_to_first_token_s == 0:
                    timings.time_to_first_token_s = now - start
                timings.generated_tokens += 1
                if token in self.stop_token_ids:
                    finish = "stop"
                    break
                result.token_ids.append(token)
                piece = strings.feed(text_stream.put(token))
                if piece:
                    result.text += piece
                    yield piece
                if strings.hit:
                    finish = "stop"
                    break
                if len(result.token_ids) >= params.max_new_tokens:
                    break
        finally:
            tokens.close()
        tail = "" if strings.hit else strings.held + text_stream.flush()
        cut = _find_stop(tail, strings.stop) if strings.stop and tail else None
        if cut is not None:
            tail, finish = tail[:cut], "stop"
        if tail:
            result.text += tail
            yield tail
        timings.total_s = time.perf_counter() - start
        result.finish_reason = finish


class StopStrings:
    """Cuts streamed text at the first stop string, holding back a tail that could begin one."""

    def __init__(self, stop: Sequence[str]):
        self.stop = [s for s in stop if s]
        self.held = ""  # text not yet emitted because it might be the start of a stop string
        self.hit = False  # a stop string appeared: nothing after it is wanted

    def feed(self, piece: str) -> str:
        """The part of ``piece`` (with what was held) that is safe to emit now."""
        if not self.stop:
            return piece
        self.held += piece
        cut = _find_stop(self.held, self.stop)
        if cut is not None:
            out, self.held, self.hit = self.held[:cut], "", True
            return out
        safe = len(self.held) - _longest_stop_prefix(self.held, self.stop)
        out, self.held = self.held[:safe], self.held[safe:]
        return out


def _find_stop(text: str, stop: Sequence[str]) -> int | None:
    hits = [text.find(s) for s in stop if s and s in text]
    return min(hits) if hits else None


def _longest_stop_prefix(text: str, stop: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that could begin a stop string."""
    best = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
