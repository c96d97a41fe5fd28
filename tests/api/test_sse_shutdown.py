"""A stream the server's shutdown cuts short ends with the dialect's error frame as of that
moment (a Responses stream numbers its events: a frame made up front would repeat numbers)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from server.api.sse import stream_response
from server.errors import ServerError

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_a_stream_cut_by_the_shutdown_ends_with_the_frame_of_that_moment() -> None:
    sent: list[dict[str, Any]] = []
    events_out = 0

    async def events() -> AsyncIterator[bytes]:
        nonlocal events_out
        for k in range(3):
            events_out = k + 1
            yield f"data: {k}\n\n".encode()
        await asyncio.Event().wait()  # then a long generation runs on

    def error(exc: ServerError | None) -> bytes:
        return f"error after {events_out} events: {type(exc).__name__}\n\n".encode()

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()  # the client stays
        return {}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    response = stream_response(events(), on_close=lambda: None, error=error, done=b"DONE")
    task = asyncio.create_task(response({"type": "http"}, receive, send))
    while len(sent) < 4:  # the start and three events
        await asyncio.sleep(0.01)
    task.cancel()  # uvicorn giving up on running requests at its shutdown timeout
    await task
    assert sent[-1] == {"type": "http.response.body", "more_body": False,
                        "body": b"error after 3 events: ServerShuttingDown\n\nDONE"}
