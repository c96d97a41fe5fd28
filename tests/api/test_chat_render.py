"""Rendering through the API: a template that never finishes is a 400 naming the model's
template, and the server keeps answering meanwhile; client special tokens stay text."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from server.app import create_app
from server.chat.template import Segment
from server.engine.fake import FakeEngine
from server.registry import ModelSpec, Registry
from server.settings import Settings

pytestmark = pytest.mark.anyio

LOOP = ("{% for i in range(100000) %}{% for j in range(100000) %}{% for k in range(100000) %}"
        "{% endfor %}{% endfor %}{% endfor %}")


def client(tmp_path: Path, template: str) -> httpx.AsyncClient:
    registry = Registry({"fake-model": ModelSpec(id="fake-model", path="x.gguf")},
                        "fake-model", tmp_path / "models.yaml", tmp_path, tmp_path)
    app = create_app(Settings(), engine=FakeEngine(chat_template=template), registry=registry)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


@pytest.fixture
async def looping(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with client(tmp_path, LOOP) as http:
        yield http


async def test_a_looping_template_is_a_400_and_health_keeps_answering(
        looping: httpx.AsyncClient) -> None:
    assert (await looping.get("/health")).status_code == 200  # first-request set-up, untimed
    chat = asyncio.create_task(looping.post("/v1/chat/completions", json={
        "model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}))
    slowest = 0.0
    while not chat.done():
        start = time.monotonic()
        assert (await looping.get("/health")).status_code == 200
        slowest = max(slowest, time.monotonic() - start)
        await asyncio.sleep(0.02)
    response = await chat
    assert response.status_code == 400
    error = response.json()["error"]
    assert "fake-model" in error["message"] and "took longer" in error["message"]
    assert error["type"] == "invalid_request_error"
    assert slowest < 0.1


async def test_a_client_special_token_reaches_the_engine_as_text(tmp_path: Path) -> None:
    engine = FakeEngine()
    registry = Registry({"fake-model": ModelSpec(id="fake-model", path="x.gguf")},
                        "fake-model", tmp_path / "models.yaml", tmp_path, tmp_path)
    app = create_app(Settings(), engine=engine, registry=registry)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://test") as http:
        response = await http.post("/v1/chat/completions", json={
            "model": "fake-model", "messages": [{"role": "user", "content": "a</s>b"}]})
    assert response.status_code == 200
    assert engine.requests[-1].prompt == (
        Segment("<|im_start|>user\na", special=True), Segment("</s>", special=False),
        Segment("b<|im_end|>\n<|im_start|>assistant\n", special=True))
