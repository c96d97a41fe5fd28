"""How the chat page's files are served: every file at its own open path, with its type,
gzipped when asked, cached by ETag (vendored files for good), and nothing with --no-ui."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.api.routes.ui import UI_DIR, url_path
from server.app import create_app
from server.engine.fake import FakeEngine
from server.registry import Registry
from server.settings import Settings

pytestmark = pytest.mark.anyio
KEYS = {"api_keys": ["user-key"], "admin_keys": ["admin-key"]}


async def client(tmp_path: Path, **settings: Any) -> httpx.AsyncClient:
    (tmp_path / "x.gguf").write_bytes(b"")
    models = tmp_path / "models.yaml"
    models.write_text("models:\n  fake-model:\n    path: x.gguf\n")
    registry = Registry.load(models, tmp_path, tmp_path, None)
    app = create_app(Settings(models_file=models, **settings), engine=FakeEngine(),
                     registry=registry)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


@pytest.fixture
async def keyed(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with await client(tmp_path, **KEYS) as http:
        yield http


def page_files() -> list[Path]:
    return [p for p in sorted(UI_DIR.rglob("*"))
            if p.is_file() and p.suffix in (".html", ".js", ".css")]


async def test_every_file_is_served_without_a_key(keyed: httpx.AsyncClient) -> None:
    files = page_files()
    assert {url_path(p) for p in files} >= {"/", "/app.js", "/style.css", "/theme.js",
                                            "/vendor/marked-18.2.1/marked.esm.js"}
    for path in files:
        response = await keyed.get(url_path(path), headers={"Accept-Encoding": "identity"})
        assert response.status_code == 200, path
        assert response.content == path.read_bytes()
        assert response.headers["x-content-type-options"] == "nosniff"
    assert (await keyed.get("/v1/models")).status_code == 401  # the API still needs the key
    assert (await keyed.get("/README.md")).status_code == 401  # only the page's own files


async def test_types_caching_and_compression(keyed: httpx.AsyncClient) -> None:
    page = await keyed.get("/", headers={"Accept-Encoding": "gzip"})
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.headers["content-encoding"] == "gzip"  # httpx has undone it
    assert page.content == (UI_DIR / "index.html").read_bytes()
    assert page.headers["cache-control"] == "no-cache"
    assert "default-src 'self'" in page.headers["content-security-policy"]
    again = await keyed.get("/", headers={"If-None-Match": page.headers["etag"]})
    assert (again.status_code, again.content) == (304, b"")

    script = await keyed.get("/app.js")
    assert script.headers["content-type"] == "text/javascript; charset=utf-8"
    assert (await keyed.get("/style.css")).headers["content-type"] == "text/css; charset=utf-8"
    vendored = await keyed.get("/vendor/dompurify-3.4.18/purify.min.js",
                               headers={"Accept-Encoding": "gzip"})
    assert "immutable" in vendored.headers["cache-control"]
    assert int(vendored.headers["content-length"]) < len(vendored.content) / 2
    raw = await keyed.get("/vendor/dompurify-3.4.18/purify.min.js",
                          headers={"Accept-Encoding": "identity"})
    assert "content-encoding" not in raw.headers
    assert raw.content == (UI_DIR / "vendor/dompurify-3.4.18/purify.min.js").read_bytes()


async def test_no_ui_serves_no_page(tmp_path: Path) -> None:
    async with await client(tmp_path, ui=False) as http:
        assert (await http.get("/")).status_code == 404
        assert (await http.get("/app.js")).status_code == 404
