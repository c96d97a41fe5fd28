"""What chat and text completions share: admitting a request, metering it, collecting it."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from starlette.requests import Request

from server.engine.base import (
    ChoiceFinished,
    Engine,
    Event,
    FinishReason,
    GenerationRequest,
    GenerationStream,
    PromptTokens,
    TextDelta,
    TokenLogprob,
    Usage,
)
from server.errors import ClientDisconnected, RequestTimedOut, ServerError
from server.metrics import Metrics

log = logging.getLogger("server.requests")
SETTLE_TIMEOUT_S = 10.0  # longest wait for a stopped request's token counts
# Tasks that count a stopped request's tokens: held here so that they are not collected.
_settling: set[asyncio.Task[None]] = set()


@dataclass
class Generation:
    """An admitted request: its id, its metered events, and how to stop it."""

    id: str
    model: str  # as the client named it (an adapter's `model:adapter`), for the reply
    created: int
    stream: GenerationStream
    metrics: Metrics
    endpoint: str
    started: float
    usage: Usage | None = None
    first_token_at: float | None = None
    _last_delta_at: dict[int, float] = field(default_factory=dict)
    timeout_s: float = 600.0
    streamed: bool = True
    _itl: Any = None  # the inter-token latency histogram of this model
    label: str = ""  # the registry model in metrics (an adapter's base model); "": `model`

    def __post_init__(self) -> None:
        self.label = self.label or self.model

    @classmethod
    async def start(cls, engine: Engine, request: GenerationRequest, metrics: Metrics,
                    endpoint: str, id_prefix: str, timeout_s: float) -> Generation:
        """Admit `request` in the engine; typed errors raise here, before any response."""
        started = time.perf_counter()
        stream = await engine.generate(request)
        return cls(f"{id_prefix}-{uuid.uuid4().hex}", request.served_model, int(time.time()),
                   stream, metrics, endpoint, started, timeout_s=timeout_s,
                   streamed=request.stream, label=request.model)

    async def _timed(self) -> AsyncIterator[Event]:
        """The engine's events, ending in RequestTimedOut past the request's deadline.

        One timer per request: at the deadline it cancels the generation, which ends the
        engine's stream within a decode step (a timer around every event costs more than the
        event itself at hundreds of tokens per second).
        """
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            self.stream.cancel()

        remaining = self.timeout_s - (time.perf_counter() - self.started)
        timer = asyncio.get_running_loop().call_later(max(remaining, 0.0), expire)
        try:
            async for event in self.stream:
                if not expired:
                    yield event
                elif isinstance(event, Usage):  # what the request used until it was stopped
                    self._count_usage(event)
        finally:
            timer.cancel()
        if expired:
            raise RequestTimedOut(
                f"The request ran longer than this server allows ({self.timeout_s:g} s); "
                "ask for fewer tokens.")

    async def events(self) -> AsyncIterator[Event]:
        m, model = self.metrics, self.label
        outcome = "cancelled"
        m.requests_running.labels(model).inc()
        try:
            async for event in self._timed():
                if isinstance(event, TextDelta):
                    self._time_delta(event)
                elif isinstance(event, ChoiceFinished):
                    m.request_success.labels(model, event.reason).inc()
                elif isinstance(event, Usage):
                    self._count_usage(event)
                yield event
            outcome = "ok"
        except ServerError as exc:
            outcome = "client_error" if exc.status_code < 500 else "server_error"
            raise
        except Exception:
            outcome = "server_error"
            raise
        finally:
            self.stream.cancel()
            m.requests_running.labels(model).dec()
            m.requests.labels(model, self.endpoint, outcome).inc()
            m.e2e_latency.labels(model).observe(time.perf_counter() - self.started)
            if self.usage is None:
                # Stopped early (disconnect, cancel): the engine sends the token counts once it
                # has stopped the request, within a step; count and log them then.
                task = asyncio.get_running_loop().create_task(self._settle(outcome))
                _settling.add(task)
                task.add_done_callback(_settling.discard)
            else:
                self._log(outcome)

    async def _settle(self, outcome: str) -> None:
        try:
            async with asyncio.timeout(SETTLE_TIMEOUT_S):
                async for event in self.stream:
                    if isinstance(event, Usage):
                        self._count_usage(event)
        except (Exception, TimeoutError):  # the request is over either way; log what we know
            pass
        self._log(outcome)

    def _time_delta(self, delta: TextDelta) -> None:
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
            self.metrics.time_to_first_token.labels(self.label).observe(now - self.started)
        last = self._last_delta_at.get(delta.index)
        if last is not None and self.streamed:  # a whole reply arrives in one piece
            if self._itl is None:  # looked up once: labels() costs more than observe()
                self._itl = self.metrics.inter_token_latency.labels(self.label)
            self._itl.observe(now - last)
        self._last_delta_at[delta.index] = now

    def _log(self, outcome: str) -> None:
        total = time.perf_counter() - self.started
        usage = self.usage or Usage(0, 0)
        ttft = None if self.first_token_at is None else self.first_token_at - self.started
        rate = usage.completion_tokens / total if total > 0 else 0.0
        fields = {"model": self.model, "endpoint": self.endpoint, "outcome": outcome,
                  "prompt_tokens": usage.prompt_tokens, "cached_tokens": usage.cached_tokens,
                  "completion_tokens": usage.completion_tokens,
                  "ttft_s": None if ttft is None else round(ttft, 4),
                  "total_s": round(total, 4), "tokens_per_s": round(rate, 2)}
        log.info("%s %s %s prompt=%d (cached %d) output=%d ttft=%s total=%.3fs %.1f tok/s",
                 self.endpoint, self.model, outcome, usage.prompt_tokens, usage.cached_tokens,
                 usage.completion_tokens, "-" if ttft is None else f"{ttft:.3f}s", total, rate,
                 extra=fields)

    def _count_usage(self, usage: Usage) -> None:
        self.usage = usage
        m, model = self.metrics, self.label
        m.prompt_tokens.labels(model).inc(usage.prompt_tokens)
        m.prompt_tokens_cached.labels(model).inc(usage.cached_tokens)
        m.generation_tokens.labels(model).inc(usage.completion_tokens)
        m.prompt_length.labels(model).observe(usage.prompt_tokens)
        m.output_length.labels(model).observe(usage.completion_tokens)

    async def collect(self, n: int) -> Collected:
        """Run to the end and gather each choice's text, log-probabilities and finish."""
        result = Collected([[] for _ in range(n)], ["stop"] * n, [[] for _ in range(n)],
                           [None] * n)
        async for event in self.events():
            if isinstance(event, TextDelta):
                result.parts[event.index].append(event.text)
                result.logprobs[event.index] += event.logprobs
            elif isinstance(event, ChoiceFinished):
                result.finish[event.index] = event.reason
                result.stops[event.index] = event.stop
            elif isinstance(event, Usage):
                result.usage = event
            elif isinstance(event, PromptTokens):
                result.prompt = event.tokens
        return result


@dataclass
class Collected:
    parts: list[list[str]]
    finish: list[FinishReason]
    logprobs: list[list[TokenLogprob]]
    stops: list[str | None]  # the stop string that ended each choice, if one did
    usage: Usage = field(default_factory=lambda: Usage(0, 0))
    prompt: tuple[TokenLogprob, ...] = ()  # the prompt's tokens, when echoed

    def text(self, index: int) -> str:
        return "".join(self.parts[index])


T = TypeVar("T")


async def metered_call(work: Awaitable[T], *, metrics: Metrics, model: str, endpoint: str,
                       timeout_s: float, what: str, count: int) -> T:
    """A one-shot engine call (embeddings, rerank): within the request's time limit, counted
    in the request metrics by outcome and logged with `count` `what` (inputs, documents)."""
    started = time.perf_counter()
    outcome = "server_error"
    try:
        async with asyncio.timeout(timeout_s):
            result = await work
        outcome = "ok"
    except TimeoutError:
        raise RequestTimedOut(f"The request ran longer than this server allows ({timeout_s:g} "
                              f"s); send fewer or shorter {what}.") from None
    except ServerError as exc:
        outcome = "client_error" if exc.status_code < 500 else "server_error"
        raise
    finally:
        metrics.requests.labels(model, endpoint, outcome).inc()
        log.info("%s %s %s %s=%d total=%.3fs", endpoint, model, outcome, what, count,
                 time.perf_counter() - started)
    return result


async def start_all(engine: Engine, requests: Sequence[GenerationRequest], metrics: Metrics,
                    endpoint: str, id_prefix: str, timeout_s: float) -> list[Generation]:
    """Admit every request of a batch, or none: one refused cancels those admitted."""
    started: list[Generation] = []
    try:
        for request in requests:
            started.append(await Generation.start(engine, request, metrics, endpoint,
                                                  id_prefix, timeout_s))
    except BaseException:
        for generation in started:
            generation.stream.cancel()
        raise
    return started


async def collect_all(generations: Sequence[Generation], n: int,
                      request: Request | None = None) -> list[Collected]:
    """Collect a batch's generations side by side; one failing cancels the rest, and so does
    the client of `request` going away (ClientDisconnected)."""
    tasks = [asyncio.ensure_future(g.collect(n)) for g in generations]
    gathered: asyncio.Future[list[Collected]] = asyncio.gather(*tasks)
    watcher = asyncio.ensure_future(_disconnect(request)) if request is not None else None
    try:
        if watcher is not None:
            await asyncio.wait([gathered, watcher],  # type: ignore[type-var]
                               return_when=asyncio.FIRST_COMPLETED)
            if not gathered.done():
                raise ClientDisconnected("The client closed the connection.")
        return list(await gathered)
    finally:
        for task in tasks:
            task.cancel()
        if watcher is not None:
            watcher.cancel()
        # A client gone first leaves the gathering future to fail with the tasks' cancellation:
        # read it, or asyncio logs "exception was never retrieved" for every such request.
        gathered.add_done_callback(lambda done: done.cancelled() or done.exception())


async def _disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the body is already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def merged_events(generations: Sequence[Generation]) -> AsyncIterator[tuple[int, Event]]:
    """The events of a batch's generations as they come, each with its generation's index."""
    if len(generations) == 1:
        async for event in generations[0].events():
            yield 0, event
        return
    queue: asyncio.Queue[tuple[int, Event | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, generation: Generation) -> None:
        try:
            async for event in generation.events():
                queue.put_nowait((index, event))
            queue.put_nowait((index, None))
        except Exception as exc:
            queue.put_nowait((index, exc))

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(generations)]
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
