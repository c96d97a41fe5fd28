"""The one SSE adapter: typed chunks → `data:` events, errors in-band, `[DONE]` always last.

A small ASGI response of our own rather than sse-starlette's: a streamed token is one event, and
at a thousand events a second per stream the generic event encoding, its task group and the
send wrappers cost more than the token itself. Here an event is `data: <json>\\n\\n` written
as it comes, a comment line keeps an idle connection alive, and a client that goes away stops
the stream (and, through `on_close`, the generation) at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from pydantic import BaseModel
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from server.api.errors import error_body, internal_error_body
from server.errors import ServerError, ServerShuttingDown

log = logging.getLogger("server.api")
PING_S = 15.0  # a comment line this often keeps proxies from closing an idle stream
DONE = b"data: [DONE]\n\n"
# How a stream still running when the server stops ends: uvicorn cancels it once
# GGSERVE_SHUTDOWN_TIMEOUT_S has passed, and the client should see why, not a cut connection.
SHUTTING_DOWN = ServerShuttingDown(
    "The server shut down before this stream finished; retry on another replica.")
ErrorFrame = Callable[[ServerError | None], bytes]  # an in-band error (None: an internal one)


def _openai_error(exc: ServerError | None) -> bytes:
    body = internal_error_body() if exc is None else error_body(exc)
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def sse_event(name: str, payload: BaseModel | dict[str, Any]) -> bytes:
    """One named SSE event (`event:` and `data:` lines), as the Responses and Anthropic
    streams send them."""
    data = payload.model_dump_json(exclude_none=True) if isinstance(payload, BaseModel) \
        else json.dumps(payload)
    return b"event: " + name.encode() + b"\ndata: " + data.encode() + b"\n\n"


def sse_response(chunks: AsyncIterator[BaseModel], *, on_close: Callable[[], None],
                 exclude: set[str] | None = None) -> EventStream:
    """Stream `chunks` as OpenAI does; once the first byte is out, errors go in-band.

    `on_close` runs however the stream ends (finished, failed, or the client went away), so
    the engine stops working for a client that disconnected.
    """

    async def events() -> AsyncIterator[bytes]:
        async for chunk in chunks:
            yield b"data: " + chunk.model_dump_json(exclude=exclude).encode() + b"\n\n"

    return stream_response(events(), on_close=on_close, error=_openai_error, done=DONE)


def stream_response(events: AsyncIterator[bytes], *, on_close: Callable[[], None],
                    error: ErrorFrame, done: bytes = b"",
                    media_type: str = "text/event-stream",
                    ping: bytes | None = b": ping\n\n") -> EventStream:
    """Any dialect's stream of ready-framed `events`: a failure after the first byte becomes
    the dialect's in-band `error` frame, `done` always ends it (OpenAI's `[DONE]`; nothing for
    the Responses, Anthropic and Ollama streams), and `on_close` runs however it ends. `ping`
    keeps an idle connection open (None for NDJSON, which has no comment lines)."""

    async def framed() -> AsyncIterator[bytes]:
        try:
            async for event in events:
                yield event
        except ServerError as exc:
            yield error(exc)
        except Exception:
            log.exception("stream failed")
            yield error(None)
        finally:
            on_close()
        if done:
            yield done

    return EventStream(framed(), media_type=media_type, ping=ping,
                       cut_short=lambda: error(SHUTTING_DOWN) + done)


class EventStream(Response):
    """A streamed response of ready-made events (SSE, or NDJSON lines)."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], *, media_type: str = "text/event-stream",
                 ping: bytes | None = b": ping\n\n",
                 cut_short: Callable[[], bytes] = lambda: b"") -> None:
        self._events = events
        self.media_type = media_type
        self._ping_frame = ping
        # What ends a stream the server's shutdown cut short, made then: a dialect's frame
        # numbers its events (the Responses stream) and carries the output so far.
        self._cut_short = cut_short
        self.status_code = 200
        self.background = None
        self.init_headers({"cache-control": "no-cache", "x-accel-buffering": "no"})
        self._last_send = time.monotonic()
        self._sending = False
        self._events_done = False  # every event, `[DONE]` included, has been sent
        self._ended = False  # the final (empty) body has been sent

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        tasks = [asyncio.ensure_future(self._stream(send)),
                 asyncio.ensure_future(self._disconnect(receive)),
                 asyncio.ensure_future(self._ping(send))]
        cancelled = False
        try:
            await asyncio.wait(tasks[:2], return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            cancelled = True
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(BaseException):
                    await task
            with contextlib.suppress(BaseException):
                await self._events.aclose()  # type: ignore[attr-defined]
        if cancelled:
            await self._end_cut_short(send)

    async def _end_cut_short(self, send: Send) -> None:
        """End a stream the server cancelled (its shutdown timeout): error in-band, `[DONE]`.

        Cancellation here comes only from uvicorn giving up on running requests (or asyncio.run
        tearing down after a forced exit), so the request ends normally rather than re-raising:
        a re-raised CancelledError would make uvicorn log a traceback and cut the connection.
        """
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        if not self._ended:
            body = b"" if self._events_done else self._cut_short()
            self._ended = True
            await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _stream(self, send: Send) -> None:
        async for event in self._events:
            await self._send(send, event)
        self._events_done = True
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        self._ended = True

    async def _send(self, send: Send, body: bytes) -> None:
        self._sending = True
        try:
            await send({"type": "http.response.body", "body": body, "more_body": True})
        finally:
            self._sending = False
            self._last_send = time.monotonic()

    async def _ping(self, send: Send) -> None:
        if self._ping_frame is None:
            return
        while True:
            await asyncio.sleep(max(0.0, self._last_send + PING_S - time.monotonic()))
            if not self._sending and time.monotonic() - self._last_send >= PING_S:
                await self._send(send, self._ping_frame)

    @staticmethod
    async def _disconnect(receive: Receive) -> None:
        message: dict[str, Any] = {}
        while message.get("type") != "http.disconnect":
            message = dict(await receive())
