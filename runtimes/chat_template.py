"""Render a model's Jinja chat template the way Hugging Face does, without transformers.

Every backend renders chat through this one function, so ``chat()`` builds the same prompt on
every device.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any


@lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, indent=indent, ensure_ascii=False)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def render_chat(template: str, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                **special_tokens: str) -> str:
    """The prompt text for ``messages`` (a list of ``{"role", "content"}`` dicts).

    A system message that the template drops (Phi-3-mini's first template has no system branch)
    is an error, never silently lost.
    """
    from .errors import PhiEdgeError

    if not template:
        raise PhiEdgeError("this artifact has no chat template; pass plain text to generate() instead of chat()")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise PhiEdgeError(f"chat message {i} must be a dict with 'role' and 'content', got {m!r}")
    text = _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     **special_tokens)
    for m in messages:
        content = m["content"]
        if m["role"] == "system" and isinstance(content, str) and content.strip() and content not in text:
            raise PhiEdgeError("this model's chat template has no system role, so the system message would be "
                               "dropped; put its instructions at the start of the first user message instead")
    return text
