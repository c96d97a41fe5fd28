"""KV cache types per model (issue 19): llama.cpp builds the cache in the entry's types, the
server's memory accounting (placement, /metrics) matches the size llama.cpp reports, and the
output stays sane."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import LiveServer

N_CTX = 2048
TYPES = {"f16": ("f16", "f16"), "q8": ("q8_0", "q8_0"), "q4": ("q4_0", "q4_0"),
         "mixed": ("q8_0", "f16")}
# llama.cpp's own report, one line per context it builds
REPORT = re.compile(r"llama_kv_cache: size = +([\d.]+) MiB \( *(\d+) cells.*K \((\w+)\): +"
                    r"([\d.]+) MiB, V \((\w+)\): +([\d.]+) MiB")


@pytest.fixture(scope="module")
def live(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    registry = tmp_path_factory.mktemp("kv") / "models.yaml"
    entries = "".join(f"  {name}:\n    path: {smollm2_path}\n    n_ctx: {N_CTX}\n"
                      f"    cache_type_k: {k}\n    cache_type_v: {v}\n"
                      for name, (k, v) in TYPES.items())
    registry.write_text(f"default: f16\nmodels:\n{entries}")
    server = LiveServer(["--models-file", str(registry), "--parallel", "1", "--threads", "2",
                         "--log-level", "debug"])
    yield server
    server.stop()


def first_token(live: LiveServer, model: str) -> dict[str, float]:
    reply = httpx.post(f"{live.url}/v1/chat/completions", timeout=120, json={
        "model": model, "max_tokens": 1, "temperature": 0, "logprobs": True,
        "top_logprobs": 5, "messages": [{"role": "user", "content": "Name a colour."}]})
    assert reply.status_code == 200, reply.text
    content = reply.json()["choices"][0]["logprobs"]["content"][0]
    return {t["token"]: t["logprob"] for t in content["top_logprobs"]}


def test_the_cache_is_built_in_the_entrys_types_and_accounted_as_llama_cpp_sizes_it(
        live: LiveServer) -> None:
    tops = {name: first_token(live, name) for name in TYPES}  # loads each model
    reports = {(m[2], m[4]): m for m in REPORT.findall(live.log.read_text())}
    sizes = {}
    for name, (k, v) in TYPES.items():
        total, cells, *_ = reports[(k, v)]
        assert int(cells) == N_CTX
        sizes[name] = float(total)
        accounted = live.metric("ggserve:model_memory_bytes", model=name, part="kv_cache",
                                device="cpu")
        assert accounted / 2**20 == pytest.approx(float(total), abs=0.01), name
    assert sizes["q8"] / sizes["f16"] == pytest.approx(34 / 64, rel=0.01)
    assert sizes["q4"] / sizes["f16"] == pytest.approx(18 / 64, rel=0.01)
    assert sizes["mixed"] / sizes["f16"] == pytest.approx((34 / 32 + 2) / 4, rel=0.01)
    # Still sane: the quantized caches' first choice is among f16's five best, and the best
    # token's probability barely moves under q8_0.
    best = max(tops["f16"], key=tops["f16"].__getitem__)
    for name in ("q8", "q4", "mixed"):
        assert max(tops[name], key=tops[name].__getitem__) in tops["f16"], (name, tops)
    assert tops["q8"].get(best, -99) == pytest.approx(tops["f16"][best], abs=0.25)


def test_a_quantized_v_cache_without_flash_attention_is_refused(
        smollm2_path: Path, tmp_path: Path) -> None:
    registry = tmp_path / "models.yaml"
    registry.write_text(f"default: plain\nmodels:\n  plain:\n    path: {smollm2_path}\n"
                        f"  q8v:\n    path: {smollm2_path}\n    cache_type_v: q8_0\n")
    server = LiveServer(["--models-file", str(registry), "--flash-attn", "off"])
    try:
        reply = httpx.post(f"{server.url}/v1/completions", timeout=60,
                           json={"model": "q8v", "prompt": "hi", "max_tokens": 1})
        assert reply.status_code == 503
        assert "flash attention" in reply.json()["error"]["message"]
    finally:
        server.stop()
