"""LoRA adapters at the HTTP layer, on the scripted engine: `model: "id:adapter"` reaches the
engine as the entry and the adapter in every dialect, replies name the adapter, an unknown
adapter is a 404 naming the available ones, and /v1/models lists each adapter as a model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from server.app import create_app
from server.engine.fake import FakeEngine
from server.registry import LoraSpec, ModelSpec, Registry
from server.settings import Settings

pytestmark = pytest.mark.anyio
QUANTS: dict[str, Any] = {"file": "b-{quant}.gguf", "quant": "Q4_K_M",
                          "quants": ("Q4_K_M", "Q8_0")}


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(models=("base", "base:Q8_0", "plain"), infill_models=("base",),
                      adapters={"base": ("sql", "fr"), "base:Q8_0": ("sql", "fr")})


@pytest.fixture
def app(tmp_path: Path, engine: FakeEngine) -> FastAPI:
    (tmp_path / "sql.gguf").write_bytes(b"GGUF" + bytes(96))
    lora = (LoraSpec(name="sql", path="sql.gguf", scale=0.5),
            LoraSpec(name="fr", repo="org/fr-lora", file="fr.gguf"))
    specs = {"base": ModelSpec(id="base", repo="org/b", lora=lora, **QUANTS),
             "plain": ModelSpec(id="plain", path="x.gguf")}
    registry = Registry(specs, "base", tmp_path / "models.yaml", tmp_path, tmp_path)
    return create_app(Settings(), engine=engine, registry=registry)


async def complete(http: httpx.AsyncClient, model: str, **fields: Any) -> httpx.Response:
    return await http.post("/v1/completions", json={"model": model, "prompt": "hi", **fields})


@pytest.mark.parametrize(("model", "entry", "adapter"), [
    ("base", "base", None), ("base:sql", "base", "sql"), ("base:fr", "base", "fr"),
    ("base:Q8_0", "base:Q8_0", None), ("base:Q8_0:sql", "base:Q8_0", "sql")])
async def test_the_model_name_picks_the_entry_and_the_adapter(
        http: httpx.AsyncClient, engine: FakeEngine, model: str, entry: str,
        adapter: str | None) -> None:
    reply = await complete(http, model)
    assert reply.status_code == 200, reply.text
    assert reply.json()["model"] == model
    assert (engine.requests[-1].model, engine.requests[-1].adapter) == (entry, adapter)
    chat = await http.post("/v1/chat/completions", json={
        "model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True})
    assert f'"model":"{model}"' in chat.text
    assert (engine.requests[-1].model, engine.requests[-1].adapter) == (entry, adapter)


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/messages", {"max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/responses", {"input": "hi"}),
    ("/api/chat", {"messages": [{"role": "user", "content": "hi"}], "stream": False}),
    ("/api/generate", {"prompt": "hi", "stream": False}),
    ("/api/generate", {"prompt": "hi", "stream": False, "raw": True}),
    ("/infill", {"input_prefix": "def f(", "input_suffix": "):"})])
async def test_every_dialect_passes_the_adapter_on(http: httpx.AsyncClient, engine: FakeEngine,
                                                   path: str, body: dict[str, Any]) -> None:
    reply = await http.post(path, json={"model": "base:sql", **body})
    assert reply.status_code == 200, reply.text
    assert (engine.requests[-1].model, engine.requests[-1].adapter) == ("base", "sql")
    assert reply.json()["model"] == "base:sql"


async def test_an_unknown_adapter_is_a_404_naming_the_adapters(http: httpx.AsyncClient) -> None:
    reply = await complete(http, "base:nope")
    assert reply.status_code == 404
    error = reply.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert error["message"] == ("The model 'base:nope' does not exist: 'base' has no LoRA "
                                "adapter 'nope'. Its adapters: base:sql, base:fr.")
    assert (await complete(http, "plain:sql")).json()["error"]["code"] == "model_not_found"
    assert (await http.get("/v1/models/base:nope")).status_code == 404


async def test_models_lists_each_adapter_under_its_entry(http: httpx.AsyncClient) -> None:
    listed = (await http.get("/v1/models")).json()["data"]
    assert [(m["id"], m["parent"]) for m in listed] == [
        ("base", None), ("base:sql", "base"), ("base:fr", "base"), ("plain", None)]
    sizes = {m["id"]: m["size_bytes"] for m in listed}
    assert sizes["base:sql"] == 100 and sizes["base:fr"] is None  # on disk / not downloaded
    adapter = (await http.get("/v1/models/base:sql")).json()
    assert (adapter["id"], adapter["parent"], adapter["status"]) == ("base:sql", "base",
                                                                      "loaded")


async def test_llama_servers_lora_field_is_reported_as_ignored(http: httpx.AsyncClient,
                                                              engine: FakeEngine) -> None:
    reply = await complete(http, "base", lora=[{"id": 0, "scale": 1.0}])
    assert reply.status_code == 200 and "lora" in reply.headers["x-ignored-fields"]
    assert engine.requests[-1].adapter is None  # the model name picks adapters, nothing else


async def test_ollama_tags_list_the_adapters_whose_file_is_here(http: httpx.AsyncClient,
                                                               tmp_path: Path) -> None:
    base = tmp_path / "org--b" / "b-Q4_K_M.gguf"  # the entry's download, here
    base.parent.mkdir()
    base.write_bytes(b"not a GGUF header")
    names = {m["name"]: m for m in (await http.get("/api/tags")).json()["models"]}
    # fr is a Hub adapter not downloaded yet; base:Q8_0's file is not here either
    assert set(names) == {"base", "base:sql"}
    assert names["base:sql"]["size"] == base.stat().st_size + 100
    assert names["base:sql"]["digest"] != names["base"]["digest"]
