"""``phi-export eval``: quality after quantization on the user's own local text.

Scores the artifact and the reference over the same sliding windows of the same tokens through one
interface (``encode`` + ``logits``), so every backend is measured the same way: perplexity of
each, their ratio, mean KL divergence of the next-token distributions, and top-1 agreement.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from phi_edge.runtimes.errors import PhiEdgeError

DEFAULT_TEXT = Path(__file__).with_name("data") / "corpus.txt"


@dataclass
class EvalReport:
    artifact: str
    reference: str
    text: str
    tokens_scored: int
    windows: int
    window: int
    stride: int
    perplexity: float
    reference_perplexity: float
    perplexity_ratio: float
    mean_kl: float
    top1_agreement: float
    # how the artifact's logits were computed where that is not simply its runtime's forward pass
    # (e.g. GGUF: llama.cpp's hidden states times the stored output matrix in numpy); "" otherwise
    logits: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def open_scorer(path: str):
    """An artifact folder (through phi_edge.runtimes) or a checkpoint (through transformers)."""
    from phi_edge.runtimes.manifest import MANIFEST_NAME, read_manifest

    if (Path(path) / MANIFEST_NAME).is_file():
        from phi_edge.runtimes import load
        from phi_edge.runtimes.errors import BackendUnavailableError

        try:
            return load(path)
        except BackendUnavailableError:
            if read_manifest(path).format != "coreml":
                raise
            # no Core ML here: the package's stored weights, read back and dequantized, computing in torch
            from .formats.coreml.readback import stored_weights_runtime

            return stored_weights_runtime(Path(path))
    from .progress import tool_output_to_log
    from .reference import load_reference

    with tool_output_to_log("loading the reference checkpoint"):
        return load_reference(path)


def windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first scored position) for each window: every token after the first is scored
    once, each with up to ``window - stride`` tokens of context from the window before."""
    spans, scored_to = [], 1
    start = 0
    while scored_to < n_tokens:
        end = min(start + window, n_tokens)
        spans.append((start, end, scored_to))
        scored_to = end
        start = max(end - (window - stride), 0) if end < n_tokens else end
    return spans


def evaluate(artifact: str, against: str, text_file: str | None = None, window: int = 128, stride: int = 64,
             max_tokens: int = 2048, scorer=None, reference=None) -> EvalReport:
    if not 0 < stride <= window:
        raise PhiEdgeError(f"--stride must be in (0, --window], got stride {stride} and window {window}")
    path = Path(text_file) if text_file else DEFAULT_TEXT
    if not path.is_file():
        raise PhiEdgeError(f"text file '{path}' does not exist; pass a local text file with --text")
    text = path.read_text(errors="replace")
    ours = scorer or open_scorer(artifact)
    ref = reference or open_scorer(against)
    ids = ref.encode(text)[:max_tokens]
    if ours.encode(text)[:max_tokens] != ids:
        raise PhiEdgeError("the artifact's tokenizer disagrees with the reference's on this text; "
                           "the artifact was not exported from this checkpoint (or its tokenizer is broken)")
    if len(ids) < 2:
        raise PhiEdgeError(f"'{path}' has fewer than 2 tokens; pass a longer text")
    limit = getattr(ours, "context_length", None)
    if limit:
        window = min(window, limit - 1)
        stride = min(stride, window)
    nll, ref_nll, kls, agree = [], [], [], []
    spans = windows(len(ids), window, stride)
    for start, end, first in spans:
        chunk = ids[start:end]
        a = _log_softmax(ours.logits(chunk))
        b = _log_softmax(ref.logits(chunk))
        vocab = min(a.shape[-1], b.shape[-1])
        a, b = a[:, :vocab], b[:, :vocab]
        # position p predicts token p+1; score predictions of tokens first..end-1
        rows = np.arange(first - start - 1, end - start - 1)
        targets = np.asarray(chunk)[rows + 1]
        nll.extend(-a[rows, targets])
        ref_nll.extend(-b[rows, targets])
        pb = np.exp(b[rows])
        kls.extend((pb * (b[rows] - a[rows])).sum(-1))
        agree.extend(a[rows].argmax(-1) == b[rows].argmax(-1))
    ppl, ref_ppl = float(np.exp(np.mean(nll))), float(np.exp(np.mean(ref_nll)))
    return EvalReport(artifact=str(artifact), reference=str(against), text=str(path), tokens_scored=len(nll),
                      windows=len(spans), window=window, stride=stride, perplexity=round(ppl, 4),
                      reference_perplexity=round(ref_ppl, 4), perplexity_ratio=round(ppl / ref_ppl, 6),
                      mean_kl=round(max(float(np.mean(kls)), 0.0), 8), top1_agreement=round(float(np.mean(agree)), 6),
                      logits=str(getattr(ours, "logits_note", "") or ""))
