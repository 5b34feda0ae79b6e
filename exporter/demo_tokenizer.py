"""A self-made Llama-style BPE tokenizer with Phi-3's special tokens, for the demo checkpoints.

Same layout as Phi-3's real ``tokenizer.json`` (SentencePiece-style ``▁`` normalizer, byte
fallback, BOS added by the post-processor) and the same special tokens at the same ids, with a
small vocabulary learned from a built-in text. Deterministic: the same files every time.
"""

from __future__ import annotations

import json
from pathlib import Path

DATA = Path(__file__).with_name("data")
CHAT_TEMPLATE = (DATA / "phi3_chat_template.jinja").read_text()

# Phi-3 / Phi-3.5-mini special tokens and their ids
PHI3_SPECIAL = {
    "<|endoftext|>": 32000, "<|assistant|>": 32001, "<|placeholder1|>": 32002, "<|placeholder2|>": 32003,
    "<|placeholder3|>": 32004, "<|placeholder4|>": 32005, "<|system|>": 32006, "<|end|>": 32007,
    "<|placeholder5|>": 32008, "<|placeholder6|>": 32009, "<|user|>": 32010,
}
# Phi-4-mini's chat tokens sit at other ids in its 200k vocabulary
PHI4_SPECIAL = {
    "<|endoftext|>": 199999, "<|assistant|>": 200019, "<|end|>": 200020, "<|user|>": 200021,
    "<|system|>": 200022, "<|tool|>": 200023, "<|/tool|>": 200024,
}
LEARNED = 1200  # tokens the BPE trainer learns from the corpus
_SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "de", "pa", "zu", "mo", "ri", "ge", "ba", "fo"]


def _filler(i: int) -> str:
    """A pronounceable word for a vocabulary slot no merge reaches, so random output reads as words."""
    parts = []
    for _ in range(3):
        parts.append(_SYLLABLES[i % len(_SYLLABLES)])
        i //= len(_SYLLABLES)
    return "▁" + "".join(parts) + (str(i) if i else "")


def _learn_merges() -> tuple[list[str], list[list[str]]]:
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    # Learn merges within words only, as SentencePiece does: the runtimes' tokenizers (ORT
    # extensions, OpenVINO tokenizers) split at word starts and never apply a cross-word merge.
    # Like SentencePiece's split_by_unicode_script and Llama's split_digits, pieces are runs of
    # letters only: punctuation, digits and symbols stay single characters.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("▁", behavior="merged_with_next"),
        pre_tokenizers.Split(Regex("[^▁\\p{L}]"), behavior="isolated"),
    ])
    trainer = trainers.BpeTrainer(vocab_size=LEARNED, special_tokens=[], show_progress=False,
                                  limit_alphabet=200, initial_alphabet=[])
    lines = (DATA / "corpus.txt").read_text().splitlines()
    tok.train_from_iterator(lines, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    ordered = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
    return [t for t, _ in ordered], merges


def build_tokenizer_json(vocab_size: int, special: dict[str, int], add_bos: bool = True) -> dict:
    learned, merges = _learn_merges()
    vocab: dict[str, int] = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = 3 + b
    for t in learned:
        if t not in vocab:
            vocab[t] = len(vocab)
    first_special = min(special.values())
    i = 0
    while len(vocab) < first_special:
        vocab.setdefault(_filler(i), len(vocab))
        i += 1
    for name, idx in sorted(special.items(), key=lambda kv: kv[1]):
        while len(vocab) < idx:
            vocab[f"<|reserved_{len(vocab)}|>"] = len(vocab)
        vocab[name] = idx
    while len(vocab) < vocab_size:
        vocab[f"[PAD{len(vocab)}]"] = len(vocab)

    def added(content, idx, rstrip=False):
        return {"id": idx, "content": content, "single_word": False, "lstrip": False, "rstrip": rstrip,
                "normalized": False, "special": True}

    added_tokens = [added("<unk>", 0), added("<s>", 1), added("</s>", 2, True)]
    added_tokens += [added(n, i, n != "<|endoftext|>") for n, i in sorted(special.items(), key=lambda kv: kv[1])]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added_tokens,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
        "pre_tokenizer": None,
        "post_processor": None if not add_bos else {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
            {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }


def write_tokenizer(folder: Path, vocab_size: int = 32064, special: dict[str, int] | None = None,
                    model_max_length: int = 4096, add_bos: bool = True) -> None:
    """Phi-3's tokenizers add BOS; Phi-4-mini's (``add_bos=False``) do not."""
    special = special or PHI3_SPECIAL
    folder = Path(folder)
    (folder / "tokenizer.json").write_text(json.dumps(build_tokenizer_json(vocab_size, special, add_bos),
                                                      ensure_ascii=False))
    config = {
        "add_bos_token": add_bos, "add_eos_token": False, "bos_token": "<s>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "unk_token": "<unk>", "legacy": False, "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False, "padding_side": "left",
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<unk>"},
        indent=2) + "\n")
