"""The transformers reference: what the source checkpoint itself says, for verify and eval.

The model runs in transformers (fp32, CPU); text goes through the checkpoint's tokenizer files as
written (:class:`~phi_edge.exporter.source_tokenizer.SourceTokenizer`), the same truth every
artifact is checked against, so a transformers release that reads a tokenizer differently does
not move the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np


@dataclass
class ReferenceText:
    token_ids: list[int]  # new tokens, the stop token excluded (as the runtimes report them)
    text: str
    finish_reason: str  # "stop" or "length"


class Reference:
    """The source checkpoint in fp32 on the CPU, with its own tokenizer files."""

    def __init__(self, ckpt):
        import torch
        from transformers import AutoModelForCausalLM

        from .artifact import stop_token_ids
        from .source_tokenizer import SourceTokenizer

        self.ckpt = ckpt
        self._torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(
            str(ckpt.path), dtype=torch.float32, trust_remote_code=ckpt.trust_remote_code)
        self.model.eval()
        self.tokenizer = SourceTokenizer(ckpt.path)
        self.stop_token_ids = stop_token_ids(ckpt, ckpt.generation_config())

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    def greedy(self, ids: Sequence[int], max_new_tokens: int, stop_token_ids: Sequence[int] | None = None) -> list[int]:
        """Greedy continuation of ``ids``; with ``stop_token_ids`` it stops at the first of them
        (not included), as the runtimes do; without, it runs the full ``max_new_tokens``."""
        torch = self._torch
        stops = list(stop_token_ids or [])
        with torch.no_grad():
            out = self.model.generate(torch.tensor([list(ids)]), max_new_tokens=max_new_tokens, do_sample=False,
                                      eos_token_id=stops or None, pad_token_id=stops[0] if stops else 0,
                                      attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        new = out[0, len(ids):].tolist()
        if stops and new and new[-1] in stops:
            new = new[:-1]
        return new

    def generate_text(self, prompt: str, max_new_tokens: int, stop_token_ids: Sequence[int] | None = None) -> ReferenceText:
        """``prompt`` through the source tokenizer, greedy generation with the same stop tokens as
        the artifact, and the decoded text."""
        ids = self.encode(prompt)
        stops = list(self.stop_token_ids if stop_token_ids is None else stop_token_ids)
        new = self.greedy(ids, max_new_tokens, stops)
        finish = "stop" if len(new) < max_new_tokens else "length"
        return ReferenceText(token_ids=new, text=self.continuation(ids, new), finish_reason=finish)

    def continuation(self, prompt_ids: Sequence[int], new_ids: Sequence[int]) -> str:
        """The text ``new_ids`` add after the prompt (a leading space kept), as the runtimes stream it."""
        context = list(prompt_ids[-1:])
        return self.decode(context + list(new_ids))[len(self.decode(context)):]

    def chat_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        """transformers' ``apply_chat_template(messages, add_generation_prompt=True)`` on the
        tokenizer files as written."""
        out = self.tokenizer.as_transformers().apply_chat_template(messages, add_generation_prompt=True,
                                                                   tokenize=True)
        if isinstance(out, dict) or hasattr(out, "keys"):
            out = out["input_ids"]
        return [int(i) for i in out]

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        torch = self._torch
        with torch.no_grad():
            return self.model(torch.tensor([list(ids)])).logits[0].float().numpy()


def load_reference(source: str | Path):
    from .checkpoint import resolve

    return Reference(resolve(str(source)))
