"""The sequences of a llama.cpp context as slots that keep their KV for reuse (prefix caching).

A finished request leaves its tokens' KV in its slot. A new request takes the idle slot whose
cached tokens share the longest prefix with its prompt, keeps that prefix, and reads only the
rest: the next turn of a chat, or the same system prompt, skips re-reading what it shares.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

# Prefixes are indexed in blocks of this many tokens: finding the slot that shares the longest
# prefix with a prompt hashes the prompt once (O(prompt)) instead of comparing it with every
# slot's cache token by token in Python.
BLOCK = 64


class KvMemory(Protocol):
    """The two KV-cache operations the pool needs (llama.cpp's llama_memory_seq_rm/_cp)."""

    def remove(self, seq_id: int, start: int) -> None:
        """Drop the sequence's cells from position `start` on."""

    def copy(self, src: int, dst: int, end: int) -> None:
        """Share (or copy) `src`'s cells of positions [0, end) into `dst`."""


@dataclass(eq=False)
class Slot:
    seq_id: int
    cached: list[int] = field(default_factory=list)  # tokens in KV, from position 0
    busy: bool = False
    keys: list[int] = field(default_factory=list)  # chained hashes of cached's full blocks


def block_keys(tokens: list[int], limit: int | None = None) -> Iterator[int]:
    """Chained hashes of `tokens`' full blocks: key k identifies tokens[:BLOCK * (k + 1)]."""
    key = 0
    end = len(tokens) if limit is None else min(limit, len(tokens))
    for start in range(0, end - BLOCK + 1, BLOCK):
        key = hash((key, *tokens[start:start + BLOCK]))
        yield key


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of `a` and `b` (by halving: list comparisons run in C)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


# A cached prefix shorter than this (or than half the prompt) is not worth taking a slot out of
# order for: re-reading it costs less than splitting the batch.
MIN_REUSE = 32


class SlotPool:
    """Hands out sequence ids; owned and called by the scheduler thread only."""

    def __init__(self, memory: KvMemory, count: int, share_cells: bool) -> None:
        self._memory = memory
        self._slots = [Slot(seq_id) for seq_id in range(count)]
        self._share_cells = share_cells  # one unified KV cache: sequences can share cells
        self._index: dict[int, set[int]] = {}  # block key -> seq ids whose cache has it

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
        best = self._longest_prefix(prompt, idle)
        reused = min(common_prefix(best.cached, prompt), len(prompt) - 1)
        if not reuse or reused < min(MIN_REUSE, len(prompt) // 2):
            best, reused = idle[0], 0
        self._truncate(best, reused)
        taken = [best, *[s for s in idle if s is not best][:n - 1]]
        for slot in taken[1:]:
            self._truncate(slot, 0)
            if reused and self._share_cells:
                self._memory.copy(best.seq_id, slot.seq_id, reused)
                slot.cached = prompt[:reused]
        for slot in taken:
            slot.busy = True
        return [s.seq_id for s in taken], reused

    def _longest_prefix(self, prompt: list[int], idle: list[Slot]) -> Slot:
        """The idle slot whose cache shares the most full blocks with `prompt` (ties: the one
        that also shares more of the next block; then the lowest id)."""
        candidates = {s.seq_id for s in idle}
        depth = 0
        for key in block_keys(prompt):
            holders = self._index.get(key, set()) & candidates
            if not holders:
                break
            candidates, depth = holders, depth + 1
        # The candidates share `depth` blocks (hash-verified below): at most one more block
        # can match, so compare only that far.
        head = prompt[:(depth + 1) * BLOCK]
        ranked = [s for s in idle if s.seq_id in candidates]
        return max(ranked, key=lambda s: common_prefix(s.cached[:len(head)], head))

    def release(self, seq_id: int, in_kv: list[int]) -> None:
        """A sequence finished; its KV (`in_kv`, from position 0) stays for reuse."""
        slot = self._slots[seq_id]
        slot.busy, slot.cached = False, in_kv
        self._unindex(slot, 0)
        slot.keys = list(block_keys(in_kv))
        for key in slot.keys:
            self._index.setdefault(key, set()).add(seq_id)

    def _unindex(self, slot: Slot, keep_blocks: int) -> None:
        for key in slot.keys[keep_blocks:]:
            holders = self._index.get(key)
            if holders is not None:
                holders.discard(slot.seq_id)
                if not holders:
                    del self._index[key]
        del slot.keys[keep_blocks:]

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
        self._memory.remove(slot.seq_id, keep)
        slot.cached = slot.cached[:keep]
        self._unindex(slot, keep // BLOCK)
