"""The prompt cache on the real llama.cpp engine: a document evicted from every slot is restored
from host RAM, or from disk after a restart, and the model reads on exactly where it was."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from server.app import create_app
from server.chat.template import plain_prompt
from server.engine.base import GenerationRequest, SamplingParams, TextDelta, Usage
from server.engine.manager import LlamaEngine
from server.settings import Settings

MODEL = "m"
DOCUMENT = " ".join(f"Paragraph {k}: the quick brown fox number {k} jumps over {k + 1} lazy "
                    "dogs near the river bank." for k in range(30))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@asynccontextmanager
async def engine(model: Path, tmp_path: Path, **settings: Any) -> AsyncIterator[LlamaEngine]:
    registry = tmp_path / "models.yaml"
    registry.write_text(f"models:\n  {MODEL}:\n    path: {model}\n    n_ctx: 1024\n")
    app = create_app(Settings(models_file=registry, parallel=2, threads=2,
                              prompt_cache_min_tokens=64, **settings))
    async with app.router.lifespan_context(app):
        yield app.state.engine


async def ask(engine: LlamaEngine, prompt: str) -> tuple[str, Usage]:
    request = GenerationRequest(MODEL, plain_prompt(prompt), SamplingParams(temperature=0),
                                max_tokens=12)
    events = [e async for e in await engine.generate(request)]
    usage = next(e for e in events if isinstance(e, Usage))
    return "".join(e.text for e in events if isinstance(e, TextDelta)), usage


async def evict(engine: LlamaEngine) -> None:
    """Four other conversations through both slots (the lowest free slot goes first)."""
    for k in range(4):
        await ask(engine, f"Conversation {k}. " + DOCUMENT.replace("fox", f"cat {k}"))


@pytest.mark.anyio
@pytest.mark.parametrize("unified", [False, True], ids=["kv-streams", "kv-unified"])
async def test_a_document_evicted_from_every_slot_is_restored_from_ram(
        smollm2_path: Path, tmp_path: Path, unified: bool) -> None:
    async with engine(smollm2_path, tmp_path, kv_unified=unified) as eng:
        cold, usage = await ask(eng, DOCUMENT + "\nQuestion: which river?")
        assert usage.cached_tokens == 0 and usage.prompt_tokens > 600
        await evict(eng)
        warm, again = await ask(eng, DOCUMENT + "\nQuestion: which river?")
        worker = eng._resident[MODEL].worker
        assert worker._cache.hits == 1
        # every prompt token but the last came back from the saved state
        assert again.cached_tokens == again.prompt_tokens - 1
        assert warm == cold  # and the model reads on from exactly the KV it had
        _, third = await ask(eng, DOCUMENT + "\nQuestion: how many dogs?")
        assert third.cached_tokens >= usage.prompt_tokens - 10  # the document, from a slot


@pytest.mark.anyio
async def test_the_same_document_without_a_prompt_cache_is_read_again(
        smollm2_path: Path, tmp_path: Path) -> None:
    async with engine(smollm2_path, tmp_path, prompt_cache_mb=0) as eng:
        await ask(eng, DOCUMENT + "\nQuestion: which river?")
        await evict(eng)
        _, usage = await ask(eng, DOCUMENT + "\nQuestion: which river?")
        assert usage.cached_tokens == 0
        assert eng._resident[MODEL].worker._cache is None


@pytest.mark.anyio
async def test_states_on_disk_are_restored_after_a_restart(
        smollm2_path: Path, tmp_path: Path) -> None:
    cache_dir = tmp_path / "kv"
    async with engine(smollm2_path, tmp_path, prompt_cache_mb=0,
                      prompt_cache_dir=cache_dir) as eng:
        cold, _ = await ask(eng, DOCUMENT + "\nQuestion: which river?")
    assert len(list(cache_dir.glob("*.kv"))) == 1  # the slot's cache, saved at shutdown
    async with engine(smollm2_path, tmp_path, prompt_cache_mb=0,
                      prompt_cache_dir=cache_dir) as eng:
        warm, usage = await ask(eng, DOCUMENT + "\nQuestion: which river?")
        assert usage.cached_tokens == usage.prompt_tokens - 1
        assert warm == cold
    # another KV cache layout (a unified cache) cannot read those states: not offered
    async with engine(smollm2_path, tmp_path, prompt_cache_mb=0, prompt_cache_dir=cache_dir,
                      kv_unified=True) as eng:
        _, usage = await ask(eng, DOCUMENT + "\nQuestion: which river?")
        assert usage.cached_tokens == 0
