"""The HTTP side of `slms serve`: a Starlette app with the OpenAI endpoints, the playground
page, and the bridge from the scheduler's thread to the event loop.

Endpoints: POST /v1/completions, POST /v1/chat/completions (both stream as Server-Sent Events
with `stream: true`), GET /v1/models, GET /v1/models/{id}, GET /health, GET / (playground).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from slms.model import GPT
from slms.serve import protocol
from slms.serve.protocol import ApiError
from slms.serve.scheduler import Busy, Event, Job, Scheduler
from slms.tokenizer import Tokenizer


@dataclass
class Server:
    """What the handlers share: the model's facts, the scheduler, the optional API key."""

    model: GPT
    tok: Tokenizer
    name: str
    scheduler: Scheduler | None = None
    api_key: str | None = None
    created: int = 0

    def info(self) -> dict[str, Any]:
        """GET /v1/models's entry (with the extension `slms`: what the playground needs)."""
        cfg = self.model.cfg
        moe = cfg.moe
        extra = {"context": cfg.block_size, "n_layer": cfg.n_layer,
                 "moe_layers": [i for i in range(cfg.n_layer) if cfg.is_moe_layer(i)],
                 "n_experts": moe.n_experts if moe else 0, "top_k": moe.top_k if moe else 0}
        return {"id": self.name, "object": "model", "created": self.created,
                "owned_by": "slms", "slms": extra}


def create_app(model: GPT, tok: Tokenizer, name: str, max_batch: int = 16,
               max_queue: int = 64, api_key: str | None = None) -> Starlette:
    """The app; its scheduler thread runs while the app is served (its lifespan)."""
    srv = Server(model, tok, name, api_key=api_key, created=int(time.time()))

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()

        def deliver(items: list[tuple[Job, Event]]) -> None:  # on the scheduler's thread
            loop.call_soon_threadsafe(_put_all, items)

        srv.scheduler = Scheduler(model, tok, deliver, max_batch, max_queue).start()
        try:
            yield
        finally:
            srv.scheduler.close()

    async def completions(request: Request) -> Response:
        return await _generate(srv, request, "completions")

    async def chat(request: Request) -> Response:
        return await _generate(srv, request, "chat")

    routes = [
        Route("/", lambda _r: HTMLResponse(PLAYGROUND())),
        Route("/health", lambda _r: JSONResponse({"status": "ok", "model": srv.name,
                                                   **srv.scheduler.load()})),
        Route("/v1/models", lambda r: _models(srv, r)),
        Route("/v1/models/{model:path}", lambda r: _model(srv, r)),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
    ]
    handlers = {ApiError: _api_error, HTTPException: _http_error, Exception: _server_error}
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)


def PLAYGROUND() -> str:  # noqa: N802 - read each time: edits show on reload
    return (resources.files("slms.serve") / "static" / "playground.html").read_text("utf-8")


def _put_all(items: list[tuple[Job, Event]]) -> None:
    for job, event in items:
        job.handle.put_nowait(event)


def _authorize(srv: Server, request: Request) -> None:
    if srv.api_key is None:
        return
    sent = request.headers.get("authorization", "")
    if not hmac.compare_digest(sent.encode(), f"Bearer {srv.api_key}".encode()):
        raise ApiError(401, "missing or wrong API key: send the header "
                       "'Authorization: Bearer KEY'", code="invalid_api_key")


def _models(srv: Server, request: Request) -> Response:
    _authorize(srv, request)
    return JSONResponse({"object": "list", "data": [srv.info()]})


def _model(srv: Server, request: Request) -> Response:
    _authorize(srv, request)
    protocol.check_model({"model": request.path_params["model"]}, srv.name)
    return JSONResponse(srv.info())


async def _generate(srv: Server, request: Request, kind: str) -> Response:
    _authorize(srv, request)
    body = protocol.parse_body(await request.body())
    req = protocol.gen_request(body, kind, srv.tok, srv.model.cfg.block_size, srv.name)
    events: asyncio.Queue[Event] = asyncio.Queue()
    try:
        job = srv.scheduler.submit(req, events)
    except Busy as e:
        raise ApiError(503, str(e), kind="server_busy", code="server_busy") from None
    rid = protocol.new_id(kind)
    if req.stream:
        return StreamingResponse(_sse(job, events, kind, rid, srv.name),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    return await _collect(request, job, events, kind, rid, srv.name)


async def _next_events(events: asyncio.Queue[Event]) -> list[Event]:
    """The next event, and every other one already waiting (a slow reader gets several
    tokens in one chunk instead of falling behind)."""
    out = [await events.get()]
    while not events.empty():
        out.append(events.get_nowait())
    return out


async def _collect(request: Request, job: Job, events: asyncio.Queue[Event], kind: str,
                   rid: str, name: str) -> Response:
    """A whole response; a client that goes away cancels its row."""
    text: list[str] = []
    tokens: list[dict] = []
    while True:
        try:
            batch = await asyncio.wait_for(_next_events(events), timeout=1.0)
        except TimeoutError:
            if await request.is_disconnected():
                job.cancelled = True
                return Response(status_code=499)
            continue
        for e in batch:
            text.append(e.text)
            if e.token is not None:
                tokens.append(e.token)
            if e.finish == "error":
                raise ApiError(500, e.error or "generation failed", kind="server_error")
            if e.finish is not None:
                use = protocol.usage(*e.usage)
                return JSONResponse(protocol.response(
                    kind, rid, name, "".join(text), e.finish, use,
                    tokens if job.req.routing else None))


def _data(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def _sse(job: Job, events: asyncio.Queue[Event], kind: str, rid: str, name: str
               ) -> AsyncIterator[str]:
    """The OpenAI stream: chunks of text deltas, one with the finish reason, the usage when
    asked (stream_options.include_usage), then `data: [DONE]`."""
    first = True
    try:
        while True:
            batch = await _next_events(events)
            text = "".join(e.text for e in batch)
            tokens = [e.token for e in batch if e.token is not None]
            end = next((e for e in batch if e.finish is not None), None)
            if text or tokens or (first and end is None):
                yield _data(protocol.chunk(kind, rid, name, text, None, tokens, first))
                first = False
            if end is None:
                continue
            if end.finish == "error":
                yield _data({"error": {"message": end.error, "type": "server_error",
                                       "param": None, "code": None}})
            else:
                yield _data(protocol.chunk(kind, rid, name, None, end.finish, first=first))
                if job.req.include_usage:
                    yield _data(protocol.usage_chunk(kind, rid, name,
                                                     protocol.usage(*end.usage)))
            yield "data: [DONE]\n\n"
            return
    finally:
        job.cancelled = True  # a client gone mid-stream: its row leaves at the next step


async def _api_error(_request: Request, e: Exception) -> Response:
    assert isinstance(e, ApiError)
    headers = {"Retry-After": "1"} if e.status == 503 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


async def _http_error(_request: Request, e: Exception) -> Response:
    assert isinstance(e, HTTPException)
    message = {404: "no such endpoint", 405: "method not allowed here"}.get(
        e.status_code, str(e.detail))
    return JSONResponse(ApiError(e.status_code, message).body(), status_code=e.status_code)


async def _server_error(_request: Request, e: Exception) -> Response:
    return JSONResponse(ApiError(500, f"internal error: {e}", kind="server_error").body(),
                        status_code=500)


@contextlib.contextmanager
def running(app: Starlette, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve `app` on a thread while inside; yields its base URL (port 0: a free port)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join()
        sock.close()
