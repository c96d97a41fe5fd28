"""A request inside the scheduler (Job, one Choice per sample) and its stream to the event loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from server.engine.base import (
    ChoiceFinished,
    Event,
    FinishReason,
    GenerationRequest,
    TextDelta,
    TokenLogprob,
    Usage,
)
from server.engine.native import SamplerChain
from server.engine.textstream import StopTextStream

_END = object()


@dataclass(eq=False)
class Choice:
    """One sampled continuation: a llama.cpp sequence with its own sampler and stop scanner."""

    index: int
    seq_id: int
    sampler: SamplerChain
    text: StopTextStream
    pos: int = 0  # position the next token to decode goes to
    next_token: int = -1
    fed: list[int] = field(default_factory=list)  # output tokens decoded into this sequence
    has_prompt: bool = False  # the prompt's KV is in this sequence (the first choice reads it)
    generated: int = 0
    finish: FinishReason | None = None
    # Log-probabilities of sampled tokens whose text is not sent yet (held for a stop string
    # or an unfinished UTF-8 character); they go out with that text.
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass(eq=False)
class Job:
    """One admitted request: its prompt tokens, prefill progress and choices."""

    request: GenerationRequest
    tokens: list[int]
    max_new: int
    stop_tokens: frozenset[int]
    stream: JobStream
    submitted: float = field(default_factory=time.perf_counter)
    prefilled: int = 0
    cached: int = 0  # prompt tokens whose KV was reused from an earlier request
    choices: list[Choice] = field(default_factory=list)
    pending: list[Event | Exception] = field(default_factory=list)
    bos_added: bool = False  # the scheduler put a BOS before the prompt's own tokens
    # Log-probabilities of the prompt's tokens from position 1 on, as far as it is read.
    prompt_scores: list[TokenLogprob] = field(default_factory=list)

    @property
    def wants_prompt_logits(self) -> bool:
        return self.request.prompt_logprobs is not None

    @property
    def reservation(self) -> int:
        """KV cells this job may come to hold: the shared prompt plus each choice's output."""
        return len(self.tokens) + self.request.n * self.max_new

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.tokens)

    @property
    def done(self) -> bool:
        return bool(self.choices) and all(c.finish is not None for c in self.choices)

    def emit_text(self, choice: Choice, text: str, last: bool = False) -> None:
        """Send `text` with the log-probabilities of its tokens; `last` sends those held
        even without text (an end token's)."""
        if text or (last and choice.logprobs):
            logprobs, choice.logprobs = tuple(choice.logprobs), []
            self.pending.append(TextDelta(choice.index, text, logprobs))

    def emit_finish(self, choice: Choice) -> None:
        assert choice.finish is not None
        self.pending.append(ChoiceFinished(choice.index, choice.finish))
        if self.done:
            generated = sum(c.generated for c in self.choices)
            self.pending.append(Usage(len(self.tokens), generated, self.cached))

    def flush(self, final: bool) -> None:
        """Hand the step's events to the event loop (thread-safe); `final` ends the stream."""
        events, self.pending = self.pending, []
        if final:
            events.append(_END)  # type: ignore[arg-type]
        if events:
            self.stream.deliver_threadsafe(events)


class JobStream:
    """The async side of a Job: events arrive from the scheduler thread through the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_cancel: object) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[Sequence[object]] = asyncio.Queue()
        self._on_cancel = on_cancel
        self.cancelled = False
        self._finished = False

    def deliver_threadsafe(self, events: Sequence[object]) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, events)

    def cancel(self) -> None:
        """Stop generating for this request at the scheduler's next step (idempotent)."""
        if not self.cancelled and not self._finished:
            self.cancelled = True
            self._on_cancel()  # type: ignore[operator]

    async def __aiter__(self) -> AsyncIterator[Event]:
        try:
            while True:
                for item in await self._queue.get():
                    if item is _END:
                        self._finished = True
                        return
                    if isinstance(item, Exception):
                        self._finished = True
                        raise item
                    yield item  # type: ignore[misc]
        finally:
            self.cancel()
