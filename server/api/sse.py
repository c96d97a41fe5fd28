"""The one SSE adapter: typed chunks → `data:` events, errors in-band, `[DONE]` always last."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from pydantic import BaseModel
from sse_starlette.sse import EventSourceResponse

from server.api.errors import error_body, internal_error_body
from server.errors import ServerError

log = logging.getLogger("server.api")


def sse_response(chunks: AsyncIterator[BaseModel], *, on_close: Callable[[], None],
                 exclude: set[str] | None = None) -> EventSourceResponse:
    """Stream `chunks` as OpenAI does; once the first byte is out, errors go in-band.

    `on_close` runs however the stream ends (finished, failed, or the client went away), so
    the engine stops working for a client that disconnected.
    """

    async def events() -> AsyncIterator[dict[str, Any]]:
        try:
            async for chunk in chunks:
                yield {"data": chunk.model_dump_json(exclude=exclude)}
        except ServerError as exc:
            yield {"data": json.dumps(error_body(exc))}
        except Exception:
            log.exception("stream failed")
            yield {"data": json.dumps(internal_error_body())}
        finally:
            on_close()
        yield {"data": "[DONE]"}

    return _EventStream(events(), sep="\n", ping=15)


class _EventStream(EventSourceResponse):
    """sse-starlette's response without a cancel scope around every send when there is no
    send timeout (anyio's scope costs more than the send of a token's chunk)."""

    async def _send_with_timeout(self, send: Any, message: Any) -> None:
        if self.send_timeout is None:
            await send(message)
        else:
            await super()._send_with_timeout(send, message)
