"""The sequences of a llama.cpp context as slots that keep their KV for reuse (prefix caching).

A finished request leaves its tokens' KV in its slot. A new request takes the idle slot whose
cached tokens share the longest prefix with its prompt, keeps that prefix, and reads only the
rest: the next turn of a chat, or the same system prompt, skips re-reading what it shares.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import llama_cpp as lc


@dataclass(eq=False)
class Slot:
    seq_id: int
    cached: list[int] = field(default_factory=list)  # tokens in KV, from position 0
    busy: bool = False


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


# A cached prefix shorter than this (or than half the prompt) is not worth taking a slot out of
# order for: re-reading it costs less than splitting the batch.
MIN_REUSE = 32


class SlotPool:
    """Hands out sequence ids; owned and called by the scheduler thread only."""

    def __init__(self, memory: Any, count: int, share_cells: bool) -> None:
        self._memory = memory
        self._slots = [Slot(seq_id) for seq_id in range(count)]
        self._share_cells = share_cells  # one unified KV cache: sequences can share cells

    @property
    def idle(self) -> list[Slot]:
        return [s for s in self._slots if not s.busy]

    def idle_cells(self) -> int:
        return sum(len(s.cached) for s in self.idle)

    def acquire(self, prompt: list[int], n: int, reuse: bool = True) -> tuple[list[int], int]:
        """Take `n` idle slots for `prompt`: (their seq ids, prompt tokens already in KV).

        The slot caching the longest prefix of the prompt is reused when that prefix is worth
        it; otherwise the lowest free ids are taken, so that running sequences stay
        consecutive (llama.cpp decodes consecutive sequences of separate KV streams in one
        ubatch) and the caches in higher slots live longer. At least the prompt's last token is
        always decoded again, for its logits. Without shared cells only the first slot keeps
        the prefix; the scheduler copies the whole prompt to the others once it is read.
        """
        idle = self.idle  # in id order
        best = max(idle, key=lambda s: common_prefix(s.cached, prompt))
        reused = min(common_prefix(best.cached, prompt), len(prompt) - 1)
        if not reuse or reused < min(MIN_REUSE, len(prompt) // 2):
            best, reused = idle[0], 0
        self._truncate(best, reused)
        taken = [best, *[s for s in idle if s is not best][:n - 1]]
        for slot in taken[1:]:
            self._truncate(slot, 0)
            if reused and self._share_cells:
                lc.llama_memory_seq_cp(self._memory, best.seq_id, slot.seq_id, 0, reused)
                slot.cached = prompt[:reused]
        for slot in taken:
            slot.busy = True
        return [s.seq_id for s in taken], reused

    def release(self, seq_id: int, in_kv: list[int]) -> None:
        """A sequence finished; its KV (`in_kv`, from position 0) stays for reuse."""
        slot = self._slots[seq_id]
        slot.busy, slot.cached = False, in_kv

    def discard(self, seq_id: int) -> None:
        """Free a sequence and forget its KV (after a failed decode)."""
        slot = self._slots[seq_id]
        self._truncate(slot, 0)
        slot.busy = False

    def trim_idle(self, allowed_cells: int) -> None:
        """Evict idle caches, largest first, until they hold at most `allowed_cells`."""
        for slot in sorted(self.idle, key=lambda s: -len(s.cached)):
            if self.idle_cells() <= allowed_cells:
                return
            self._truncate(slot, 0)

    def _truncate(self, slot: Slot, keep: int) -> None:
        lc.llama_memory_seq_rm(self._memory, slot.seq_id, keep, -1)
        slot.cached = slot.cached[:keep]
