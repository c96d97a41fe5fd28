"""Every error, validation included, as OpenAI's envelope {"error": {message, type, param, code}},
or as the envelope of the dialect whose path the request took (Anthropic's, Ollama's).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from server.api.protocol import anthropic, ollama
from server.errors import ContextLengthExceeded, ServerError

log = logging.getLogger("server.api")
# (status, OpenAI's envelope) -> the envelope a dialect's clients read, by path prefix; the
# first prefix that matches wins, OpenAI's shape otherwise.
ErrorShape = Callable[[int, dict[str, Any]], dict[str, Any]]
DIALECT_ERRORS: dict[str, ErrorShape] = {
    "/v1/messages": anthropic.error_shape,
    "/api/": ollama.error_shape,
}


def shaped(path: str, status: int, body: dict[str, Any]) -> dict[str, Any]:
    """`body` (OpenAI's envelope) in the error shape of the dialect that serves `path`."""
    for prefix, shape in DIALECT_ERRORS.items():
        if path.startswith(prefix):
            return shape(status, body)
    return body


def error_body(exc: ServerError) -> dict[str, Any]:
    body: dict[str, Any] = {"message": exc.message, "type": exc.error_type,
                            "param": exc.param, "code": exc.code}
    if isinstance(exc, ContextLengthExceeded):
        # llama-server's fields: clients use them to trim the history and retry.
        body.update(n_prompt_tokens=exc.n_prompt_tokens, n_ctx=exc.n_ctx)
    return {"error": body}


def internal_error_body() -> dict[str, Any]:
    return {"error": {"message": "The server had an internal error; it was logged.",
                      "type": "server_error", "param": None, "code": None}}


def unexpected_error_response(exc: Exception) -> JSONResponse:
    """The 500 for an exception no handler maps: logged with its traceback, never shown."""
    log.exception("unhandled error", exc_info=exc)
    return JSONResponse(internal_error_body(), status_code=500)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return f"The request body is not valid JSON: {first.get('msg')}.", None
    param = ".".join(loc) or None
    where = f"'{param}'" if param else "the request body"
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return f"Invalid value for {where}: {message}.", param


def install_error_handlers(app: FastAPI) -> None:
    def respond(request: Request, status: int, body: dict[str, Any],
                headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(shaped(request.url.path, status, body), status_code=status,
                            headers=headers)

    @app.exception_handler(ServerError)
    async def _server_error(request: Request, exc: ServerError) -> JSONResponse:
        retry = getattr(exc, "retry_after", None)
        headers = {"Retry-After": str(retry)} if retry is not None else None
        return respond(request, exc.status_code, error_body(exc), headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return respond(request, 400, {"error": {"message": message,
                                                "type": "invalid_request_error",
                                                "param": param, "code": None}})

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return respond(request, exc.status_code,
                       {"error": {"message": str(exc.detail), "type": kind, "param": None,
                                  "code": None}}, getattr(exc, "headers", None))

    # The app's ObserveRequests answers most unexpected errors itself (with the request id);
    # this catches those raised outside it.
    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return unexpected_error_response(exc)
