"""Request bodies in, response bodies out: the subset of the OpenAI chat and completions API served."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from .errors import bad_request

ROLES = {"system", "user", "assistant"}
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system role
MAX_STOP = 16


@dataclass
class GenRequest:
    """One validated request: what to generate from and how."""

    kind: str  # "chat" or "completion"
    model: str | None
    messages: list[dict[str, Any]] = field(default_factory=list)  # content: text, or text and image parts
    has_images: bool = False
    prompt: str | list[int] = ""
    max_tokens: int | None = None
    sampling: dict[str, Any] = field(default_factory=dict)  # temperature, top_p, seed, stop
    stream: bool = False
    include_usage: bool = False


def _number(body: dict, name: str, lo: float, hi: float, integer: bool = False):
    value = body.get(name)
    if value is None:
        return None
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise bad_request(f"'{name}' must be {'an integer' if integer else 'a number'}, got {value!r}", param=name)
    if not lo <= value <= hi:
        raise bad_request(f"'{name}' must be between {lo} and {hi}, got {value}", param=name)
    return value


def _stop(body: dict) -> list[str] | None:
    stop = body.get("stop")
    if stop is None:
        return None
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise bad_request("'stop' must be a string or a list of strings", param="stop")
    if len(stop) > MAX_STOP:
        raise bad_request(f"'stop' takes at most {MAX_STOP} strings, got {len(stop)}", param="stop")
    return [s for s in stop if s] or None


def _common(body: Any, kind: str) -> GenRequest:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request("'model' must be a string", param="model")
    if body.get("n", 1) != 1:
        raise bad_request("only n=1 is supported: this server runs one generation per request", param="n")
    for name in ("tools", "functions", "logprobs", "top_logprobs", "echo", "suffix"):
        if body.get(name) not in (None, False, [], ""):
            raise bad_request(f"'{name}' is not supported by this server", param=name)
    if body.get("best_of") not in (None, 1):
        raise bad_request("'best_of' is not supported by this server", param="best_of")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request("'stream' must be true or false", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object", param="stream_options")
    max_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, max_name, 1, 1 << 31, integer=True)
    sampling = {"temperature": _number(body, "temperature", 0, 2), "top_p": _number(body, "top_p", 0, 1),
                "seed": _number(body, "seed", -(1 << 63), (1 << 64) - 1, integer=True), "stop": _stop(body)}
    if sampling["top_p"] == 0:
        raise bad_request("'top_p' must be greater than 0", param="top_p")
    return GenRequest(kind=kind, model=model, max_tokens=max_tokens, sampling=sampling, stream=stream,
                      include_usage=bool(options.get("include_usage")))


def parse_chat(body: Any) -> GenRequest:
    req = _common(body, "chat")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"{param} must be an object with 'role' and 'content'", param=param)
        role = ROLE_ALIASES.get(m.get("role"), m.get("role"))
        if role not in ROLES:
            raise bad_request(f"{param}.role {m.get('role')!r} is not supported; use one of: "
                              f"{', '.join(sorted(ROLES | set(ROLE_ALIASES)))}", param=f"{param}.role")
        content = _content(m.get("content"), role, f"{param}.content")
        req.has_images = req.has_images or isinstance(content, list)
        out.append({"role": role, "content": content})
    req.messages = out
    return req


def _content(content: Any, role: str, param: str) -> str | list[dict[str, Any]]:
    """A string, or (when it has image parts) the list of text and image_url parts, each checked."""
    if content is None and role == "assistant":
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{param} must be a string or a list of text and image_url parts", param=param)
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            parts.append({"type": "image_url", "image_url": {"url": _image_url(part, f"{param}[{j}]")}})
        elif kind in ("input_audio", "audio"):
            raise bad_request(f"{param}[{j}]: audio input is not supported; phi-edge serves text and image parts",
                              param=f"{param}[{j}]")
        else:
            raise bad_request(f"{param}[{j}]: only text parts ({{'type': 'text', 'text': ...}}) and image parts "
                              f"({{'type': 'image_url', 'image_url': {{'url': 'data:image/png;base64,...'}}}}) "
                              f"are supported", param=f"{param}[{j}]")
    if not any(p["type"] == "image_url" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def _image_url(part: dict, param: str) -> str:
    """Images come inline as base64 data: URLs; the server neither fetches URLs nor reads its own files."""
    spec = part.get("image_url")
    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str) or not (url.startswith("data:") and url.partition(",")[0].endswith(";base64")):
        shown = url[:60] + "..." if isinstance(url, str) and len(url) > 60 else url
        raise bad_request(f"{param}.image_url.url must be a base64 data: URL (data:image/png;base64,...), "
                          f"not {shown!r}: this server does not fetch URLs or read its own files",
                          param=f"{param}.image_url")
    return url


def parse_completion(body: Any) -> GenRequest:
    req = _common(body, "completion")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                   for t in prompt):
        req.prompt = [int(t) for t in prompt]
    elif isinstance(prompt, str) and prompt:
        req.prompt = prompt
    else:
        raise bad_request("'prompt' must be a non-empty string or a list of token ids (one prompt per request)",
                          param="prompt")
    return req


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def full_body(req: GenRequest, rid: str, model: str, text: str, finish: str, use: dict) -> dict[str, Any]:
    if req.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                  "logprobs": None}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [choice],
            "usage": use}


def chunk_body(req: GenRequest, rid: str, model: str, text: str | None, finish: str | None,
               first: bool = False, use: dict | None = None, empty: bool = False) -> dict[str, Any]:
    """One SSE chunk: a text piece, the finish reason, or (``empty``) the closing usage chunk."""
    if req.kind == "chat":
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        obj = "text_completion"
    body = {"id": rid, "object": obj, "created": int(time.time()), "model": model,
            "choices": [] if empty else [choice]}
    if use is not None:
        body["usage"] = use
    return body
