"""`--backend-sampling on` through the whole server: greedy text as on the CPU chain, seeded
draws that repeat, and n > 1 choices that are drawn apart (their first tokens share a row)."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from tests.conftest import LiveServer

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def in_graph() -> Iterator[openai.OpenAI]:
    live = LiveServer(["--parallel", "4", "--backend-sampling", "on"])
    yield openai.OpenAI(base_url=f"{live.url}/v1", api_key="x", max_retries=0)
    live.stop()


def complete(client: openai.OpenAI, **kwargs: object) -> list[str]:
    reply = client.completions.create(model=MODEL, prompt="The three best things about the sea",
                                      max_tokens=16, **kwargs)  # type: ignore[call-overload]
    return [c.text for c in reply.choices]


def test_greedy_text_is_the_cpu_chains(in_graph: openai.OpenAI, server: LiveServer) -> None:
    on_cpu = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    assert complete(in_graph, temperature=0) == complete(on_cpu, temperature=0)


def test_seeded_draws_repeat_and_n_choices_differ(in_graph: openai.OpenAI) -> None:
    one = complete(in_graph, temperature=1.2, top_p=1.0, seed=5)  # drawn in the graph
    assert one == complete(in_graph, temperature=1.2, top_p=1.0, seed=5)
    first = complete(in_graph, temperature=1.2, top_p=1.0, seed=11, n=4)
    assert first == complete(in_graph, temperature=1.2, top_p=1.0, seed=11, n=4)
    assert len({text.split(" ")[1] if " " in text else text for text in first}) > 1
