"""Calibration data for OpenVINO's data-aware weight compression (AWQ, scale estimation, GPTQ).

Built from a local text file only: the text is tokenized with the checkpoint's own tokenizer,
cut into windows, and each window becomes the inputs the exported model takes (through
optimum-intel's ``prepare_inputs``, as optimum-intel does for its own datasets). Nothing is
fetched from the hub.
"""

from __future__ import annotations

from pathlib import Path

from phi_edge.runtimes.errors import PhiEdgeError

SEQ_LEN = 128  # tokens per sample
MAX_SAMPLES = 128  # NNCF's default number of calibration samples
MIN_TOKENS = 16  # a shorter text calibrates nothing


def read_text(path: str | Path) -> str:
    p = Path(path)
    if not p.is_file():
        raise PhiEdgeError(f"--calibration-text file '{p}' does not exist; pass a local text file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PhiEdgeError(f"--calibration-text file '{p}' is not UTF-8 text; pass a plain text file") from None
    if not text.strip():
        raise PhiEdgeError(f"--calibration-text file '{p}' is empty; pass a text file with a few paragraphs "
                           f"of the kind of text the model will see")
    return text


def token_windows(tokenizer, text: str, seq_len: int = SEQ_LEN, max_samples: int = MAX_SAMPLES) -> list[list[int]]:
    """``text`` as windows of at most ``seq_len`` tokens, each starting with the special tokens the
    tokenizer puts at the start of a prompt (BOS for Phi-3)."""
    prefix = list(tokenizer("", add_special_tokens=True)["input_ids"])
    body = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    step = max(seq_len - len(prefix), 1)
    windows = [prefix + body[i:i + step] for i in range(0, len(body), step)]
    windows = [w for w in windows if len(w) - len(prefix) >= MIN_TOKENS]
    return windows[:max_samples]


def dataset(model, checkpoint_path: Path, text_file: str | Path, trust_remote_code: bool = False):
    """An ``nncf.Dataset`` of model inputs for the exported ``OVModelForCausalLM`` ``model``."""
    import nncf
    import torch

    from ...source_tokenizer import SourceTokenizer

    text = read_text(text_file)
    tokenizer = SourceTokenizer(checkpoint_path).as_transformers()
    windows = token_windows(tokenizer, text)
    if not windows:
        raise PhiEdgeError(f"--calibration-text file '{text_file}' holds fewer than {MIN_TOKENS} tokens; "
                           f"pass more text (a few paragraphs at least)")

    def inputs(ids: list[int]):
        t = torch.tensor([ids], dtype=torch.long)
        return model.prepare_inputs(input_ids=t, attention_mask=torch.ones_like(t))

    return nncf.Dataset(windows, inputs), len(windows)
