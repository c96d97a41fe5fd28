"""Many models from one server on the real llama.cpp: load on first use, least-recently-used
eviction, busy models kept, keep_alive, admin load/unload, broken files, registry reload."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.engine.devices import place
from server.engine.llama.gguf import read_gguf
from tests.conftest import LiveServer
from tests.gguf_factory import write_gguf


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("residency")
    good = {name: write_gguf(d / f"{name}.gguf", "llama", seed=i)
            for i, name in enumerate(["a", "b", "c"])}
    data = good["a"].read_bytes()
    (d / "truncated.gguf").write_bytes(data[: len(data) // 2])
    (d / "garbage.gguf").write_bytes(b"not a model at all" * 100)
    # the same file with an architecture this llama.cpp does not know
    (d / "unknown-arch.gguf").write_bytes(data.replace(b"llama", b"llamx", 1))
    return {**good, **{name: d / f"{name}.gguf" for name in
                       ["truncated", "garbage", "unknown-arch"]}}


def write_registry(path: Path, ggufs: dict[str, Path], names: list[str],
                   extra: str = "") -> Path:
    entries = "".join(f"  {name}:\n    path: {ggufs[name]}\n    n_ctx: 256\n{extra}"
                      for name in names)
    path.write_text(f"default: {names[0]}\nmodels:\n{entries}")
    return path


def states(live: LiveServer) -> dict[str, str]:
    return {m["id"]: m["status"] for m in httpx.get(f"{live.url}/v1/models").json()["data"]}


def complete(live: LiveServer, model: str, **fields: Any) -> httpx.Response:
    return httpx.post(f"{live.url}/v1/completions", timeout=60,
                      json={"model": model, "prompt": "hello", "max_tokens": 4, **fields})


@pytest.fixture
def two_at_most(tmp_path: Path, ggufs: dict[str, Path]) -> Iterator[LiveServer]:
    registry = write_registry(tmp_path / "models.yaml", ggufs, ["a", "b", "c"])
    # One sequence per model: of several requests to a model, all but one wait in its queue.
    live = LiveServer(["--models-file", str(registry), "--parallel", "1"],
                      env={"GGSERVE_MAX_LOADED_MODELS": "2"})
    yield live
    live.stop()


def test_models_load_on_first_use_and_the_least_recently_used_idle_one_makes_room(
        two_at_most: LiveServer) -> None:
    live = two_at_most
    assert states(live) == {"a": "loaded", "b": "on_disk", "c": "on_disk"}
    assert complete(live, "b").status_code == 200
    assert complete(live, "a").status_code == 200  # a is now the most recently used
    assert complete(live, "c").status_code == 200
    assert states(live) == {"a": "loaded", "b": "on_disk", "c": "loaded"}
    model = httpx.get(f"{live.url}/v1/models/c").json()
    assert model["placement"]["device"] == "cpu" and model["placement"]["n_layers"] == 2
    assert model["placement"]["memory_ram_bytes"] > 0 and model["n_ctx"] == 256
    assert live.metric("ggserve:models_loaded") == 2


def test_a_model_serving_requests_is_never_unloaded_under_them(
        two_at_most: LiveServer) -> None:
    live = two_at_most
    results: dict[str, list[httpx.Response]] = {"a": [], "b": []}
    stop = threading.Event()

    # Three of these per model: with one sequence, two always wait, so it is never idle.
    def keep_busy(model: str) -> None:
        while not stop.is_set():
            results[model].append(complete(live, model, max_tokens=200,
                                           logit_bias={"2": -100}, temperature=0))

    workers = [threading.Thread(target=keep_busy, args=(m,)) for m in ("a", "b") * 3]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + 30
    while states(live)["b"] != "loaded" and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    refused = complete(live, "c")  # both loaded models are busy: no room, at once
    stop.set()
    for worker in workers:
        worker.join()
    assert refused.status_code == 503 and refused.headers["retry-after"]
    assert refused.json()["error"]["code"] == "server_overloaded"
    assert "retry" in refused.json()["error"]["message"]
    for model in ("a", "b"):
        assert all(r.status_code == 200 for r in results[model])
        assert all(r.json()["usage"]["completion_tokens"] == 200 for r in results[model])
    assert complete(live, "c").status_code == 200  # once idle, they make room


def test_keep_alive_per_request_unloads_after_it_or_later(two_at_most: LiveServer) -> None:
    live = two_at_most
    assert complete(live, "b", keep_alive=0).status_code == 200
    deadline = time.monotonic() + 10
    while states(live)["b"] != "on_disk" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert states(live)["b"] == "on_disk"
    assert complete(live, "b", keep_alive="1s").status_code == 200
    assert states(live)["b"] == "loaded"
    time.sleep(2.0)
    assert states(live)["b"] == "on_disk"
    assert complete(live, "a", keep_alive="soon").status_code == 400


def test_admin_loads_and_unloads_and_names_unknown_models(two_at_most: LiveServer) -> None:
    live = two_at_most
    loaded = httpx.post(f"{live.url}/models/load", json={"model": "b"}, timeout=60)
    assert loaded.status_code == 200 and loaded.json()["status"] == "loaded"
    unloaded = httpx.post(f"{live.url}/models/unload", json={"model": "b"})
    assert unloaded.status_code == 200 and unloaded.json()["status"] == "on_disk"
    missing = httpx.post(f"{live.url}/models/load", json={"model": "nope"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_admin_endpoints_need_an_admin_key(tmp_path: Path, ggufs: dict[str, Path]) -> None:
    registry = write_registry(tmp_path / "models.yaml", ggufs, ["a", "b"])
    live = LiveServer(["--models-file", str(registry)],
                      env={"GGSERVE_API_KEYS": '["k"]', "GGSERVE_ADMIN_KEYS": '["admin"]'})
    try:
        for path in ("/models/load", "/models/unload", "/admin/reload"):
            assert httpx.post(f"{live.url}{path}", json={"model": "b"}).status_code == 401
            assert httpx.post(f"{live.url}{path}", json={"model": "b"},
                              headers={"Authorization": "Bearer k"}).status_code == 403
        ok = httpx.post(f"{live.url}/models/load", json={"model": "b"},
                        headers={"Authorization": "Bearer admin"}, timeout=60)
        assert ok.status_code == 200
    finally:
        live.stop()


def test_broken_files_fail_clearly_and_the_others_keep_serving(
        tmp_path: Path, ggufs: dict[str, Path]) -> None:
    registry = write_registry(tmp_path / "models.yaml", ggufs,
                              ["a", "truncated", "garbage", "unknown-arch"])
    live = LiveServer(["--models-file", str(registry)])
    expected = {"truncated": "truncated", "garbage": "not a readable GGUF",
                "unknown-arch": "unknown model architecture: 'llamx'"}
    try:
        for model, why in expected.items():
            response = complete(live, model)
            assert response.status_code == 503, model
            error = response.json()["error"]
            assert error["code"] == "model_load_failed" and why in error["message"], error
            listed = httpx.get(f"{live.url}/v1/models/{model}").json()
            assert listed["status"] == "failed" and why in listed["error"]
        assert complete(live, "a").status_code == 200
    finally:
        live.stop()


def test_a_model_over_the_memory_budget_is_refused_with_what_to_change(
        tmp_path: Path, ggufs: dict[str, Path]) -> None:
    registry = write_registry(tmp_path / "models.yaml", ggufs, ["a"])
    live = LiveServer(["--models-file", str(registry)], env={"GGSERVE_MEMORY_BUDGET": "1000"})
    try:
        response = complete(live, "a")
        assert response.status_code == 503
        assert "GGSERVE_MEMORY_BUDGET" in response.json()["error"]["message"]
        assert httpx.get(f"{live.url}/ready").status_code == 503  # its default is not loaded
        assert httpx.get(f"{live.url}/health").status_code == 200
    finally:
        live.stop()


def test_the_registry_reloads_and_an_invalid_file_keeps_the_old_one(
        tmp_path: Path, ggufs: dict[str, Path]) -> None:
    path = write_registry(tmp_path / "models.yaml", ggufs, ["a", "b"])
    live = LiveServer(["--models-file", str(path)])
    try:
        assert complete(live, "c").status_code == 404
        write_registry(path, ggufs, ["a", "b", "c"], extra="    stop: ['x']\n")
        reloaded = httpx.post(f"{live.url}/admin/reload")
        assert reloaded.status_code == 200 and reloaded.json()["models"] == ["a", "b", "c"]
        assert states(live)["a"] == "on_disk"  # its entry changed: unloaded, reloads on use
        assert complete(live, "c").status_code == 200
        path.write_text("models:\n  a:\n    path: x.gguf\n    colour: blue\n")
        refused = httpx.post(f"{live.url}/admin/reload")
        assert refused.status_code == 400
        assert "unknown key 'colour'" in refused.json()["error"]["message"]
        assert complete(live, "c").status_code == 200  # the old registry still serves
        write_registry(path, ggufs, ["a", "b"])
        live.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "c" in states(live) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert set(states(live)) == {"a", "b"}
    finally:
        live.stop()


def test_the_memory_budget_makes_the_least_recently_used_model_unload(
        tmp_path: Path, ggufs: dict[str, Path]) -> None:
    one_model = place(read_gguf(ggufs["a"]), 0, kv_cells=256 * 4, vram_free=0).ram
    registry = write_registry(tmp_path / "models.yaml", ggufs, ["a", "b", "c"])
    live = LiveServer(["--models-file", str(registry), "--parallel", "4"],
                      env={"GGSERVE_MEMORY_BUDGET": str(int(one_model * 2.5))})
    try:
        assert complete(live, "b").status_code == 200  # a and b fit
        assert states(live) == {"a": "loaded", "b": "loaded", "c": "on_disk"}
        assert complete(live, "c").status_code == 200  # a is the least recently used
        assert states(live) == {"a": "on_disk", "b": "loaded", "c": "loaded"}
    finally:
        live.stop()
