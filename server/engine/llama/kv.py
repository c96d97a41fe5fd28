"""A llama.cpp context's KV cache as sequences: removing and sharing their cells, and saving
and restoring a sequence's state (the prompt cache), with what such a state depends on."""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import llama_cpp as lc

from server.engine.llama.context import ContextConfig
from server.engine.llama.native import NativeModel


def file_identity(path: Path) -> str:
    """A file as KV computed with it depends on it: where it is, its size and its mtime (a
    file replaced under the same name is another one)."""
    stat = path.stat()
    return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


def state_fingerprint(model: NativeModel, config: ContextConfig) -> str:
    """What a saved sequence state depends on: the model file, the KV cache's types and its
    streams, and the llama.cpp that wrote it."""
    streams = 1 if config.kv_unified else config.parallel
    return (f"{file_identity(model.path)}|{config.cache_type_k}|{config.cache_type_v}|"
            f"{streams}|llama-cpp-python {lc.__version__}")


class ContextKv:
    """A context's KV cache as the slot pool uses it (slots.KvMemory): sequences' cells removed
    and shared, and their state saved and restored for the prompt cache."""

    def __init__(self, ctx: Any) -> None:
        self._ctx = ctx
        self._memory = lc.llama_get_memory(ctx)

    def remove(self, seq_id: int, start: int) -> None:
        lc.llama_memory_seq_rm(self._memory, seq_id, start, -1)

    def copy(self, src: int, dst: int, end: int) -> None:
        lc.llama_memory_seq_cp(self._memory, src, dst, 0, end)

    def state_size(self, seq_id: int) -> int:
        return int(lc.llama_state_seq_get_size(self._ctx, seq_id))

    def save(self, seq_id: int) -> bytearray:
        size = self.state_size(seq_id)
        data = bytearray(size)  # written in place: a 2,000-token state is tens of MB
        written = lc.llama_state_seq_get_data(
            self._ctx, (ctypes.c_uint8 * size).from_buffer(data), size, seq_id)
        del data[written:]
        return data

    def restore(self, seq_id: int, data: bytearray) -> bool:
        source = (ctypes.c_uint8 * len(data)).from_buffer(data)
        restored: int = lc.llama_state_seq_set_data(self._ctx, source, len(data), seq_id)
        return restored == len(data)
