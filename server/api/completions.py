"""POST /v1/completions: plain text continuation, the caller owns the prompt format."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter
from sse_starlette.sse import EventSourceResponse

from server.api.deps import EngineDep, MetricsDep, RegistryDep, SettingsDep
from server.api.generation import Generation
from server.api.schemas import (
    Completion,
    CompletionChoice,
    CompletionRequest,
    CompletionUsage,
    streamed,
)
from server.api.sse import sse_response
from server.engine.base import ChoiceFinished, TextDelta, Usage
from server.prompts import plain_prompt

router = APIRouter()


@router.post("/v1/completions", response_model=None, responses=streamed(Completion))
async def create_completion(body: CompletionRequest, engine: EngineDep, registry: RegistryDep,
                            metrics: MetricsDep,
                            settings: SettingsDep) -> Completion | EventSourceResponse:
    body.check_limits(settings)
    spec = registry.get(body.model)
    request = body.to_generation(spec, plain_prompt(body.prompt_text))
    generation = await Generation.start(engine, request, metrics, "completions", "cmpl",
                                        settings.request_timeout_s)
    if body.stream:
        return sse_response(_chunks(generation, body.include_usage),
                            on_close=generation.stream.cancel,
                            exclude=None if body.include_usage else {"usage"})
    result = await generation.collect(body.n)
    return Completion(
        id=generation.id, created=generation.created, model=generation.model,
        choices=[CompletionChoice(text=result.text(i), index=i, finish_reason=result.finish[i])
                 for i in range(body.n)],
        usage=CompletionUsage.of(result.usage))


async def _chunks(generation: Generation, include_usage: bool) -> AsyncIterator[Completion]:
    def chunk(choices: list[CompletionChoice], usage: CompletionUsage | None = None) -> \
            Completion:
        return Completion(id=generation.id, created=generation.created, model=generation.model,
                          choices=choices, usage=usage)

    async for event in generation.events():
        if isinstance(event, TextDelta):
            yield chunk([CompletionChoice(text=event.text, index=event.index,
                                          finish_reason=None)])
        elif isinstance(event, ChoiceFinished):
            yield chunk([CompletionChoice(text="", index=event.index,
                                          finish_reason=event.reason)])
        elif isinstance(event, Usage) and include_usage:
            yield chunk([], CompletionUsage.of(event))
