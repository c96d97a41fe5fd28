"""The GPUs llama.cpp can use, their free memory, and how many layers of a model fit on them.

Devices come from ggml's backend registry (the same list llama.cpp offloads to), declared here
through ctypes because the bindings do not expose it. A CPU-only build lists no GPU even on a
GPU host: `gpu_present()` looks at the host itself so that the server can warn about that trap.
"""

from __future__ import annotations

import ctypes
import shutil
from dataclasses import dataclass
from pathlib import Path

from server.engine.llama.gguf import GGUFInfo
from server.engine.llama.native import ggml_library

_GPU_TYPES = (1, 2)  # enum ggml_backend_dev_type: CPU=0, GPU=1, IGPU=2, ACCEL=3
MIN_MARGIN = 512 << 20  # kept free on the GPU for llama.cpp's compute buffers and the driver


@dataclass(frozen=True)
class Gpu:
    name: str
    description: str
    free: int
    total: int


def gpus() -> list[Gpu]:
    """The GPU devices of this llama.cpp build (none for a CPU-only build)."""
    lib = ggml_library("libggml.so")
    lib.ggml_backend_dev_count.restype = ctypes.c_size_t
    lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    lib.ggml_backend_dev_get.restype = ctypes.c_void_p
    for name in ("ggml_backend_dev_name", "ggml_backend_dev_description"):
        getattr(lib, name).argtypes = [ctypes.c_void_p]
        getattr(lib, name).restype = ctypes.c_char_p
    lib.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_type.restype = ctypes.c_int
    lib.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                                            ctypes.POINTER(ctypes.c_size_t)]
    found = []
    for index in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(index)
        if lib.ggml_backend_dev_type(dev) not in _GPU_TYPES:
            continue
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        found.append(Gpu(lib.ggml_backend_dev_name(dev).decode(),
                         lib.ggml_backend_dev_description(dev).decode(), free.value, total.value))
    return found


def gpu_present() -> bool:
    """Whether this host has an NVIDIA GPU, whatever llama.cpp was built with."""
    return Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi") is not None


@dataclass(frozen=True)
class Placement:
    """Where a model's layers go, and what it will take of RAM and VRAM."""

    gpu_layers: int  # repeating layers on the GPU
    n_layer: int
    ram: int
    vram: int

    @property
    def all_on_gpu(self) -> bool:
        return self.n_layer > 0 and self.gpu_layers >= self.n_layer


def place(info: GGUFInfo, requested: int | str, kv_cells: int, vram_free: int) -> Placement:
    """Split `info`'s layers between GPU and CPU, as llama.cpp does: the last layers go to the
    GPU first, and the output head with them once every layer is there. "auto" puts as many as
    fit in `vram_free` (less a margin); -1 all; a number that many."""
    kv_layer = info.kv_bytes_per_token * kv_cells // max(info.n_layer, 1)
    layer_cost = [size + kv_layer for size in info.layer_bytes]
    if vram_free <= 0 and requested == "auto":
        requested = 0
    if requested == "auto":
        room = vram_free - max(MIN_MARGIN, vram_free // 10)
        count, used = 0, 0
        for cost in reversed(layer_cost):
            if used + cost > room:
                break
            used, count = used + cost, count + 1
        if count == info.n_layer and used + info.other_bytes > room:
            count -= 1  # the output head would not fit beside them
    else:
        count = info.n_layer if int(requested) < 0 else min(int(requested), info.n_layer)
    count = max(count, 0)
    on_gpu = sum(layer_cost[info.n_layer - count:]) if count else 0
    if count and count == info.n_layer:
        on_gpu += info.other_bytes
    total = sum(layer_cost) + info.other_bytes
    return Placement(count, info.n_layer, total - on_gpu, on_gpu)
