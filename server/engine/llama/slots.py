"""The sequences of a llama.cpp context as slots that keep their KV for reuse (prefix caching).

A finished request leaves its tokens' KV in its slot. A new request takes the idle slot whose
cached tokens share the longest prefix with its prompt, keeps that prefix, and reads only the
rest: the next turn of a chat, or the same system prompt, skips re-reading what it shares.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from server.engine.llama.prefix import BLOCK, PrefixIndex, common_prefix
from server.engine.llama.prompt_cache import PromptCache

__all__ = ["BLOCK", "KvMemory", "SlotPool", "common_prefix"]

# A cached prefix shorter than this (or than half the prompt) is not worth taking a slot out of
# order for: re-reading it costs less than splitting the batch.
MIN_REUSE = 32


class KvMemory(Protocol):
    """The two KV-cache operations the pool needs (llama.cpp's llama_memory_seq_rm/_cp)."""

    def remove(self, seq_id: int, start: int) -> None:
        """Drop the sequence's cells from position `start` on."""

    def copy(self, src: int, dst: int, end: int) -> None:
        """Share (or copy) `src`'s cells of positions [0, end) into `dst`."""

    def state_size(self, seq_id: int) -> int:
        """Bytes of the sequence's state (llama_state_seq_get_size)."""

    def save(self, seq_id: int) -> bytearray:
        """The sequence's state (llama_state_seq_get_data)."""

    def restore(self, seq_id: int, data: bytearray) -> bool:
        """Replace the sequence's cells with a saved state; False if it could not."""


@dataclass(eq=False)
class Slot:
    seq_id: int
    cached: list[int] = field(default_factory=list)  # tokens in KV, from position 0
    busy: bool = False
    tag: str | None = None  # what `cached` was computed under (a LoRA adapter; None: base)


class SlotPool:
    """Hands out sequence ids; owned and called by the scheduler thread only."""

    def __init__(self, memory: KvMemory, count: int, share_cells: bool,
                 cache: PromptCache | None = None) -> None:
        self._memory = memory
        self._slots = [Slot(seq_id) for seq_id in range(count)]
        self._share_cells = share_cells  # one unified KV cache: sequences can share cells
        self._index: PrefixIndex[int] = PrefixIndex()  # over the slots' seq ids
        self._cache = cache

    @property
    def idle(self) -> list[Slot]:
        return [s for s in self._slots if not s.busy]

    def idle_cells(self) -> int:
        return sum(len(s.cached) for s in self.idle)

    def acquire(self, prompt: list[int], n: int, reuse: bool = True,
                tag: str | None = None) -> tuple[list[int], int]:
        """Take `n` idle slots for `prompt`, read under `tag`: (their seq ids, prompt tokens
        already in KV).

        The slot caching the longest prefix of the prompt (under the same tag) is reused when
        that prefix is worth it, or a saved state from the prompt cache restored when it holds
        more; otherwise the lowest free ids are taken, so that running sequences stay
        consecutive (llama.cpp decodes consecutive sequences of separate KV streams in one
        ubatch) and the caches in higher slots live longer. At least the prompt's last token is
        always decoded again, for its logits. Without shared cells only the first slot keeps
        the prefix; the scheduler copies the whole prompt to the others once it is read.
        """
        idle = self.idle  # in id order
        best, reused = self._longest_prefix(prompt, idle, tag) if reuse else (idle[0], 0)
        if reused < min(MIN_REUSE, len(prompt) // 2):
            best, reused = idle[0], 0
        restored = self._restore(prompt, tag, idle[0], reused) if reuse else None
        if restored is None:
            reused = min(reused, len(best.cached))  # a failed restore emptied idle[0]
            self._truncate(best, reused)
        else:
            best, reused = idle[0], restored
        taken = [best, *[s for s in idle if s is not best][:n - 1]]
        for slot in taken[1:]:
            self._truncate(slot, 0)
            if reused and self._share_cells:
                self._memory.copy(best.seq_id, slot.seq_id, reused)
                slot.cached = prompt[:reused]
        for slot in taken:
            slot.busy, slot.tag = True, tag
        return [s.seq_id for s in taken], reused

    def _longest_prefix(self, prompt: list[int], idle: list[Slot],
                        tag: str | None) -> tuple[Slot, int]:
        """The idle slot whose cache, made under `tag`, shares the most with `prompt` (ties:
        the lowest id), and how many tokens of the prompt it can skip."""
        same = {s.seq_id for s in idle if s.tag == tag and s.cached}
        if not same:
            return idle[0], 0
        candidates, depth = self._index.deepest(prompt, tag, same)
        head = prompt[:(depth + 1) * BLOCK]
        best = max((s for s in idle if s.seq_id in candidates),
                   key=lambda s: common_prefix(s.cached[:len(head)], head))
        return best, min(common_prefix(best.cached, prompt), len(prompt) - 1)

    def _restore(self, prompt: list[int], tag: str | None, target: Slot,
                 reused: int) -> int | None:
        """Restore into `target` the saved state sharing the most with `prompt` if it beats
        `reused` by a block or more; the prompt tokens it holds, or None."""
        if self._cache is None:
            return None
        found = self._cache.longest(prompt, tag)
        if found is None:
            return None
        saved, shared = found
        keep = min(shared, len(prompt) - 1)
        if keep < reused + BLOCK or keep < MIN_REUSE:
            return None
        data = self._cache.load(saved)  # first: saving the target's cache may evict it
        if data is None:
            return None
        self._truncate(target, 0)  # saves what it held first, if that is worth keeping
        if not self._memory.restore(target.seq_id, data):
            self._memory.remove(target.seq_id, 0)  # whatever a failed restore left
            return None
        target.cached, target.tag = list(saved.tokens), tag
        self._truncate(target, keep, save=False)
        self._cache.hits += 1
        self._cache.restored_tokens += keep
        return keep

    def release(self, seq_id: int, in_kv: list[int]) -> None:
        """A sequence finished; its KV (`in_kv`, from position 0) stays for reuse."""
        slot = self._slots[seq_id]
        slot.busy, slot.cached = False, in_kv
        self._index.put(seq_id, in_kv, slot.tag)

    def discard(self, seq_id: int) -> None:
        """Free a sequence and forget its KV (after a failed decode: never saved)."""
        slot = self._slots[seq_id]
        self._truncate(slot, 0, save=False)
        slot.busy = False

    def trim_idle(self, allowed_cells: int) -> None:
        """Evict idle caches, largest first, until they hold at most `allowed_cells`."""
        for slot in sorted(self.idle, key=lambda s: -len(s.cached)):
            if self.idle_cells() <= allowed_cells:
                return
            self._truncate(slot, 0)

    def persist(self) -> None:
        """Save every idle slot's cache to the prompt cache (before the context goes)."""
        for slot in self.idle:
            self._save(slot)

    def _truncate(self, slot: Slot, keep: int, save: bool = True) -> None:
        """Keep the slot's first `keep` cached tokens; what goes is saved to the prompt cache
        first (the whole cache: a state restores from position 0) when it is long enough."""
        if save and len(slot.cached) - keep >= self._min_saved():
            self._save(slot)
        self._memory.remove(slot.seq_id, keep)
        slot.cached = slot.cached[:keep]
        self._index.cut(slot.seq_id, keep // BLOCK)

    def _min_saved(self) -> float:
        return float("inf") if self._cache is None else max(self._cache.min_tokens, 1)

    def _save(self, slot: Slot) -> None:
        cache = self._cache
        if cache is None or cache.keeps(slot.cached, slot.tag) or \
                not cache.fits(self._memory.state_size(slot.seq_id)):
            return
        cache.put(slot.tag, slot.cached, self._memory.save(slot.seq_id))
