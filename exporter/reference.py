"""The transformers reference: what the source checkpoint itself says, for verify and eval."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


class Reference:
    """The source checkpoint in fp32 on the CPU, with its own tokenizer."""

    def __init__(self, ckpt):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.ckpt = ckpt
        self._torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(
            str(ckpt.path), dtype=torch.float32, trust_remote_code=ckpt.trust_remote_code)
        self.model.eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(ckpt.path), trust_remote_code=ckpt.trust_remote_code)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def greedy(self, ids: Sequence[int], max_new_tokens: int) -> list[int]:
        torch = self._torch
        with torch.no_grad():
            out = self.model.generate(torch.tensor([list(ids)]), max_new_tokens=max_new_tokens, do_sample=False,
                                      eos_token_id=None, pad_token_id=0, attention_mask=torch.ones(1, len(ids),
                                                                                                   dtype=torch.long))
        return out[0, len(ids):].tolist()

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        torch = self._torch
        with torch.no_grad():
            return self.model(torch.tensor([list(ids)])).logits[0].float().numpy()


def load_reference(source: str | Path):
    from .checkpoint import resolve

    return Reference(resolve(str(source)))
