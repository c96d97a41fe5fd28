"""POST /v1/responses (OpenAI's Responses API: whole, or streamed as its typed SSE events), and
GET/DELETE /v1/responses/{id} for the responses this server keeps (see api/response_store.py).

A Responses request runs as a chat request (api/conversation.py); its one choice's deltas build
the output items (api/protocol/openai_responses_output.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request

from server.api.conversation import ChatRun, start_chat
from server.api.deps import EngineDep, MetricsDep, RegistryDep, ResponseStoreDep, SettingsDep
from server.api.errors import error_body, internal_error_body
from server.api.protocol.common import ERROR_RESPONSES, streamed
from server.api.protocol.openai_responses import ResponsesRequest, input_messages
from server.api.protocol.openai_responses_output import (
    Event,
    OutputBuilder,
    Response,
    ResponseError,
    new_id,
)
from server.api.serving import collect_all
from server.api.sse import EventStream, sse_event, stream_response
from server.engine.base import ChoiceFinished, FinishReason, TextDelta, Usage
from server.errors import InvalidRequest, ServerError

router = APIRouter()


@router.post("/v1/responses", response_model=None, responses=streamed(Response))
async def create_response(body: ResponsesRequest, engine: EngineDep, registry: RegistryDep,
                          metrics: MetricsDep, settings: SettingsDep, store: ResponseStoreDep,
                          http: Request) -> Response | EventStream:
    earlier = store.get(body.previous_response_id, "previous_response_id").history \
        if body.previous_response_id else ()
    call = body.to_chat(earlier)
    try:
        run = await start_chat(call.request, engine, registry, metrics, settings, "responses",
                               "resp")
    except InvalidRequest as exc:
        exc.param = call.param(exc.param)
        raise
    draft = Response(id=new_id("resp"), created_at=run.generation.created,
                     model=run.generation.model, **body.echo(call))

    def keep(response: Response) -> None:
        if body.store:  # its output as a client would send it back as input
            output = input_messages([item.model_dump() for item in response.output])
            store.put(response, earlier, (*call.turn, *output))

    if body.stream:
        stream = _ResponseStream(run, draft, keep)
        return stream_response(stream.events(), on_close=run.generation.stream.cancel,
                               error=stream.error)
    result, = await collect_all([run.generation], 1, http)
    output, builder = run.outputs[0], OutputBuilder()
    builder.feed(output.feed(result.text(0)) + output.flush())
    builder.finish(result.finish[0])
    response = draft.finished(builder.items, result.usage, result.finish[0])
    keep(response)
    return response


@router.get("/v1/responses/{response_id}", responses={200: {"model": Response},
                                                       404: ERROR_RESPONSES[404]})
async def get_response(response_id: str, store: ResponseStoreDep) -> Response:
    return store.get(response_id).response


@router.delete("/v1/responses/{response_id}", responses={404: ERROR_RESPONSES[404]})
async def delete_response(response_id: str, store: ResponseStoreDep) -> dict[str, Any]:
    store.get(response_id)  # a 404 for an unknown id
    store.delete(response_id)
    return {"id": response_id, "object": "response", "deleted": True}


class _ResponseStream:
    """One streamed response: its events in order, each numbered, an error in-band as an
    `error` event and `response.failed`."""

    def __init__(self, run: ChatRun, draft: Response,
                 keep: Callable[[Response], None]) -> None:
        self._run, self._draft, self._keep = run, draft, keep
        self._builder = OutputBuilder()
        self._sequence = 0

    def _frame(self, event: Event) -> bytes:
        event["sequence_number"] = self._sequence
        self._sequence += 1
        return sse_event(event["type"], event)

    def _lifecycle(self, kind: str, response: Response) -> bytes:
        return self._frame({"type": f"response.{kind}", "response": response.model_dump()})

    async def events(self) -> AsyncIterator[bytes]:
        yield self._lifecycle("created", self._draft)
        yield self._lifecycle("in_progress", self._draft)
        output, builder = self._run.outputs[0], self._builder
        usage = Usage(0, 0)
        reason: FinishReason = "stop"
        async for event in self._run.generation.events():
            pending: list[Event] = []
            if isinstance(event, TextDelta):
                pending = builder.feed(output.feed(event.text))
            elif isinstance(event, ChoiceFinished):
                reason = event.reason
                pending = builder.feed(output.flush()) + builder.finish(reason)
            elif isinstance(event, Usage):
                usage = event
            for item in pending:
                yield self._frame(item)
        response = self._draft.finished(builder.items, usage, reason)
        self._keep(response)
        yield self._lifecycle(response.status, response)

    def error(self, exc: ServerError | None) -> bytes:
        """The in-band frames of a failure after the stream started (sequence numbers follow
        the last event)."""
        detail = (internal_error_body() if exc is None else error_body(exc))["error"]
        client_error = exc is not None and exc.status_code < 500
        failed = self._draft.model_copy(update={
            "status": "failed", "output": list(self._builder.items),
            "error": ResponseError(code="invalid_prompt" if client_error else "server_error",
                                   message=detail["message"])})
        return self._frame({"type": "error", "code": detail["code"],
                            "message": detail["message"], "param": detail["param"]}) + \
            self._lifecycle("failed", failed)
