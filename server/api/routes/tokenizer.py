"""The tokenizer endpoints in vLLM's shape: GET /tokenizer_info, POST /tokenize and
POST /detokenize (lm-evaluation-harness's remote tokenizer uses them). Without `model`, the
registry's default model answers."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field, StrictInt, model_validator

from server.api.conversation import chat_prompt
from server.api.deps import EngineDep, RegistryDep, SettingsDep
from server.api.protocol.common import ERROR_RESPONSES, RequestBody
from server.api.protocol.openai_chat import ChatMessage
from server.chat.template import Prompt, plain_prompt
from server.chat.tools import plan_tools
from server.engine.base import ModelInfo
from server.errors import EmbeddingModelOnly, InvalidRequest
from server.registry import ModelSpec, Registry
from server.settings import Settings

router = APIRouter()
_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: ERROR_RESPONSES[status] for status in (400, 401, 404, 503)}


class TokenizerInfoResponse(BaseModel):
    model: str
    tokenizer_class: Literal["llama.cpp"] = "llama.cpp"
    vocab_type: str  # llama.cpp's vocabulary kind: spm, bpe, wpm, ugm, ...
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    unk_token: str | None
    chat_template: str | None
    model_max_length: int  # the model's context window (n_ctx)
    add_bos_token: bool


class TokenizeRequest(RequestBody):
    """A prompt string, or chat messages rendered as /v1/chat/completions renders them."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = Field(True, strict=True)
    tools: list[dict[str, Any]] | None = None  # described in the prompt as chat describes them
    tool_choice: Any = None
    # Default: true for a prompt. Messages always get exactly the chat endpoint's tokens.
    add_special_tokens: bool | None = Field(None, strict=True)
    return_token_strs: bool = Field(False, strict=True)

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send either 'prompt' (a string) or 'messages' (chat messages)")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(RequestBody):
    model: str | None = None
    tokens: list[StrictInt]


class DetokenizeResponse(BaseModel):
    prompt: str


@router.get("/tokenizer_info", responses=_RESPONSES)
async def get_tokenizer_info(engine: EngineDep, registry: RegistryDep,
                             model: str | None = None) -> TokenizerInfoResponse:
    """The model's special tokens, chat template and context length."""
    spec = _spec(registry, model)
    info = await engine.model_info(spec.id)
    vocab = await engine.tokenizer_info(spec.id)
    return TokenizerInfoResponse(
        model=spec.id, vocab_type=vocab.vocab_type, bos_token=vocab.bos_token,
        eos_token=vocab.eos_token, pad_token=vocab.pad_token, unk_token=vocab.unk_token,
        chat_template=info.chat_template, model_max_length=info.n_ctx,
        add_bos_token=vocab.add_bos)


@router.post("/tokenize", responses=_RESPONSES)
async def tokenize(body: TokenizeRequest, engine: EngineDep, registry: RegistryDep,
                   settings: SettingsDep) -> TokenizeResponse:
    """The tokens the model reads for a prompt string, or for chat messages."""
    spec = _spec(registry, body.model)
    info = await engine.model_info(spec.id)
    if body.prompt is not None:
        prompt = plain_prompt(body.prompt)  # as /v1/completions reads it
        add_special = body.add_special_tokens is not False
    else:
        prompt = await _chat_prompt(body, spec, info, settings)
        add_special = True  # what the chat endpoint feeds: BOS as the vocabulary asks
    tokens = await engine.tokenize(spec.id, prompt, add_special)
    texts = await engine.token_texts(spec.id, tokens) if body.return_token_strs else None
    return TokenizeResponse(count=len(tokens), max_model_len=info.n_ctx, tokens=tokens,
                            token_strs=texts)


@router.post("/detokenize", responses=_RESPONSES)
async def detokenize(body: DetokenizeRequest, engine: EngineDep,
                     registry: RegistryDep) -> DetokenizeResponse:
    """The text of token ids, special tokens as their text."""
    spec = _spec(registry, body.model)
    return DetokenizeResponse(prompt=await engine.detokenize(spec.id, body.tokens))


def _spec(registry: Registry, model: str | None) -> ModelSpec:
    return registry.get(model or registry.default)


async def _chat_prompt(body: TokenizeRequest, spec: ModelSpec, info: ModelInfo,
                       settings: Settings) -> Prompt:
    messages = body.messages or []
    if spec.embedding:
        raise EmbeddingModelOnly(spec.id)
    if len(messages) > settings.max_messages:
        raise InvalidRequest(f"{len(messages)} messages; this server allows at most "
                             f"{settings.max_messages}.", param="messages")
    plan = plan_tools(body.tools, body.tool_choice, None, info.chat_template)
    return await chat_prompt(spec, info, [m.as_template_input() for m in messages], plan,
                             add_generation_prompt=body.add_generation_prompt)
