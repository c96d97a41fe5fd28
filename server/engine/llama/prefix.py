"""Finding which cached token lists share the longest prefix with a prompt, in O(prompt)."""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

# Prefixes are indexed in blocks of this many tokens: finding the holder that shares the
# longest prefix with a prompt hashes the prompt once (O(prompt)) instead of comparing it with
# every cache token by token in Python.
BLOCK = 64

H = TypeVar("H", bound=Hashable)


def block_keys(tokens: list[int], tag: Hashable = None) -> Iterator[int]:
    """Chained hashes of `tokens`' full blocks: key k identifies tokens[:BLOCK * (k + 1)]
    computed under `tag` (a LoRA adapter: the same tokens under another give other KV)."""
    key = 0 if tag is None else hash(("tag", tag))
    for start in range(0, len(tokens) - BLOCK + 1, BLOCK):
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


class PrefixIndex(Generic[H]):
    """Block keys → the holders (slots, saved states) whose tokens have them."""

    def __init__(self) -> None:
        self._holders: dict[int, set[H]] = {}
        self._keys: dict[H, list[int]] = {}

    def put(self, holder: H, tokens: list[int], tag: Hashable) -> None:
        """`holder` now holds `tokens` (computed under `tag`)."""
        self.cut(holder, 0)
        keys = self._keys[holder] = list(block_keys(tokens, tag=tag))
        for key in keys:
            self._holders.setdefault(key, set()).add(holder)

    def cut(self, holder: H, keep_blocks: int) -> None:
        """`holder` keeps only its first `keep_blocks` full blocks."""
        keys = self._keys.get(holder, [])
        for key in keys[keep_blocks:]:
            holders = self._holders.get(key)
            if holders is not None:
                holders.discard(holder)
                if not holders:
                    del self._holders[key]
        del keys[keep_blocks:]

    def drop(self, holder: H) -> None:
        self.cut(holder, 0)
        self._keys.pop(holder, None)

    def deepest(self, prompt: list[int], tag: Hashable, among: set[H]) -> tuple[set[H], int]:
        """The holders in `among` that share the most full blocks with `prompt`, and how many
        (0: all of `among`). At most one more block can match: compare only that far."""
        candidates, depth = among, 0
        for key in block_keys(prompt, tag=tag):
            holders = self._holders.get(key, set()) & candidates
            if not holders:
                break
            candidates, depth = holders, depth + 1
        return candidates, depth
