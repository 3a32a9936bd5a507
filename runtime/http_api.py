"""The OpenAI-compatible HTTP API of `adaptlink serve` (FastAPI; docs/SERVING.md).

    POST /v1/chat/completions   text + image_url parts; `stream: true` answers server-sent events
    GET  /v1/models             the model, its modalities and context length
    POST /v1/cancel/{id}        end a request (its KV freed on every rank)
    GET  /health                200 {"status": "ok"}; 503 while loading, draining, or with a block lost
    GET  /metrics               Prometheus text (runtime.live.ServeMetrics)

Every error is OpenAI-shaped, `{"error": {"message", "type", "param", "code"}}`, with 400
(a malformed request: bad JSON, wrong types, a bad image, `n` > 1, ...), 401 (no or a wrong
`Authorization: Bearer KEY` with --api-key; /health stays open), 404 (unknown model or
route), 413 (a body over `max_body_bytes`), 429 with `Retry-After` (the waiting queue is
full), 503 (loading, draining, or a block without a live copy). A malformed request is
refused before it reaches the engine, so it never harms the others.

Streaming sends what OpenAI sends: a first chunk with `delta.role`, content deltas, a
chunk with `finish_reason`, with `stream_options.include_usage` a last chunk of `usage`
and empty `choices`, then `data: [DONE]`; a `: keep-alive` comment after each
`keepalive_s` of silence (exo's 10 s). A client that disconnects has its request
cancelled at once: Starlette cancels the body generator on `http.disconnect`, and its
`finally` cancels the request in the engine; a non-streamed request polls for the
disconnect while it waits. `finish_reason` is `stop` (an eos token or a `stop` string),
`length` (max_tokens), or `cancelled` (POST /v1/cancel).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from runtime.chat import ChatError, parse_chat, text_only
from runtime.live import Detokenizer, LiveEngine, Stream

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 32 * 2**20     # a chat request's body; an image's base64 is most of it
KEEPALIVE_S = 10.0
DISCONNECT_POLL_S = 0.5         # a non-streamed request checks for a gone client this often
TICK_SLACK_S = 0.005            # a loop timer may fire this much early (libuv: milliseconds)
# a text-only body up to this is parsed on the server's loop, not on a worker thread: the
# hop costs more than parsing a short one (0.2 ms); one this small holds the loop ~2 ms at
# most (a 60 KB text takes ~60 ms: on a worker thread)
INLINE_BYTES = 2 * 2**10


def build_app(engine: LiveEngine, *, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
              keepalive_s: float = KEEPALIVE_S) -> FastAPI:
    app = FastAPI(title="adaptlink serve", docs_url=None, redoc_url=None, openapi_url=None)

    def error(e: ChatError) -> JSONResponse:
        headers = {"Retry-After": str(engine.limits.retry_after_s)} if e.status == 429 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error(ChatError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", type=kind))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        return error(ChatError(400, str(exc.errors()[:1])))

    if api_key is not None:
        app.add_middleware(_ApiKey, key=api_key, refuse=lambda: error(ChatError(
            401, "Incorrect or missing API key: send Authorization: Bearer KEY", type="authentication_error",
            code="invalid_api_key")))

    @app.get("/health")
    async def health():
        if not engine.ready:
            return error(engine.unavailable())
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        ctx = engine.chat
        return {"object": "list", "data": [{
            "id": engine.model_name, "object": "model", "created": int(time.time()), "owned_by": "adaptlink",
            "max_model_len": ctx.context if ctx else None, "modalities": ["text", "image"]}]}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/cancel/{rid}")
    async def cancel(rid: str):
        s = engine.find(rid)
        if s is None:
            return error(ChatError(404, f"no running request {rid!r}", type="not_found_error", param="id"))
        engine.cancel(s, "cancelled")
        return {"id": rid, "object": "chat.completion.cancel", "cancelled": True}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        try:
            if not engine.ready:
                raise engine.unavailable()
            body, size = await _read_json(request, max_body_bytes)
            if size <= INLINE_BYTES and text_only(body):
                job = parse_chat(body, engine.chat)  # text: ~0.2 ms, less than the hop to a worker thread
            else:
                job = await run_in_threadpool(parse_chat, body, engine.chat)  # image decode + processor: off the loop
            s = engine.open(job)
        except ChatError as e:
            return error(e)
        if job.stream:
            return StreamingResponse(_sse(engine, s, keepalive_s), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _complete(engine, s, request)

    return app


class _ApiKey:
    """`Authorization: Bearer KEY` on every route but /health: a pure ASGI middleware (a
    `@app.middleware("http")` one would pass each SSE chunk through a memory stream between
    two tasks)."""

    def __init__(self, app, key: str, refuse):
        self.app, self.want, self.refuse = app, f"Bearer {key}".encode(), refuse

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            if not hmac.compare_digest(given, self.want):
                return await self.refuse()(scope, receive, send)
        return await self.app(scope, receive, send)


async def _read_json(request: Request, cap: int):
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > cap:
        raise ChatError(413, f"the request body is {int(size)} bytes, over the {cap}-byte limit",
                        code="request_too_large")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > cap:
            raise ChatError(413, f"the request body is over the {cap}-byte limit", code="request_too_large")
    try:
        return json.loads(raw), len(raw)
    except (ValueError, RecursionError) as e:
        raise ChatError(400, f"the request body is not valid JSON: {e}") from None


def _finish_reason(engine: LiveEngine, s: Stream, result, detok: Detokenizer) -> str:
    if detok.stopped:
        return "stop"
    if result.error is not None and result.error.startswith("cancelled"):
        return "cancelled"
    last = result.tokens[-1] if result.tokens else None
    return "stop" if last in s.job.request.stop_token_ids else "length"


def _usage(s: Stream, n: int) -> dict:
    return {"prompt_tokens": s.job.prompt_tokens, "completion_tokens": n, "total_tokens": s.job.prompt_tokens + n}


def _engine_error(result) -> ChatError:
    return ChatError(503 if "dropped out" in (result.error or "") else 500, result.error,
                     type="server_error", code="engine_error")


async def _complete(engine: LiveEngine, s: Stream, request: Request) -> JSONResponse:
    """A non-streamed answer: wait for the whole text (cancel if the client goes). Tokens
    come one by one only with `stop` strings to watch for; else the result is decoded once."""
    detok = Detokenizer(engine.tokenizer, s.job.stop)
    finished = False
    poll = _Ticks(s, DISCONNECT_POLL_S)
    try:
        while True:
            kind, value = await s.queue.get()
            if kind == "tick":
                if await request.is_disconnected():  # `finally` cancels it (once: one count)
                    return JSONResponse({}, status_code=499)
                poll.arm(DISCONNECT_POLL_S)
                continue
            if kind == "token":
                engine.token_seen(s)
                if not detok.stopped:
                    detok.add(value)
                    if detok.stopped:
                        engine.cancel(s, "stop: a stop string")
                continue
            result = value
            finished = True
            if result.error is not None and not detok.stopped and not result.error.startswith("cancelled"):
                engine.closed(s, "error")
                e = _engine_error(result)
                return JSONResponse(e.body(), status_code=e.status)
            if not s.per_token:
                detok.tokens = list(result.tokens)
            detok.finish()
            reason = _finish_reason(engine, s, result, detok)
            engine.closed(s, reason)
            return JSONResponse({
                "id": s.id, "object": "chat.completion", "created": s.created, "model": engine.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": detok.sent},
                             "finish_reason": reason, "logprobs": None}],
                "usage": _usage(s, len(detok.tokens))})
    finally:
        poll.cancel()
        if not finished:
            engine.cancel(s, "cancelled: client disconnected")


class _Ticks:
    """A ("tick", None) into the stream's queue after `delay` seconds (one at a time): the
    keep-alive and disconnect clocks, without a timeout (a task and a timer) per token."""

    def __init__(self, s: Stream, delay: float):
        self.queue, self.loop, self.handle = s.queue, asyncio.get_running_loop(), None
        self.arm(delay)

    def arm(self, delay: float) -> None:
        self.handle = self.loop.call_later(max(0.0, delay), self.queue.put_nowait, ("tick", None))

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()


async def _sse(engine: LiveEngine, s: Stream, keepalive_s: float):
    """The event stream of one request (Starlette cancels it when the client disconnects)."""
    detok = Detokenizer(engine.tokenizer, s.job.stop)
    finished = False

    def chunk(delta: dict, reason=None) -> str:
        body = {"id": s.id, "object": "chat.completion.chunk", "created": s.created, "model": engine.model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}]}
        if s.job.include_usage:
            body["usage"] = None
        return f"data: {json.dumps(body)}\n\n"

    loop = asyncio.get_running_loop()
    last = loop.time()  # of the last event sent: a keep-alive after keepalive_s without one
    ticks = _Ticks(s, keepalive_s)
    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            kind, value = await s.queue.get()
            if kind == "tick":
                quiet = loop.time() - last
                if quiet >= keepalive_s - TICK_SLACK_S:
                    yield ": keep-alive\n\n"
                    last = loop.time()
                    quiet = 0.0
                ticks.arm(keepalive_s - quiet)
                continue
            if kind == "token":
                engine.token_seen(s)
                if detok.stopped:
                    continue
                delta = detok.add(value)
                if detok.stopped:
                    engine.cancel(s, "stop: a stop string")
                if delta:
                    yield chunk({"content": delta})
                    last = loop.time()
                continue
            result = value
            finished = True
            if result.error is not None and not detok.stopped and not result.error.startswith("cancelled"):
                engine.closed(s, "error")
                yield f"data: {json.dumps(_engine_error(result).body())}\n\n"
                return
            delta = detok.finish()
            reason = _finish_reason(engine, s, result, detok)
            engine.closed(s, reason)
            tail = [chunk({"content": delta})] if delta else []  # the end in one write
            tail.append(chunk({}, reason))
            if s.job.include_usage:
                tail.append("data: " + json.dumps({"id": s.id, "object": "chat.completion.chunk",
                                                   "created": s.created, "model": engine.model_name, "choices": [],
                                                   "usage": _usage(s, len(detok.tokens))}) + "\n\n")
            tail.append("data: [DONE]\n\n")
            yield "".join(tail)
            return
    finally:
        ticks.cancel()
        if not finished:
            engine.cancel(s, "cancelled: client disconnected")
