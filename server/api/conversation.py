"""A chat request in the engine's terms, for every chat dialect (OpenAI chat and Responses,
Anthropic Messages, Ollama): the prompt rendered with its tools, the admitted generation, and
one output shaper per choice (reasoning, content, tool calls).

A dialect converts its request into a `ChatCompletionRequest` (after validating its own fields,
so that errors name them), calls `start_chat`, and renders the `Delta`s of each choice's
`ChoiceOutput` (`feed` per text event, `flush` at its end) in its own wire format.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from server.api.protocol.openai_chat import ChatCompletionRequest
from server.api.serving import Generation
from server.chat.families import GENERIC, prompt_family
from server.chat.families.reasoning import reasoning_for
from server.chat.output import ChoiceOutput
from server.chat.template import Prompt, render_chat_async
from server.chat.tools import ToolPlan, plan_tools, prepare_messages
from server.engine.base import Engine, GenerationRequest, Grammar, ModelInfo
from server.errors import InvalidRequest
from server.metrics import Metrics
from server.registry import ModelSpec, Registry
from server.settings import Settings


@dataclass
class ChatRun:
    """An admitted chat request: its generation and each choice's output shaper."""

    generation: Generation
    outputs: list[ChoiceOutput]
    plan: ToolPlan | None


async def start_chat(body: ChatCompletionRequest, engine: Engine, registry: Registry,
                     metrics: Metrics, settings: Settings, endpoint: str,
                     id_prefix: str) -> ChatRun:
    """Render, admit and set up the output shaping of `body`; typed errors raise here, before
    any response. `endpoint` labels the metrics and logs; `id_prefix` starts the reply's id."""
    body.check_limits(settings)
    spec = registry.get(body.model)
    info = await engine.model_info(spec.id)
    plan = plan_tools(body.tools, body.tool_choice, body.parallel_tool_calls,
                      info.chat_template)
    request = await _generation_request(body, spec, info, plan, settings)
    generation = await Generation.start(engine, request, metrics, endpoint, id_prefix,
                                        settings.request_timeout_s)
    reasoning = None if body.reasoning_format == "none" else reasoning_for(
        info.chat_template, request.prompt, spec.reasoning.separator if spec.reasoning else None)
    return ChatRun(generation, [ChoiceOutput(reasoning, plan) for _ in range(body.n)], plan)


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
