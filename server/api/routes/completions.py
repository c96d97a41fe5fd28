"""POST /v1/completions: plain text continuation, the caller owns the prompt format.

A batch of prompts runs side by side; choice `i` of prompt `p` is choice `p * n + i`, as in
OpenAI's API. `echo` puts the prompt before the output, and with `logprobs` its tokens'
log-probabilities too (`max_tokens: 0` scores a prompt without generating: how
lm-evaluation-harness ranks multiple-choice answers).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence

from fastapi import APIRouter, Request

from server.api.deps import EngineDep, MetricsDep, RegistryDep, SettingsDep
from server.api.protocol.common import CompletionUsage, streamed
from server.api.protocol.openai_completions import Completion, CompletionChoice, CompletionRequest
from server.api.protocol.openai_logprobs import CompletionLogprobs
from server.api.serving import (
    Collected,
    Generation,
    collect_all,
    merged_events,
    start_all,
)
from server.api.sse import EventStream, sse_response
from server.chat.template import plain_prompt
from server.engine.base import (
    ChoiceFinished,
    PromptTokens,
    TextDelta,
    TokenIds,
    TokenLogprob,
    Usage,
)

router = APIRouter()


@router.post("/v1/completions", response_model=None, responses=streamed(Completion))
async def create_completion(body: CompletionRequest, engine: EngineDep, registry: RegistryDep,
                            metrics: MetricsDep, settings: SettingsDep,
                            http: Request) -> Completion | EventStream:
    body.check_limits(settings)
    spec = registry.get(body.model)
    prompts = body.prompts()
    requests = [body.to_generation(spec, p if isinstance(p, tuple) else plain_prompt(p),
                                  settings) for p in prompts]
    generations = await start_all(engine, requests, metrics, "completions", "cmpl",
                                  settings.request_timeout_s)
    if body.stream:
        def cancel() -> None:
            for generation in generations:
                generation.stream.cancel()

        return sse_response(_chunks(generations, prompts, body), on_close=cancel,
                            exclude=None if body.include_usage else {"usage"})
    results = await collect_all(generations, body.n, http)
    first = generations[0]
    return Completion(
        id=first.id, created=first.created, model=first.model,
        choices=[_choice(result, prompt, body, p * body.n + i, i)
                 for p, (result, prompt) in enumerate(zip(results, prompts, strict=True))
                 for i in range(body.n)],
        usage=CompletionUsage.of(_total(r.usage for r in results)))


def _echo_text(prompt: str | TokenIds, tokens: Sequence[TokenLogprob]) -> str:
    """The prompt as echoed: the text sent, or the text of the token ids sent."""
    if isinstance(prompt, str):
        return prompt
    return b"".join(t.piece for t in tokens).decode("utf-8", errors="replace")


def _choice(result: Collected, prompt: str | TokenIds, body: CompletionRequest, index: int,
            own: int) -> CompletionChoice:
    echo = _echo_text(prompt, result.prompt) if body.echo else ""
    text = echo + result.text(own)
    logprobs = None
    if body.logprobs is not None:
        logprobs = CompletionLogprobs.of(result.prompt if body.echo else ())
        logprobs.extend(CompletionLogprobs.of(result.logprobs[own], len(echo)))
    return CompletionChoice(text=text, index=index, logprobs=logprobs,
                            finish_reason=result.finish[own])


def _total(usages: Iterable[Usage]) -> Usage:
    total = Usage(0, 0)
    for u in usages:
        total = Usage(total.prompt_tokens + u.prompt_tokens,
                      total.completion_tokens + u.completion_tokens,
                      total.cached_tokens + u.cached_tokens)
    return total


async def _chunks(generations: Sequence[Generation], prompts: Sequence[str | TokenIds],
                  body: CompletionRequest) -> AsyncIterator[Completion]:
    first, n = generations[0], body.n
    offsets = [0] * (len(generations) * n)  # characters sent so far, per choice
    usages: list[Usage] = []

    def chunk(choices: list[CompletionChoice], usage: CompletionUsage | None = None) -> \
            Completion:
        return Completion(id=first.id, created=first.created, model=first.model,
                          choices=choices, usage=usage)

    def piece(index: int, text: str, tokens: Sequence[TokenLogprob]) -> Completion:
        logprobs = None if body.logprobs is None else \
            CompletionLogprobs.of(tokens, offsets[index])
        offsets[index] += len(text)
        return chunk([CompletionChoice(text=text, index=index, logprobs=logprobs,
                                       finish_reason=None)])

    async for p, event in merged_events(generations):
        if isinstance(event, PromptTokens):
            echo = _echo_text(prompts[p], event.tokens)
            for i in range(n):
                yield piece(p * n + i, echo, event.tokens)
        elif isinstance(event, TextDelta):
            yield piece(p * n + event.index, event.text, event.logprobs)
        elif isinstance(event, ChoiceFinished):
            yield chunk([CompletionChoice(text="", index=p * n + event.index,
                                          finish_reason=event.reason)])
        elif isinstance(event, Usage):
            usages.append(event)
    if body.include_usage:
        yield chunk([], CompletionUsage.of(_total(usages)))
