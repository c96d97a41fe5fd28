"""Thin, typed wrappers over llama.cpp's C API (through llama-cpp-python's ctypes bindings)."""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import llama_cpp as lc

from server.errors import ModelLoadFailed

log = logging.getLogger("server.engine")
_native_log = logging.getLogger("llama.cpp")
# ggml_log_level: NONE=0, DEBUG=1, INFO=2, WARN=3, ERROR=4, CONT=5 (continues the last line).
_LEVELS = {0: logging.CRITICAL, 1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING,
           4: logging.ERROR}
_init_lock = threading.Lock()
_state: dict[str, Any] = {}
_load_errors = threading.local()  # llama.cpp's error lines while this thread loads a model


@lc.llama_log_callback  # type: ignore[untyped-decorator]
def _on_native_log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
    # llama.cpp logs in fragments (level 5 continues the previous line): join them into lines.
    if level != 5:
        _state["level"] = _LEVELS.get(level, logging.DEBUG)
    _state["line"] = _state.get("line", "") + text.decode("utf-8", errors="replace")
    if _state["line"].endswith("\n"):
        line, _state["line"] = _state["line"].rstrip(), ""
        # llama.cpp's INFO is a firehose (every tensor of every load): keep it at DEBUG. Its
        # n_ctx_seq warning is about the unified KV cache's total size; the engine checks the
        # per-request window against the training context itself (engine/manager.py).
        level_ = _state["level"]
        if "n_ctx_seq" in line and "n_ctx_train" in line:
            level_ = logging.DEBUG
        _native_log.log(logging.DEBUG if level_ == logging.INFO else level_, "%s", line)
        errors = getattr(_load_errors, "lines", None)
        if errors is not None and level_ >= logging.ERROR:
            errors.append(line)


@contextmanager
def native_errors() -> Iterator[list[str]]:
    """The error lines llama.cpp logs from this thread inside the block (why a load failed)."""
    _load_errors.lines = []
    try:
        yield _load_errors.lines
    finally:
        _load_errors.lines = None


def failure_reason(errors: list[str]) -> str:
    """The last of native_errors()'s lines, without llama.cpp's function prefixes."""
    return "; ".join(line.split(": ", 1)[-1] for line in errors[-2:]) or "see the log"


def init_backend() -> None:
    """Initialise llama.cpp once per process and route its log into Python logging."""
    with _init_lock:
        if _state.get("ready"):
            return
        lc.llama_log_set(_on_native_log, ctypes.c_void_p(0))
        lc.llama_backend_init()
        _state["ready"] = True


def ggml_library(name: str) -> ctypes.CDLL:
    """One of the ggml libraries that llama-cpp-python loaded (e.g. "libggml.so"), for the
    parts of ggml's C API its bindings do not expose."""
    folder = os.environ.get("LLAMA_CPP_LIB_PATH") or str(Path(lc.__file__).parent / "lib")
    return ctypes.CDLL(str(Path(folder) / name))


def system_info() -> str:
    return bytes(lc.llama_print_system_info()).decode("utf-8", errors="replace")


def build_has_amx() -> bool:
    """True when this llama.cpp was compiled with the AMX kernels (a -march=native build on AMX)."""
    return "AMX_INT8 = 1" in system_info()


def gpu_offload_supported() -> bool:
    return bool(lc.llama_supports_gpu_offload())


def repack_enabled(setting: str) -> bool:
    """Whether to let llama.cpp repack weights into its extra CPU buffer types.

    The AMX repacking path segfaults in ggml_backend_amx_mul_mat on quantized models on the
    AMX CPUs we run on; "auto" keeps repacking off whenever the build carries those kernels.
    """
    if setting == "auto":
        return not build_has_amx()
    return setting == "on"


class NativeModel:
    """A loaded llama_model with its vocabulary: tokenize, detokenize, metadata."""

    def __init__(self, path: Path, *, n_gpu_layers: int, repack: bool,
                 devices: Sequence[int] = (), split_mode: int = 1, main_gpu: int = 0,
                 tensor_split: Sequence[float] = ()) -> None:
        """Load `path`; `devices` (ggml_backend_dev_t handles) replaces llama.cpp's default
        device list (every GPU), and `tensor_split` gives each device's share of the layers."""
        params = lc.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers if n_gpu_layers >= 0 else 10_000
        params.use_extra_bufts = repack
        params.split_mode, params.main_gpu = split_mode, main_gpu
        # llama.cpp copies both arrays while loading: they need to live only through the call.
        device_list = (ctypes.c_void_p * (len(devices) + 1))(*devices, None)
        if devices:
            params.devices = ctypes.cast(device_list, ctypes.c_void_p)
        shares = (ctypes.c_float * max(int(lc.llama_max_devices()), len(tensor_split)))(
            *tensor_split)
        if tensor_split:
            params.tensor_split = ctypes.cast(shares, ctypes.POINTER(ctypes.c_float))
        with native_errors() as errors:
            ptr = lc.llama_model_load_from_file(str(path).encode(), params)
        if not ptr:
            raise ModelLoadFailed(f"llama.cpp could not load {path.name}: "
                                  f"{failure_reason(errors)}")
        self.ptr = ptr
        self.path = path
        self.vocab = lc.llama_model_get_vocab(ptr)
        self.n_vocab = int(lc.llama_vocab_n_tokens(self.vocab))
        self.n_ctx_train = int(lc.llama_model_n_ctx_train(ptr))
        self.add_bos = bool(lc.llama_vocab_get_add_bos(self.vocab))
        self.bos = int(lc.llama_vocab_bos(self.vocab))
        self.eos = int(lc.llama_vocab_eos(self.vocab))
        self.weights_bytes = int(lc.llama_model_size(ptr))
        self._pieces: dict[int, bytes] = {}
        self._output_pieces: dict[int, bytes] = {}

    def close(self) -> None:
        if self.ptr:
            lc.llama_model_free(self.ptr)
            self.ptr = None

    def meta(self, key: str) -> str | None:
        size = 4096
        while True:
            buf = ctypes.create_string_buffer(size)
            n = lc.llama_model_meta_val_str(self.ptr, key.encode(), buf, size)
            if n < 0:
                return None
            if n < size:
                return buf.value.decode("utf-8", errors="replace")
            size = n + 1

    def token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return bytes(lc.llama_vocab_get_text(self.vocab, token)).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        return bool(lc.llama_vocab_is_eog(self.vocab, token))

    def tokenize(self, text: str, *, parse_special: bool, add_special: bool = False) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 8
        buf = (lc.llama_token * capacity)()
        n = lc.llama_tokenize(self.vocab, data, len(data), buf, capacity, add_special,
                              parse_special)
        if n < 0:
            capacity = -n
            buf = (lc.llama_token * capacity)()
            n = lc.llama_tokenize(self.vocab, data, len(data), buf, capacity, add_special,
                                  parse_special)
        return list(buf[:n])

    def piece(self, token: int, special: bool = False) -> bytes:
        """The bytes a generated token adds to the output (control tokens add none unless
        `special`, which renders them as their text)."""
        buf = ctypes.create_string_buffer(64)
        n = lc.llama_token_to_piece(self.vocab, token, buf, 64, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = lc.llama_token_to_piece(self.vocab, token, buf, -n, 0, special)
        return buf.raw[:n]

    def special_piece(self, token: int) -> bytes:
        """A token's bytes with control tokens as their text (cached: logprobs ask often)."""
        cached = self._pieces.get(token)
        if cached is None:
            cached = self._pieces[token] = self.piece(token, special=True)
        return cached

    def output_piece(self, token: int) -> bytes:
        """`piece(token)`, cached: the scheduler asks for every generated token."""
        cached = self._output_pieces.get(token)
        if cached is None:
            cached = self._output_pieces[token] = self.piece(token)
        return cached

    def single_token(self, text: str) -> int | None:
        """The id of `text` if it is one token of the vocabulary (e.g. `<|im_end|>`)."""
        tokens = self.tokenize(text, parse_special=True)
        return tokens[0] if len(tokens) == 1 else None
