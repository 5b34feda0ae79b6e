"""Importance matrix from a local text: per-input-column mean squared activations of every linear layer.

The source checkpoint runs in transformers (float32) over ``--calibration-text`` cut into windows; a
forward hook on each ``nn.Linear`` adds up the squares of its inputs per input column. The result, keyed
by the GGUF tensor name of the layer's weight, is what llama.cpp's ``llama-imatrix`` computes and its
quantizers take as ``quant_weights`` (:mod:`.kquants`, :mod:`.legacy`). Expert matrices of a mixture of
experts are not ``nn.Linear`` modules in transformers 5 and get no entry (they are quantized plainly).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from phi_edge.runtimes.errors import PhiEdgeError

from . import tensors

SEQ_LEN = 512  # tokens per window (llama-imatrix's default context)
MAX_TOKENS = 4096  # at most this many tokens of the text are run (a 3.8B model in float32: about 5 minutes on 2 cores)
MIN_TOKENS = 16


def collect(ckpt_path: Path, text_file: str | Path, arch: str = "phi3", max_tokens: int = MAX_TOKENS,
            seq_len: int = SEQ_LEN) -> tuple[dict[str, np.ndarray], int]:
    """({GGUF weight name: mean squared input per column, float32}, tokens run)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ...source_tokenizer import SourceTokenizer
    from ..openvino.calibration import read_text, token_windows

    text = read_text(text_file)
    windows = token_windows(SourceTokenizer(ckpt_path).as_transformers(), text, seq_len=seq_len,
                            max_samples=max(1, max_tokens // seq_len))
    if not windows:
        raise PhiEdgeError(f"--calibration-text file '{text_file}' holds fewer than {MIN_TOKENS} tokens; "
                           f"pass more text (a few paragraphs at least)")
    model = AutoModelForCausalLM.from_pretrained(str(ckpt_path), dtype=torch.float32)
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def hook_for(name: str):
        def hook(module, args, output):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sq = (x * x).sum(0)
            sums[name] = sums[name] + sq if name in sums else sq
            counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            dst = tensors.gguf_name(f"{name}.weight", arch)
            if dst is not None:
                hooks.append(module.register_forward_hook(hook_for(dst)))
    tokens = 0
    try:
        with torch.no_grad():
            for ids in windows:
                model(torch.tensor([ids], dtype=torch.long), use_cache=False)
                tokens += len(ids)
    finally:
        for h in hooks:
            h.remove()
    return {name: (s / counts[name]).numpy().astype(np.float32) for name, s in sums.items()}, tokens


def element_weights(x: np.ndarray, importance: np.ndarray, sigma2: np.ndarray) -> np.ndarray:
    """llama.cpp's per-weight importance: the column's mean squared activation times
    sqrt(sigma2 + x^2), where sigma2 is the block's (or row's) mean square of the weights."""
    return importance * np.sqrt(sigma2 + x * x)
