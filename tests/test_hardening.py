"""Security and limits: API keys, CORS, body size, request caps, timeouts, untrusted templates,
graceful shutdown."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
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


# The preflights Chromium sends for the JS SDKs' requests (openai 6.49 chat.completions.create,
# @anthropic-ai/sdk 1.14 messages.create with dangerouslyAllowBrowser), header names as sent.
SDK_PREFLIGHTS = {
    "openai": (CHAT, "authorization,content-type,x-stainless-arch,x-stainless-lang,"
                     "x-stainless-os,x-stainless-package-version,x-stainless-retry-count,"
                     "x-stainless-runtime,x-stainless-runtime-version,x-stainless-timeout"),
    "anthropic": ("/v1/messages", "anthropic-dangerous-direct-browser-access,anthropic-version,"
                                  "content-type,x-api-key,x-stainless-arch,x-stainless-lang,"
                                  "x-stainless-os,x-stainless-package-version,"
                                  "x-stainless-retry-count,x-stainless-runtime,"
                                  "x-stainless-runtime-version,x-stainless-timeout"),
}


@pytest.mark.parametrize("sdk", sorted(SDK_PREFLIGHTS))
async def test_cors_accepts_the_preflights_of_the_browser_sdks(tmp_path: Path, sdk: str) -> None:
    path, asked = SDK_PREFLIGHTS[sdk]
    app = make_app(tmp_path, cors_origins=["https://app.example"], api_keys=["k"])
    async with await client_for(app) as http:
        response = await http.options(path, headers={
            "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": asked})
        assert response.status_code == 200, response.text
        allowed = {h.strip().lower() for h in
                   response.headers["access-control-allow-headers"].split(",")}
        assert set(asked.split(",")) <= allowed
        assert response.headers["access-control-allow-origin"] == "https://app.example"
        other = await http.options(path, headers={
            "Origin": "https://evil.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": asked})
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers


async def test_anthropic_clients_may_send_the_key_as_x_api_key(tmp_path: Path) -> None:
    async with await client_for(make_app(tmp_path, api_keys=["k"])) as http:
        assert (await http.post(CHAT, json=BODY, headers={"x-api-key": "k"})).status_code == 200
        wrong = await http.post(CHAT, json=BODY, headers={"x-api-key": "nope"})
        assert wrong.status_code == 401


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


def wait_for(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    """Poll `condition` until it holds: tests wait on what the server shows, not on sleeps."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


class LongStream(threading.Thread):
    """A completion stream of `max_tokens` tokens (EOS banned) read in the background, line by
    line; `started` is set once its first chunk has arrived."""

    def __init__(self, live: LiveServer, max_tokens: int) -> None:
        super().__init__()
        self.live, self.max_tokens = live, max_tokens
        self.started = threading.Event()
        self.data: list[str] = []
        self.failure: Exception | None = None

    def run(self) -> None:
        body = {"model": "smollm2-135m-instruct", "prompt": "A long story:", "stream": True,
                "max_tokens": self.max_tokens, "stream_options": {"include_usage": True},
                "logit_bias": {"0": -100, "2": -100, "4": -100}}
        try:
            with httpx.stream("POST", f"{self.live.url}/v1/completions", json=body,
                              timeout=180) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        self.data.append(line[6:])
                        self.started.set()
        except httpx.HTTPError as exc:  # a cut stream: the test reports it
            self.failure = exc

    def events(self) -> list[Any]:
        assert self.failure is None and self.data[-1] == "[DONE]", (self.failure, self.data[-3:])
        return [json.loads(x) for x in self.data[:-1]]


def start_stream(live: LiveServer, max_tokens: int) -> LongStream:
    stream = LongStream(live, max_tokens)
    stream.start()
    assert stream.started.wait(60), live.log.read_text()
    return stream


def quiet_exit(live: LiveServer, timeout: float = 60.0) -> int:
    """The server's exit status, once it has exited without a traceback in its log."""
    try:
        code = live.proc.wait(timeout=timeout)
    finally:
        live.stop()
    log = live.log.read_text()
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log
    return code


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
def test_sigterm_drains_then_lets_running_streams_finish(anyio_backend: str) -> None:
    # the drain only bounds how long the test has to see /ready turn 503, so it is generous;
    # the shutdown timeout leaves a slow machine all the time it needs for the 400 tokens
    live = LiveServer(["--drain-s", "5"], env={"GGSERVE_SHUTDOWN_TIMEOUT_S": "300"})
    stream = start_stream(live, max_tokens=400)
    live.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: httpx.get(f"{live.url}/ready").status_code == 503)  # balancers drain it...
    assert httpx.get(f"{live.url}/health").status_code == 200  # ...while it still serves
    stream.join(timeout=300)
    # uvicorn re-raises the signal once it has shut down gracefully
    assert quiet_exit(live, timeout=60) in (0, -signal.SIGTERM)
    events = stream.events()
    assert events[-1]["usage"]["completion_tokens"] == 400
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "length"


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize(("sig", "status"), [(signal.SIGTERM, -signal.SIGTERM),
                                              (signal.SIGINT, 128 + signal.SIGINT)],
                         ids=["SIGTERM", "SIGINT"])
def test_a_stream_outlasting_the_shutdown_timeout_ends_with_an_error_then_done(
        anyio_backend: str, sig: signal.Signals, status: int) -> None:
    live = LiveServer([], env={"GGSERVE_SHUTDOWN_TIMEOUT_S": "1"})
    stream = start_stream(live, max_tokens=8000)  # minutes of decoding; 1 s is left to it
    live.proc.send_signal(sig)
    stream.join(timeout=120)
    assert quiet_exit(live) == status
    error = stream.events()[-1]["error"]
    assert error["code"] == "shutting_down" and error["type"] == "server_error"


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
def test_ctrl_c_when_idle_exits_without_a_traceback(anyio_backend: str) -> None:
    live = LiveServer([])
    live.proc.send_signal(signal.SIGINT)
    assert quiet_exit(live) == 128 + signal.SIGINT


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
def test_a_second_ctrl_c_stops_waiting_for_running_streams(anyio_backend: str) -> None:
    live = LiveServer([])  # the default 30 s shutdown timeout
    stream = start_stream(live, max_tokens=8000)
    live.proc.send_signal(signal.SIGINT)
    wait_for(lambda: "Waiting for connections to close" in live.log.read_text())
    live.proc.send_signal(signal.SIGINT)
    assert quiet_exit(live, timeout=15) == 128 + signal.SIGINT  # well before the 30 s
    stream.join(timeout=30)
    assert stream.events()[-1]["error"]["code"] == "shutting_down"


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
def test_a_port_in_use_is_reported_before_any_model_loads(anyio_backend: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "server", "--port", str(port)],
                              cwd=Path(__file__).parent.parent, capture_output=True, text=True,
                              timeout=60)
    assert done.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "loading model" not in done.stderr + done.stdout
