"""Layers over several devices (pure planning, two simulated GPUs): the split llama.cpp makes
for a given tensor_split, what `auto` fits in each GPU's free memory, the engine's per-GPU
budget, and the registry fields that ask for it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from server.engine.devices import Gpu, Placement, margin, place
from server.engine.llama.gguf import GGUFInfo
from server.engine.manager import LlamaEngine
from server.errors import RegistryError
from server.metrics import Metrics
from server.registry import Registry
from server.settings import Settings

MIB, GIB = 1 << 20, 1 << 30
# a 7B-like model: 32 layers of 200 MiB, 300 MiB of embeddings and head, 128 KiB KV per token
SEVEN_B = GGUFInfo("llama", 32, 32768, 0, (200 * MIB,) * 32, 300 * MIB, 128 * 1024)
CELLS = 4096  # 512 MiB of KV: 16 MiB per layer
LAYER = 200 * MIB + 16 * MIB


def test_auto_spreads_a_model_too_big_for_one_gpu_over_two() -> None:
    assert not place(SEVEN_B, "auto", CELLS, 6 * GIB).all_on_gpu
    plan = place(SEVEN_B, "auto", CELLS, [6 * GIB, 6 * GIB])
    assert plan.all_on_gpu and plan.ram == 0
    assert plan.devices[0] > 0 and plan.devices[1] > 0 and plan.split == (0.5, 0.5)
    for used in plan.devices:
        assert used <= 6 * GIB - margin(6 * GIB)
    assert plan.vram == sum(plan.devices) == SEVEN_B.weights_bytes + CELLS * 128 * 1024


def test_auto_splits_in_proportion_to_free_memory() -> None:
    plan = place(SEVEN_B, "auto", CELLS, [24 * GIB, 8 * GIB])
    assert plan.all_on_gpu and plan.split == (0.75, 0.25)
    # 33 offloaded (the head last): the first GPU takes positions 0 to 24 (24/33 < 0.75)
    assert plan.devices == (25 * LAYER, 7 * LAYER + 300 * MIB)


def test_auto_offloads_what_fits_the_smaller_share() -> None:
    # An even split that the 3 GiB card cannot hold its half of: fewer layers, none too many.
    plan = place(SEVEN_B, "auto", CELLS, [24 * GIB, 3 * GIB], split=[1, 1])
    assert 0 < plan.gpu_layers < 32
    assert plan.devices[1] <= 3 * GIB - margin(3 * GIB)
    assert plan.ram + plan.vram == SEVEN_B.weights_bytes + CELLS * 128 * 1024


def test_layers_go_where_llama_cpp_puts_them() -> None:
    # llama.cpp (llama-model.cpp, load_tensors): the i-th of k offloaded layers (the head
    # last) goes to the first device whose cumulative share exceeds i / k.
    sizes = (1, 10, 100, 1000)
    model = GGUFInfo("llama", 4, 4096, 0, sizes, 10000, 0)
    plan = place(model, -1, 0, [GIB, GIB], split=[1, 1])
    assert plan.devices == (1 + 10 + 100, 1000 + 10000)  # shares at 0, .2, .4 | .6, .8
    plan = place(model, 2, 0, [GIB, GIB], split=[1, 1])  # the last two layers and the head
    assert plan.devices == (100 + 1000, 10000) and plan.ram == 1 + 10
    assert plan.offloaded == 3  # llama.cpp's n_gpu_layers: the head counts as a layer


def test_tensor_split_and_split_modes() -> None:
    layered = place(SEVEN_B, -1, CELLS, [80 * GIB, 80 * GIB], split=[1, 3])
    assert layered.split == (0.25, 0.75)
    assert layered.devices == (9 * LAYER, 23 * LAYER + 300 * MIB)  # 8/33 < 0.25 <= 9/33
    rows = place(SEVEN_B, -1, CELLS, [80 * GIB, 80 * GIB], split=[1, 3], mode="row")
    assert rows.devices[1] == pytest.approx(3 * rows.devices[0], rel=1e-6)
    single = place(SEVEN_B, -1, CELLS, [80 * GIB, 80 * GIB], mode="none", main_gpu=1)
    assert single.devices[0] == 0 and single.devices[1] == single.vram > 0
    with pytest.raises(ValueError, match="tensor_split has 3 values for 2 devices"):
        place(SEVEN_B, -1, CELLS, [GIB, GIB], split=[1, 1, 1])
    with pytest.raises(ValueError, match="main_gpu 2"):
        place(SEVEN_B, -1, CELLS, [GIB, GIB], mode="none", main_gpu=2)


def test_no_device_keeps_everything_on_the_cpu() -> None:
    for requested in ("auto", -1, 8):
        for mode in ("layer", "row", "none"):
            plan = place(SEVEN_B, requested, CELLS, [], mode=mode)  # type: ignore[arg-type]
            assert (plan.gpu_layers, plan.vram, plan.devices, plan.offloaded) == (0, 0, (), 0)
            assert plan.ram == SEVEN_B.weights_bytes + CELLS * 128 * 1024


def test_rpc_workers_hold_layers_outside_this_hosts_budgets() -> None:
    plan = place(SEVEN_B, "auto", CELLS, [64 * GIB, 4 * GIB], remote=1)
    assert plan.all_on_gpu and plan.devices[0] > plan.devices[1] > 0
    assert plan.vram == plan.on_gpu(0) == plan.devices[1]  # only the local GPU's bytes
    assert plan.ram == 0


def _engine(tmp_path: Path, free: list[int]) -> LlamaEngine:
    model = tmp_path / "m.gguf"
    model.touch()
    (tmp_path / "models.yaml").write_text(f"models:\n  m:\n    path: {model}\n"
                                          "    n_gpu_layers: auto\n")
    settings = Settings(models_file=tmp_path / "models.yaml", parallel=1)
    registry = Registry.load(settings.models_file, settings.templates_dir, tmp_path)
    engine = LlamaEngine(registry, settings, Metrics())
    engine._gpus = [Gpu(f"CUDA{i}", "sim", room, room) for i, room in enumerate(free)]
    engine.vram_budget = sum(free)
    return engine


def test_the_engine_plans_on_what_each_gpu_has_left(tmp_path: Path) -> None:
    engine = _engine(tmp_path, [8 * GIB, 8 * GIB])
    spec = engine.registry.get("m")
    fresh = engine._place(spec, SEVEN_B, CELLS, [])
    assert fresh.all_on_gpu and fresh.split == (0.5, 0.5)
    # A loaded model holds 6 GiB of the first GPU: the next plan leans on the second.
    held = Placement(32, 32, 0, 6 * GIB, (6 * GIB, 0), (1.0, 0.0))
    engine._resident["other"] = SimpleNamespace(placement=held)  # type: ignore[assignment]
    assert engine._gpu_rooms() == [2 * GIB, 8 * GIB]
    leaning = engine._place(spec, SEVEN_B, CELLS, [])
    assert leaning.devices[1] > leaning.devices[0]
    assert leaning.on_gpu(0) <= 2 * GIB - margin(2 * GIB)


def test_registry_fields_for_several_devices(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.touch()

    def load(fields: str) -> Registry:
        (tmp_path / "models.yaml").write_text(f"models:\n  m:\n    path: {model}\n{fields}")
        return Registry.load(tmp_path / "models.yaml", tmp_path, tmp_path)

    spec = load("    split_mode: row\n    tensor_split: [3, 1]\n    main_gpu: 1\n"
                "    rpc: ['10.0.0.2:50052', '[fd00::2]:50052']\n").get("m")
    assert (spec.split_mode, spec.tensor_split, spec.main_gpu) == ("row", (3.0, 1.0), 1)
    assert spec.rpc == ("10.0.0.2:50052", "[fd00::2]:50052")
    assert load("").get("m").split_mode == "layer"  # llama.cpp's default
    for fields, message in (("    rpc: [worker]\n", "'worker' is not host:port"),
                            ("    rpc: ['w:99999']\n", "is not host:port"),
                            ("    tensor_split: [1, -1]\n", "none negative"),
                            ("    tensor_split: [0, 0]\n", "not all 0"),
                            ("    split_mode: tensor\n", "split_mode"),
                            ("    main_gpu: -1\n", "main_gpu")):
        with pytest.raises(RegistryError, match=message):
            load(fields)
