"""The Starlette app: /v1/models, /v1/chat/completions (image parts for vision artifacts), /v1/completions,
auth, body limits and SSE."""

from __future__ import annotations

import hmac
import json
import logging
import time
from typing import Any, AsyncIterator

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import ContextLengthError, PhiEdgeError
from ..images import split_chat_images
from .errors import APIError, bad_request
from .protocol import GenRequest, chunk_body, full_body, new_id, parse_chat, parse_completion, usage
from .scheduler import Scheduler

log = logging.getLogger("phi_edge.serve")
MAX_BODY = 1 << 20
MAX_IMAGE_BODY = 20 << 20  # vision artifacts: base64 photos (OpenAI takes images up to 20 MB)


class SSEResponse(Response):
    """Server-sent events from an async iterator of JSON bodies, ended by ``data: [DONE]``. A client
    that goes away cancels the iterator at once (it is closed, which closes the generation)."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[dict], on_close=None):
        self.status_code = 200
        self.background = None
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                            (b"x-accel-buffering", b"no")]
        self.events = events
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        async with anyio.create_task_group() as tg:
            async def watch_disconnect():
                while (await receive())["type"] != "http.disconnect":
                    pass
                tg.cancel_scope.cancel()

            tg.start_soon(watch_disconnect)
            try:
                await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
                async for event in self.events:
                    data = f"data: {json.dumps(event, ensure_ascii=False)}\n\n".encode()
                    await send({"type": "http.response.body", "body": data, "more_body": True})
                await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
            except OSError:
                pass  # the client went away while we wrote
            finally:
                with anyio.CancelScope(shield=True):
                    await self.events.aclose()
                if self.on_close is not None:
                    self.on_close()
                tg.cancel_scope.cancel()


def create_app(runtime, model_id: str, api_key: str | None = None, max_queue: int = 16,
               max_body: int | None = None) -> Starlette:
    """An ASGI app serving ``runtime`` under the model name ``model_id``. Request bodies are capped at
    ``max_body`` (default 1 MiB, 20 MiB for a vision artifact, whose requests carry base64 images)."""
    scheduler = Scheduler(runtime, max_queue=max_queue)
    vision = takes_images(runtime)
    max_body = max_body or (MAX_IMAGE_BODY if vision else MAX_BODY)
    created = int(time.time())
    expected = api_key.encode() if api_key else None

    def check_auth(request: Request) -> None:
        if expected is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    async def read_json(request: Request) -> Any:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_body:
            raise APIError(413, f"the request body is {declared} bytes; this server takes at most {max_body}",
                           code="request_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body:
                raise APIError(413, f"the request body is over {max_body} bytes", code="request_too_large")
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise bad_request(f"the request body is not valid JSON: {e}") from None

    def model_card() -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "phi-edge"}

    async def models(request: Request) -> Response:
        check_auth(request)
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def model(request: Request) -> Response:
        check_auth(request)
        if request.path_params["model"] != model_id:
            raise _no_model(request.path_params["model"], model_id)
        return JSONResponse(model_card())

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": model_id, "queued": scheduler.admitted,
                             "pieces_generated": scheduler.pieces_sent})

    async def prepare(req: GenRequest) -> tuple[list[int], dict[str, Any], tuple[str, list] | None]:
        """The prompt's ids, the sampling arguments and (chat with image parts) the prompt text and the
        images, checked against the context."""
        if req.model is not None and req.model != model_id:
            raise _no_model(req.model, model_id)
        images = None
        if req.has_images and not vision:
            raise bad_request(f"{model_id} is a text-only model and takes no images; send text content only, or "
                              f"serve a Phi-4-multimodal artifact exported for an onnx-genai target",
                              param="messages", code="image_input_not_supported")
        try:
            if req.has_images:
                messages, decoded = split_chat_images(req.messages)
                prompt = runtime.chat_prompt(messages)
                ids = await scheduler.call(runtime.image_prompt_ids, prompt, decoded)  # counted; prepared again later
                images = (prompt, decoded)
            elif req.kind == "chat":
                ids = await scheduler.call(runtime.chat_ids, req.messages)
            elif isinstance(req.prompt, str):
                ids = await scheduler.call(runtime.encode, req.prompt)
            else:
                ids = list(req.prompt)
            sampling = {**req.sampling, "max_new_tokens": req.max_tokens}
            runtime.params(**{k: v for k, v in sampling.items() if k != "stop"})
        except ContextLengthError as e:  # the images' tokens alone are over the context
            raise bad_request(str(e), param="messages", code="context_length_exceeded") from None
        except PhiEdgeError as e:
            raise bad_request(str(e)) from None
        context = runtime.context_length
        where = "messages" if req.kind == "chat" else "prompt"
        if not ids:
            raise bad_request("the prompt is empty", param=where)
        if len(ids) >= context:
            raise bad_request(f"the prompt is {len(ids)} tokens but the model's context is {context} tokens",
                              param=where, code="context_length_exceeded")
        if req.max_tokens is not None and len(ids) + req.max_tokens > context:
            raise bad_request(f"the prompt ({len(ids)} tokens) plus max_tokens ({req.max_tokens}) is "
                              f"{len(ids) + req.max_tokens} tokens, over the model's context of {context}; "
                              f"ask for at most {context - len(ids)} tokens", param="max_tokens",
                              code="context_length_exceeded")
        return ids, sampling, images

    async def generate(request: Request, parse) -> Response:
        check_auth(request)
        req = parse(await read_json(request))
        ids, sampling, images = await prepare(req)
        scheduler.admit()
        rid = new_id(req.kind)
        result = runtime.new_result()
        if req.stream:
            return SSEResponse(_events(req, rid, ids, sampling, result, images), on_close=scheduler.release)
        try:
            text = await _collect(request, scheduler.run(ids, sampling, result, images))
        except ContextLengthError as e:
            raise bad_request(str(e), code="context_length_exceeded") from None
        finally:
            scheduler.release()
        if text is None:
            return Response(status_code=499)  # the client went away; its generation was stopped
        return JSONResponse(full_body(req, rid, model_id, text, result.finish_reason,
                                      usage(len(ids), len(result.token_ids))))

    async def _events(req, rid, ids, sampling, result, images) -> AsyncIterator[dict]:
        first = True
        try:
            if req.kind == "chat":
                yield chunk_body(req, rid, model_id, "", None, first=True)
                first = False
            async for piece in scheduler.run(ids, sampling, result, images):
                yield chunk_body(req, rid, model_id, piece, None, first=first)
                first = False
            yield chunk_body(req, rid, model_id, None if req.kind == "chat" else "", result.finish_reason)
            if req.include_usage:
                yield chunk_body(req, rid, model_id, None, None, use=usage(len(ids), len(result.token_ids)),
                                 empty=True)
        except PhiEdgeError as e:  # after the 200 went out: say it in the stream, as OpenAI does
            yield APIError(500, str(e), type="server_error").body()
        except Exception as e:  # an engine failure: the stream says so, the server goes on
            log.exception("generation failed")
            yield APIError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error").body()

    async def chat(request: Request) -> Response:
        return await generate(request, parse_chat)

    async def completions(request: Request) -> Response:
        return await generate(request, parse_completion)

    async def api_error(request: Request, exc: APIError) -> Response:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        message = (f"no route {request.method} {request.url.path}; this server has GET /v1/models, "
                   f"POST /v1/chat/completions and POST /v1/completions") if exc.status_code in (404, 405) \
            else str(exc.detail)
        return JSONResponse(APIError(exc.status_code, message, type=kind).body(), status_code=exc.status_code)

    async def disconnected(request: Request, exc: ClientDisconnect) -> Response:
        return Response(status_code=499)

    async def internal(request: Request, exc: Exception) -> Response:
        log.exception("request failed")
        return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error").body(),
                            status_code=500)

    app = Starlette(
        routes=[Route("/v1/models", models), Route("/v1/models/{model:path}", model), Route("/health", health),
                Route("/v1/chat/completions", chat, methods=["POST"]),
                Route("/v1/completions", completions, methods=["POST"])],
        exception_handlers={APIError: api_error, HTTPException: http_error, ClientDisconnect: disconnected,
                            Exception: internal},
    )
    app.state.scheduler = scheduler
    return app


async def _collect(request: Request, pieces: AsyncIterator[str]) -> str | None:
    """The whole text of a generation, or None when the client disconnects first (which stops it)."""
    parts: list[str] = []
    finished = False
    async with anyio.create_task_group() as tg:
        async def watch_disconnect():
            while (await request.receive())["type"] != "http.disconnect":
                pass
            tg.cancel_scope.cancel()

        tg.start_soon(watch_disconnect)
        try:
            async for piece in pieces:
                parts.append(piece)
            finished = True
        finally:
            with anyio.CancelScope(shield=True):
                await pieces.aclose()
            tg.cancel_scope.cancel()
    return "".join(parts) if finished else None


def takes_images(runtime) -> bool:
    """Whether the artifact has a vision part (its manifest's runtime section says which)."""
    manifest = getattr(runtime, "manifest", None)
    return bool((getattr(manifest, "runtime", None) or {}).get("vision"))


def _no_model(asked: str, served: str) -> APIError:
    return APIError(404, f"model {asked!r} is not served here; this server serves {served!r}",
                    param="model", code="model_not_found")
