"""A llama_batch whose arrays are numpy buffers, so the scheduler fills rows in bulk."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

import llama_cpp as lc
import numpy as np


class BatchBuffer:
    """Room for `capacity` tokens, each in up to `max_seqs` sequences."""

    def __init__(self, capacity: int, max_seqs: int) -> None:
        self.capacity = capacity
        self.token = np.zeros(capacity, np.int32)
        self.pos = np.zeros(capacity, np.int32)
        self.n_seq_id = np.ones(capacity, np.int32)
        self.seq_ids = np.zeros((capacity, max_seqs), np.int32)
        self.logits = np.zeros(capacity, np.int8)
        i32 = ctypes.POINTER(ctypes.c_int32)
        rows = self.seq_ids.ctypes.data
        stride = self.seq_ids.strides[0]
        self._rows = (i32 * capacity)(*[ctypes.cast(rows + i * stride, i32)
                                        for i in range(capacity)])
        batch: Any = lc.llama_batch()
        self.batch = batch
        batch.token = self.token.ctypes.data_as(i32)
        batch.embd = None
        batch.pos = self.pos.ctypes.data_as(i32)
        batch.n_seq_id = self.n_seq_id.ctypes.data_as(i32)
        batch.seq_id = ctypes.cast(self._rows, ctypes.POINTER(i32))
        batch.logits = self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
        self.n = 0

    def clear(self) -> None:
        self.n = 0

    def add_tokens(self, tokens: Sequence[int] | np.ndarray[Any, Any], first_pos: int,
                   seqs: Sequence[int], logits: bool | str) -> int:
        """Append consecutive tokens of `seqs` from position `first_pos`; `logits` is True
        (every row), False, or "last". Returns the row of the first token."""
        start, count = self.n, len(tokens)
        end = start + count
        self.token[start:end] = tokens
        self.pos[start:end] = np.arange(first_pos, first_pos + count, dtype=np.int32)
        self.n_seq_id[start:end] = len(seqs)
        self.seq_ids[start:end, :len(seqs)] = seqs
        self.logits[start:end] = logits is True
        if logits == "last":
            self.logits[end - 1] = 1
        self.n = end
        return start

    def add_rows(self, tokens: Sequence[int], positions: Sequence[int],
                 seqs: Sequence[int]) -> int:
        """Append one token per sequence (the decode rows), each with logits."""
        start, end = self.n, self.n + len(tokens)
        self.token[start:end] = tokens
        self.pos[start:end] = positions
        self.n_seq_id[start:end] = 1
        self.seq_ids[start:end, 0] = seqs
        self.logits[start:end] = 1
        self.n = end
        return start

    def ready(self) -> Any:
        self.batch.n_tokens = self.n
        return self.batch
