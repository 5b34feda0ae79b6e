"""The tokenizer as llama.cpp reads it: ``tokenizer.ggml.*`` metadata from the artifact's tokenizer.json.

Two shapes of tokenizer.json occur in the Phi family:

- SentencePiece-style BPE (Phi-3, Phi-3.5: ``▁`` for spaces, byte fallback ``<0xNN>``): llama.cpp's
  ``llama`` (SPM) tokenizer. It merges by token score, so each token's score is minus the rank of the
  first merge that makes it: the order in which tokenizers' BPE applies the merges. Tokens no merge
  makes score below every merged one.
- byte-level BPE (Phi-4-mini's real tokenizer): llama.cpp's ``gpt2`` tokenizer with the merges and the
  ``gpt-4o`` pre-tokenizer (the split regex of Phi-4-mini's tokenizer).

Special tokens are CONTROL, other added tokens USER_DEFINED, ``<0xNN>`` BYTE, and the padding rows
the embedding has beyond the tokenizer (Phi-3's 32011 tokens in 32064 rows) UNUSED ``[PADn]``.
BOS/EOS and ``add_bos_token``/``add_eos_token`` are what the export measured from the source
(the manifest's ``prefix_ids``/``suffix_ids``).

llama.cpp decides per model *name* whether Phi-3's special tokens strip the whitespace after them
(``general.name`` containing "phi-3" or "phi3" turns on rstrip for every special token but ``<unk>``,
``<s>`` and ``<|endoftext|>``); :func:`phi3_strip_rule` says whether the source's added tokens follow
exactly that rule, and the writer names the model accordingly.
"""

from __future__ import annotations

import re
from typing import Any

from phi_edge.runtimes.errors import PhiEdgeError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
_NOT_STRIPPED = ("<unk>", "<s>", "<|endoftext|>")  # llama.cpp's phi-3 rule keeps these un-stripped


def kind(tj: dict[str, Any]) -> str:
    """``llama`` (SentencePiece-style) or ``gpt2`` (byte-level) for a tokenizer.json, else refuse."""
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise PhiEdgeError(f"the gguf exporter writes BPE tokenizers; this tokenizer.json has a "
                           f"{model.get('type')} model")
    text = str(tj.get("pre_tokenizer")) + str(tj.get("decoder"))
    if "ByteLevel" in text:
        return "gpt2"
    if model.get("byte_fallback") and "▁" in str(tj.get("normalizer")) + str(tj.get("pre_tokenizer")):
        return "llama"
    raise PhiEdgeError("the gguf exporter knows SentencePiece-style (▁, byte fallback) and byte-level BPE "
                       "tokenizers; this tokenizer.json is neither")


def phi3_strip_rule(tj: dict[str, Any]) -> bool:
    """Whether the source's special tokens strip exactly as llama.cpp's phi-3 name rule makes them."""
    specials = [t for t in tj.get("added_tokens", []) if t.get("special")]
    if not any(t["content"] == "<|end|>" for t in specials):
        return False
    for t in specials:
        want_rstrip = t["content"] not in _NOT_STRIPPED
        if bool(t.get("rstrip")) != want_rstrip or t.get("lstrip"):
            return False
    return True


def _merge_pairs(merges: list) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]


def tokens(tj: dict[str, Any], n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """(token texts, scores, token types) for ids 0..n_vocab-1."""
    model = tj["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["id"]: t for t in tj.get("added_tokens", [])}
    for i, t in added.items():
        vocab.setdefault(t["content"], i)
    if max(vocab.values()) >= n_vocab:
        raise PhiEdgeError(f"the tokenizer has ids up to {max(vocab.values())} but the model's embedding has "
                           f"{n_vocab} rows; the checkpoint and its tokenizer do not belong together")
    texts = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [UNUSED] * n_vocab
    for text, i in vocab.items():
        texts[i] = text
        types[i] = NORMAL
    made_by: dict[str, int] = {}
    for rank, (a, b) in enumerate(_merge_pairs(model.get("merges", []))):
        made_by.setdefault(a + b, rank)
    unmade = -float(len(made_by) + 1)
    scores = [unmade - 1] * n_vocab
    for text, i in vocab.items():
        scores[i] = -float(made_by[text]) if text in made_by else unmade
    unk = model.get("unk_token")
    for i in range(n_vocab):
        if i in added:
            types[i] = CONTROL if added[i].get("special") else USER_DEFINED
            scores[i] = 0.0
        elif texts[i] == unk:
            types[i] = UNKNOWN
        elif types[i] == NORMAL and _BYTE_TOKEN.match(texts[i]) and model.get("byte_fallback"):
            types[i] = BYTE
    return texts, scores, types


def write(writer, tj: dict[str, Any], n_vocab: int, behaviour) -> dict[str, Any]:
    """Add the ``tokenizer.ggml.*`` keys; returns what was written, for the manifest."""
    how = kind(tj)
    texts, scores, types = tokens(tj, n_vocab)
    writer.add_tokenizer_model(how)
    if how == "gpt2":
        writer.add_tokenizer_pre("gpt-4o")
        writer.add_token_merges([" ".join(p) for p in _merge_pairs(tj["model"].get("merges", []))])
    else:
        writer.add_tokenizer_pre("default")
        writer.add_token_scores(scores)
    writer.add_token_list(texts)
    writer.add_token_types(types)
    unk = tj["model"].get("unk_token")
    if unk is not None and unk in texts:
        writer.add_unk_token_id(texts.index(unk))
    if behaviour.bos_token_id is not None:
        writer.add_bos_token_id(behaviour.bos_token_id)
    if behaviour.eos_token_id is not None:
        writer.add_eos_token_id(behaviour.eos_token_id)
    writer.add_add_bos_token(behaviour.add_bos)
    writer.add_add_eos_token(behaviour.add_eos)
    if how == "llama":
        writer.add_add_space_prefix(_prepends_space(tj))
    return {"model": how, "tokens": len(texts), "add_bos_token": behaviour.add_bos,
            "add_eos_token": behaviour.add_eos}


def _prepends_space(tj: dict[str, Any]) -> bool:
    """Whether the tokenizer puts ``▁`` before the text (a Prepend normalizer or a Metaspace
    pre-tokenizer with prepend_scheme first/always)."""
    norm, pre = str(tj.get("normalizer")), tj.get("pre_tokenizer") or {}
    if "'Prepend'" in norm:
        return True
    return "Metaspace" in str(pre) and "'never'" not in str(pre)
