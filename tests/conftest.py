"""Shared fixtures: tiny checkpoints and exports, built once per test session and reused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
REAL_TOKENIZER = REPO.parent / "shared" / "phi3-tokenizer"


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("phi-edge")


@pytest.fixture(scope="session")
def checkpoint(session_dir):
    """``checkpoint("phi3")`` -> folder of a tiny checkpoint of that family (built once)."""
    from phi_edge.exporter.fixtures import write_checkpoint

    built: dict[str, Path] = {}

    def get(family: str = "phi3") -> Path:
        if family not in built:
            built[family] = write_checkpoint(session_dir / "ckpt" / family, family)
        return built[family]

    return get


@pytest.fixture(scope="session")
def exported(session_dir, checkpoint):
    """``exported("rpi5", "int4", family="phi3", accuracy_level=0)`` -> artifact folder (built once
    per distinct arguments). Extra keyword arguments are quantization options."""
    from phi_edge.exporter.export import run_export

    built: dict[tuple, Path] = {}

    def get(target: str, precision: str | None = None, family: str = "phi3", context_length: int = 0,
            **quant) -> Path:
        key = (target, precision, family, context_length, tuple(sorted(quant.items())))
        if key not in built:
            name = "-".join(str(k) for k in key[:4]) + "".join(f"-{k}={v}" for k, v in key[4])
            out = session_dir / "artifacts" / name.replace("/", "_")
            run_export(str(checkpoint(family)), target, out, precision=precision, context_length=context_length,
                       quant=quant)
            built[key] = out
        return built[key]

    return get


@pytest.fixture(scope="session")
def reference(checkpoint):
    """``reference("phi3")`` -> the transformers reference model of that fixture (loaded once)."""
    from phi_edge.exporter.checkpoint import validate
    from phi_edge.exporter.reference import Reference

    loaded = {}

    def get(family: str = "phi3"):
        if family not in loaded:
            loaded[family] = Reference(validate(checkpoint(family)))
        return loaded[family]

    return get


@pytest.fixture(scope="session")
def real_tokenizer() -> Path:
    if not (REAL_TOKENIZER / "tokenizer.json").is_file():
        pytest.skip("../shared/phi3-tokenizer is not present (a fresh clone has none)")
    return REAL_TOKENIZER


def assert_matches_reference(rt, ref, prompt: str, new_tokens: int = 32) -> list[int]:
    """The artifact tokenizes ``prompt`` like the source, generates the reference's greedy tokens
    exactly, and its logits agree; returns the prompt ids."""
    import numpy as np

    ids = ref.encode(prompt)
    assert rt.encode(prompt) == ids  # tokenization survives the export, BOS included
    result = rt.generate(prompt, max_new_tokens=new_tokens, temperature=0)
    assert result.token_ids == ref.greedy(ids, new_tokens)
    assert result.finish_reason == "length"
    np.testing.assert_allclose(rt.logits(ids), ref.logits(ids), atol=2e-3)
    return ids


def assert_text_parity(rt, ref, prompts, new_tokens: int = 24) -> None:
    """Through text on both sides: the artifact's own encode -> greedy generate -> decoded text equals
    the reference's tokens and text, with the artifact's stop tokens on both."""
    for prompt in prompts:
        ours = rt.generate(prompt, max_new_tokens=new_tokens, temperature=0)
        theirs = ref.generate_text(prompt, new_tokens, stop_token_ids=sorted(rt.stop_token_ids))
        assert ours.prompt_token_ids == ref.encode(prompt)
        assert ours.token_ids == theirs.token_ids, prompt
        assert ours.text == theirs.text, prompt


def real_tokenizer_vectors(folder: Path) -> list[tuple[str, list[int]]]:
    """llama.cpp's Phi-3 tokenizer test vectors: (text, expected ids without BOS)."""
    inputs = (folder / "ggml-vocab-phi-3.gguf.inp").read_text().split("\n__ggml_vocab_test__\n")
    outputs = (folder / "ggml-vocab-phi-3.gguf.out").read_text().split("\n")
    return [(i, [int(x) for x in o.split()]) for i, o in zip(inputs, outputs)]


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(session_dir):
    """The demo checkpoint cache goes to the session folder, never the user's home."""
    old = os.environ.get("PHI_EDGE_CACHE")
    os.environ["PHI_EDGE_CACHE"] = str(session_dir / "cache")
    yield
    if old is None:
        os.environ.pop("PHI_EDGE_CACHE", None)
    else:
        os.environ["PHI_EDGE_CACHE"] = old
