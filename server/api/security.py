"""Who may do what (user and admin keys, JSON-only POSTs, no cross-origin admin calls), and the
request body size limit. Keys are compared in constant time and never logged."""

from __future__ import annotations

import hmac
import ipaddress
import logging
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import error_body, shaped
from server.engine.base import MAY_DOWNLOAD
from server.errors import (
    AdminKeyRequired,
    AuthenticationFailed,
    CrossOriginRefused,
    ServerError,
    UnsupportedMediaType,
)
from server.settings import Settings, load_keys

log = logging.getLogger("server")
Access = Literal["open", "user", "admin"]


@dataclass(frozen=True)
class Keys:
    """The configured keys. An admin key is also a user key. With no key of either kind the
    server is open to everyone, admin operations included, as Ollama and llama-server are."""

    user: frozenset[str]
    admin: frozenset[str]

    @classmethod
    def from_settings(cls, settings: Settings) -> Keys:
        return cls(load_keys(settings.api_keys, settings.api_key_file),
                   load_keys(settings.admin_keys, settings.admin_key_file))

    def check(self, authorization: str, needed: Access) -> bool:
        """Raise unless the Authorization header grants `needed`; return whether it is admin."""
        scheme, _, token = authorization.partition(" ")
        given = token.strip() if scheme.lower() == "bearer" else ""
        is_admin = _matches(given, self.admin) or not (self.user or self.admin)
        is_user = is_admin or _matches(given, self.user) or not self.user
        if needed == "open" or (needed == "user" and is_user) or is_admin:
            return is_admin
        if not given:
            raise AuthenticationFailed(
                "Missing API key: send it as 'Authorization: Bearer <key>'.")
        if not _matches(given, self.user):
            raise AuthenticationFailed("Incorrect API key provided.")
        raise AdminKeyRequired(
            "This operation needs an admin key (GGSERVE_ADMIN_KEYS or GGSERVE_ADMIN_KEY_FILE)."
            if self.admin else "Admin operations are off: no admin key is configured (set "
            "GGSERVE_ADMIN_KEYS or GGSERVE_ADMIN_KEY_FILE).")


def _authorization(headers: Headers) -> str:
    """The Authorization header, or Anthropic's x-api-key as a bearer token (its SDK and
    Claude Code send the key there)."""
    given = headers.get("authorization")
    if given is None and (key := headers.get("x-api-key")):
        return f"Bearer {key}"
    return given or ""


def _matches(given: str, keys: frozenset[str]) -> bool:
    matched = False
    for key in keys:  # every key, each in constant time: the timing says nothing of which
        matched |= hmac.compare_digest(given.encode(), key.encode())
    return matched and bool(given)


class AccessControl:
    """Check each request's key against its path's access level before anything reads the
    body, then refuse non-JSON POST bodies and admin calls from other origins' pages.

    Without keys a browser page on any site can still send "simple" cross-origin requests
    (text/plain or untyped bodies, no preflight) to a server on localhost; JSON-only bodies and
    the Origin check keep those from doing anything.
    """

    def __init__(self, app: ASGIApp, keys: Keys, levels: dict[str, Access],
                 origins: list[str]) -> None:
        self.app = app
        self.keys = keys
        self.levels = levels  # path -> level; any other path needs a user key
        self.origins = origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        needed = self.levels.get(scope["path"], "user")
        try:
            is_admin = self.keys.check(_authorization(headers), needed)
            if scope["method"] in ("POST", "PUT", "PATCH"):
                _check_json(headers)
            if needed == "admin":
                self._check_origin(headers)
        except ServerError as exc:
            body = shaped(scope["path"], exc.status_code, error_body(exc))
            await JSONResponse(body, status_code=exc.status_code)(scope, receive, send)
            return
        token = MAY_DOWNLOAD.set(is_admin)
        try:
            await self.app(scope, receive, send)
        finally:
            MAY_DOWNLOAD.reset(token)

    def _check_origin(self, headers: Headers) -> None:
        # Browsers send Origin on every POST; other clients (curl, SDKs) send none.
        origin = headers.get("origin")
        if origin is None or origin in self.origins or "*" in self.origins:
            return
        if urlsplit(origin).netloc != headers.get("host", ""):
            raise CrossOriginRefused(
                f"Admin operations are not served to pages from another origin ({origin}); "
                "add it to GGSERVE_CORS_ORIGINS to allow it.")


def _check_json(headers: Headers) -> None:
    content_type = headers.get("content-type")
    has_body = headers.get("content-length", "0") != "0" or "transfer-encoding" in headers
    if content_type is None and not has_body:
        return  # `curl -X POST /admin/reload`
    kind = (content_type or "").partition(";")[0].strip().lower()
    if kind != "application/json" and not (kind.startswith("application/")
                                           and kind.endswith("+json")):
        raise UnsupportedMediaType(
            f"Send the body as JSON with 'Content-Type: application/json' (got "
            f"{content_type or 'no Content-Type'}).")


def warn_if_exposed(settings: Settings, keys: Keys) -> None:
    """Warn when the server listens beyond loopback with no key (llama-server does too)."""
    if keys.user or keys.admin or _is_loopback(settings.host):
        return
    log.warning("listening on %s without an API key: anyone who can reach this address can use "
                "the server, load and download models. Set GGSERVE_API_KEYS and "
                "GGSERVE_ADMIN_KEYS, or bind 127.0.0.1.", settings.host)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


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
