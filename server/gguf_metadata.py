"""A GGUF's metadata without loading it: its scalar key-values and parameter count, read in pure
Python (the header and tensor table only), for describing models that are not loaded.

The file is untrusted: every count and length is bounded by the file's size, and anything
malformed is a ValueError.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# llama.cpp's `llama_ftype`: what general.file_type names (the quantization of most weights)
FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
              10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M",
              16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S",
              22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M",
              28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0",
              37: "TQ2_0", 38: "MXFP4_MOE"}


@dataclass(frozen=True)
class GGUFMetadata:
    """A GGUF's scalar key-values (strings, numbers, booleans; arrays left out) and its
    parameter count (elements of all tensors)."""

    values: dict[str, Any]
    parameter_count: int

    @property
    def architecture(self) -> str:
        return str(self.values.get("general.architecture", ""))

    @property
    def quantization(self) -> str | None:
        file_type = self.values.get("general.file_type")
        return FILE_TYPES.get(file_type) if isinstance(file_type, int) else None


def read_metadata(path: Path) -> GGUFMetadata:
    """`path`'s metadata; ValueError when it is not a readable GGUF. Cached per file version
    (path, size, modification time)."""
    stat = path.stat()
    return _read_cached(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _read_cached(path: str, size: int, mtime_ns: int) -> GGUFMetadata:
    with open(path, "rb") as handle:
        return _Reader(handle, size).read()


class _Reader:
    def __init__(self, handle: IO[bytes], size: int) -> None:
        self._handle = handle
        self._size = size

    def read(self) -> GGUFMetadata:
        if self._bytes(4) != b"GGUF":
            raise ValueError("not a GGUF file (bad magic)")
        version = self._unpack("<I")
        if version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version}")
        n_tensors, n_kv = self._count(), self._count()
        values: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            value = self._value(self._unpack("<I"))
            if value is not None:
                values[key] = value
        parameters = 0
        for _ in range(n_tensors):
            self._string()  # the tensor's name
            n_dims = self._unpack("<I")
            if n_dims > 8:
                raise ValueError(f"a tensor with {n_dims} dimensions")
            parameters += functools.reduce(
                lambda a, b: a * b, (self._unpack("<Q") for _ in range(n_dims)), 1)
            self._bytes(12)  # its type (u32) and data offset (u64)
        return GGUFMetadata(values, parameters)

    def _value(self, kind: int) -> Any:
        """A scalar's value; an array is skipped (None)."""
        if kind == _STRING:
            return self._string()
        if kind in _SCALARS:
            return self._unpack(_SCALARS[kind])
        if kind != _ARRAY:
            raise ValueError(f"unknown GGUF value type {kind}")
        item, count = self._unpack("<I"), self._count()
        if item in _SCALARS:
            self._skip(count * struct.calcsize(_SCALARS[item]))
        elif item == _STRING:
            for _ in range(count):
                self._skip(self._count())
        else:
            raise ValueError(f"an array of GGUF value type {item}")
        return None

    def _string(self) -> str:
        return self._bytes(self._count()).decode("utf-8", errors="replace")

    def _count(self) -> int:
        count: int = self._unpack("<Q")
        if count > self._size:  # nothing in a file counts more than its bytes
            raise ValueError("a count larger than the file")
        return count

    def _unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self._bytes(struct.calcsize(fmt)))[0]

    def _bytes(self, n: int) -> bytes:
        data = self._handle.read(n)
        if len(data) != n:
            raise ValueError("the GGUF header is cut short")
        return data

    def _skip(self, n: int) -> None:
        if self._handle.tell() + n > self._size:
            raise ValueError("the GGUF header is cut short")
        self._handle.seek(n, 1)
