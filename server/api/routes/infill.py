"""POST /infill: fill in the middle with a code model's FIM tokens, as llama-server lays them
out (format_prompt_infill in tools/server/server-common.cpp), after arXiv:2409.12186's
repository-level pattern:

    [BOS] [FIM_REP]myproject\\n [FIM_SEP]{filename}\\n{text} ... [FIM_SEP]filename\\n
    [FIM_PRE]{input_prefix}{prompt} [FIM_SUF]{input_suffix} [FIM_MID]

A model without FIM_REP/FIM_SEP tokens gets each chunk after a "--- snippet ---" line instead.
The local context fits one batch (the prefix's end: 3/4 of it; the suffix's start: the rest);
the repository context fills the context window up to room for the output, its oldest part
left out first. One departure: the BOS (for vocabularies that want one) comes first, where
llama-server puts it after the repository context.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from server.api.deps import EngineDep, MetricsDep, RegistryDep, SettingsDep
from server.api.errors import error_body, internal_error_body
from server.api.protocol.common import ERROR_RESPONSES
from server.api.protocol.infill import (
    InfillChunkReply,
    InfillRequest,
    InfillResponse,
    InfillTimings,
)
from server.api.serving import Collected, Generation, collect_all, start_all
from server.api.sse import EventStream, stream_response
from server.chat.template import Segment
from server.engine.base import (
    ChoiceFinished,
    Engine,
    InfillTokens,
    TextDelta,
    TokenIds,
    Usage,
)
from server.errors import EmbeddingModelOnly, NoInfillTokens, ServerError

router = APIRouter()
REPO_NAME = "myproject\n"  # llama-server's placeholders for the project and the current file
CURRENT_FILE = "filename\n"
SNIPPET = "\n\n--- snippet ---\n\n"  # a chunk's header when the model has no FIM_SEP
# An InfillResponse, only the `response_fields` asked for, or (streamed) its pieces as SSE.
RESPONSES: dict[int | str, dict[str, Any]] = {200: {"content": {
    "application/json": {"schema": {"type": "object"}},
    "text/event-stream": {"schema": {"type": "string"}}}}, **ERROR_RESPONSES}


@dataclass(frozen=True)
class InfillParts:
    """The tokens of each part of a request, separators of the repository context included."""

    prefix: list[int]
    suffix: list[int]
    prompt: list[int]
    extra: list[int]  # the whole repository context, as laid out before the prefix


def fim_prompt(fim: InfillTokens, parts: InfillParts, n_batch: int, n_ctx: int,
               n_predict: int) -> tuple[TokenIds, bool]:
    """The FIM prompt, and whether repository context was left out to fit `n_ctx`."""
    n_prefix = min(len(parts.prefix), 3 * (n_batch // 4))
    n_suffix = min(len(parts.suffix), max(0, n_batch // 4 - (2 + len(parts.prompt))))
    n_extra = min(max(0, n_ctx - n_batch - 2 * n_predict), len(parts.extra))
    tokens = [fim.bos] if fim.bos is not None else []
    tokens += parts.extra[len(parts.extra) - n_extra:]
    tokens += [fim.prefix, *parts.prefix[len(parts.prefix) - n_prefix:], *parts.prompt]
    tokens += [fim.suffix, *parts.suffix[:n_suffix], fim.middle]
    return tuple(tokens), n_extra < len(parts.extra)


async def infill_parts(engine: Engine, model: str, fim: InfillTokens,
                       body: InfillRequest) -> InfillParts:
    """Each part's tokens: the client's text never read as special tokens."""
    async def tokens(text: str) -> list[int]:
        return await engine.tokenize(model, (Segment(text, special=False),), False) \
            if text else []

    extra = [fim.repo, *await tokens(REPO_NAME)] if fim.repo is not None else []
    for chunk in body.input_extra:
        if fim.file_sep is not None:
            extra += [fim.file_sep, *await tokens(chunk.filename + "\n")]
        else:
            extra += await tokens(SNIPPET)
        extra += await tokens(chunk.text)
    if fim.file_sep is not None:
        extra += [fim.file_sep, *await tokens(CURRENT_FILE)]
    return InfillParts(await tokens(body.input_prefix), await tokens(body.input_suffix),
                       await tokens(body.prompt), extra)


@router.post("/infill", response_model=None, responses=RESPONSES)
async def infill(body: InfillRequest, engine: EngineDep, registry: RegistryDep,
                 metrics: MetricsDep, settings: SettingsDep,
                 http: Request) -> JSONResponse | EventStream:
    """Complete the code between `input_prefix` and `input_suffix` with a FIM code model."""
    spec = registry.get(body.model or registry.default)
    if spec.embedding:
        raise EmbeddingModelOnly(spec.id)
    fim = (await engine.tokenizer_info(spec.id)).infill
    if fim is None:
        raise NoInfillTokens(spec.id)
    n_ctx = (await engine.model_info(spec.id)).n_ctx
    parts = await infill_parts(engine, spec.id, fim, body)
    prompt, truncated = fim_prompt(fim, parts, min(settings.batch_tokens, n_ctx), n_ctx,
                                   body.output_limit or 0)
    completion = body.as_completion(body.model or spec.id, prompt)  # `id:adapter` kept
    completion.check_limits(settings)
    request = completion.to_generation(spec, prompt, settings)
    [generation] = await start_all(engine, [request], metrics, "infill", "infill",
                                   settings.request_timeout_s)
    if body.stream:
        return stream_response(_events(generation, body, truncated),
                               on_close=generation.stream.cancel, error=_error_event)
    [result] = await collect_all([generation], 1, http)
    return JSONResponse(_reply(generation, result, truncated).fields(body.response_fields))


def _reply(generation: Generation, result: Collected, truncated: bool) -> InfillResponse:
    usage = result.usage
    ended = time.perf_counter()
    first = generation.first_token_at or ended
    stop = result.stops[0]
    return InfillResponse(
        content=result.text(0), model=generation.model,
        tokens_predicted=usage.completion_tokens, tokens_evaluated=usage.prompt_tokens,
        has_new_line="\n" in result.text(0), truncated=truncated,
        stop_type="limit" if result.finish[0] == "length" else "word" if stop else "eos",
        stopping_word=stop or "", tokens_cached=usage.cached_tokens,
        timings=InfillTimings.of(usage.cached_tokens, usage.prompt_tokens - usage.cached_tokens,
                                 first - generation.started, usage.completion_tokens,
                                 ended - first))


async def _events(generation: Generation, body: InfillRequest,
                  truncated: bool) -> AsyncIterator[bytes]:
    """The middle as it comes, then the whole reply's fields with empty `content`."""
    result = Collected([[]], ["stop"], [[]], [None])
    async for event in generation.events():
        if isinstance(event, TextDelta):
            yield _data(InfillChunkReply(content=event.text).model_dump())
            result.parts[0].append(event.text)
        elif isinstance(event, ChoiceFinished):
            result.finish[0], result.stops[0] = event.reason, event.stop
        elif isinstance(event, Usage):
            result.usage = event
    final = _reply(generation, result, truncated)
    yield _data(final.model_copy(update={"content": ""}).fields(body.response_fields))


def _data(payload: object) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"


def _error_event(exc: ServerError | None) -> bytes:
    return _data(internal_error_body() if exc is None else error_body(exc))
