"""API keys (constant-time comparison, never logged), request body size limit."""

from __future__ import annotations

import hmac

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import AuthenticationFailed


async def require_api_key(request: Request) -> None:
    """Pass when no keys are configured or the bearer token is one of them."""
    keys: frozenset[str] = request.app.state.api_keys
    if not keys:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise AuthenticationFailed(
            "Missing API key: send it as 'Authorization: Bearer <key>'.")
    matched = False
    for key in keys:  # compare against every key, in constant time each
        matched |= hmac.compare_digest(given.strip().encode(), key.encode())
    if not matched:
        raise AuthenticationFailed("Incorrect API key provided.")


class BodySizeLimit:
    """Refuse request bodies over `limit` bytes with a 413, before the app reads them."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit():
            if int(declared) > self.limit:
                await self._refuse(send)
                return
            await self.app(scope, receive, send)
            return
        # No declared length (chunked upload): read it here, up to the limit, then replay it.
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                await self._refuse(send)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send) -> None:
        await JSONResponse({"error": {
            "message": f"The request body is larger than this server accepts ({self.limit} "
                       "bytes); send a shorter prompt or history.",
            "type": "invalid_request_error", "param": None, "code": "request_too_large"}},
            status_code=413)({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}
