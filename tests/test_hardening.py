"""Security and limits: API keys, CORS, body size, request caps, timeouts, untrusted templates,
graceful shutdown."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI

from server.app import create_app
from server.engine.fake import FakeEngine
from server.registry import ModelSpec, Registry
from server.settings import Settings
from tests.conftest import LiveServer
from tests.gguf_factory import write_gguf

pytestmark = pytest.mark.anyio
CHAT = "/v1/chat/completions"
BODY = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def make_app(tmp_path: Path, engine: FakeEngine | None = None, **settings: Any) -> FastAPI:
    registry = Registry({"fake-model": ModelSpec(id="fake-model", path="x.gguf")}, "fake-model",
                        tmp_path / "m.yaml", tmp_path, tmp_path)
    app = create_app(Settings(**settings), engine=engine or FakeEngine(), registry=registry)
    app.state.accepting = True
    return app


async def client_for(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


@pytest.fixture
async def keyed(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    key_file = tmp_path / "keys.txt"
    key_file.write_text("# operators\nkey-from-file\n\n")
    async with await client_for(make_app(tmp_path, api_keys=["key-one"],
                                         api_key_file=key_file)) as http:
        yield http


async def test_api_keys_guard_the_api_but_not_the_probes(keyed: httpx.AsyncClient) -> None:
    missing = await keyed.post(CHAT, json=BODY)
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "invalid_api_key"
    wrong = await keyed.post(CHAT, json=BODY, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and "nope" not in wrong.text
    for key in ("key-one", "key-from-file"):
        ok = await keyed.post(CHAT, json=BODY, headers={"Authorization": f"Bearer {key}"})
        assert ok.status_code == 200
    assert (await keyed.get("/v1/models")).status_code == 401
    for open_path in ("/health", "/ready", "/metrics"):
        assert (await keyed.get(open_path)).status_code == 200, open_path


async def test_metrics_can_require_the_key(tmp_path: Path) -> None:
    app = make_app(tmp_path, api_keys=["k"], metrics_require_key=True)
    async with await client_for(app) as http:
        assert (await http.get("/metrics")).status_code == 401
        assert (await http.get("/metrics", headers={"Authorization": "Bearer k"})).status_code \
            == 200


async def test_cors_is_closed_by_default_and_opens_when_configured(tmp_path: Path) -> None:
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    async with await client_for(make_app(tmp_path)) as http:
        closed = await http.options(CHAT, headers=preflight)
        assert "access-control-allow-origin" not in closed.headers
    async with await client_for(make_app(tmp_path, cors_origins=["https://app.example"])) as h:
        opened = await h.options(CHAT, headers=preflight)
        assert opened.headers["access-control-allow-origin"] == "https://app.example"


async def test_body_over_the_limit_is_413(tmp_path: Path) -> None:
    async with await client_for(make_app(tmp_path, max_body_bytes=2048)) as http:
        big = {**BODY, "messages": [{"role": "user", "content": "x" * 5000}]}
        response = await http.post(CHAT, json=big)
        assert response.status_code == 413
        assert "larger than this server accepts (2048 bytes)" in \
            response.json()["error"]["message"]
        assert (await http.post(CHAT, json=BODY)).status_code == 200
        async def body() -> AsyncIterator[bytes]:
            yield json.dumps(big).encode()

        chunked = await http.post(CHAT, content=body(),
                                  headers={"content-type": "application/json"})
        assert chunked.status_code == 413


@pytest.mark.parametrize(("extra", "param"), [
    ({"max_tokens": 500}, "max_tokens"), ({"n": 5}, "n"),
    ({"messages": [{"role": "user", "content": "x"}] * 9}, "messages")])
async def test_request_caps(tmp_path: Path, extra: dict[str, Any], param: str) -> None:
    app = make_app(tmp_path, max_tokens_limit=100, max_n=4, max_messages=8)
    async with await client_for(app) as http:
        response = await http.post(CHAT, json={**BODY, **extra})
        assert response.status_code == 400
        assert response.json()["error"]["param"] == param


async def test_request_timeout(tmp_path: Path) -> None:
    engine = FakeEngine(script=["a"] * 50, delay=0.05)
    async with await client_for(make_app(tmp_path, engine, request_timeout_s=0.3)) as http:
        whole = await http.post(CHAT, json=BODY)
        assert whole.status_code == 504
        assert whole.json()["error"]["code"] == "request_timeout"
        streamed = await http.post(CHAT, json={**BODY, "stream": True})
        lines = [x[6:] for x in streamed.text.splitlines() if x.startswith("data: ")]
        assert lines[-1] == "[DONE]"
        assert json.loads(lines[-2])["error"]["code"] == "request_timeout"
    assert engine.cancelled == 2


CVE_TEMPLATE = (
    "{% for c in ''.__class__.__mro__[1].__subclasses__() %}"
    "{% if c.__name__ == 'Popen' %}{{ c(['touch', '" + "{marker}" + "']) }}{% endif %}"
    "{% endfor %}"
    "{{ self.__init__.__globals__.__builtins__.__import__('os').system('touch {marker}') }}"
    "{% for m in messages %}{{ m['content'] }}{% endfor %}")


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
def test_gguf_template_cannot_run_code(tmp_path: Path, anyio_backend: str) -> None:
    marker = tmp_path / "pwned"
    model = write_gguf(tmp_path / "evil.gguf", "llama",
                       chat_template=CVE_TEMPLATE.replace("{marker}", str(marker)))
    registry = tmp_path / "models.yaml"
    registry.write_text(f"models:\n  evil:\n    path: {model}\n    n_ctx: 128\n")
    live = LiveServer(["--models-file", str(registry)])
    try:
        response = httpx.post(f"{live.url}/v1/chat/completions", json={
            "model": "evil", "messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code in (400, 500)
        assert set(response.json()["error"]) >= {"message", "type", "param", "code"}
        assert not marker.exists()
        # the server is unharmed and keeps serving
        ok = httpx.post(f"{live.url}/v1/completions",
                        json={"model": "evil", "prompt": "hi", "max_tokens": 2})
        assert ok.status_code == 200
    finally:
        live.stop()
    assert not marker.exists()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
def test_sigterm_drains_then_lets_running_streams_finish(anyio_backend: str) -> None:
    live = LiveServer(["--drain-s", "1.5"])
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="x", max_retries=0)
    result: dict[str, Any] = {}

    def stream() -> None:
        chunks = list(client.completions.create(
            model="smollm2-135m-instruct", prompt="A long story:", max_tokens=400, stream=True,
            stream_options={"include_usage": True},
            logit_bias={"0": -100, "2": -100, "4": -100}))
        result["usage"] = chunks[-1].usage
        result["finish"] = [c.choices[0].finish_reason for c in chunks if c.choices][-1]

    worker = threading.Thread(target=stream)
    worker.start()
    time.sleep(0.3)
    live.proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    assert httpx.get(f"{live.url}/ready").status_code == 503  # balancers drain it...
    assert httpx.get(f"{live.url}/health").status_code == 200  # ...while it still serves
    try:
        worker.join(timeout=60)
        # uvicorn re-raises the signal once it has shut down gracefully
        assert live.proc.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        live.stop()
    assert result["finish"] == "length" and result["usage"].completion_tokens == 400
