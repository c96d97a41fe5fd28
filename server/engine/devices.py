"""The GPUs llama.cpp can use, their free memory, and how a model's layers spread over them.

Devices come from ggml's backend registry (the same list llama.cpp offloads to), declared here
through ctypes because the bindings do not expose it. A CPU-only build lists no GPU even on a
GPU host: `gpu_present()` looks at the host itself so that the server can warn about that trap.
"""

from __future__ import annotations

import ctypes
import shutil
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Literal

from server.engine.llama.gguf import GGUFInfo
from server.engine.llama.native import ggml_library

_GPU_TYPES = (1, 2)  # enum ggml_backend_dev_type: CPU=0, GPU=1, IGPU=2, ACCEL=3
MIN_MARGIN = 512 << 20  # kept free on the GPU for llama.cpp's compute buffers and the driver


@dataclass(frozen=True)
class Gpu:
    """A device llama.cpp can offload layers to: a GPU of this host, or an RPC worker's."""

    name: str
    description: str
    free: int
    total: int
    handle: int = 0  # its ggml_backend_dev_t, for a model's explicit device list


def backend_library() -> ctypes.CDLL:
    """libggml with the parts of ggml's backend registry API used here declared."""
    lib = ggml_library("libggml.so")
    signatures: dict[str, tuple[list[object], object]] = {
        "ggml_backend_dev_count": ([], ctypes.c_size_t),
        "ggml_backend_dev_get": ([ctypes.c_size_t], ctypes.c_void_p),
        "ggml_backend_dev_name": ([ctypes.c_void_p], ctypes.c_char_p),
        "ggml_backend_dev_description": ([ctypes.c_void_p], ctypes.c_char_p),
        "ggml_backend_dev_type": ([ctypes.c_void_p], ctypes.c_int),
        "ggml_backend_dev_memory": ([ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                                     ctypes.POINTER(ctypes.c_size_t)], None),
        "ggml_backend_reg_by_name": ([ctypes.c_char_p], ctypes.c_void_p),
        "ggml_backend_reg_get_proc_address": ([ctypes.c_void_p, ctypes.c_char_p],
                                              ctypes.c_void_p),
        "ggml_backend_reg_dev_count": ([ctypes.c_void_p], ctypes.c_size_t),
        "ggml_backend_reg_dev_get": ([ctypes.c_void_p, ctypes.c_size_t], ctypes.c_void_p),
    }
    for name, (args, result) in signatures.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = args, result
    return lib


def describe(lib: ctypes.CDLL, dev: int) -> Gpu:
    """A device's name, description and memory, as llama.cpp sees them."""
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
    return Gpu(lib.ggml_backend_dev_name(dev).decode(),
               lib.ggml_backend_dev_description(dev).decode(), free.value, total.value, dev)


def gpus() -> list[Gpu]:
    """The GPU devices of this llama.cpp build (none for a CPU-only build)."""
    lib = backend_library()
    devices = (lib.ggml_backend_dev_get(i) for i in range(lib.ggml_backend_dev_count()))
    return [describe(lib, dev) for dev in devices if lib.ggml_backend_dev_type(dev) in _GPU_TYPES]


def gpu_present() -> bool:
    """Whether this host has an NVIDIA GPU, whatever llama.cpp was built with."""
    return Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi") is not None


SplitMode = Literal["none", "layer", "row"]
SPLIT_MODES: dict[str, int] = {"none": 0, "layer": 1, "row": 2}  # enum llama_split_mode


@dataclass(frozen=True)
class Placement:
    """Where a model's layers go, and what it will take of RAM and of each device's memory.

    `devices` are the devices llama.cpp gets for the model, in its order: RPC workers first
    (the first `remote` of them, whose memory is not this host's), then this host's GPUs.
    """

    gpu_layers: int  # repeating layers offloaded (to GPUs or RPC workers)
    n_layer: int
    ram: int
    vram: int  # bytes on this host's GPUs
    devices: tuple[int, ...] = ()  # bytes on each device
    split: tuple[float, ...] = ()  # each device's share of the layers: llama.cpp's tensor_split
    remote: int = 0

    @property
    def all_on_gpu(self) -> bool:
        return self.n_layer > 0 and self.gpu_layers >= self.n_layer

    @property
    def offloaded(self) -> int:
        """llama.cpp's n_gpu_layers for this plan: the output head counts as one more layer,
        and llama.cpp offloads it first, then the last layers."""
        return self.gpu_layers + 1 if self.gpu_layers else 0

    def on_gpu(self, index: int) -> int:
        """Bytes on this host's GPU `index`."""
        local = self.devices[self.remote:]
        return local[index] if index < len(local) else 0


def margin(room: int) -> int:
    return max(MIN_MARGIN, room // 10)


def place(info: GGUFInfo, requested: int | str, kv_cells: int, vram_free: int | Sequence[int],
          *, split: Sequence[float] | None = None, mode: SplitMode = "layer",
          main_gpu: int = 0, remote: int = 0) -> Placement:
    """Split `info`'s layers between the CPU and the devices whose free bytes `vram_free`
    lists (one int: one GPU), as llama.cpp does: the output head and the last layers are
    offloaded first, spread over the devices in proportion to `split` (default: to their free
    memory). "auto" offloads as many layers as fit every device (less a margin); -1 all; a
    number that many. `mode` "none" puts everything on device `main_gpu`."""
    rooms = [vram_free] if isinstance(vram_free, int) else list(vram_free)
    shares = _shares(rooms, split, mode, main_gpu)
    kv_layer = info.kv_bytes_per_token * kv_cells // max(info.n_layer, 1)
    layer_cost = [size + kv_layer for size in info.layer_bytes]
    if not rooms:  # no device: everything on the CPU
        count = 0
    elif requested == "auto":
        caps = [room - margin(room) for room in rooms]
        count = next((n for n in range(info.n_layer, 0, -1)
                      if all(used <= cap for used, cap in zip(
                          _spread(layer_cost, info.other_bytes, n, shares, mode), caps,
                          strict=True))), 0)
    else:
        count = info.n_layer if int(requested) < 0 else min(int(requested), info.n_layer)
    per_device = _spread(layer_cost, info.other_bytes, count, shares, mode)
    total = sum(layer_cost) + info.other_bytes
    return Placement(count, info.n_layer, total - sum(per_device), sum(per_device[remote:]),
                     tuple(per_device), tuple(shares), remote)


def _shares(rooms: list[int], split: Sequence[float] | None, mode: SplitMode,
            main_gpu: int) -> list[float]:
    """Each device's proportion of the offloaded layers, summing to 1."""
    if not rooms:
        return []
    if mode == "none":
        if not 0 <= main_gpu < len(rooms):
            raise ValueError(f"main_gpu {main_gpu}: there are {len(rooms)} devices")
        return [1.0 if i == main_gpu else 0.0 for i in range(len(rooms))]
    if split is not None and len(split) != len(rooms):
        raise ValueError(f"tensor_split has {len(split)} values for {len(rooms)} devices")
    weights = [float(w) for w in split] if split is not None else \
        [float(max(room, 0)) for room in rooms]
    if any(w < 0 for w in weights):
        raise ValueError("tensor_split values must not be negative")
    total = sum(weights)
    if total <= 0:  # no room anywhere (an explicit count may still ask): spread evenly
        return [1 / len(rooms)] * len(rooms) if rooms else []
    return [w / total for w in weights]


def _spread(layer_cost: list[int], head: int, count: int, shares: list[float],
            mode: SplitMode) -> list[int]:
    """Bytes on each device when the last `count` layers and the head are offloaded."""
    per_device = [0] * len(shares)
    if not count:
        return per_device
    offloaded = [*layer_cost[len(layer_cost) - count:], head]  # llama.cpp's order: head last
    if mode == "row":  # every offloaded matrix is split by rows across the devices
        total = sum(offloaded)
        return [int(total * share) for share in shares]
    bounds = list(accumulate(shares))
    for position, cost in enumerate(offloaded):
        # llama.cpp: the device whose cumulative share first exceeds position / count
        device = bisect_right(bounds, position / len(offloaded))
        per_device[min(device, len(shares) - 1)] += cost
    return per_device
