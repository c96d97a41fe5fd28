"""A request inside the scheduler (Job, one Choice per sample) and its stream to the event loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from server.engine.base import (
    ChoiceFinished,
    Event,
    FinishReason,
    GenerationRequest,
    TextDelta,
    TokenLogprob,
    Usage,
    is_token_ids,
)
from server.engine.llama.native import NativeModel
from server.engine.llama.sampling import SequenceSampler, free_sampler, parse_grammar
from server.engine.llama.vocab import check_tokens, read_prompt
from server.engine.textstream import StopTextStream
from server.errors import ContextLengthExceeded, InvalidRequest

if TYPE_CHECKING:
    from server.engine.llama.speculative import SpecState

_END = object()


@dataclass(eq=False)
class Choice:
    """One sampled continuation: a llama.cpp sequence with its own sampler and stop scanner."""

    index: int
    seq_id: int
    sampler: SequenceSampler
    text: StopTextStream
    job: Job
    pos: int = 0  # position the next token to decode goes to
    next_token: int = -1
    fed: list[int] = field(default_factory=list)  # output tokens decoded into this sequence
    has_prompt: bool = False  # the prompt's KV is in this sequence (the first choice reads it)
    generated: int = 0
    finish: FinishReason | None = None
    # Log-probabilities of sampled tokens whose text is not sent yet (held for a stop string
    # or an unfinished UTF-8 character); they go out with that text.
    logprobs: list[TokenLogprob] = field(default_factory=list)
    spec: SpecState | None = None  # its speculative decoding, if it speculates


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
    grammar: Any = None  # the parsed llama.cpp grammar sampler, until the choices copy it
    chunk_row: int = 0  # batch row of the prompt chunk in the current step
    preserved: frozenset[int] = frozenset()  # control tokens whose text the output keeps
    text_sent: bool = False  # some text was handed over already
    _texts: tuple[int, list[str]] | None = None  # a whole reply's text run being gathered

    @property
    def deliverable(self) -> bool:
        """Whether this step's events go to the event loop now: always for a streamed
        request; for a whole reply only its first text (it times the first token)."""
        if not self.pending and self._texts is None:
            return False
        return self.request.stream or not self.text_sent

    def close(self) -> None:
        """Free what the job holds outside its choices (its parsed grammar)."""
        free_sampler(self.grammar)
        self.grammar = None

    def fail(self, error: Exception) -> None:
        """End the request with `error` (its token counts first)."""
        self.pending, self._texts = [self.usage(), error], None
        self.flush(final=True)

    def usage(self) -> Usage:
        """Token counts so far (all of them once every choice is finished)."""
        return Usage(len(self.tokens), sum(c.generated for c in self.choices), self.cached)

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
            if not self.request.stream and not logprobs:
                # A whole reply is handed over at the end: its text in one delta per choice.
                if self._texts is None or self._texts[0] != choice.index:
                    self._close_text()
                    self._texts = (choice.index, [])
                self._texts[1].append(text)
            else:
                self._close_text()
                self.pending.append(TextDelta(choice.index, text, logprobs))

    def _close_text(self) -> None:
        if self._texts is not None:
            index, parts = self._texts
            self.pending.append(TextDelta(index, "".join(parts)))
            self._texts = None

    def emit_finish(self, choice: Choice) -> None:
        assert choice.finish is not None
        self._close_text()
        self.pending.append(ChoiceFinished(choice.index, choice.finish, choice.text.matched))
        if self.done:
            self.pending.append(self.usage())

    def take(self, final: bool) -> list[object]:
        """The step's events, ending the stream if `final`."""
        self._close_text()
        events: list[object] = list(self.pending)
        self.pending = []
        self.text_sent = self.text_sent or any(isinstance(e, TextDelta) for e in events)
        if final:
            events.append(_END)
        return events

    def flush(self, final: bool) -> None:
        """Hand the step's events to the event loop (thread-safe); `final` ends the stream."""
        deliver_all([(self, final)])


def deliver_all(ready: list[tuple[Job, bool]]) -> None:
    """Hand several jobs' events to their event loop in one wake-up (thread-safe)."""
    batches = [(job.stream, events) for job, final in ready if (events := job.take(final))]
    if not batches:
        return
    loops = {id(stream.loop): stream.loop for stream, _ in batches}
    for loop in loops.values():
        mine = [(s, e) for s, e in batches if s.loop is loop]
        loop.call_soon_threadsafe(_put_all, mine)


def _put_all(batches: list[tuple[JobStream, list[object]]]) -> None:
    for stream, events in batches:
        stream.put(events)


class JobStream:
    """The async side of a Job: events arrive from the scheduler thread through the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_cancel: object) -> None:
        self.loop = loop
        self._queue: asyncio.Queue[Sequence[object]] = asyncio.Queue()
        self._on_cancel = on_cancel
        self.cancelled = False
        self._finished = False

    def put(self, events: Sequence[object]) -> None:
        """Deliver `events` (on the event loop's thread)."""
        self._queue.put_nowait(events)

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


def prepare_job(model: NativeModel, n_ctx: int, kv_cells: int, model_stops: frozenset[int],
                request: GenerationRequest, stream: JobStream) -> Job:
    """`request` as a Job: its tokens checked against the context, its grammar parsed."""
    prompt = request.prompt
    if is_token_ids(prompt):
        check_tokens(model, prompt, "prompt")
        tokens, bos_added = list(prompt), False
    else:
        tokens, bos_added = read_prompt(model, prompt)
    if not tokens:
        raise InvalidRequest("The prompt is empty; send at least one token of text.",
                             param="prompt")
    room = n_ctx - len(tokens)
    wanted = request.max_tokens
    if room < (0 if wanted == 0 else 1) or (wanted is not None and wanted > room):
        raise ContextLengthExceeded(n_prompt_tokens=len(tokens), n_ctx=n_ctx,
                                    max_tokens=wanted)
    check_tokens(model, request.stop_tokens, "stop")
    check_tokens(model, tuple(request.sampling.logit_bias), "logit_bias")
    stop_tokens = model_stops | stop_token_ids(model, request.stop) | \
        frozenset(request.stop_tokens)
    max_new = min(room, request.default_max_tokens or room) if wanted is None else wanted
    reservation = len(tokens) + request.n * max_new
    if reservation > kv_cells:
        raise InvalidRequest(
            f"n={request.n} choices of up to {max_new} tokens after a "
            f"{len(tokens)}-token prompt need {reservation} KV cells; this model has "
            f"{kv_cells}. Lower n or max_tokens.", param="n")
    grammar = None if request.grammar is None else parse_grammar(model.vocab, request.grammar)
    preserved = frozenset(t for t in map(model.single_token, request.preserved)
                          if t is not None)
    return Job(request, tokens, max_new, stop_tokens, stream, bos_added=bos_added,
               grammar=grammar, preserved=preserved)


def stop_token_ids(model: NativeModel, stops: tuple[str, ...]) -> frozenset[int]:
    """The stop strings that are single tokens of `model`, as token ids."""
    ids = (model.single_token(s) for s in stops if s)
    return frozenset(i for i in ids if i is not None)
