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
SHUT_DOWN = b"data: " + json.dumps(error_body(ServerShuttingDown(
    "The server shut down before this stream finished; retry on another replica."))).encode() \
    + b"\n\n" + DONE


def sse_response(chunks: AsyncIterator[BaseModel], *, on_close: Callable[[], None],
                 exclude: set[str] | None = None) -> EventStream:
    """Stream `chunks` as OpenAI does; once the first byte is out, errors go in-band.

    `on_close` runs however the stream ends (finished, failed, or the client went away), so
    the engine stops working for a client that disconnected.
    """

    async def events() -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                yield b"data: " + chunk.model_dump_json(exclude=exclude).encode() + b"\n\n"
        except ServerError as exc:
            yield b"data: " + json.dumps(error_body(exc)).encode() + b"\n\n"
        except Exception:
            log.exception("stream failed")
            yield b"data: " + json.dumps(internal_error_body()).encode() + b"\n\n"
        finally:
            on_close()
        yield DONE

    return EventStream(events())


class EventStream(Response):
    """A text/event-stream response of ready-made events."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes]) -> None:
        self._events = events
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
            body = b"" if self._events_done else SHUT_DOWN
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
        while True:
            await asyncio.sleep(max(0.0, self._last_send + PING_S - time.monotonic()))
            if not self._sending and time.monotonic() - self._last_send >= PING_S:
                await self._send(send, b": ping\n\n")

    @staticmethod
    async def _disconnect(receive: Receive) -> None:
        message: dict[str, Any] = {}
        while message.get("type") != "http.disconnect":
            message = dict(await receive())
