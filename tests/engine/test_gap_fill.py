"""Filler rows close the gaps between running sequences, so that llama.cpp decodes separate KV
streams in one pass over the weights (real llama.cpp, the default model, on the CPU with
gap_fill forced on). The passes are counted by llama.cpp itself: its eval callback sees the
model's output tensor computed once per ubatch."""

from __future__ import annotations

import asyncio
import ctypes
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp as lc
import pytest

from server.app import create_app
from server.chat.template import plain_prompt
from server.engine.base import GenerationRequest, Usage
from server.engine.llama import scheduler as scheduler_module
from server.engine.manager import LlamaEngine
from server.settings import Settings
from tests.engine.test_grammar_isolation import collect
from tests.engine.test_scheduler_failures import GREEDY, MODEL, anyio_backend

__all__ = ["anyio_backend"]

_GGML = ctypes.CDLL(str(Path(lc.__file__).parent / "lib" / "libggml-base.so"))
_GGML.ggml_get_name.restype = ctypes.c_char_p
_GGML.ggml_get_name.argtypes = [ctypes.c_void_p]
# B's prompt is long enough to be worth a slot of its own when it comes again (slots.MIN_REUSE)
PROMPTS = {"A": "The sky is", "C": "Once upon a time",
           "B": "Here is a list of the planets of the solar system, from the closest to the sun "
                "to the farthest one, with one line about each of them:"}


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[Decode]:
    """Each llama_decode of the schedulers made meanwhile."""
    seen: list[Decode] = []
    count = [0]

    def observe(tensor: int, ask: bool, _: Any) -> bool:
        if _GGML.ggml_get_name(tensor) == b"result_output":
            if not ask:
                count[0] += 1
            return True
        return False

    callback = lc.ggml_backend_sched_eval_callback(observe)
    original_params, original_decode = scheduler_module.context_params, \
        scheduler_module.lc.llama_decode

    def params(config: Any) -> Any:
        made = original_params(config)
        made.cb_eval = callback
        return made

    def decode(ctx: Any, batch: Any) -> int:
        before = count[0]
        status = original_decode(ctx, batch)
        rows = range(batch.n_tokens)
        seen.append(Decode(frozenset(batch.seq_id[i][0] for i in rows if batch.logits[i]),
                           frozenset(batch.seq_id[i][0] for i in rows), count[0] - before))
        return int(status)

    monkeypatch.setattr(scheduler_module, "context_params", params)
    monkeypatch.setattr(scheduler_module.lc, "llama_decode", decode)
    return seen


@dataclass(frozen=True)
class Decode:
    sampled: frozenset[int]  # the sequences whose rows have logits
    written: frozenset[int]  # every sequence with a row in the batch (fillers too)
    passes: int  # how many times llama.cpp computed the output tensor: one per ubatch


async def scenario(smollm2_path: Path, tmp_path: Path, decodes: list[Decode],
                   gap_fill: str) -> tuple[list[str], list[Decode]]:
    """A, B and C together on sequences 0, 1 and 2; B ends after 2 tokens and leaves 1 idle
    between A and C. Their texts, then B's again (from its cache), and the decodes of A and C
    alone."""
    registry = tmp_path / f"models-{gap_fill}.yaml"
    registry.write_text(f"models:\n  {MODEL}:\n    path: {smollm2_path}\n    n_ctx: 256\n")
    app = create_app(Settings(models_file=registry, parallel=3, batch_tokens=64, threads=2,
                              gap_fill=gap_fill, prompt_cache_mb=0))
    async with app.router.lifespan_context(app):
        engine: LlamaEngine = app.state.engine
        await generate(engine, "A", 1)  # loads the model
        worker = engine._resident[MODEL].worker
        decodes.clear()
        # submitted one after the other: they take the lowest idle sequences in that order
        streams = [await engine.generate(request(name, n))
                   for name, n in (("A", 16), ("B", 2), ("C", 16))]
        done = await asyncio.gather(*(collect(stream) for stream in streams))
        alone = [d for d in decodes if d.sampled == {0, 2}]
        # B's idle slot holds exactly its own tokens: llama.cpp's positions 0 .. len - 1
        slot = worker._slots._slots[1]
        assert slot.cached and not slot.busy
        assert lc.llama_memory_seq_pos_max(worker._memory, 1) == len(slot.cached) - 1
        again, usage = await generate(engine, "B", 2)
        assert usage.cached_tokens > 0  # B came back to its slot and reused its cache
        return [text for text, _ in done] + [again], alone


def request(name: str, max_tokens: int) -> GenerationRequest:
    return GenerationRequest(MODEL, plain_prompt(PROMPTS[name]), GREEDY, max_tokens=max_tokens)


async def generate(engine: LlamaEngine, name: str, max_tokens: int) -> tuple[str, Usage]:
    text, usage = await collect(await engine.generate(request(name, max_tokens)))
    assert usage is not None
    return text, usage




@pytest.mark.anyio
async def test_a_finished_sequence_between_two_running_ones_costs_no_second_pass(
        smollm2_path: Path, tmp_path: Path, decodes: list[Decode]) -> None:
    texts, filled = await scenario(smollm2_path, tmp_path, decodes, "on")
    plain, split = await scenario(smollm2_path, tmp_path, decodes, "off")
    # Without fillers each step of A and C alone is two passes: 0, then 2.
    assert len(split) >= 10 and all(d.written == {0, 2} and d.passes == 2 for d in split)
    # With one in 1 (whose row asks no logits), one pass.
    assert len(filled) >= 10 and all(d.written == {0, 1, 2} and d.passes == 1 for d in filled)
    # The fillers changed nothing for anyone, B's cache included.
    assert texts == plain
    assert texts[3] == texts[1]
