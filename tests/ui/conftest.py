"""Fixtures of the chat page's tests: Chromium driven by Playwright, and a real server with an
API key and two chat models on the default model's file, one with a reasoning format."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.conftest import LiveServer

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page, ViewportSize

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
KEY = "ui-test-key"
DESKTOP: ViewportSize = {"width": 1280, "height": 800}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# Per module: sync Playwright keeps an event loop running in this thread until it stops, and
# no anyio test can run meanwhile.
@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Iterator[LiveServer]:
    """`chat` and `thinker` (its reply up to the first '.' is its reasoning), both SmolLM2."""
    registry = tmp_path_factory.mktemp("ui") / "models.yaml"
    registry.write_text(
        f"models:\n"
        f"  chat:\n    path: {smollm2_path}\n    n_ctx: 2048\n"
        f"  thinker:\n    path: {smollm2_path}\n    n_ctx: 2048\n"
        f"    reasoning:\n      separator: '.'\n")
    # One llama.cpp thread: its threads wait for each other at every step, and with the
    # browser busy on the same few cores two of them ran ten times slower than one.
    live = LiveServer(["--models-file", str(registry), "--parallel", "2", "--threads", "1"],
                      env={"GGSERVE_API_KEYS": json.dumps([KEY])})
    yield live
    live.stop()


@pytest.fixture
def open_page(browser: Browser, live: LiveServer) -> Iterator[Callable[..., Page]]:
    """Open the page in a fresh browser profile, with the server's key already stored unless
    `key` says otherwise. An uncaught script error fails the test, and so does a request to
    anywhere but the server."""
    contexts = []
    errors: list[str] = []
    elsewhere: list[str] = []

    def open_(key: str | None = KEY) -> Page:
        context = browser.new_context(viewport=DESKTOP, base_url=live.url, color_scheme="light")
        contexts.append(context)
        if key is not None:
            context.add_init_script(
                f"localStorage.getItem('ggserve.apiKey') ?? "
                f"localStorage.setItem('ggserve.apiKey', {json.dumps(key)})")
        page = context.new_page()
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on("request", lambda request: None if request.url.startswith(
            (f"{live.url}/", "data:")) else elsewhere.append(request.url))
        page.goto("/")
        return page

    yield open_
    for context in contexts:
        context.close()
    assert not errors, errors
    assert not elsewhere, elsewhere
