"""The source checkpoint's tokenizer as its files are written: the encoding every artifact must reproduce.

The truth is ``tokenizer.json`` run by the ``tokenizers`` library, with ``tokenizer_config.json``'s
explicit ``add_bos_token`` / ``add_eos_token`` applied over the post-processor (as transformers 4's
Llama tokenizers and llama.cpp's converter read them); without those keys the post-processor alone
decides. BOS and EOS handling is probed from the ids the files return, not read from one key.

transformers 5 reads some checkpoints differently (it ignores ``add_bos_token`` for fast
tokenizers, and rebuilds a checkpoint declared ``LlamaTokenizer``, changing leading spaces), so it
is only a cross-check here: :func:`transformers_differences` reports where it disagrees.

An artifact gets normalised copies (:func:`write_artifact_files`): a post-processor that adds exactly
what the source adds and a ``tokenizer_config.json`` that says so explicitly, so every reader of the
artifact's files (transformers 4 or 5, tokenizers, the engines' own tokenizers) encodes alike.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from phi_edge.runtimes.errors import PhiEdgeError

# What every artifact's own tokenizer must encode exactly like the source (export refuses otherwise).
PROBES = (
    "Hello world!",
    "The quick brown fox jumps over the lazy dog.",
    " leading space",
    "  two leading spaces and  double  spaces inside",
    "trailing space ",
    "Führer café naïve résumé",
    "日本語のテキストと中文",
    "emoji 🦙🚀 and symbols ©®™",
    "Numbers 3.14159, 1,000,000 and 42",
    "Dates 2026-12-03 and 03/12/2026 at 05:28",
    "\ttabs\tand\nnewlines\n\n",
    "<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\n",
    "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n",
    "def f(x):\n    return x ** 2  # square\n",
)
LLAMA_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast", "CodeLlamaTokenizer", "CodeLlamaTokenizerFast")
# written by transformers 5's save_pretrained; transformers 4 (e.g. on a device) does not know it
TRANSFORMERS5_CLASSES = ("TokenizersBackend",)


@dataclass
class Behaviour:
    """What the source tokenizer adds around the text of every ``encode``."""

    prefix: list[int]  # ids added before the text (BOS for Phi-3; nothing for Phi-4-mini)
    suffix: list[int]  # ids added after it (usually nothing)
    decided_by: str  # which file and key decided prefix/suffix
    bos_token: str | None = None
    bos_token_id: int | None = None
    eos_token: str | None = None
    eos_token_id: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def add_bos(self) -> bool:
        return self.bos_token_id is not None and self.prefix == [self.bos_token_id]

    @property
    def add_eos(self) -> bool:
        return self.eos_token_id is not None and self.suffix == [self.eos_token_id]


def _token_text(v: Any) -> str | None:
    if isinstance(v, dict):
        return v.get("content")
    return v or None


class SourceTokenizer:
    """``encode``/``decode`` exactly as the checkpoint's tokenizer files say."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer

        self.path = Path(path)
        tj = self.path / "tokenizer.json"
        if not tj.is_file():
            raise PhiEdgeError(
                f"'{self.path}' has no tokenizer.json; phi-edge reads tokenizers from tokenizer.json "
                f"(a checkpoint with only tokenizer.model needs one: copy it from the original repository, "
                f"or write it with transformers' AutoTokenizer.save_pretrained and check its encodings)")
        try:
            self.json = json.loads(tj.read_text())
            self._tok = Tokenizer.from_str(json.dumps(self.json))
        except (ValueError, Exception) as e:  # tokenizers raises a plain Exception for a bad model
            raise PhiEdgeError(f"{tj} cannot be read by the tokenizers library ({e}); re-download it") from None
        cfg = self.path / "tokenizer_config.json"
        try:
            self.config: dict[str, Any] = json.loads(cfg.read_text()) if cfg.is_file() else {}
        except ValueError as e:
            raise PhiEdgeError(f"{cfg} is not valid JSON ({e}); re-download the checkpoint") from None
        self.behaviour = self._probe()

    # ---- what the files add ------------------------------------------------------------------------
    def _special_id(self, name: str) -> tuple[str | None, int | None]:
        text = _token_text(self.config.get(name))
        if text is None:
            special_map = self.path / "special_tokens_map.json"
            if special_map.is_file():
                text = _token_text(json.loads(special_map.read_text()).get(name))
        return text, (self._tok.token_to_id(text) if text else None)

    def _probe(self) -> Behaviour:
        prefix = suffix = None
        for text in ("Hello", "a b c", "x"):
            plain = self._tok.encode(text, add_special_tokens=False).ids
            full = self._tok.encode(text, add_special_tokens=True).ids
            n = len(full) - len(plain)
            start = next((i for i in range(n + 1) if full[i:i + len(plain)] == plain), None)
            if start is None:
                raise PhiEdgeError(f"{self.path / 'tokenizer.json'}'s post-processor changes the text's own ids; "
                                   f"phi-edge cannot carry such a tokenizer to a device")
            p, s = full[:start], full[start + len(plain):]
            if prefix is not None and (p, s) != (prefix, suffix):
                raise PhiEdgeError(f"{self.path / 'tokenizer.json'}'s post-processor adds different tokens to "
                                   f"different texts; phi-edge cannot carry such a tokenizer to a device")
            prefix, suffix = p, s
        bos, bos_id = self._special_id("bos_token")
        eos, eos_id = self._special_id("eos_token")
        decided = ["tokenizer.json post-processor"]
        notes: list[str] = []
        for key, token, token_id, is_bos in (("add_bos_token", bos, bos_id, True), ("add_eos_token", eos, eos_id, False)):
            if key not in self.config:
                continue
            want = bool(self.config[key])
            if want and token_id is None:
                raise PhiEdgeError(f"{self.path / 'tokenizer_config.json'} sets {key} but names no "
                                   f"{'bos' if is_bos else 'eos'}_token in the vocabulary; fix the tokenizer config")
            current = prefix if is_bos else suffix
            new = [token_id] if want else [i for i in current if i != token_id]
            if new != current:
                notes.append(f"tokenizer_config.json's {key}: {str(want).lower()} overrides tokenizer.json's "
                             f"post-processor ({'adds' if current else 'adds nothing'} {current or ''} -> {new or 'nothing'})"
                             .replace(" ''", ""))
            if is_bos:
                prefix = new
            else:
                suffix = new
            decided.append(f"tokenizer_config.json {key}")
        return Behaviour(prefix=list(prefix), suffix=list(suffix), decided_by=" + ".join(decided), bos_token=bos,
                         bos_token_id=bos_id, eos_token=eos, eos_token_id=eos_id, notes=notes)

    # ---- encode / decode ---------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if not add_special_tokens:
            return list(ids)
        return self.behaviour.prefix + list(ids) + self.behaviour.suffix

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    # ---- the artifact's copies ---------------------------------------------------------------------
    def normalized_json(self) -> dict[str, Any]:
        """tokenizer.json whose post-processor adds exactly ``prefix`` and ``suffix``."""
        tj = json.loads(json.dumps(self.json))
        b = self.behaviour
        plain_again = self._tok.encode("Hello", add_special_tokens=True).ids
        if plain_again == b.prefix + self._tok.encode("Hello", add_special_tokens=False).ids + b.suffix:
            return tj  # the post-processor already says it
        if not b.prefix and not b.suffix:
            tj["post_processor"] = None
            return tj

        def piece(ids: list[int], type_id: int):
            return [{"SpecialToken": {"id": self._tok.id_to_token(i), "type_id": type_id}} for i in ids]

        specials = {self._tok.id_to_token(i): {"id": self._tok.id_to_token(i), "ids": [i],
                                               "tokens": [self._tok.id_to_token(i)]} for i in b.prefix + b.suffix}
        tj["post_processor"] = {
            "type": "TemplateProcessing",
            "single": piece(b.prefix, 0) + [{"Sequence": {"id": "A", "type_id": 0}}] + piece(b.suffix, 0),
            "pair": piece(b.prefix, 0) + [{"Sequence": {"id": "A", "type_id": 0}}] + piece(b.suffix, 0)
                    + piece(b.prefix, 1) + [{"Sequence": {"id": "B", "type_id": 1}}] + piece(b.suffix, 1),
            "special_tokens": specials,
        }
        return tj

    def normalized_config(self) -> dict[str, Any]:
        cfg = dict(self.config)
        if cfg.get("tokenizer_class") in LLAMA_CLASSES + TRANSFORMERS5_CLASSES:
            cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        cfg["add_bos_token"] = self.behaviour.add_bos
        cfg["add_eos_token"] = self.behaviour.add_eos
        return cfg

    def changes_for_artifact(self) -> list[str]:
        """What :func:`write_artifact_files` changes in the copies, in words (for the manifest)."""
        out = list(self.behaviour.notes)
        if self.normalized_json().get("post_processor") != self.json.get("post_processor"):
            out.append("the artifact's tokenizer.json post-processor adds exactly what the source adds")
        cls = self.config.get("tokenizer_class")
        if cls in TRANSFORMERS5_CLASSES:
            out.append(f"tokenizer_config.json's tokenizer_class {cls} -> PreTrainedTokenizerFast in the artifact, "
                       f"which transformers 4 reads too")
        if cls in LLAMA_CLASSES:
            out.append(f"tokenizer_config.json's tokenizer_class {cls} -> PreTrainedTokenizerFast in the artifact, so "
                       f"transformers 5 reads tokenizer.json as written instead of rebuilding it")
        return out

    def as_transformers(self):
        """A transformers tokenizer that encodes exactly like this one (for tools that want one)."""
        from tokenizers import Tokenizer
        from transformers import PreTrainedTokenizerFast

        b = self.behaviour
        specials = {k: _token_text(self.config.get(k)) for k in ("unk_token", "pad_token")}
        tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(self.normalized_json())),
                                      bos_token=b.bos_token, eos_token=b.eos_token,
                                      **{k: v for k, v in specials.items() if v})
        template = chat_template_of(self.path, self.config)
        if template:
            tok.chat_template = template
        return tok


def chat_template_of(path: Path, config: dict[str, Any]) -> str:
    """The checkpoint's chat template: tokenizer_config.json's, else chat_template.jinja's."""
    template = config.get("chat_template") or ""
    if isinstance(template, list):  # named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), "")
    if not template and (Path(path) / "chat_template.jinja").is_file():
        template = (Path(path) / "chat_template.jinja").read_text()
    return template


def write_artifact_files(src: SourceTokenizer, folder: Path) -> None:
    """The normalised tokenizer.json and tokenizer_config.json, written into an artifact folder."""
    folder = Path(folder)
    (folder / "tokenizer.json").write_text(json.dumps(src.normalized_json(), ensure_ascii=False))
    (folder / "tokenizer_config.json").write_text(json.dumps(src.normalized_config(), indent=2, ensure_ascii=False)
                                                  + "\n")


def transformers_differences(src: SourceTokenizer, trust_remote_code: bool = False,
                             probes: Sequence[str] = PROBES) -> list[dict[str, Any]]:
    """Probes that transformers' AutoTokenizer encodes differently from the files as written."""
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(str(src.path), trust_remote_code=trust_remote_code)
    except Exception as e:  # a tokenizer transformers cannot load at all is a difference too
        return [{"text": "", "transformers": f"cannot load: {type(e).__name__}: {e}", "files": []}]
    out = []
    for p in probes:
        ours, theirs = src.encode(p), list(hf(p)["input_ids"])
        if ours != theirs:
            out.append({"text": p, "transformers": theirs, "files": ours})
    return out


def describe_differences(diffs: list[dict[str, Any]], n_probes: int = len(PROBES)) -> str:
    if not diffs:
        return f"transformers' AutoTokenizer agrees on all {n_probes} probes"
    d = diffs[0]
    return (f"transformers {_transformers_version()} encodes {len(diffs)} of {n_probes} probes differently "
            f"(first {d['text']!r}: transformers {d['transformers']}, files as written {d['files']}); "
            f"phi-edge follows the files as written, as the model was trained")


def _transformers_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformers")
    except PackageNotFoundError:
        return "(not installed)"


def first_mismatch(encode, src: SourceTokenizer, probes: Sequence[str] = PROBES) -> tuple[str, list[int], list[int]] | None:
    """The first probe that ``encode`` (an artifact's own tokenizer) encodes differently from the source."""
    for p in probes:
        ours, want = list(encode(p)), src.encode(p)
        if ours != want:
            return p, ours, want
    return None


def manifest_entry(src: SourceTokenizer, transformers_check: str) -> dict[str, Any]:
    """The manifest's ``tokenizer`` section."""
    b = src.behaviour
    return {"bos_token": b.bos_token or "", "bos_token_id": b.bos_token_id, "eos_token": b.eos_token or "",
            "eos_token_id": b.eos_token_id, "add_bos_token": b.add_bos, "add_eos_token": b.add_eos,
            "prefix_ids": b.prefix, "suffix_ids": b.suffix, "decided_by": b.decided_by,
            "transformers_check": transformers_check, "artifact_changes": src.changes_for_artifact()}


def behaviour_dict(src: SourceTokenizer) -> dict[str, Any]:
    return asdict(src.behaviour)
