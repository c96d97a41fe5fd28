"""Ollama's generation endpoints: POST /api/chat and /api/generate (NDJSON streams unless
`stream` is false), and GET /api/version.

Both go through the chat path every dialect shares (api/conversation.py), except a `raw`
generate (or one on a model without a chat template), which continues the prompt as
/v1/completions does. Each choice's deltas become Ollama's message pieces: `content`,
`thinking` (a reasoning format's rationale), and whole tool calls with object arguments.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from server.api.conversation import ChatRun, start_chat
from server.api.deps import EngineDep, MetricsDep, RegistryDep, SettingsDep
from server.api.errors import internal_error_body
from server.api.protocol.ollama import (
    STREAMED,
    ChatRequest,
    GenerateRequest,
    VersionResponse,
    ndjson,
    timestamp,
)
from server.api.serving import Generation, collect_all
from server.api.sse import stream_response
from server.chat.families.reasoning import reasoning_for
from server.chat.output import ChoiceOutput, Delta
from server.chat.template import plain_prompt
from server.engine.base import ChoiceFinished, Engine, TextDelta, Usage
from server.errors import InvalidRequest, ModelNotFound, ServerError
from server.metrics import Metrics
from server.registry import ModelSpec, Registry
from server.settings import Settings

router = APIRouter()
Piece = dict[str, Any]  # part of an Ollama message: content, thinking, tool_calls
Frame = Callable[[Piece], dict[str, Any]]  # a piece as a reply's fields


def resolve(registry: Registry, name: str) -> ModelSpec:
    """The registry entry an Ollama model name means (`:latest`, Ollama's default tag, is the
    entry itself); ModelNotFound (404) otherwise."""
    try:
        return registry.get(name)
    except ModelNotFound:
        if name.endswith(":latest"):
            return registry.get(name.removesuffix(":latest"))
        raise


def served(spec: ModelSpec, name: str) -> str:
    """The registry model an Ollama model name `name` (resolved to `spec`) asks for: the
    entry's id, or `id:adapter` for one of its LoRA adapters."""
    adapter = spec.served_adapter(name.removesuffix(":latest"))
    return spec.id if adapter is None else f"{spec.id}:{adapter}"


def ndjson_error(exc: ServerError | None) -> bytes:
    """An error inside an NDJSON stream, as Ollama sends it."""
    return ndjson({"error": exc.message if exc is not None
                   else internal_error_body()["error"]["message"]})


def can_think(spec: ModelSpec, template: str | None) -> bool:
    """Whether the model's output has a rationale this server splits off (`thinking`)."""
    separator = spec.reasoning.separator if spec.reasoning else None
    return reasoning_for(template, (), separator) is not None


def _chat_frame(piece: Piece) -> dict[str, Any]:
    return {"message": {"role": "assistant", **piece}}


def _generate_frame(piece: Piece) -> dict[str, Any]:
    thinking = {"thinking": piece["thinking"]} if "thinking" in piece else {}
    return {"response": piece.get("content", ""), **thinking}


@router.get("/api/version")
async def version() -> VersionResponse:
    """The Ollama version whose API this server speaks."""
    return VersionResponse()


@router.post("/api/chat", response_model=None, responses=STREAMED)
async def chat(body: ChatRequest, engine: EngineDep, registry: RegistryDep,
               metrics: MetricsDep, settings: SettingsDep, http: Request) -> Response:
    """Ollama's chat; no messages loads the model (with keep_alive 0: unloads it)."""
    received = time.perf_counter()
    spec = resolve(registry, body.model)
    if not body.messages:
        return await _load_or_unload(engine, spec.id, body.model, body.keep_alive, _chat_frame)
    request = body.to_openai(served(spec, body.model))
    info = await engine.model_info(spec.id)
    shaper = _Shaper(_show_thinking(body.think, spec, info.chat_template))
    run = await start_chat(request, engine, registry, metrics, settings, "ollama_chat", "ollama")
    return await _respond(run, _Reply(body.model, _chat_frame, shaper, received), body.stream,
                          http)


@router.post("/api/generate", response_model=None, responses=STREAMED)
async def generate(body: GenerateRequest, engine: EngineDep, registry: RegistryDep,
                   metrics: MetricsDep, settings: SettingsDep, http: Request) -> Response:
    """Ollama's completion: the prompt in the chat template (as a user turn after `system`),
    or as it is with `raw`; no prompt loads the model (with keep_alive 0: unloads it)."""
    received = time.perf_counter()
    body.check()
    spec = resolve(registry, body.model)
    if not body.prompt:
        return await _load_or_unload(engine, spec.id, body.model, body.keep_alive,
                                     _generate_frame)
    info = await engine.model_info(spec.id)
    if body.raw or info.chat_template is None:  # a base model's template is the prompt itself
        if body.think:
            raise InvalidRequest("'think' needs the chat template, which raw (or a model without "
                                 "one) skips.", param="think")
        run = await _start_raw(body, spec, engine, metrics, settings)
        shaper = _Shaper(False)
    else:
        shaper = _Shaper(_show_thinking(body.think, spec, info.chat_template))
        run = await start_chat(body.to_openai(served(spec, body.model)), engine, registry,
                               metrics, settings, "ollama_generate", "ollama")
    return await _respond(run, _Reply(body.model, _generate_frame, shaper, received),
                          body.stream, http)


def _show_thinking(think: bool | str | None, spec: ModelSpec, template: str | None) -> bool:
    """Whether the reply carries the rationale: unless `think` is false. (The template has no
    switch this server sets, so a reasoning model still reasons; false only hides it.)"""
    if think is True and not can_think(spec, template):
        raise InvalidRequest(f"The model '{spec.id}' does not support thinking ('think').",
                             param="think")
    return think is not False


async def _start_raw(body: GenerateRequest, spec: ModelSpec, engine: Engine, metrics: Metrics,
                     settings: Settings) -> ChatRun:
    request = body.to_completion(served(spec, body.model))
    request.check_limits(settings)
    generation = await Generation.start(
        engine, request.to_generation(spec, plain_prompt(body.prompt or ""), settings), metrics,
        "ollama_generate", "ollama", settings.request_timeout_s)
    return ChatRun(generation, [ChoiceOutput(None, None)], None)


async def _load_or_unload(engine: Engine, model: str, name: str, keep_alive: float | str | None,
                          frame: Frame) -> JSONResponse:
    unload = keep_alive == 0
    await (engine.unload(model) if unload else engine.load(model))
    return JSONResponse({"model": name, "created_at": timestamp(), **frame({"content": ""}),
                         "done": True, "done_reason": "unload" if unload else "load"})


class _Shaper:
    """Deltas (OpenAI's chat streaming shape) → Ollama message pieces; a tool call comes whole,
    its arguments an object."""

    def __init__(self, show_thinking: bool) -> None:
        self._show_thinking = show_thinking
        self._named: dict[int, tuple[str, str]] = {}  # a call's index -> its id and name

    def pieces(self, deltas: list[Delta]) -> list[Piece]:
        out: list[Piece] = []
        for delta in deltas:
            if "content" in delta:
                out.append({"content": delta["content"]})
            elif "reasoning_content" in delta and self._show_thinking:
                out.append({"content": "", "thinking": delta["reasoning_content"]})
            elif "tool_calls" in delta and (call := self._call(delta["tool_calls"][0])):
                out.append({"content": "", "tool_calls": [call]})
        return out

    def _call(self, item: dict[str, Any]) -> dict[str, Any] | None:
        """The whole call once its arguments arrive (they follow its id and name)."""
        function = item.get("function", {})
        if "id" in item:
            self._named[item["index"]] = (item["id"], function["name"])
            return None
        call_id, name = self._named.pop(item["index"])
        return {"id": call_id, "function": {"index": item["index"], "name": name,
                                            "arguments": json.loads(function["arguments"])}}


@dataclass
class _Reply:
    """How one reply is written: the model as the client named it, and its frame."""

    name: str
    frame: Frame
    shaper: _Shaper
    received: float  # perf_counter() when the request arrived

    def chunk(self, piece: Piece) -> dict[str, Any]:
        return {"model": self.name, "created_at": timestamp(), **self.frame(piece),
                "done": False}

    def final(self, piece: Piece, reason: str, usage: Usage,
              generation: Generation) -> dict[str, Any]:
        """The last object: the rest of the reply, why it ended, token counts and durations
        (nanoseconds; load_duration runs from arrival to admission: loading, rendering)."""
        end = time.perf_counter()
        first = generation.first_token_at or end

        def ns(seconds: float) -> int:
            return max(0, int(seconds * 1e9))

        return {"model": self.name, "created_at": timestamp(), **self.frame(piece),
                "done": True, "done_reason": reason,
                "total_duration": ns(end - self.received),
                "load_duration": ns(generation.started - self.received),
                "prompt_eval_count": usage.prompt_tokens,
                "prompt_eval_duration": ns(first - generation.started),
                "eval_count": usage.completion_tokens, "eval_duration": ns(end - first)}


async def _respond(run: ChatRun, reply: _Reply, stream: bool, http: Request) -> Response:
    if stream:
        return stream_response(_lines(run, reply), on_close=run.generation.stream.cancel,
                               error=ndjson_error, media_type="application/x-ndjson", ping=None)
    result, = await collect_all([run.generation], 1, http)
    output = run.outputs[0]
    pieces = reply.shaper.pieces(output.feed(result.text(0)) + output.flush())
    return JSONResponse(reply.final(_merged(pieces), result.finish[0], result.usage,
                                    run.generation))


async def _lines(run: ChatRun, reply: _Reply) -> AsyncIterator[bytes]:
    output = run.outputs[0]
    reason, usage = "stop", Usage(0, 0)
    async for event in run.generation.events():
        if isinstance(event, TextDelta):
            deltas = output.feed(event.text)
        elif isinstance(event, ChoiceFinished):
            deltas, reason = output.flush(), event.reason
        else:
            usage = event if isinstance(event, Usage) else usage
            continue
        for piece in reply.shaper.pieces(deltas):
            yield ndjson(reply.chunk(piece))
    yield ndjson(reply.final({"content": ""}, reason, usage, run.generation))


def _merged(pieces: list[Piece]) -> Piece:
    """A whole reply's pieces as one."""
    merged: Piece = {"content": "".join(p.get("content", "") for p in pieces)}
    if thinking := "".join(p.get("thinking", "") for p in pieces):
        merged["thinking"] = thinking
    if calls := [call for p in pieces for call in p.get("tool_calls", [])]:
        merged["tool_calls"] = calls
    return merged
