"""Who may do what: user and admin keys, keys before bodies, JSON-only POSTs, cross-origin
refusals, docs behind the key, downloads only for admins, the exposed-without-key warning."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from server import hub
from server.app import create_app
from server.engine.fake import FakeEngine
from server.errors import ModelLoadFailed
from server.registry import ModelSpec, Registry
from server.settings import Settings

pytestmark = pytest.mark.anyio
CHAT = "/v1/chat/completions"
BODY = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
USER = {"Authorization": "Bearer user-key"}
ADMIN = {"Authorization": "Bearer admin-key"}
ADMIN_POSTS = ("/models/load", "/models/unload", "/admin/reload")


def make_app(tmp_path: Path, **settings: Any) -> FastAPI:
    (tmp_path / "x.gguf").write_bytes(b"")
    models = tmp_path / "models.yaml"
    models.write_text("models:\n  fake-model:\n    path: x.gguf\n")
    registry = Registry.load(models, tmp_path, tmp_path, None)
    app = create_app(Settings(models_file=models, **settings), engine=FakeEngine(),
                     registry=registry)
    app.state.accepting = True
    return app


@pytest.fixture
async def scoped(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    app = make_app(tmp_path, api_keys=["user-key"], admin_keys=["admin-key"])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://t") as client:
        yield client


async def open_client(tmp_path: Path, **settings: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=make_app(tmp_path, **settings)),
                             base_url="http://t")


async def test_admin_routes_need_an_admin_key(scoped: httpx.AsyncClient) -> None:
    for path in ADMIN_POSTS:
        assert (await scoped.post(path, json={"model": "fake-model"})).status_code == 401
        refused = await scoped.post(path, json={"model": "fake-model"}, headers=USER)
        assert refused.status_code == 403, path
        assert refused.json()["error"]["code"] == "admin_key_required"
        allowed = await scoped.post(path, json={"model": "fake-model"}, headers=ADMIN)
        assert allowed.status_code == 200, (path, allowed.text)
    # an admin key is also a user key
    assert (await scoped.post(CHAT, json=BODY, headers=ADMIN)).status_code == 200


async def test_user_keys_alone_leave_the_admin_routes_closed(tmp_path: Path) -> None:
    async with await open_client(tmp_path, api_keys=["user-key"]) as http:
        refused = await http.post("/admin/reload", headers=USER)
        assert refused.status_code == 403
        assert "GGSERVE_ADMIN_KEYS" in refused.json()["error"]["message"]
        assert (await http.post(CHAT, json=BODY, headers=USER)).status_code == 200


async def test_without_keys_local_use_stays_open(tmp_path: Path) -> None:
    async with await open_client(tmp_path) as http:
        assert (await http.post(CHAT, json=BODY)).status_code == 200
        for path in ADMIN_POSTS:
            assert (await http.post(path, json={"model": "fake-model"})).status_code == 200
        assert (await http.post("/admin/reload")).status_code == 200  # curl -X POST, no body
        assert (await http.get("/openapi.json")).status_code == 200


async def test_docs_need_the_key_when_keys_are_set(scoped: httpx.AsyncClient) -> None:
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert (await scoped.get(path)).status_code == 401, path
        assert (await scoped.get(path, headers=USER)).status_code == 200, path


async def test_the_key_is_checked_before_the_body_is_read(scoped: httpx.AsyncClient) -> None:
    garbage = {"Content-Type": "application/json"}
    for path in (CHAT, "/models/load"):
        refused = await scoped.post(path, content=b"{not json", headers=garbage)
        assert refused.status_code == 401, path
        assert refused.json()["error"]["code"] == "invalid_api_key"
    wrong_type = await scoped.post(CHAT, content=b"{not json", headers={"Content-Type":
                                                                          "text/plain"})
    assert wrong_type.status_code == 401


async def test_posts_take_json_only(tmp_path: Path) -> None:
    async with await open_client(tmp_path) as http:
        for path in (CHAT, "/admin/reload", "/models/load"):
            refused = await http.post(path, content=b'{"model": "fake-model"}',
                                      headers={"Content-Type": "text/plain"})
            assert refused.status_code == 415, path
            assert refused.json()["error"]["code"] == "unsupported_media_type"
        # a body without a Content-Type (a browser's untyped Blob) is not JSON either
        untyped = await http.post(CHAT, content=b'{"model": "fake-model"}')
        assert untyped.status_code == 415
        typed = await http.post(CHAT, content=httpx.Request("POST", "/", json=BODY).content,
                                headers={"Content-Type": "application/json; charset=utf-8"})
        assert typed.status_code == 200


async def test_a_cross_origin_page_cannot_reach_the_admin_routes(tmp_path: Path) -> None:
    evil = {"Origin": "https://evil.example"}
    async with await open_client(tmp_path) as http:
        simple = await http.post("/admin/reload", content=b"x",
                                 headers={**evil, "Content-Type": "text/plain"})
        assert simple.status_code == 415
        bodiless = await http.post("/admin/reload", headers=evil)
        assert bodiless.status_code == 403
        assert bodiless.json()["error"]["code"] == "cross_origin_refused"
        same_origin = await http.post("/admin/reload", headers={"Origin": "http://t"})
        assert same_origin.status_code == 200
    async with await open_client(tmp_path, cors_origins=["https://evil.example"]) as http:
        assert (await http.post("/admin/reload", headers=evil)).status_code == 200


async def test_an_ordinary_key_cannot_start_a_download(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pulls: list[str] = []

    def download(repo: str, file: str, *_: Any, **__: Any) -> Path:
        pulls.append(f"{repo}/{file}")
        raise ModelLoadFailed("the test's hub is offline")

    monkeypatch.setattr(hub, "download", download)
    registry = Registry({"remote": ModelSpec(id="remote", repo="org/remote-GGUF",
                                             file="remote.Q4_0.gguf")},
                        "remote", tmp_path / "models.yaml", tmp_path, tmp_path / "models")
    app = create_app(Settings(api_keys=["user-key"], admin_keys=["admin-key"]),
                     registry=registry)  # the llama.cpp engine: it is the one that downloads
    app.state.accepting = True
    body = {**BODY, "model": "remote"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://t") as http:
        refused = await http.post(CHAT, json=body, headers=USER)
        assert refused.status_code == 403, refused.text
        error = refused.json()["error"]
        assert error["code"] == "model_not_downloaded" and "admin" in error["message"]
        assert "/models/load" in error["message"]
        assert pulls == []
        tried = await http.post(CHAT, json=body, headers=ADMIN)
        assert tried.status_code == 503 and pulls == ["org/remote-GGUF/remote.Q4_0.gguf"]


@pytest.mark.parametrize(("host", "keys", "warned"), [
    ("0.0.0.0", [], True), ("127.0.0.1", [], False), ("::1", [], False),
    ("localhost", [], False), ("0.0.0.0", ["k"], False)])
async def test_binding_beyond_loopback_without_a_key_warns(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, host: str, keys: list[str],
        warned: bool) -> None:
    app = make_app(tmp_path, host=host, api_keys=keys)
    with caplog.at_level(logging.WARNING, logger="server"):
        async with app.router.lifespan_context(app):
            pass
    assert ("without an API key" in caplog.text) is warned


async def test_load_and_unload_document_what_they_answer(scoped: httpx.AsyncClient) -> None:
    schema = (await scoped.get("/openapi.json", headers=USER)).json()
    for path in ("/models/load", "/models/unload"):
        documented = schema["paths"][path]["post"]["responses"]
        assert {"400", "401", "403", "404", "415"} <= set(documented), (path, documented)
        answered = await scoped.post(path, json={"model": 3}, headers=ADMIN)
        assert answered.status_code == 400
    assert "403" in schema["paths"]["/admin/reload"]["post"]["responses"]
    assert "415" in schema["paths"][CHAT]["post"]["responses"]
