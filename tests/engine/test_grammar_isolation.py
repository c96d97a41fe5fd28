"""A grammar that must filter the whole vocabulary does so off the scheduler thread: the batch
goes on without that sequence (real llama.cpp, the default model)."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI

from server.chat.template import plain_prompt
from server.engine.base import GenerationRequest, Grammar, SamplingParams, TextDelta, Usage
from server.engine.llama.sampling import SequenceSampler
from server.engine.manager import LlamaEngine
from tests.engine.test_sampling import UNLIKELY
from tests.engine.test_scheduler_failures import MODEL, anyio_backend, app, request, run

__all__ = ["anyio_backend", "app"]  # the fixtures this module shares

# Sampled from the whole distribution: the first token is refused and only every token
# filtered can pick the next (no top-k or min-p for the best candidates to decide with).
WIDE = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=7)


def constrained(max_tokens: int = 6) -> GenerationRequest:
    return GenerationRequest(MODEL, plain_prompt("Say hello."), WIDE, max_tokens=max_tokens,
                             grammar=Grammar(UNLIKELY))


@pytest.fixture
def held(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[threading.Event, threading.Event]]:
    """(entered, release): every whole-vocabulary filter waits for `release`."""
    entered, release = threading.Event(), threading.Event()
    original = SequenceSampler.resolve

    def resolve(self: SequenceSampler) -> int:
        entered.set()
        release.wait(30)
        return original(self)

    monkeypatch.setattr(SequenceSampler, "resolve", resolve)
    yield entered, release
    release.set()


async def start_held(engine: LlamaEngine, entered: threading.Event) -> \
        tuple[Any, asyncio.Future[tuple[str, Usage | None]]]:
    """The constrained request, started, once its first filter is held: (its stream, the
    task collecting it)."""
    await run(engine, request("warm-up", 1))  # loads the model
    stream = await engine.generate(constrained())
    task = asyncio.ensure_future(collect(stream))
    assert await asyncio.to_thread(entered.wait, 30)
    return stream, task


async def collect(stream: Any) -> tuple[str, Usage | None]:
    events = [e async for e in stream]
    usage = next((e for e in events if isinstance(e, Usage)), None)
    return "".join(e.text for e in events if isinstance(e, TextDelta)), usage


@pytest.mark.anyio
async def test_a_plain_request_runs_to_its_end_while_a_grammar_filters_the_vocabulary(
        app: FastAPI, held: tuple[threading.Event, threading.Event]) -> None:
    engine: LlamaEngine = app.state.engine
    entered, release = held
    _, slow = await start_held(engine, entered)
    # Were the filter on the scheduler thread, this request could not get a single token.
    async with asyncio.timeout(30):
        _, events = await run(engine, request("The sky is", max_tokens=12))
    assert [e.completion_tokens for e in events if isinstance(e, Usage)] == [12]
    assert not slow.done()
    release.set()
    async with asyncio.timeout(30):
        out, usage = await slow
    assert re.fullmatch(r"zq[a-z]{0,6}", out), out
    assert usage is not None and usage.completion_tokens >= 1


@pytest.mark.anyio
async def test_a_request_cancelled_while_its_grammar_filters_ends_cleanly(
        app: FastAPI, held: tuple[threading.Event, threading.Event]) -> None:
    engine: LlamaEngine = app.state.engine
    entered, release = held
    stream, consumer = await start_held(engine, entered)
    stream.cancel()
    # The scheduler frees the sampler only once the worker is done with it.
    threading.Timer(0.3, release.set).start()
    async with asyncio.timeout(30):
        _, usage = await consumer
    assert usage is not None  # a cancelled request's tokens still count
    expected, _ = await run(engine, request("The sky is"))
    assert expected  # the model serves on


@pytest.mark.anyio
async def test_a_deferred_token_that_ends_the_last_request_leaves_no_empty_step(
        app: FastAPI, caplog: pytest.LogCaptureFixture) -> None:
    engine: LlamaEngine = app.state.engine
    await run(engine, request("warm-up", 1))
    # "a", then only the end: the model's next token is refused and only the whole
    # vocabulary decides, on a worker, that the request is over.
    alone = GenerationRequest(MODEL, plain_prompt("Say hello."), WIDE, max_tokens=5,
                              grammar=Grammar('root ::= "a"'))
    with caplog.at_level("ERROR", logger="server.engine"):
        async with asyncio.timeout(30):
            out, usage = await collect(await engine.generate(alone))
    assert out == "a" and usage is not None
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text
    assert engine.status(MODEL).state == "loaded"
