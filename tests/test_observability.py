"""Metrics move by the right amounts after real requests; probes; request ids and logs."""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI

from server.app import create_app
from server.engine.fake import FakeEngine
from server.logs import REQUEST_ID, JsonFormatter
from server.registry import ModelSpec, Registry
from server.settings import Settings
from tests.conftest import LiveServer

MODEL = "smollm2-135m-instruct"
COUNTERS = ["prompt_tokens_total", "generation_tokens_total", "prompt_tokens_cached_total",
            "decode_calls_total", "time_to_first_token_seconds_count",
            "inter_token_latency_seconds_count", "e2e_request_latency_seconds_count",
            "request_queue_time_seconds_count", "request_prompt_tokens_sum",
            "request_generation_tokens_sum"]


def snapshot(server: LiveServer) -> dict[str, float]:
    values = {name: server.metric(f"ggserve:{name}", model=MODEL) for name in COUNTERS}
    values["ok"] = server.metric("ggserve:requests_total", model=MODEL, endpoint="chat",
                                 outcome="ok")
    values["length"] = server.metric("ggserve:request_success_total", model=MODEL,
                                     finished_reason="length")
    values["http"] = server.metric("ggserve:http_requests_total",
                                   endpoint="/v1/chat/completions", status="2xx")
    return values


def test_each_metric_moves_by_the_right_amount(server: LiveServer) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    before = snapshot(server)
    question = f"Token {uuid.uuid4().hex}: describe the moon."  # no cached prefix beyond chat
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=12,
        temperature=0.7, stream=True, stream_options={"include_usage": True},
        logit_bias={"0": -100, "2": -100, "4": -100}))
    usage = chunks[-1].usage
    deltas = [c for c in chunks if c.choices and c.choices[0].delta.content]
    after = snapshot(server)
    moved = {k: after[k] - before[k] for k in after}
    assert moved["prompt_tokens_total"] == usage.prompt_tokens
    assert moved["prompt_tokens_cached_total"] == usage.prompt_tokens_details.cached_tokens
    assert moved["generation_tokens_total"] == usage.completion_tokens == 12
    assert moved["request_prompt_tokens_sum"] == usage.prompt_tokens
    assert moved["request_generation_tokens_sum"] == 12
    # one step reads the prompt and samples the first token; each later token takes one more
    assert moved["decode_calls_total"] == 12
    assert moved["inter_token_latency_seconds_count"] == len(deltas) - 1
    for name in ("time_to_first_token_seconds_count", "e2e_request_latency_seconds_count",
                 "request_queue_time_seconds_count", "ok", "length", "http"):
        assert moved[name] == 1, name


def test_gauges_describe_the_loaded_model(server: LiveServer) -> None:
    assert server.metric("ggserve:models_loaded") == 1
    weights = server.metric("ggserve:model_memory_bytes", model=MODEL, part="weights",
                            device="cpu")
    assert 80e6 < weights < 120e6  # the Q4_1 file is 92 MiB
    assert server.metric("ggserve:model_memory_bytes", model=MODEL, part="kv_cache",
                         device="cpu") > 0
    # Idle: no cell is held by a running request; the finished ones' cells stay as prefixes
    # for reuse, which do not count as used (tests/test_kv_usage.py reads them under load).
    assert server.metric("ggserve:kv_cache_tokens", model=MODEL) == 0
    assert server.metric("ggserve:kv_cache_usage_perc", model=MODEL) == 0
    assert server.metric("ggserve:kv_cache_prefix_tokens", model=MODEL) > 0
    assert server.metric("ggserve:kv_cache_capacity_tokens", model=MODEL) == 8192 * 4
    assert server.metric("ggserve:num_sequences_running", model=MODEL) == 0
    assert server.metric("ggserve:num_requests_waiting", model=MODEL) == 0


def test_request_id_is_echoed_or_made_and_logged(server: LiveServer) -> None:
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
    given = httpx.post(f"{server.url}/v1/completions", json=body,
                       headers={"x-request-id": "trace-abc-123"})
    assert given.headers["x-request-id"] == "trace-abc-123"
    made = httpx.post(f"{server.url}/v1/completions", json=body)
    assert len(made.headers["x-request-id"]) == 32
    log = server.log.read_text()
    line = next(x for x in log.splitlines() if "[trace-abc-123]" in x)
    assert "completions smollm2-135m-instruct ok prompt=" in line and "output=2" in line


def test_ready_on_the_real_server(server: LiveServer) -> None:
    response = httpx.get(f"{server.url}/ready")
    assert (response.status_code, response.json()["status"]) == (200, "ready")


@pytest.fixture
def fake_app(tmp_path: Path) -> tuple[FastAPI, FakeEngine]:
    engine = FakeEngine()
    spec = ModelSpec(id="fake-model", path="unused.gguf")
    registry = Registry({"fake-model": spec}, "fake-model", tmp_path / "m.yaml", tmp_path,
                        tmp_path)
    return create_app(Settings(), engine=engine, registry=registry), engine


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_ready_states(fake_app: tuple[FastAPI, FakeEngine], anyio_backend: str) -> None:
    app, engine = fake_app
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://t") as http:
        starting = await http.get("/ready")
        assert starting.status_code == 503
        assert "not accepting requests" in starting.json()["problems"]
        app.state.accepting = True
        assert (await http.get("/ready")).status_code == 200
        engine.full = True
        full = await http.get("/ready")
        assert (full.status_code, full.json()["problems"]) == (503, ["a request queue is full"])
        engine.full, engine.models = False, ()
        assert (await http.get("/ready")).json()["problems"] == ["model fake-model not loaded"]
        assert (await http.get("/health")).status_code == 200  # alive all along


def test_json_log_lines_carry_the_request_id_and_fields() -> None:
    record = logging.LogRecord("server.requests", logging.INFO, __file__, 1, "done %s",
                               ("x",), None)
    record.prompt_tokens = 5
    token = REQUEST_ID.set("rid-1")
    try:
        line: dict[str, Any] = json.loads(JsonFormatter().format(record))
    finally:
        REQUEST_ID.reset(token)
    assert line["message"] == "done x" and line["request_id"] == "rid-1"
    assert line["prompt_tokens"] == 5 and line["level"] == "info"


def declared_metrics() -> set[str]:
    from server.metrics import Metrics

    return {family.name for family in Metrics().registry.collect()}


def test_dashboard_and_readme_cover_every_metric() -> None:
    root = Path(__file__).resolve().parent.parent
    declared = declared_metrics()
    dashboard = (root / "deploy" / "grafana" / "ggserve-dashboard.json").read_text()
    import re

    used = {re.sub(r"_(bucket|total)$", "", m)
            for m in re.findall(r"ggserve:[a-z0-9_]+", dashboard)}
    assert used <= declared, used - declared
    readme = (root / "README.md").read_text()
    missing = [name for name in declared if f"`{name}" not in readme]
    assert not missing, f"README's metrics table lacks {missing}"
