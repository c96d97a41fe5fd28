"""The chat page in a real browser (Chromium through Playwright) against the real engine:
streaming, stopping, models, reasoning, keys, conversations kept across reloads, and what it
makes of Markdown and errors. Writes the README's screenshots with GGSERVE_SCREENSHOTS=1."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT, LiveServer
from tests.ui.conftest import CHROMIUM, KEY

if not CHROMIUM.exists():
    pytest.skip("chromium not installed: apt-get install chromium", allow_module_level=True)

from playwright.sync_api import Page, Request, Route, expect

OpenPage = Callable[..., Page]
SCREENSHOTS = ROOT / "docs" / "screenshots"
REPLY_TIMEOUT = 120_000  # ms: a shared CI machine can be slow


def ready(page: Page, model: str = "chat") -> None:
    page.locator(f'#model option[value="{model}"]').wait_for(state="attached")


def configure(page: Page, **fields: str) -> None:
    """Fill this conversation's settings (system, temperature, top_p, max_tokens)."""
    settings = page.locator("#settings")
    if settings.get_attribute("open") is None:
        settings.locator("summary").click()
    for name, value in fields.items():
        page.locator(f"#{name}").fill(value)


def send(page: Page, text: str) -> dict[str, Any]:
    """Type `text`, press Enter and return the request body the page sent."""
    page.locator("#input").fill(text)
    with page.expect_request("**/v1/chat/completions") as request:
        page.locator("#input").press("Enter")
    return body_of(request.value)


def body_of(request: Request) -> dict[str, Any]:
    body = request.post_data_json
    assert isinstance(body, dict)
    return body


def finished(page: Page) -> None:
    expect(page.locator("#send")).to_be_visible(timeout=REPLY_TIMEOUT)


def last_reply(page: Page) -> Any:
    return page.locator(".message.assistant").last


def wait_for_metric(live: LiveServer, value: float, name: str, **labels: str) -> float:
    deadline = time.monotonic() + 10
    while live.metric(name, **labels) < value and time.monotonic() < deadline:
        time.sleep(0.1)
    return live.metric(name, **labels)


# The reply's text length at each change while it streams, recorded in the page (polling from
# here would take the CPU the server needs).
RECORD_GROWTH = """() => {
  window.seen = [];
  new MutationObserver(() => {
    const reply = [...document.querySelectorAll(".message.assistant .content")].pop();
    const length = reply?.innerText.length;
    if (length && !document.querySelector("#stop").hidden) window.seen.push(length);
  }).observe(document.querySelector("#messages"),
             { subtree: true, childList: true, characterData: true });
}"""


def test_a_reply_streams_in_with_its_counts(open_page: OpenPage, tmp_path: Path) -> None:
    page = open_page()
    ready(page)
    expect(page.locator("#model-status")).to_have_text("loaded")
    configure(page, system="You are a helpful assistant.", temperature="0", max_tokens="40")
    page.locator("#input").fill("one")
    page.locator("#input").press("Shift+Enter")
    page.locator("#input").press_sequentially("two")
    assert page.locator("#input").input_value() == "one\ntwo"  # a new line, nothing sent
    assert page.locator(".message").count() == 0

    page.evaluate(RECORD_GROWTH)
    body = send(page, "Write a Python function that adds two numbers, in a code block.")
    assert body["model"] == "chat" and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert (body["temperature"], body["max_tokens"]) == (0, 40)
    assert body["messages"][0] == {"role": "system", "content": "You are a helpful assistant."}
    finished(page)
    seen = page.evaluate("window.seen")
    assert len(set(seen)) >= 2, seen  # the text grew while the reply streamed
    assert len(last_reply(page).locator(".content").inner_text()) >= max(seen)
    expect(last_reply(page).locator(".stats")).to_have_text(re.compile(
        r"^\d+ tokens · [\d.]+ tokens/s · prompt \d+ tokens · first token [\d.]+ s"))
    expect(page.locator("#conversations .open")).to_have_text(  # titled by its first message
        ["Write a Python function that adds two numbers, in a code bl…"])
    screenshots(page, tmp_path)


def screenshots(page: Page, tmp_path: Path) -> None:
    """Desktop, phone and dark pictures of the conversation; the phone layout must fit."""
    folder = SCREENSHOTS if os.environ.get("GGSERVE_SCREENSHOTS") == "1" else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    page.locator("#settings summary").click()  # fold the settings away
    page.locator("#input").blur()
    page.screenshot(path=folder / "chat-desktop.png")
    page.set_viewport_size({"width": 390, "height": 844})
    expect(page.locator("#sidebar")).to_be_hidden()
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    page.screenshot(path=folder / "chat-phone.png")
    page.locator("#sidebar-button").click()
    expect(page.locator("#sidebar")).to_be_visible()
    page.keyboard.press("Escape")
    expect(page.locator("#sidebar")).to_be_hidden()
    page.set_viewport_size({"width": 1280, "height": 800})
    page.emulate_media(color_scheme="dark")
    page.screenshot(path=folder / "chat-dark.png")
    for name in ("chat-desktop.png", "chat-phone.png", "chat-dark.png"):
        assert (folder / name).stat().st_size > 10_000


def test_stop_ends_the_reply_and_the_server_cancels_it(open_page: OpenPage,
                                                       live: LiveServer) -> None:
    labels = {"model": "chat", "endpoint": "chat", "outcome": "cancelled"}
    before = live.metric("ggserve:requests_total", **labels)
    page = open_page()
    ready(page)
    configure(page, temperature="0.8", max_tokens="400")
    send(page, "Write a very long essay about the history of the ocean.")
    content = last_reply(page).locator(".content")
    expect(content).not_to_have_text("", timeout=REPLY_TIMEOUT)
    expect(page.locator("#stop")).to_be_visible()
    page.keyboard.press("Escape")
    finished(page)
    expect(last_reply(page).locator(".stats")).to_contain_text("stopped")
    assert wait_for_metric(live, before + 1, "ggserve:requests_total", **labels) == before + 1
    kept = content.inner_text()
    assert kept
    page.wait_for_timeout(300)
    assert content.inner_text() == kept
    page.reload()  # what came before the stop is kept
    expect(last_reply(page).locator(".content")).to_have_text(kept)


def test_another_model_and_its_folded_reasoning(open_page: OpenPage, live: LiveServer) -> None:
    labels = {"model": "thinker", "endpoint": "chat", "outcome": "ok"}
    before = live.metric("ggserve:requests_total", **labels)
    page = open_page()
    ready(page, "thinker")
    page.locator("#model").select_option("thinker")
    configure(page, temperature="0", max_tokens="40")
    body = send(page, "Why is the sky blue? Answer in three sentences.")
    assert body["model"] == "thinker"
    finished(page)
    assert wait_for_metric(live, before + 1, "ggserve:requests_total", **labels) == before + 1
    reply = last_reply(page)
    expect(reply.locator(".role")).to_have_text("thinker")
    expect(reply.locator(".error")).to_be_hidden()
    reasoning = reply.locator("details.reasoning")
    expect(reasoning).to_be_visible()
    assert reasoning.get_attribute("open") is None  # folded
    expect(reasoning.locator(".reasoning-text")).to_be_hidden()
    reasoning.locator("summary").click()
    expect(reasoning.locator(".reasoning-text")).to_be_visible()
    expect(reasoning.locator(".reasoning-text")).not_to_have_text("")
    page.reload()  # the conversation keeps its model
    expect(page.locator("#model")).to_have_value("thinker")


def test_conversations_survive_a_reload_and_can_be_deleted(open_page: OpenPage) -> None:
    page = open_page()
    ready(page)
    configure(page, temperature="0", max_tokens="8")
    send(page, "Name a colour.")
    finished(page)
    reply = last_reply(page).locator(".content").inner_text()
    page.reload()
    ready(page)
    expect(page.locator("#conversations .open")).to_have_text(["Name a colour."])
    expect(page.locator(".message.user .content")).to_have_text(["Name a colour."])
    expect(last_reply(page).locator(".content")).to_have_text(reply)
    expect(page.locator("#max_tokens")).to_have_value("8")  # settings are per conversation
    page.locator("#new-chat").click()
    expect(page.locator(".message")).to_have_count(0)
    expect(page.locator("#max_tokens")).to_have_value("")
    expect(page.locator("#conversations .open")).to_have_text(["New chat", "Name a colour."])
    page.get_by_role("button", name="Delete conversation “Name a colour.”").click()
    page.reload()
    expect(page.locator("#conversations .open")).to_have_text(["New chat"])


def test_edit_a_message_and_regenerate_a_reply(open_page: OpenPage) -> None:
    page = open_page()
    ready(page)
    configure(page, temperature="0", max_tokens="6")
    send(page, "Name a fruit.")
    finished(page)
    page.locator(".message.user").get_by_role("button", name="Edit").click()
    editor = page.locator(".message.user textarea.editor")
    editor.fill("Name a vegetable.")
    with page.expect_request("**/v1/chat/completions") as request:
        editor.press("Enter")
    assert body_of(request.value)["messages"] == [
        {"role": "user", "content": "Name a vegetable."}]
    finished(page)
    expect(page.locator(".message")).to_have_count(2)
    expect(page.locator(".message.user .content")).to_have_text("Name a vegetable.")
    with page.expect_request("**/v1/chat/completions") as again:
        last_reply(page).get_by_role("button", name="Regenerate").click()
    assert body_of(again.value)["messages"] == [
        {"role": "user", "content": "Name a vegetable."}]
    finished(page)
    expect(page.locator(".message")).to_have_count(2)


def test_key_errors_are_shown_as_the_server_wrote_them(open_page: OpenPage,
                                                       live: LiveServer) -> None:
    def refusal(key: str | None) -> str:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        answer = httpx.get(f"{live.url}/v1/models", headers=headers)
        assert answer.status_code == 401
        message: str = answer.json()["error"]["message"]
        return message

    page = open_page(key=None)
    expect(page.locator("#key-dialog")).to_be_visible()
    expect(page.locator("#key-message")).to_have_text(refusal(None))
    page.locator("#key-input").fill("wrong-key")
    page.locator("#key-input").press("Enter")
    expect(page.locator("#key-message")).to_have_text(refusal("wrong-key"))
    page.locator("#key-input").fill(KEY)
    page.locator("#key-input").press("Enter")
    expect(page.locator("#key-dialog")).to_be_hidden()
    ready(page)
    # A key that stops working: the chat request's refusal, word for word.
    page.evaluate("localStorage.setItem('ggserve.apiKey', 'revoked')")
    with page.expect_request("**/v1/chat/completions") as request:
        page.locator("#input").fill("Hello")
        page.locator("#input").press("Enter")
    assert request.value.headers["authorization"] == "Bearer revoked"
    expect(page.locator("#key-message")).to_have_text(refusal("revoked"))
    page.locator("#key-cancel").click()
    expect(last_reply(page).locator(".error")).to_have_text(refusal("revoked"))


GB = 1_000_000_000
PULLING: list[dict[str, Any]] = [  # a download's stages, as GET /v1/models shows them
    {"status": "downloading", "download": {"downloaded": GB, "total": 4 * GB}},
    {"status": "downloading", "download": {"downloaded": 3 * GB, "total": 4 * GB}},
    {"status": "loaded", "download": None}]


def models_list(stage: int) -> dict[str, Any]:
    return {"object": "list", "data": [
        {"id": "chat", "status": "loaded", "kind": "chat", "size_bytes": 98_362_432},
        {"id": "big", "status": "not_downloaded", "kind": "chat", "size_bytes": 2.1 * GB},
        {"id": "pulling", "kind": "chat", "size_bytes": 4 * GB, **PULLING[stage]},
        {"id": "embedder", "status": "on_disk", "kind": "embedding", "size_bytes": 60_000_000},
        {"id": "broken", "status": "failed", "kind": "chat", "size_bytes": 10,
         "error": "llama.cpp could not load the file"},
    ]}


def test_the_picker_shows_each_models_state(open_page: OpenPage) -> None:
    stage = 0
    calls = []

    def answer(route: Route) -> None:
        calls.append(stage)
        route.fulfill(json=models_list(stage))

    page = open_page()
    page.route("**/v1/models", answer)
    page.reload()
    ready(page, "broken")
    expect(page.locator("#model option")).to_have_text([
        "chat · loaded", "big · needs download (2.1 GB)", "pulling · downloading 25% of 4.0 GB",
        "embedder · embeddings only, not for chat",
        "broken · failed: llama.cpp could not load the file"])
    assert page.locator('#model option[value="embedder"]').is_disabled()
    page.locator("#model").select_option("pulling")
    expect(page.locator("#model-progress")).to_have_js_property("value", 0.25)
    stage = 1  # the page polls while a download runs
    expect(page.locator("#model-status")).to_have_text("downloading 75% of 4.0 GB")
    expect(page.locator("#model-progress")).to_have_js_property("value", 0.75)
    stage = 2
    expect(page.locator("#model-status")).to_have_text("loaded")
    expect(page.locator("#model-progress")).to_be_hidden()
    polls = len(calls)
    page.wait_for_timeout(2500)
    assert len(calls) == polls  # nothing busy: no more polling


def sse(*events: dict[str, Any]) -> str:
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events) + ": ping\n\ndata: [DONE]\n\n"


def delta(content: str) -> dict[str, Any]:
    return {"object": "chat.completion.chunk", "choices": [{"index": 0,
                                                            "delta": {"content": content}}]}


MARKDOWN = ("Here is **code**:\n\n```python\nprint('hi')\n```\n\n"
            "<img src=x onerror=\"window.pwned=1\"><script>window.pwned=2</script>"
            "[a link](javascript:window.pwned=3)")


def test_markdown_is_sanitised_and_errors_are_the_servers(open_page: OpenPage,
                                                          live: LiveServer) -> None:
    page = open_page()
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    replies = [sse(*(delta(MARKDOWN[i:i + 7]) for i in range(0, len(MARKDOWN), 7))),
               sse(delta("Partial"), {"error": {
                   "message": "The model failed mid-reply (test).", "type": "server_error",
                   "param": None, "code": None}})]
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        body=replies.pop(0), headers={"Content-Type": "text/event-stream"}))
    ready(page)
    send(page, "Show me code.")
    finished(page)
    reply = last_reply(page)
    expect(reply.locator(".content strong")).to_have_text("code")
    code = reply.locator(".code-block code.hljs")
    expect(code.locator(".hljs-built_in")).to_have_text("print")
    assert page.locator(".messages img, .messages script").count() == 0
    assert reply.locator("a").get_attribute("href") is None
    reply.locator("a").click()
    assert page.evaluate("window.pwned") is None
    reply.get_by_role("button", name="Copy").click()
    expect(reply.get_by_role("button", name="Copied")).to_be_visible()
    assert page.evaluate("navigator.clipboard.readText()") == "print('hi')\n"

    send(page, "Again.")  # an error after the first bytes comes in-band
    finished(page)
    expect(last_reply(page).locator(".content")).to_have_text("Partial")
    expect(last_reply(page).locator(".error")).to_have_text("The model failed mid-reply (test).")

    page.unroute("**/v1/chat/completions")  # a refusal before the stream: the real server's
    configure(page, max_tokens="100000")
    body = send(page, "Hello")
    finished(page)
    refused = httpx.post(f"{live.url}/v1/chat/completions", json=body,
                         headers={"Authorization": f"Bearer {KEY}"})
    assert refused.status_code == 400
    expect(last_reply(page).locator(".error")).to_have_text(refused.json()["error"]["message"])


def test_under_a_proxy_path_prefix(open_page: OpenPage, live: LiveServer) -> None:
    """Every URL the page uses is relative: behind /proxy/ it asks /proxy/v1/models."""
    page = open_page()
    paths: list[str] = []

    def proxy(route: Route) -> None:
        paths.append(route.request.url.removeprefix(live.url))
        route.fulfill(response=route.fetch(url=route.request.url.replace("/proxy/", "/", 1)))

    page.route(f"{live.url}/**", lambda route: route.abort())  # nothing outside /proxy/
    page.route(f"{live.url}/proxy/**", proxy)  # the later route is tried first
    page.goto("/proxy/")
    ready(page)
    assert {"/proxy/", "/proxy/app.js", "/proxy/v1/models"} <= set(paths)
    assert all(p.startswith("/proxy/") for p in paths)


def test_the_theme_toggle_is_kept(open_page: OpenPage) -> None:
    page = open_page()
    ready(page)
    theme = page.locator("#theme-button")
    expect(theme).to_have_text("Theme: auto")
    background = page.evaluate("getComputedStyle(document.body).backgroundColor")
    theme.click()
    expect(theme).to_have_text("Theme: light")
    theme.click()
    expect(theme).to_have_text("Theme: dark")
    dark = page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert dark != background
    page.reload()
    expect(page.locator("html")).to_have_attribute("data-theme", "dark")
    expect(theme).to_have_text("Theme: dark")
    theme.click()
    expect(theme).to_have_text("Theme: auto")
    assert page.evaluate("getComputedStyle(document.body).backgroundColor") == background
