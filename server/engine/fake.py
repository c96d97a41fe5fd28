"""A scripted engine for fast tests of the API layer: no llama.cpp, same interface and events."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from server.engine.base import (
    ChoiceFinished,
    Event,
    FinishReason,
    GenerationRequest,
    ModelInfo,
    ModelStatus,
    TextDelta,
    Usage,
)
from server.engine.textstream import StopTextStream
from server.errors import ModelNotFound
from server.prompts import prompt_text
from server.registry import Registry

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


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
        return ModelStatus("loaded", n_ctx=self.n_ctx)

    async def load(self, model: str) -> ModelStatus:
        return self.status(model)

    async def unload(self, model: str) -> ModelStatus:
        return self.status(model)

    async def use_registry(self, registry: Registry) -> None:
        return None

    async def model_info(self, model: str) -> ModelInfo:
        if model not in self.models:
            raise ModelNotFound(model, list(self.models))
        return ModelInfo(model, self.n_ctx, self.chat_template, "<s>", "</s>")

    async def generate(self, request: GenerationRequest) -> _FakeStream:
        await self.model_info(request.model)
        self.requests.append(request)
        return _FakeStream(self, request)


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
        limit = request.max_tokens or len(engine.script)
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
                yield ChoiceFinished(index, reason)
            completed = True
            yield Usage(len(prompt_text(request.prompt).split()), generated)
        finally:
            if not completed:
                self.cancel()
