"""A scripted engine for fast tests of the API layer: no llama.cpp, same interface and events."""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from server.chat.template import Prompt, prompt_text
from server.engine.base import (
    ChoiceFinished,
    Embeddings,
    Event,
    FinishReason,
    GenerationRequest,
    InfillTokens,
    ModelInfo,
    ModelStatus,
    Ranking,
    TextDelta,
    TokenizerInfo,
    Usage,
    is_token_ids,
)
from server.engine.textstream import StopTextStream
from server.errors import (
    AdapterNotFound,
    EmbeddingModelOnly,
    InputTooLong,
    ModelNotFound,
    NotAnEmbeddingModel,
    NotAReranker,
    RerankerOnly,
    UnknownToken,
)
from server.registry import Registry

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# The fake vocabulary: a token is a Unicode code point, except these two.
FAKE_SPECIAL = {1: "<s>", 2: "</s>"}
FAKE_VOCAB_SIZE = 0x110000
# An infill model's FIM tokens: the ids of ASCII control characters.
FAKE_INFILL = InfillTokens(prefix=3, suffix=4, middle=5, repo=6, file_sep=7, bos=1)


@dataclass
class FakeEngine:
    """Replies with `script` (a list of text pieces, one per "token") to every request.

    `fail_after` raises an error after that many pieces; `delay` paces the pieces so tests can
    disconnect mid-stream. Prompts and cancellations are recorded for assertions.
    """

    script: list[str] = field(default_factory=lambda: ["Hello", ",", " world", "!"])
    models: tuple[str, ...] = ("fake-model",)
    chat_template: str | None = CHATML
    n_ctx: int = 2048
    delay: float = 0.0
    fail_after: int | None = None
    requests: list[GenerationRequest] = field(default_factory=list)
    cancelled: int = 0
    full: bool = False
    embedding_models: tuple[str, ...] = ()  # of `models`: these embed, and never generate
    reranker_models: tuple[str, ...] = ()  # of `embedding_models`: these only rerank
    infill_models: tuple[str, ...] = ()  # of `models`: these have FIM tokens (FAKE_INFILL)
    adapters: dict[str, tuple[str, ...]] = field(default_factory=dict)  # LoRA names by model

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def loaded(self) -> list[str]:
        return list(self.models)

    def overloaded(self) -> bool:
        return self.full

    def status(self, model: str) -> ModelStatus:
        if model not in self.models:
            raise ModelNotFound(model, list(self.models))
        return ModelStatus("loaded", n_ctx=self.n_ctx, size=0)

    async def load(self, model: str) -> ModelStatus:
        return self.status(model)

    async def unload(self, model: str) -> ModelStatus:
        return self.status(model)

    async def use_registry(self, registry: Registry) -> None:
        return None

    async def model_info(self, model: str) -> ModelInfo:
        if model not in self.models:
            raise ModelNotFound(model, list(self.models))
        return ModelInfo(model, self.n_ctx, self.chat_template, "<s>", "</s>",
                         special_tokens=tuple(FAKE_SPECIAL.values()))

    async def generate(self, request: GenerationRequest) -> _FakeStream:
        await self.model_info(request.model)
        if request.model in self.embedding_models:
            raise EmbeddingModelOnly(request.model)
        known = self.adapters.get(request.model, ())
        if request.adapter is not None and request.adapter not in known:
            raise AdapterNotFound(request.served_model, request.model, known)
        self._check(list(request.sampling.logit_bias), "logit_bias")
        self.requests.append(request)
        return _FakeStream(self, request)

    async def embed(self, model: str, inputs: list[list[int]] | list[str]) -> Embeddings:
        """Per input: 8 numbers from a hash of its tokens, normalised to unit length."""
        await self.model_info(model)
        if model not in self.embedding_models:
            raise NotAnEmbeddingModel(model)
        if model in self.reranker_models:
            raise RerankerOnly(model)
        await asyncio.sleep(self.delay)
        vectors, total = [], 0
        items: list[list[int] | str] = list(inputs)
        for index, item in enumerate(items):
            tokens = self._tokens(item, True) if isinstance(item, str) else item
            self._check(tokens, "input")
            if len(tokens) > self.n_ctx:
                raise InputTooLong(index=index, n_tokens=len(tokens), n_ctx=self.n_ctx)
            digest = hashlib.sha256(repr(tokens).encode()).digest()
            values = [byte / 127.5 - 1.0 for byte in digest[:8]]
            norm = math.hypot(*values)
            vectors.append([v / norm for v in values])
            total += len(tokens)
        return Embeddings(vectors, total)

    async def rerank(self, model: str, query: str, documents: list[str]) -> Ranking:
        """Each document's score: the share of the query's words it holds."""
        await self.model_info(model)
        if model not in self.reranker_models:
            raise NotAReranker(model)
        await asyncio.sleep(self.delay)
        words = set(query.lower().split())
        scores = [len(words & set(d.lower().split())) / max(len(words), 1) for d in documents]
        # the fake vocabulary: BOS query EOS document EOS, one token per character
        return Ranking(scores, sum(3 + len(query) + len(d) for d in documents))

    async def tokenize(self, model: str, prompt: Prompt, add_special: bool) -> list[int]:
        await self.model_info(model)
        return self._tokens(prompt_text(prompt), add_special)

    async def detokenize(self, model: str, tokens: list[int]) -> str:
        return "".join(await self.token_texts(model, tokens))

    async def token_texts(self, model: str, tokens: list[int]) -> list[str]:
        await self.model_info(model)
        self._check(tokens, "tokens")
        return [FAKE_SPECIAL.get(token) or chr(token) for token in tokens]

    async def tokenizer_info(self, model: str) -> TokenizerInfo:
        await self.model_info(model)
        return TokenizerInfo("fake", "<s>", "</s>", None, None, add_bos=True,
                             infill=FAKE_INFILL if model in self.infill_models else None)

    @staticmethod
    def _tokens(text: str, add_special: bool) -> list[int]:
        return [1] * add_special + [ord(char) for char in text]

    @staticmethod
    def _check(tokens: list[int], param: str) -> None:
        for token in tokens:
            if not 0 <= token < FAKE_VOCAB_SIZE:
                raise UnknownToken(token, FAKE_VOCAB_SIZE, param=param)


class _FakeStream:
    def __init__(self, engine: FakeEngine, request: GenerationRequest) -> None:
        self._engine = engine
        self._request = request
        self._cancelled = False

    def cancel(self) -> None:
        if not self._cancelled:
            self._cancelled = True
            self._engine.cancelled += 1

    async def __aiter__(self) -> AsyncIterator[Event]:
        engine, request = self._engine, self._request
        limit = request.max_tokens or request.default_max_tokens or len(engine.script)
        generated = 0
        completed = False
        try:
            for index in range(request.n):
                text = StopTextStream(request.stop)
                reason: FinishReason = "stop"
                for count, piece in enumerate(engine.script):
                    if self._cancelled:
                        return
                    if count == limit:
                        reason = "length"
                        break
                    if engine.fail_after is not None and count == engine.fail_after:
                        raise RuntimeError("scripted engine failure")
                    await asyncio.sleep(engine.delay)
                    generated += 1
                    out = text.feed(piece.encode())
                    if out:
                        yield TextDelta(index, out)
                    if text.stopped:
                        break
                if tail := text.flush():
                    yield TextDelta(index, tail)
                yield ChoiceFinished(index, reason, text.matched)
            completed = True
            prompt = request.prompt
            yield Usage(len(prompt) if is_token_ids(prompt) else len(prompt_text(prompt).split()),
                        generated)
        finally:
            if not completed:
                self.cancel()
