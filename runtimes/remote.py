"""An OpenAI-compatible HTTP endpoint as a runtime: ``load("https://…/v1", model=…)`` (GitHub Models,
Azure AI Foundry, NVIDIA NIM, Ollama, ``phi-run serve``). The same generate/stream/chat, stop strings
and timings as an artifact; no tokenizer or logits (they stay on the server). Uses httpx only."""

from __future__ import annotations

import email.utils
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from .base import GenerationResult, Runtime, SamplingParams, StopStrings
from .errors import PhiEdgeError

OPENAI_MAX_STOP = 4  # the most stop strings the OpenAI API takes; any more are applied here


@dataclass(frozen=True)
class Provider:
    name: str
    base_url: str | None  # None: the user's own resource URL (from url_env or the call)
    key_env: str | None
    chat_only: bool = False  # no /completions: generate(text) sends the text as one user message
    key_header: str = "authorization"
    url_env: str | None = None
    query: str = ""
    key_hint: str = ""
    key_required: bool = True


PROVIDERS: dict[str, Provider] = {
    # https://docs.github.com/en/github-models: POST https://models.github.ai/inference/chat/completions
    "github": Provider("GitHub Models", "https://models.github.ai/inference", "GITHUB_TOKEN", chat_only=True,
                       key_hint="a GitHub token with the models:read permission"),
    # https://<resource>.services.ai.azure.com/models (Azure AI model inference API); the key goes in api-key
    "azure": Provider("Azure AI Foundry", None, "AZURE_INFERENCE_CREDENTIAL", chat_only=True, key_header="api-key",
                      url_env="AZURE_INFERENCE_ENDPOINT", query="api-version=2024-05-01-preview",
                      key_hint="the resource's key, and that the model name is a deployment in it"),
    "nvidia": Provider("NVIDIA NIM", "https://integrate.api.nvidia.com/v1", "NVIDIA_API_KEY", chat_only=True,
                       key_hint="an nvapi- key from build.nvidia.com"),
    "ollama": Provider("Ollama", "http://localhost:11434/v1", "OLLAMA_API_KEY",
                       key_hint="the key your proxy in front of Ollama expects (Ollama itself needs none)",
                       key_required=False),
}
GENERIC = Provider("the endpoint", None, "PHI_EDGE_API_KEY", key_required=False)
RETRY_STATUS = {429, 500, 502, 503, 504}


class RemoteResult(GenerationResult):
    """A result from an endpoint: token counts from its ``usage``, no token ids."""

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "prompt_tokens": self.timings.prompt_tokens,
                "generated_tokens": self.timings.generated_tokens}


class RemoteRuntime(Runtime):
    """An OpenAI-compatible endpoint behind the :class:`Runtime` API."""

    format = "remote"
    source = "remote"

    def __init__(self, url: str | None, model: str, api_key: str | None = None, provider: str | None = None,
                 timeout: float = 60.0, connect_timeout: float = 10.0, max_retries: int = 3,
                 max_wait_s: float = 30.0, context_length: int = 0):
        try:
            import httpx
        except ImportError:
            raise PhiEdgeError("an HTTP endpoint needs httpx, which is not installed; install it with: "
                               "pip install 'phi-edge[serve]'") from None

        if provider is not None and provider not in PROVIDERS:
            raise PhiEdgeError(f"unknown provider '{provider}'; known: {', '.join(PROVIDERS)}")
        self.provider = PROVIDERS[provider] if provider else GENERIC
        p = self.provider
        url = url or (os.environ.get(p.url_env) if p.url_env else None) or p.base_url
        if not url:
            raise PhiEdgeError(f"{p.name} needs your resource's URL: pass it (https://<resource>.services.ai.azure"
                               f".com/models) or set {p.url_env}")
        if not url.startswith(("http://", "https://")):
            raise PhiEdgeError(f"'{url}' is not an http(s):// URL")
        if not model:
            raise PhiEdgeError(f"name the model to use at {url}: model=... (phi-run: --model NAME)")
        self.url = url.rstrip("/")
        self.model = model
        self._key = api_key or (os.environ.get(p.key_env) if p.key_env else None) or None
        if p.key_required and not self._key:
            raise PhiEdgeError(f"{p.name} needs a key: set {p.key_env} (or pass api_key=)"
                               + (f"; {p.key_hint}" if p.key_hint else ""))
        self.folder = None
        self.manifest = None
        self.device = provider or "remote"
        self.stop_token_ids = frozenset()
        self.context_length = int(context_length)
        self.load_s = 0.0
        self.timeout = float(timeout)
        self.max_retries = max(0, int(max_retries))
        self.max_wait_s = float(max_wait_s)
        self.fallback_reason: str | None = None
        self._stream_options = True  # dropped after an endpoint refuses it once
        self._client = httpx.Client(timeout=httpx.Timeout(self.timeout, connect=connect_timeout))

    def __repr__(self) -> str:  # never the key
        return f"RemoteRuntime({self.url!r}, model={self.model!r}, provider={self.device!r})"

    def close(self) -> None:
        self._client.close()

    # ---- what an endpoint cannot give ---------------------------------------------------------
    def _unavailable(self, what: str):
        raise PhiEdgeError(f"{what} is not available from an HTTP endpoint ({self.url}): the tokenizer and "
                           f"the model stay on the server; load a local artifact for it")

    def _encode_plain(self, text: str) -> list[int]:
        self._unavailable("tokenization")

    def decode(self, ids: Sequence[int]) -> str:
        self._unavailable("decoding token ids")

    def logits(self, ids: Sequence[int]):
        self._unavailable("logits")

    def chat_prompt(self, messages: list[dict[str, Any]]) -> str:
        self._unavailable("the rendered chat template")

    def chat_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        self._unavailable("chat token ids")

    # ---- the API ------------------------------------------------------------------------------
    @staticmethod
    def new_result() -> RemoteResult:
        return RemoteResult(text="", token_ids=[], prompt_token_ids=[], finish_reason="")

    def params(self, **overrides: Any) -> SamplingParams:
        given = {k: v for k, v in overrides.items() if v is not None}
        p = SamplingParams(**given)
        p.check()
        if p.top_k or p.repetition_penalty != 1.0:
            raise PhiEdgeError("top_k and repetition_penalty are not part of the OpenAI API; an endpoint "
                               "cannot apply them")
        return p

    def generate(self, prompt, max_new_tokens=None, temperature=None, top_p=None, top_k=None,
                 repetition_penalty=None, stop=None, seed=None) -> RemoteResult:
        result = self.new_result()
        for _ in self.stream(prompt, max_new_tokens, temperature, top_p, top_k, repetition_penalty, stop, seed,
                             result=result):
            pass
        return result

    def stream(self, prompt, max_new_tokens=None, temperature=None, top_p=None, top_k=None,
               repetition_penalty=None, stop=None, seed=None, result=None) -> Iterator[str]:
        params = self.params(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                             repetition_penalty=repetition_penalty, seed=seed)
        if isinstance(prompt, str):
            if not prompt:
                raise PhiEdgeError("the prompt is empty; pass some text")
            if self.provider.chat_only:  # these endpoints have chat completions only
                return self._generate("chat", {"messages": [{"role": "user", "content": prompt}]}, params,
                                      stop, result)
            return self._generate("completion", {"prompt": prompt}, params, stop, result)
        ids = [int(i) for i in prompt]
        if not ids or self.provider.chat_only:
            raise PhiEdgeError(f"{self.provider.name} takes text, not token ids")
        return self._generate("completion", {"prompt": ids}, params, stop, result)

    def chat(self, messages: list[dict[str, Any]], stream: bool = False, **kwargs: Any):
        if not isinstance(messages, list) or not messages:
            raise PhiEdgeError("messages must be a non-empty list of {role, content}")
        result = kwargs.pop("result", None) or self.new_result()
        params = self.params(**{k: kwargs.pop(k, None) for k in
                                ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed")})
        stop = kwargs.pop("stop", None)
        if kwargs:
            raise PhiEdgeError(f"unknown arguments: {', '.join(kwargs)}")
        pieces = self._generate("chat", {"messages": messages}, params, stop, result)
        if stream:
            return pieces
        for _ in pieces:
            pass
        return result

    # ---- HTTP ---------------------------------------------------------------------------------
    def _generate(self, kind: str, body: dict, params: SamplingParams, stop: Sequence[str] | None,
                  result: GenerationResult | None) -> Iterator[str]:
        result = result if result is not None else self.new_result()
        stop = [s for s in (stop or ()) if s]
        payload = {"model": self.model, **body, "max_tokens": params.max_new_tokens,
                   "temperature": params.temperature, "top_p": params.top_p, "stream": True}
        if params.seed is not None:
            payload["seed"] = params.seed
        if stop:
            payload["stop"] = stop[:OPENAI_MAX_STOP]
        return self._pieces(kind, payload, stop, result)

    def _pieces(self, kind: str, payload: dict, stop: list[str], result: GenerationResult) -> Iterator[str]:
        path = "/chat/completions" if kind == "chat" else "/completions"
        timings = result.timings
        start = time.perf_counter()
        response = self._open(path, payload)
        strings = StopStrings(stop)
        finish, done, received, chunks = None, False, 0, 0
        try:
            for data in self._events(response):
                if data == "[DONE]":
                    done = True
                    break
                event = self._json(data)
                if "error" in event:
                    raise PhiEdgeError(f"{self.provider.name} reported an error mid-stream: "
                                       f"{self._scrub(_message(event))}")
                if event.get("usage"):
                    timings.prompt_tokens = int(event["usage"].get("prompt_tokens") or 0)
                    timings.generated_tokens = int(event["usage"].get("completion_tokens") or 0)
                for choice in event.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content") if kind == "chat" else choice.get("text")
                    if choice.get("finish_reason"):
                        finish = choice["finish_reason"]
                    if not piece:
                        continue
                    if not timings.time_to_first_token_s:
                        timings.time_to_first_token_s = time.perf_counter() - start
                    chunks += 1
                    received += len(piece)
                    if strings.hit:
                        continue
                    piece = strings.feed(piece)
                    if piece:
                        result.text += piece
                        yield piece
                if strings.hit:
                    finish = "_stopped_here"
                    break  # our own stop string: the rest is not wanted
        finally:
            response.close()
        if finish is None and not done:
            raise PhiEdgeError(f"the stream from {self.provider.name} ({self.url}) ended before it finished, after "
                               f"{received} characters: the connection was cut; retry the request")
        if strings.held:
            result.text += strings.held
            yield strings.held
        if not timings.generated_tokens:
            timings.generated_tokens = chunks
        timings.total_s = time.perf_counter() - start
        result.finish_reason = "stop" if finish in ("_stopped_here", "stop", "eos", "end_turn", "content_filter",
                                                    None) else "length" if finish == "length" else str(finish)

    def _events(self, response) -> Iterator[str]:
        import httpx

        try:
            for line in response.iter_lines():
                if line.startswith("data:"):
                    yield line[5:].strip()
        except httpx.TimeoutException:
            raise PhiEdgeError(f"{self.provider.name} ({self.url}) stopped answering for {self.timeout:g}s "
                               f"mid-stream; retry, or pass a longer timeout=") from None
        except httpx.TransportError:
            return  # a cut connection: _pieces says so when no finish came

    def _json(self, data: str) -> dict:
        try:
            event = json.loads(data)
        except ValueError:
            raise PhiEdgeError(f"{self.provider.name} sent a stream event that is not JSON: "
                               f"{self._scrub(data[:200])!r}") from None
        return event if isinstance(event, dict) else {}

    def _headers(self) -> dict[str, str]:
        headers = {"accept": "text/event-stream", "content-type": "application/json"}
        if self._key:
            if self.provider.key_header == "authorization":
                headers["authorization"] = f"Bearer {self._key}"
            else:
                headers[self.provider.key_header] = self._key
        return headers

    def _open(self, path: str, payload: dict):
        """POST and return the streaming response once it answers 200; retries 429/5xx and lost connections."""
        import httpx

        url = self.url + path + (f"?{self.provider.query}" if self.provider.query and self.url.endswith("/models")
                                 else "")
        for attempt in range(self.max_retries + 1):
            body = {**payload, "stream_options": {"include_usage": True}} if self._stream_options else payload
            try:
                response = self._client.send(self._client.build_request("POST", url, json=body,
                                                                        headers=self._headers()), stream=True)
            except httpx.TimeoutException:
                raise PhiEdgeError(f"{self.provider.name} ({self.url}) did not answer within {self.timeout:g}s; "
                                   f"check the network, or pass a longer timeout=") from None
            except httpx.TransportError as e:
                if attempt < self.max_retries:
                    time.sleep(min(self.max_wait_s, 0.5 * 2 ** attempt))
                    continue
                raise PhiEdgeError(f"cannot reach {self.provider.name} at {self.url}: {type(e).__name__}; "
                                   f"check the URL and the network") from None
            if response.status_code == 200:
                return response
            text = response.read().decode("utf-8", "replace")
            response.close()
            if response.status_code == 400 and self._stream_options and "stream_options" in text:
                self._stream_options = False
                continue
            if response.status_code in RETRY_STATUS and attempt < self.max_retries:
                wait = _retry_after(response.headers.get("retry-after"))
                wait = 0.5 * 2 ** attempt if wait is None else wait
                if wait > self.max_wait_s:
                    raise PhiEdgeError(f"{self.provider.name} answered {response.status_code} and asks to wait "
                                       f"{wait:.0f}s, more than max_wait_s={self.max_wait_s:g}; try again later")
                time.sleep(wait)
                continue
            raise self._http_error(response.status_code, text, attempt)
        raise PhiEdgeError(f"{self.provider.name} kept refusing the request")  # not reached

    def _http_error(self, status: int, text: str, attempts: int) -> PhiEdgeError:
        p = self.provider
        try:
            said = _message(json.loads(text))
        except ValueError:
            said = text
        said = self._scrub(" ".join(said.split())[:300])
        key_src = f"the key in {p.key_env} (or api_key=)" if p.key_env else "api_key="
        where = f"{p.name} at {self.url}"
        if status == 401:
            msg = f"{where} refused the key (401 Unauthorized): check {key_src}" + (
                f": {p.key_hint}" if p.key_hint else "") + ("" if self._key else "; no key was sent")
        elif status == 403:
            msg = (f"{where} denied access (403 Forbidden) to model '{self.model}': check that {key_src} has "
                   f"access to it")
        elif status == 404:
            msg = (f"{where} answered 404 Not Found: check the model name '{self.model}' and the base URL "
                   f"(it usually ends in /v1)")
        elif status == 429:
            msg = f"{where} is rate-limiting requests (429) after {attempts} retries; try again later"
        elif status >= 500:
            msg = f"{where} failed with {status} after {attempts} retries"
        else:
            msg = f"{where} rejected the request ({status})"
        return PhiEdgeError(f"{msg}; it said: {said}" if said else msg)

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text


def _message(body: Any) -> str:
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            return str(err.get("message") or err.get("detail") or err)
        return str(err)
    return str(body)


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (a number of seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def open_endpoint(url: str | None, model: str, api_key: str | None = None, provider: str | None = None,
                  **options: Any) -> RemoteRuntime:
    start = time.perf_counter()
    runtime = RemoteRuntime(url, model, api_key=api_key, provider=provider, **options)
    runtime.load_s = time.perf_counter() - start
    return runtime
