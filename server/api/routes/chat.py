"""POST /v1/chat/completions."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request

from server.api.conversation import start_chat
from server.api.deps import EngineDep, MetricsDep, RegistryDep, SettingsDep
from server.api.protocol.common import CompletionUsage, streamed
from server.api.protocol.openai_chat import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkChoice,
)
from server.api.protocol.openai_chat_output import assemble
from server.api.protocol.openai_logprobs import ChoiceLogprobs
from server.api.serving import Generation, collect_all
from server.api.sse import EventStream, sse_response
from server.chat.output import ChoiceOutput, Delta
from server.engine.base import (
    ChoiceFinished,
    TextDelta,
    TokenLogprob,
    Usage,
)

router = APIRouter()


@router.post("/v1/chat/completions", response_model=None, responses=streamed(ChatCompletion))
async def create_chat_completion(body: ChatCompletionRequest, engine: EngineDep,
                                 registry: RegistryDep, metrics: MetricsDep,
                                 settings: SettingsDep,
                                 http: Request) -> ChatCompletion | EventStream:
    run = await start_chat(body, engine, registry, metrics, settings, "chat", "chatcmpl")
    generation, outputs = run.generation, run.outputs
    if body.stream:
        return sse_response(_chunks(generation, outputs, body.include_usage, body.logprobs),
                            on_close=generation.stream.cancel,
                            exclude=None if body.include_usage else {"usage"})
    result, = await collect_all([generation], body.n, http)
    choices = []
    for i, output in enumerate(outputs):
        message = assemble(output.feed(result.text(i)) + output.flush())
        choices.append(ChatChoice(
            index=i, message=message,
            logprobs=ChoiceLogprobs.of(result.logprobs[i]) if body.logprobs else None,
            finish_reason="tool_calls" if output.calls else result.finish[i]))
    return ChatCompletion(id=generation.id, created=generation.created, model=generation.model,
                          choices=choices, usage=CompletionUsage.of(result.usage))


async def _chunks(generation: Generation, outputs: list[ChoiceOutput], include_usage: bool,
                  logprobs: bool | None) -> AsyncIterator[ChatCompletionChunk]:
    def chunk(choices: list[ChunkChoice], usage: CompletionUsage | None = None) -> \
            ChatCompletionChunk:
        return ChatCompletionChunk(id=generation.id, created=generation.created,
                                   model=generation.model, choices=choices, usage=usage)

    # Log-probabilities ride on the first chunk their text shows up in.
    held: list[list[TokenLogprob]] = [[] for _ in outputs]

    def deltas(index: int, items: list[Delta]) -> list[ChatCompletionChunk]:
        out = []
        for delta in items:
            lp = ChoiceLogprobs.of(held[index]) if logprobs and held[index] else None
            held[index] = [] if lp else held[index]
            out.append(chunk([ChunkChoice(index=index, delta=delta, logprobs=lp)]))
        return out

    for index in range(len(outputs)):
        yield chunk([ChunkChoice(index=index, delta={"role": "assistant", "content": ""})])
    async for event in generation.events():
        if isinstance(event, TextDelta):
            held[event.index] += event.logprobs
            for item in deltas(event.index, outputs[event.index].feed(event.text)):
                yield item
        elif isinstance(event, ChoiceFinished):
            output = outputs[event.index]
            for item in deltas(event.index, output.flush()):
                yield item
            rest = held[event.index]  # an end token's, which adds no text
            yield chunk([ChunkChoice(index=event.index, delta={},
                                     logprobs=ChoiceLogprobs.of(rest) if logprobs and rest
                                     else None,
                                     finish_reason="tool_calls" if output.calls
                                     else event.reason)])
        elif isinstance(event, Usage) and include_usage:
            yield chunk([], CompletionUsage.of(event))
