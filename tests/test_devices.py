"""GPU layer fitting from a GGUF's sizes, the GGUF header reader, and the CPU-build warning."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from server.engine import manager as engine_module
from server.engine.devices import MIN_MARGIN, gpus, place
from server.engine.llama.gguf import GGUFInfo, read_gguf
from server.engine.manager import LlamaEngine
from server.metrics import Metrics
from server.registry import Registry
from server.settings import Settings
from tests.gguf_factory import SHAPES, write_gguf

MIB = 1 << 20
# a 7B-like model: 32 layers of 200 MiB, 300 MiB of embeddings and head, 128 KiB KV per token
SEVEN_B = GGUFInfo("llama", 32, 32768, 0, (200 * MIB,) * 32, 300 * MIB, 128 * 1024)


def test_auto_puts_every_layer_on_a_gpu_with_room() -> None:
    plan = place(SEVEN_B, "auto", kv_cells=4096, vram_free=24 << 30)
    assert plan.gpu_layers == 32 and plan.all_on_gpu and plan.ram == 0
    assert plan.vram == 32 * 200 * MIB + 300 * MIB + 4096 * 128 * 1024


def test_auto_offloads_fewer_layers_when_the_context_does_not_fit() -> None:
    small_ctx = place(SEVEN_B, "auto", kv_cells=4096, vram_free=6 << 30)
    huge_ctx = place(SEVEN_B, "auto", kv_cells=65536, vram_free=6 << 30)
    assert 0 < huge_ctx.gpu_layers < small_ctx.gpu_layers < 32
    for plan, cells in ((small_ctx, 4096), (huge_ctx, 65536)):  # it fits, with the margin
        assert plan.vram <= (6 << 30) - max(MIN_MARGIN, (6 << 30) // 10)
        assert plan.ram + plan.vram == SEVEN_B.weights_bytes + cells * SEVEN_B.kv_bytes_per_token


def test_explicit_layer_counts_and_no_gpu() -> None:
    assert place(SEVEN_B, -1, 4096, 0).gpu_layers == 32
    assert place(SEVEN_B, 10, 4096, 0).gpu_layers == 10
    nothing = place(SEVEN_B, "auto", 4096, 0)
    assert nothing.gpu_layers == 0 and nothing.vram == 0


def test_the_header_reader_sees_layers_and_kv(tmp_path: Path) -> None:
    shape = SHAPES["tiny"]
    info = read_gguf(write_gguf(tmp_path / "m.gguf", "llama", shape=shape))
    assert info.architecture == "llama" and info.n_layer == shape.n_layer
    assert len(info.layer_bytes) == shape.n_layer and all(info.layer_bytes)
    assert info.kv_bytes_per_token == 2 * shape.n_layer * shape.n_embd_kv * 2
    assert info.weights_bytes < info.file_bytes


def test_a_cpu_only_build_on_a_gpu_host_warns(monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture,
                                              tmp_path: Path) -> None:
    monkeypatch.setattr(engine_module, "gpu_present", lambda: True)
    registry_file = tmp_path / "models.yaml"
    model = write_gguf(tmp_path / "m.gguf", "llama")
    registry_file.write_text(f"models:\n  m:\n    path: {model}\n")
    settings = Settings(models_file=registry_file)
    registry = Registry.load(registry_file, settings.templates_dir, settings.models_dir)
    engine = LlamaEngine(registry, settings, Metrics())
    with caplog.at_level(logging.INFO, logger="server.engine"):
        engine._log_backend()
    assert "llama.cpp backend: CPU only" in caplog.text
    assert "built without CUDA" in caplog.text and "-DGGML_CUDA=on" in caplog.text


@pytest.mark.gpu
@pytest.mark.skipif(not gpus(), reason="needs a CUDA build of llama.cpp and a GPU")
def test_auto_offloads_every_layer_of_a_model_that_fits(tmp_path: Path) -> None:
    info = read_gguf(write_gguf(tmp_path / "m.gguf", "llama"))
    plan = place(info, "auto", 4096, gpus()[0].free)
    assert plan.all_on_gpu
