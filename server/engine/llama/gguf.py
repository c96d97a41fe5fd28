"""What a GGUF says about itself, read by ggml's own GGUF parser before llama.cpp loads it.

The server needs a model's size before it loads it (to fit it in the memory budget and decide how
many layers go to the GPU) and a clear error for a broken file. ggml's `gguf_init_from_file`
reads only the header and tensor table (milliseconds, even for a 40B model); the bindings do not
expose it, so it is declared here through ctypes on the same libggml-base that llama.cpp uses.
"""

from __future__ import annotations

import ctypes
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from server.engine.llama.native import ggml_library
from server.errors import ModelLoadFailed

# enum gguf_type
_U32, _I32, _STRING, _ARRAY, _U64 = 4, 5, 8, 9, 10
_BLOCK = re.compile(r"^blk\.(\d+)\.")


class _InitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


def _library() -> ctypes.CDLL:
    lib = ggml_library("libggml-base.so")
    signatures: dict[str, tuple[list[object], object]] = {
        "gguf_init_from_file": ([ctypes.c_char_p, _InitParams], ctypes.c_void_p),
        "gguf_free": ([ctypes.c_void_p], None),
        "gguf_find_key": ([ctypes.c_void_p, ctypes.c_char_p], ctypes.c_int64),
        "gguf_get_kv_type": ([ctypes.c_void_p, ctypes.c_int64], ctypes.c_int),
        "gguf_get_arr_type": ([ctypes.c_void_p, ctypes.c_int64], ctypes.c_int),
        "gguf_get_arr_n": ([ctypes.c_void_p, ctypes.c_int64], ctypes.c_size_t),
        "gguf_get_arr_data": ([ctypes.c_void_p, ctypes.c_int64], ctypes.c_void_p),
        "gguf_get_val_u32": ([ctypes.c_void_p, ctypes.c_int64], ctypes.c_uint32),
        "gguf_get_val_i32": ([ctypes.c_void_p, ctypes.c_int64], ctypes.c_int32),
        "gguf_get_val_u64": ([ctypes.c_void_p, ctypes.c_int64], ctypes.c_uint64),
        "gguf_get_val_str": ([ctypes.c_void_p, ctypes.c_int64], ctypes.c_char_p),
        "gguf_get_n_tensors": ([ctypes.c_void_p], ctypes.c_int64),
        "gguf_get_tensor_name": ([ctypes.c_void_p, ctypes.c_int64], ctypes.c_char_p),
        "gguf_get_tensor_offset": ([ctypes.c_void_p, ctypes.c_int64], ctypes.c_size_t),
        "gguf_get_tensor_size": ([ctypes.c_void_p, ctypes.c_int64], ctypes.c_size_t),
        "gguf_get_data_offset": ([ctypes.c_void_p], ctypes.c_size_t),
    }
    for name, (args, result) in signatures.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = args, result
    return lib


_lib: ctypes.CDLL | None = None


# KV cache types: ggml's type id and bytes per element (a q8_0 block: 32 values in 34 bytes,
# a q4_0 block: 32 in 18)
KV_TYPES: dict[str, tuple[int, float]] = {"f16": (1, 2.0), "q8_0": (8, 34 / 32),
                                         "q4_0": (2, 18 / 32)}


@dataclass(frozen=True)
class GGUFInfo:
    """A GGUF's architecture and sizes: enough to budget memory and split layers."""

    architecture: str
    n_layer: int
    n_ctx_train: int
    file_bytes: int
    layer_bytes: tuple[int, ...]  # weights of each repeating block
    other_bytes: int  # embeddings, output head, final norm
    kv_bytes_per_token: int  # K and V over all layers: f16, or the types of with_cache()
    kv_elements_per_token: tuple[int, int] = (0, 0)  # K's and V's, over all layers

    @property
    def weights_bytes(self) -> int:
        return sum(self.layer_bytes) + self.other_bytes

    def with_adapters(self, adapters: Sequence[GGUFInfo]) -> GGUFInfo:
        """This model with LoRA adapters loaded on it (read with its n_layer): each adapter
        tensor lives beside its base tensor, so it counts with that layer (or the rest)."""
        layers = [sum(sizes) for sizes in zip(
            self.layer_bytes, *(a.layer_bytes for a in adapters), strict=True)]
        return replace(self, layer_bytes=tuple(layers),
                       other_bytes=self.other_bytes + sum(a.other_bytes for a in adapters))

    def with_draft(self, draft: GGUFInfo) -> GGUFInfo:
        """This model with a draft model beside it (speculative decoding): the draft's weights
        with the model's output head, its KV per token (a context of as many cells, in the
        model's cache types: `draft` read with with_cache) with the model's."""
        return replace(self, other_bytes=self.other_bytes + draft.weights_bytes,
                       kv_bytes_per_token=self.kv_bytes_per_token + draft.kv_bytes_per_token)

    def with_cache(self, type_k: str, type_v: str) -> GGUFInfo:
        """This model with its KV cache in `type_k` / `type_v` (KV_TYPES): what it costs."""
        k, v = self.kv_elements_per_token
        per_token = k * KV_TYPES[type_k][1] + v * KV_TYPES[type_v][1]
        return replace(self, kv_bytes_per_token=math.ceil(per_token))


def read_gguf(path: Path, n_layer: int | None = None) -> GGUFInfo:
    """Read `path`'s header; ModelLoadFailed says what is wrong with a broken file. `n_layer`:
    count its blocks as this model's (a LoRA adapter's GGUF has no block count of its own)."""
    global _lib
    _lib = _lib or _library()
    size = path.stat().st_size
    ctx = _lib.gguf_init_from_file(str(path).encode(), _InitParams(True, None))
    if not ctx:
        raise ModelLoadFailed(f"{path.name} is not a readable GGUF file (bad magic, unsupported "
                              "version, or a header cut short); download it again")
    try:
        return _summarise(_lib, ctx, path, size, n_layer)
    finally:
        _lib.gguf_free(ctx)


def _summarise(lib: ctypes.CDLL, ctx: int, path: Path, size: int,
               n_layer: int | None) -> GGUFInfo:
    def value(key: str) -> int | str | None:
        kid = lib.gguf_find_key(ctx, key.encode())
        if kid < 0:
            return None
        kind = lib.gguf_get_kv_type(ctx, kid)
        if kind == _STRING:
            return bytes(lib.gguf_get_val_str(ctx, kid)).decode()
        if kind == _ARRAY and lib.gguf_get_arr_type(ctx, kid) in (_U32, _I32):
            count = lib.gguf_get_arr_n(ctx, kid)
            data = ctypes.cast(lib.gguf_get_arr_data(ctx, kid), ctypes.POINTER(ctypes.c_int32))
            return max((data[i] for i in range(count)), default=0)  # per-layer: the largest
        getter = {_U32: lib.gguf_get_val_u32, _I32: lib.gguf_get_val_i32,
                  _U64: lib.gguf_get_val_u64}.get(kind)
        return int(getter(ctx, kid)) if getter else None

    arch = str(value("general.architecture") or "")
    n_layer = n_layer or int(value(f"{arch}.block_count") or 0)
    layers = [0] * n_layer
    other, end = 0, 0
    data_offset = lib.gguf_get_data_offset(ctx)
    for tid in range(lib.gguf_get_n_tensors(ctx)):
        name = bytes(lib.gguf_get_tensor_name(ctx, tid)).decode()
        nbytes = lib.gguf_get_tensor_size(ctx, tid)
        end = max(end, data_offset + lib.gguf_get_tensor_offset(ctx, tid) + nbytes)
        block = _BLOCK.match(name)
        if block and int(block.group(1)) < n_layer:
            layers[int(block.group(1))] += nbytes
        else:
            other += nbytes
    if end > size:
        raise ModelLoadFailed(f"{path.name} is truncated: its tensors need {end} bytes, the file "
                              f"has {size}; download it again")
    n_embd = int(value(f"{arch}.embedding_length") or 0)
    n_head = int(value(f"{arch}.attention.head_count") or 1)
    n_head_kv = int(value(f"{arch}.attention.head_count_kv") or n_head)
    head_k = int(value(f"{arch}.attention.key_length") or n_embd // max(n_head, 1))
    head_v = int(value(f"{arch}.attention.value_length") or head_k)
    return GGUFInfo(
        architecture=arch, n_layer=n_layer,
        n_ctx_train=int(value(f"{arch}.context_length") or 0), file_bytes=size,
        layer_bytes=tuple(layers), other_bytes=other,
        kv_bytes_per_token=2 * n_layer * n_head_kv * (head_k + head_v),
        kv_elements_per_token=(n_layer * n_head_kv * head_k, n_layer * n_head_kv * head_v))
