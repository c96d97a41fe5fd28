"""A scheduler that cannot hang or leak, on the real llama.cpp engine: a crashed thread, a failed
llama_decode, a batch too small for `parallel`, bounded echo memory, disconnects."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import llama_cpp as lc
import pytest
from fastapi import FastAPI

from server.app import create_app
from server.chat.template import plain_prompt
from server.engine.base import GenerationRequest, SamplingParams, TextDelta, Usage
from server.engine.llama import scheduler as scheduler_module
from server.engine.llama.logits import LogitReader
from server.engine.manager import LlamaEngine
from server.errors import EngineFailure
from server.settings import Settings
from tests.conftest import ROOT, LiveServer

MODEL = "m"
GREEDY = SamplingParams(temperature=0)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def app(smollm2_path: Path, tmp_path: Path) -> AsyncIterator[FastAPI]:
    registry = tmp_path / "models.yaml"
    registry.write_text(f"models:\n  {MODEL}:\n    path: {smollm2_path}\n    n_ctx: 512\n")
    application = create_app(Settings(models_file=registry, parallel=2, batch_tokens=64,
                                      threads=2))
    async with application.router.lifespan_context(application):
        yield application


def request(prompt: str, max_tokens: int = 8) -> GenerationRequest:
    return GenerationRequest(MODEL, plain_prompt(prompt), GREEDY, max_tokens=max_tokens)


async def run(engine: LlamaEngine, req: GenerationRequest) -> tuple[str, list[Any]]:
    events = [e async for e in await engine.generate(req)]
    return "".join(e.text for e in events if isinstance(e, TextDelta)), events


@pytest.mark.anyio
async def test_a_crashed_scheduler_fails_its_model_which_can_be_reloaded(
        app: FastAPI, monkeypatch: pytest.MonkeyPatch) -> None:
    engine: LlamaEngine = app.state.engine
    expected, _ = await run(engine, request("The sky is"))
    worker = engine._resident[MODEL].worker

    both_in = threading.Event()

    def crash() -> None:
        both_in.wait(10)  # the crash comes once the second request is queued too
        raise RuntimeError("injected")

    monkeypatch.setattr(worker, "_step", crash)
    # one running and one queued behind it (parallel 2, n 2): both fail, neither hangs
    streams = [await engine.generate(request("The sky is")),
               await engine.generate(GenerationRequest(MODEL, plain_prompt("x"), n=2))]
    both_in.set()
    for stream in streams:
        with pytest.raises(EngineFailure):
            async with asyncio.timeout(10):
                async for _ in stream:
                    pass
    with pytest.raises(EngineFailure, match=r"failed .*scheduler crashed"):
        await engine.generate(request("new"))
    assert engine.status(MODEL).state == "failed"
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://t") as client:
        ready = await client.get("/ready")
        assert ready.status_code == 503 and "failed" in str(ready.json()["problems"])
        listed = (await client.get("/v1/models")).json()["data"]
        assert [m["status"] for m in listed if m["id"] == MODEL] == ["failed"]
        assert (await client.post("/models/unload", json={"model": MODEL})).is_success
    assert engine.status(MODEL).state == "on_disk"
    again, _ = await run(engine, request("The sky is"))  # a fresh scheduler
    assert again == expected


@pytest.mark.anyio
async def test_a_failed_decode_rolls_back_and_publishes_no_unread_prefix(
        app: FastAPI, monkeypatch: pytest.MonkeyPatch) -> None:
    engine: LlamaEngine = app.state.engine
    long_prompt = " ".join(f"word{i}" for i in range(90))  # > 64 tokens: chunked prefill
    fresh, _ = await run(engine, request(long_prompt))
    real_decode = lc.llama_decode
    calls = {"n": 0}

    def fail_second_chunk(ctx: Any, batch: Any) -> int:
        calls["n"] += 1
        if calls["n"] == 2:  # the second prompt chunk of the next request
            return 1
        return int(real_decode(ctx, batch))

    # the prompt differs from the first one early, so nothing of it is cached
    other = "Other " + long_prompt
    monkeypatch.setattr(scheduler_module.lc, "llama_decode", fail_second_chunk)
    with pytest.raises(EngineFailure, match="failed to decode"):
        await run(engine, request(other))
    monkeypatch.setattr(scheduler_module.lc, "llama_decode", real_decode)
    # Reading the same prompt again reuses nothing that the failed step claimed to have read
    # and answers exactly as a fresh read does.
    text, events = await run(engine, request(other))
    usage = next(e for e in events if isinstance(e, Usage))
    assert usage.cached_tokens == 0
    reference, _ = await run(engine, GenerationRequest(MODEL, plain_prompt(other), GREEDY,
                                                       max_tokens=8, prompt_logprobs=0,
                                                       echo=True))  # reads it all, no reuse
    assert text == reference
    assert fresh  # the engine kept serving


@pytest.mark.anyio
async def test_a_cancelled_request_reports_its_tokens(app: FastAPI) -> None:
    engine: LlamaEngine = app.state.engine
    stream = await engine.generate(request("Count: one, two,", max_tokens=400))
    seen = 0
    async for event in stream:
        seen += isinstance(event, TextDelta)
        if seen == 5:
            break  # leaving the loop cancels the request
    events = [e async for e in stream]  # the engine still reports what it used
    usage = [e for e in events if isinstance(e, Usage)]
    assert usage and 5 <= usage[0].completion_tokens < 400


def test_parallel_larger_than_the_batch_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match=r"parallel \(200\) is larger than batch_tokens"):
        Settings(parallel=200, batch_tokens=128)
    done = subprocess.run([sys.executable, "-m", "server", "--parallel", "64"],
                          env={"GGSERVE_BATCH_TOKENS": "32", "PATH": "/usr/bin"}, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "parallel (64) is larger than batch_tokens (32)" in done.stderr


def test_echo_scoring_holds_one_row_at_a_time(smollm2_path: Path) -> None:
    """512 rows at a 49K vocabulary: float64 all at once was ~200 MB; now a row or two."""
    from server.engine.llama.native import NativeModel, init_backend, repack_enabled
    from tests.engine.test_sampling import Context

    init_backend()
    model = NativeModel(smollm2_path, n_gpu_layers=0, repack=repack_enabled("auto"))
    ctx = Context(model)
    tokens = model.tokenize(" ".join(["word"] * 600), parse_special=False)[:512]
    ctx.buffer.add_tokens(tokens, 0, [0], True)
    ctx.decode()
    reader = LogitReader(ctx.ctx, model.n_vocab, model.special_piece)
    tracemalloc.start()
    scores = reader.score(list(range(511)), tokens[1:], [5] * 511)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    ctx.close()
    model.close()
    assert len(scores) == 511 and all(len(s.top) == 5 for s in scores)
    assert peak < 8 * model.n_vocab * 4 + (2 << 20), peak


def test_a_non_streamed_request_stops_when_its_client_goes(smollm2_path: Path,
                                                           tmp_path: Path) -> None:
    registry = tmp_path / "models.yaml"
    registry.write_text(f"models:\n  {MODEL}:\n    path: {smollm2_path}\n")
    live = LiveServer(["--models-file", str(registry)])
    try:
        body = (b'{"model": "m", "prompt": "Count slowly:", "max_tokens": 3000, '
                b'"logit_bias": {"0": -100, "2": -100}}')
        with socket.create_connection(("127.0.0.1", live.port)) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                         b"application/json\r\nContent-Length: " + str(len(body)).encode() +
                         b"\r\n\r\n" + body)
            deadline = time.monotonic() + 30
            while live.metric("ggserve:num_sequences_running", model=MODEL) < 1:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            time.sleep(0.5)
        deadline = time.monotonic() + 10
        while live.metric("ggserve:num_sequences_running", model=MODEL) > 0:
            assert time.monotonic() < deadline, "the request kept running"
            time.sleep(0.05)
        while live.metric("ggserve:requests_total", model=MODEL, endpoint="completions",
                          outcome="cancelled") < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        generated = live.metric("ggserve:generation_tokens_total", model=MODEL)
        assert 0 < generated < 3000
        assert f"completions m cancelled prompt=3 (cached 0) output={int(generated)} " in \
            live.log.read_text()
        with httpx.Client(base_url=live.url) as client:  # and it keeps serving
            assert client.post("/v1/completions", json={"model": MODEL, "prompt": "Hi",
                                                        "max_tokens": 2}).is_success
        assert "never retrieved" not in live.log.read_text()  # the left request's futures
    finally:
        live.stop()
