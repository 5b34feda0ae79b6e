"""Ollama's ``Modelfile`` for a GGUF artifact: FROM the gguf file, the family's chat TEMPLATE, stops, num_ctx."""

from __future__ import annotations

from pathlib import Path
from typing import Any

NAME = "Modelfile"
# Ollama's Go-template form of the Phi chat templates, over .Messages as Ollama's own
# template/phi-3.gotmpl is written (Ollama puts the system prompt first in .Messages).
# Phi-3 / Phi-3.5: "<|system|>\n...<|end|>\n<|user|>\n...<|end|>\n<|assistant|>\n";
# Phi-4-mini: "<|system|>...<|end|><|user|>...<|end|><|assistant|>" (no newlines).
PHI3_TEMPLATE = "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n"
PHI4_MINI_TEMPLATE = "{{- range .Messages }}<|{{ .Role }}|>{{ .Content }}<|end|>{{ end }}<|assistant|>"
STOPS = ("<|end|>", "<|user|>", "<|assistant|>", "<|system|>", "<|endoftext|>")


def template(family: str) -> str:
    return PHI4_MINI_TEMPLATE if family == "phi4-mini" else PHI3_TEMPLATE


def parameters(context_length: int) -> dict[str, Any]:
    """The PARAMETERs, as Ollama's /api/create takes them (``stop`` a list)."""
    return {"stop": list(STOPS), "num_ctx": int(context_length)}


def render(gguf_file: str, family: str, context_length: int) -> str:
    lines = [f"FROM ./{gguf_file}", f'TEMPLATE """{template(family)}"""']
    params = parameters(context_length)
    lines += [f'PARAMETER stop "{s}"' for s in params["stop"]]
    lines.append(f"PARAMETER num_ctx {params['num_ctx']}")
    return "\n".join(lines) + "\n"


def write(folder: Path, gguf_file: str, family: str, context_length: int) -> Path:
    """Write ``Modelfile`` beside the gguf file: ``ollama create NAME -f Modelfile`` in the folder."""
    path = Path(folder) / NAME
    path.write_text(render(gguf_file, family, context_length))
    return path
