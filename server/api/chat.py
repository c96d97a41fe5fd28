"""POST /v1/chat/completions."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter
from sse_starlette.sse import EventSourceResponse

from server.api.deps import EngineDep, MetricsDep, RegistryDep, SettingsDep
from server.api.generation import Generation
from server.api.schemas import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChunkChoice,
    CompletionUsage,
    streamed,
)
from server.api.sse import sse_response
from server.engine.base import ChoiceFinished, TextDelta, Usage
from server.errors import InvalidRequest
from server.prompts import render_chat
from server.reasoning import Part, ReasoningSplitter

router = APIRouter()


@router.post("/v1/chat/completions", response_model=None, responses=streamed(ChatCompletion))
async def create_chat_completion(body: ChatCompletionRequest, engine: EngineDep,
                                 registry: RegistryDep, metrics: MetricsDep,
                                 settings: SettingsDep) -> ChatCompletion | EventSourceResponse:
    body.check_limits(settings)
    spec = registry.get(body.model)
    info = await engine.model_info(spec.id)
    if info.chat_template is None:
        raise InvalidRequest(
            f"The model '{spec.id}' has no chat template (it is a base model, and its GGUF "
            "carries none): use /v1/completions, or name a 'template' for it in models.yaml.",
            param="model")
    prompt = render_chat(info.chat_template, [m.as_template_input() for m in body.messages],
                         bos_token=info.bos_token, eos_token=info.eos_token)
    generation = await Generation.start(engine, body.to_generation(spec, prompt), metrics,
                                        "chat", "chatcmpl", settings.request_timeout_s)
    separator = spec.reasoning.separator if spec.reasoning and \
        body.reasoning_format != "none" else None
    if body.stream:
        return sse_response(_chunks(generation, body.n, body.include_usage, separator),
                            on_close=generation.stream.cancel,
                            exclude=None if body.include_usage else {"usage"})
    result = await generation.collect(body.n)
    return ChatCompletion(
        id=generation.id, created=generation.created, model=generation.model,
        choices=[ChatChoice(index=i, message=_message(result.text(i), separator),
                            finish_reason=result.finish[i]) for i in range(body.n)],
        usage=CompletionUsage.of(result.usage))


def _message(text: str, separator: str | None) -> ChatCompletionMessage:
    if separator is None:
        return ChatCompletionMessage(content=text)
    splitter = ReasoningSplitter(separator)
    parts: dict[str, str] = {"content": "", "reasoning_content": ""}
    for kind, piece in splitter.feed(text) + splitter.flush():
        parts[kind] += piece
    return ChatCompletionMessage(content=parts["content"],
                                 reasoning_content=parts["reasoning_content"])


async def _chunks(generation: Generation, n: int, include_usage: bool,
                  separator: str | None) -> AsyncIterator[ChatCompletionChunk]:
    def chunk(choices: list[ChunkChoice], usage: CompletionUsage | None = None) -> \
            ChatCompletionChunk:
        return ChatCompletionChunk(id=generation.id, created=generation.created,
                                   model=generation.model, choices=choices, usage=usage)

    splitters = [ReasoningSplitter(separator) if separator else None for _ in range(n)]

    def parts(index: int, text: str | None) -> list[Part]:
        splitter = splitters[index]
        if splitter is None:
            return [("content", text)] if text else []
        return splitter.flush() if text is None else splitter.feed(text)

    for index in range(n):
        yield chunk([ChunkChoice(index=index, delta={"role": "assistant", "content": ""})])
    async for event in generation.events():
        if isinstance(event, TextDelta | ChoiceFinished):
            text = event.text if isinstance(event, TextDelta) else None
            for kind, piece in parts(event.index, text):
                yield chunk([ChunkChoice(index=event.index, delta={kind: piece})])
        if isinstance(event, ChoiceFinished):
            yield chunk([ChunkChoice(index=event.index, delta={}, finish_reason=event.reason)])
        elif isinstance(event, Usage) and include_usage:
            yield chunk([], CompletionUsage.of(event))
