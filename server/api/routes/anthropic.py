"""POST /v1/messages and POST /v1/messages/count_tokens: Anthropic's Messages API on the chat
path every dialect shares (server/api/conversation.py), so that the `anthropic` SDK and Claude
Code (ANTHROPIC_BASE_URL) work unchanged."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request

from server.api.conversation import ChatRun, chat_prompt, start_chat
from server.api.deps import EngineDep, MetricsDep, RegistryDep, SettingsDep
from server.api.errors import error_body, internal_error_body
from server.api.protocol.anthropic import (
    Message,
    MessageCountTokensParams,
    MessageCreateParams,
    MessageTokensCount,
    StopReason,
    Usage,
    error_shape,
)
from server.api.protocol.anthropic_chat import chat_request
from server.api.protocol.common import ERROR_RESPONSES, streamed
from server.api.serving import Generation, collect_all
from server.api.sse import EventStream, sse_event, stream_response
from server.chat.output import Delta
from server.chat.tools import plan_tools
from server.engine.base import ChoiceFinished, FinishReason, TextDelta
from server.engine.base import Usage as EngineUsage
from server.errors import EmbeddingModelOnly, ServerError

router = APIRouter()
Event = dict[str, Any]  # one event of Anthropic's stream, its `type` also its SSE name


@router.post("/v1/messages", response_model=None, responses=streamed(Message))
async def create_message(body: MessageCreateParams, engine: EngineDep, registry: RegistryDep,
                         metrics: MetricsDep, settings: SettingsDep,
                         http: Request) -> Message | EventStream:
    run = await start_chat(chat_request(body), engine, registry, metrics, settings, "messages",
                           "msg")
    if body.stream:
        return stream_response(_events(run, body), on_close=run.generation.stream.cancel,
                               error=_error_event)
    result, = await collect_all([run.generation], 1, http)
    output, blocks = run.outputs[0], ContentBlocks(thinking=body.shows_thinking)
    blocks.add(output.feed(result.text(0)) + output.flush())
    blocks.close()
    stop = _matched_stop(result.stops[0], body.stop_sequences)
    return Message(id=_message_id(run.generation), content=blocks.blocks,
                   model=run.generation.model,
                   stop_reason=_stop_reason(result.finish[0], output.calls, stop),
                   stop_sequence=stop, usage=Usage.of(result.usage))


@router.post("/v1/messages/count_tokens", responses={
    status: ERROR_RESPONSES[status] for status in (400, 401, 404, 503)})
async def count_tokens(body: MessageCountTokensParams, engine: EngineDep,
                       registry: RegistryDep, settings: SettingsDep) -> MessageTokensCount:
    """The prompt's tokens, rendered and tokenized exactly as /v1/messages reads them."""
    chat = chat_request(body)
    chat.check_limits(settings)
    spec = registry.get(chat.model)
    if spec.embedding:
        raise EmbeddingModelOnly(spec.id)
    info = await engine.model_info(spec.id)
    plan = plan_tools(chat.tools, chat.tool_choice, chat.parallel_tool_calls,
                      info.chat_template)
    prompt = await chat_prompt(spec, info, [m.as_template_input() for m in chat.messages], plan)
    return MessageTokensCount(input_tokens=len(await engine.tokenize(spec.id, prompt, True)))


async def _events(run: ChatRun, body: MessageCreateParams) -> AsyncIterator[bytes]:
    """message_start, each block's start, deltas and stop, message_delta, message_stop."""
    generation, output = run.generation, run.outputs[0]
    blocks = ContentBlocks(thinking=body.shows_thinking)
    start = Message(id=_message_id(generation), content=[], model=generation.model,
                    stop_reason=None, usage=Usage(input_tokens=0, output_tokens=0))
    yield _frame({"type": "message_start", "message": start.model_dump()})
    finish: ChoiceFinished | None = None
    usage = EngineUsage(0, 0)
    async for event in generation.events():
        events: list[Event] = []
        if isinstance(event, TextDelta):
            events = blocks.add(output.feed(event.text))
        elif isinstance(event, ChoiceFinished):
            events, finish = blocks.add(output.flush()) + blocks.close(), event
        elif isinstance(event, EngineUsage):
            usage = event
        for item in events:
            yield _frame(item)
    stop = _matched_stop(finish.stop if finish else None, body.stop_sequences)
    # The prompt's token counts are known only now: message_delta's usage carries them (its
    # counts are totals, which the SDK puts in place of message_start's zeros).
    yield _frame({"type": "message_delta", "delta": {
        "stop_reason": _stop_reason(finish.reason if finish else "stop", output.calls, stop),
        "stop_sequence": stop}, "usage": Usage.of(usage).model_dump()})
    yield _frame({"type": "message_stop"})


class ContentBlocks:
    """A reply's deltas (server/chat/output.py) → Anthropic content blocks: the events that
    stream them, and the blocks themselves for the whole message, built by the same steps so
    that a streamed reply and a whole one agree. Text, thinking (when shown) and tool_use."""

    def __init__(self, thinking: bool) -> None:
        self.blocks: list[dict[str, Any]] = []
        self._thinking = thinking
        self._open = False  # the last block still takes deltas
        self._arguments = ""  # the open tool_use block's input so far, as JSON text

    def add(self, deltas: list[Delta]) -> list[Event]:
        events: list[Event] = []
        for delta in deltas:
            if "tool_calls" in delta:
                events += self._call(delta["tool_calls"][0])
            elif "content" in delta:
                events += self._text("text", delta["content"])
            elif self._thinking:
                events += self._text("thinking", delta["reasoning_content"])
        return events

    def close(self) -> list[Event]:
        """End the open block, if any."""
        if not self._open:
            return []
        self._open = False
        block = self.blocks[-1]
        events = []
        if block["type"] == "thinking":
            # Claude's rationale comes signed; a local model's has no signature, but clients
            # wait for the delta that carries one before the block ends.
            events.append(self._delta({"type": "signature_delta", "signature": ""}))
        elif block["type"] == "tool_use":
            block["input"] = json.loads(self._arguments or "{}")
        return [*events, {"type": "content_block_stop", "index": len(self.blocks) - 1}]

    def _text(self, kind: str, text: str) -> list[Event]:
        events: list[Event] = []
        if not (self._open and self.blocks[-1]["type"] == kind):
            signature = {"signature": ""} if kind == "thinking" else {}
            events = self._start({"type": kind, kind: "", **signature})
        self.blocks[-1][kind] += text
        return [*events, self._delta({"type": f"{kind}_delta", kind: text})]

    def _call(self, part: dict[str, Any]) -> list[Event]:
        """A call arrives as its id and name, then its arguments (ChoiceOutput._call)."""
        if "id" in part:
            self._arguments = ""
            return self._start({"type": "tool_use", "id": tool_use_id(part["id"]),
                                "name": part["function"]["name"], "input": {}})
        arguments = part["function"]["arguments"]
        self._arguments += arguments
        return [self._delta({"type": "input_json_delta", "partial_json": arguments})]

    def _start(self, block: dict[str, Any]) -> list[Event]:
        events = self.close()
        self.blocks.append(block)
        self._open = True
        return [*events, {"type": "content_block_start", "index": len(self.blocks) - 1,
                          "content_block": dict(block)}]

    def _delta(self, delta: dict[str, Any]) -> Event:
        return {"type": "content_block_delta", "index": len(self.blocks) - 1, "delta": delta}


def tool_use_id(call_id: str) -> str:
    """Anthropic's `toolu_` ids for the server's `call_` ids. Clients send them back as they
    got them, so the template sees the same id in a call and in its result. Other ids (a
    Mistral template accepts nine letters and digits only) stay as they are."""
    return "toolu_" + call_id.removeprefix("call_") if call_id.startswith("call_") else call_id


def _stop_reason(finish: FinishReason, calls: int, stop: str | None) -> StopReason:
    if calls:
        return "tool_use"
    if finish == "length":
        return "max_tokens"
    return "stop_sequence" if stop is not None else "end_turn"


def _matched_stop(stop: str | None, asked: list[str] | None) -> str | None:
    """The request's stop sequence that ended the reply (the stop string the engine matched);
    the model's own stop strings (its end of turn) are not the client's."""
    return stop if stop in (asked or ()) else None


def _message_id(generation: Generation) -> str:
    return "msg_" + generation.id.removeprefix("msg-")


def _frame(event: Event) -> bytes:
    return sse_event(str(event["type"]), event)


def _error_event(exc: ServerError | None) -> bytes:
    """The in-band error of a stream that has started: `event: error`, Anthropic's shape."""
    if exc is None:
        return _frame(error_shape(500, internal_error_body()))
    return _frame(error_shape(exc.status_code, error_body(exc)))
