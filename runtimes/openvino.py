"""OpenVINO GenAI backend: runs ``openvino`` artifacts on Intel CPUs, GPUs and NPUs.

Generation is ``openvino_genai.LLMPipeline`` (its sampler, KV cache and tokenizer models);
``logits()`` runs the stateful IR itself through ``openvino.Core``, because the pipeline does not
expose logits. Imports openvino and openvino_genai only.
"""

from __future__ import annotations

import functools
import queue
import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from . import require
from .base import Runtime, SamplingParams
from .errors import ContextLengthError, PhiEdgeError
from .manifest import Manifest

FORMAT = "openvino"
MODEL_XML = "openvino_model.xml"
_DONE = object()


def available_devices(ov) -> list[str]:
    return list(ov.Core().available_devices)


def pick_device(requested: str, available: list[str]) -> str:
    """``requested`` if this machine has it (``GPU`` matches ``GPU.0``), else a clear error."""
    want = requested.upper()
    if want in available or any(d.split(".")[0] == want for d in available):
        return want
    raise PhiEdgeError(f"OpenVINO device '{requested}' is not present on this machine; available: "
                       f"{', '.join(available) or 'none'} (run it on one of those: --device CPU, "
                       f"or device='CPU' in Python)")


class OpenVINORuntime(Runtime):
    format = FORMAT

    def __init__(self, folder: Path, manifest: Manifest, device: str | None = None):
        ov = require("openvino", FORMAT)
        og = require("openvino_genai", FORMAT)
        device = pick_device(device or manifest.runtime.get("device", "CPU"), available_devices(ov))
        super().__init__(folder, manifest, device)
        self._ov, self._og = ov, og
        self._properties = properties(manifest.runtime, device)
        self.max_prompt_len = int(self._properties.get("MAX_PROMPT_LEN", 0)) or None
        if self.max_prompt_len:  # the NPU's static window: prompt plus the guaranteed response
            self.context_length = min(self.context_length,
                                      self.max_prompt_len + int(self._properties["MIN_RESPONSE_LEN"]))
        try:
            self._pipe = og.LLMPipeline(str(folder), device, **self._properties)
        except Exception as e:  # the engine raises plain RuntimeError
            raise PhiEdgeError(f"OpenVINO GenAI could not load {folder} on {device}: {str(e).strip()[:400]}") from None
        self._tokenizer = self._pipe.get_tokenizer()
        self._request = None  # the raw IR for logits(), compiled on first use
        # logits() compiles the IR on the CPU for an NPU artifact (the NPU needs static shapes)
        self.logits_device = "CPU" if device == "NPU" else device

    def _encode_plain(self, text: str) -> list[int]:
        # the checkpoint's own tokenizer converted by openvino-tokenizers, without its special tokens:
        # the base class adds what the manifest says
        ids = self._tokenizer.encode(text, add_special_tokens=False).input_ids.data
        return [int(i) for i in ids[0]]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def _start(self, prompt, result=None):
        result = super()._start(prompt, result)
        n = len(result.prompt_token_ids)
        if self.max_prompt_len and n > self.max_prompt_len:
            raise ContextLengthError(
                f"the prompt is {n} tokens but this artifact takes at most {self.max_prompt_len} on the {self.device} "
                f"(max_prompt_len); shorten the prompt, or run it on the CPU (--device CPU, or device='CPU' in Python)")
        return result

    def generation_config(self, params: SamplingParams):
        cfg = self._og.GenerationConfig()
        cfg.max_new_tokens = params.max_new_tokens
        cfg.do_sample = not params.greedy
        cfg.repetition_penalty = params.repetition_penalty
        if not params.greedy:
            cfg.temperature = params.temperature
            cfg.top_p = params.top_p
            cfg.top_k = params.top_k
        if params.seed is not None:
            cfg.rng_seed = int(params.seed)
        # the pipeline fills an unset EOS or an empty stop set from generation_config.json: set both,
        # and with no stop tokens at all tell it to ignore EOS
        stops = sorted(self.stop_token_ids)
        if stops:
            cfg.eos_token_id = stops[0]
            cfg.stop_token_ids = set(stops)
        else:
            cfg.ignore_eos = True
        return cfg

    def _token_ids(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[int]:
        """The pipeline generates on a thread; its streamer hands each token id over a queue, and
        tells the pipeline to stop once this generator is closed."""
        ov, og = self._ov, self._og
        ids = np.asarray([prompt_ids], dtype=np.int64)
        inputs = og.TokenizedInputs(ov.Tensor(ids), ov.Tensor(np.ones_like(ids)))
        tokens: queue.Queue = queue.Queue()
        stop = threading.Event()
        streamer = _streamer_class(og)(tokens, stop)
        config = self.generation_config(params)
        failure: list[BaseException] = []

        def run() -> None:
            try:
                self._pipe.generate(inputs, config, streamer)
            except BaseException as e:  # handed to the consumer below
                failure.append(e)
            finally:
                tokens.put(_DONE)

        worker = threading.Thread(target=run, name="openvino-genai-generate", daemon=True)
        worker.start()
        try:
            while (item := tokens.get()) is not _DONE:
                yield item
        finally:
            stop.set()
            worker.join()
        if failure:
            raise PhiEdgeError(f"OpenVINO GenAI failed while generating: {str(failure[0]).strip()[:400]}")

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        request = self._logits_request()
        n = len(ids)
        feed = {"input_ids": np.asarray([ids], dtype=np.int64), "attention_mask": np.ones((1, n), dtype=np.int64),
                "position_ids": np.arange(n, dtype=np.int64)[None], "beam_idx": np.zeros(1, dtype=np.int32)}
        request.reset_state()
        out = request.infer({k: v for k, v in feed.items() if k in self._inputs})
        request.reset_state()
        return np.asarray(out[self._logits_output], dtype=np.float32).reshape(n, -1)

    def _logits_request(self):
        """The stateful IR compiled on this device (the CPU for an NPU, which needs static shapes)."""
        if self._request is None:
            core = self._ov.Core()
            model = core.read_model(str(self.folder / MODEL_XML))
            device = self.logits_device
            compiled = core.compile_model(model, device, properties(self.manifest.runtime, device))
            self._inputs = {i.get_any_name() for i in compiled.inputs}
            self._logits_output = compiled.output("logits")
            self._request = compiled.create_infer_request()
        return self._request


@functools.lru_cache(maxsize=None)
def _streamer_class(og):
    """A ``StreamerBase`` that puts each token id on a queue and answers STOP once asked to."""

    class QueueStreamer(og.StreamerBase):
        def __init__(self, tokens: queue.Queue, stop: threading.Event):
            super().__init__()
            self._tokens, self._stop = tokens, stop

        def write(self, token) -> Any:
            for t in token if isinstance(token, (list, tuple)) else (token,):
                self._tokens.put(int(t))
            return og.StreamingStatus.STOP if self._stop.is_set() else og.StreamingStatus.RUNNING

        def end(self) -> None:
            pass

    return QueueStreamer


def properties(runtime: dict[str, Any], device: str) -> dict[str, Any]:
    """OpenVINO properties for ``device`` from the manifest's runtime settings."""
    device = device.split(".")[0]
    props = dict((runtime.get("properties") or {}).get(device, {}))
    if device == "NPU" and runtime.get("max_prompt_len"):
        props["MAX_PROMPT_LEN"] = int(runtime["max_prompt_len"])
        props["MIN_RESPONSE_LEN"] = int(runtime.get("min_response_len", 128))
    return props


def open_artifact(folder: Path, manifest: Manifest, device: str | None = None) -> OpenVINORuntime:
    return OpenVINORuntime(folder, manifest, device)
