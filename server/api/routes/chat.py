"""POST /v1/chat/completions."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request

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
from server.chat.families import GENERIC, prompt_family
from server.chat.families.reasoning import reasoning_for
from server.chat.output import ChoiceOutput, Delta
from server.chat.template import Prompt, render_chat_async
from server.chat.tools import ToolPlan, plan_tools, prepare_messages
from server.engine.base import (
    ChoiceFinished,
    GenerationRequest,
    Grammar,
    ModelInfo,
    TextDelta,
    TokenLogprob,
    Usage,
)
from server.errors import InvalidRequest
from server.registry import ModelSpec
from server.settings import Settings

router = APIRouter()


@router.post("/v1/chat/completions", response_model=None, responses=streamed(ChatCompletion))
async def create_chat_completion(body: ChatCompletionRequest, engine: EngineDep,
                                 registry: RegistryDep, metrics: MetricsDep,
                                 settings: SettingsDep,
                                 http: Request) -> ChatCompletion | EventStream:
    body.check_limits(settings)
    spec = registry.get(body.model)
    info = await engine.model_info(spec.id)
    plan = plan_tools(body.tools, body.tool_choice, body.parallel_tool_calls,
                      info.chat_template)
    request = await _generation_request(body, spec, info, plan, settings)
    generation = await Generation.start(engine, request, metrics, "chat", "chatcmpl",
                                        settings.request_timeout_s)
    reasoning = None if body.reasoning_format == "none" else reasoning_for(
        info.chat_template, request.prompt, spec.reasoning.separator if spec.reasoning else None)
    outputs = [ChoiceOutput(reasoning, plan) for _ in range(body.n)]
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


async def chat_prompt(spec: ModelSpec, info: ModelInfo, messages: list[dict[str, Any]],
                      plan: ToolPlan | None, add_generation_prompt: bool = True) -> Prompt:
    """The prompt for `messages`, with the tools of `plan` described as the template allows
    (also what POST /tokenize counts for messages)."""
    if info.chat_template is None:
        raise InvalidRequest(
            f"The model '{spec.id}' has no chat template (it is a base model, and its GGUF "
            "carries none): use /v1/completions, or name a 'template' for it in models.yaml.",
            param="model")
    native = prompt_family(info.chat_template) is not GENERIC
    extra: dict[str, Any] = {}
    if plan is not None and native:
        extra["tools"] = [f.spec() for f in plan.functions]
    return await render_chat_async(
        info.chat_template, prepare_messages(messages, plan, native),
        bos_token=info.bos_token, eos_token=info.eos_token,
        add_generation_prompt=add_generation_prompt, extra=extra,
        special_tokens=info.special_tokens,
        template_name=f"The chat template of model '{spec.id}'")


async def _generation_request(body: ChatCompletionRequest, spec: ModelSpec, info: ModelInfo,
                              plan: ToolPlan | None, settings: Settings) -> GenerationRequest:
    prompt = await chat_prompt(spec, info, [m.as_template_input() for m in body.messages], plan)
    request = body.to_generation(spec, prompt, settings)
    if plan is None:
        return request
    if request.grammar is not None:
        raise InvalidRequest("response_format and tools cannot constrain the same reply: "
                             "send one of them, or tool_choice 'none'", param="response_format")
    return replace(request, grammar=Grammar(
        plan.gbnf, plan.trigger_pattern if plan.lazy else None, param="tools"),
        preserved=plan.family.preserved)


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
