"""Prefix reuse across slots, without llama.cpp: the pool's choices and its KV operations."""

from __future__ import annotations

import random

from server.engine.llama.slots import BLOCK, SlotPool, common_prefix


class Memory:
    """Records the pool's KV operations."""

    def __init__(self) -> None:
        self.ops: list[tuple[str, int, int]] = []

    def remove(self, seq_id: int, start: int) -> None:
        self.ops.append(("rm", seq_id, start))

    def copy(self, src: int, dst: int, end: int) -> None:
        self.ops.append(("cp", src, end))


def test_common_prefix() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix(list(range(1000)), list(range(1000))) == 1000
    assert common_prefix(list(range(1000)), [*range(777), -1]) == 777


def test_the_slot_sharing_the_longest_prefix_is_reused_among_many() -> None:
    rng = random.Random(1)
    system = [rng.randrange(50_000) for _ in range(5 * BLOCK)]
    pool = SlotPool(Memory(), 64, share_cells=False)
    for seq in range(64):
        pool.acquire([seq + 1, 2, 3], 1)
    for seq in range(64):  # each slot caches the system prompt and a different tail
        cut = (seq * 7) % (5 * BLOCK)
        pool.release(seq, system[:cut] + [90_000 + seq] * 40)
    best = max(range(64), key=lambda s: (s * 7) % (5 * BLOCK))
    prompt = [*system, 1, 2, 3]
    (seq_id,), reused = pool.acquire(prompt, 1)
    assert seq_id == best
    assert reused == (best * 7) % (5 * BLOCK)


def test_a_prefix_shorter_than_a_block_is_found_too() -> None:
    pool = SlotPool(Memory(), 4, share_cells=False)
    for seq in range(4):
        pool.acquire([seq], 1)
    for seq in range(4):
        pool.release(seq, [7] * (40 + seq) + [100 + seq] * 50)
    (seq_id,), reused = pool.acquire([7] * 60 + [1], 1)
    assert (seq_id, reused) == (3, 43)


def test_truncating_a_slot_forgets_its_blocks() -> None:
    memory = Memory()
    pool = SlotPool(memory, 2, share_cells=False)
    prompt = list(range(3 * BLOCK + 5))
    pool.acquire([1], 1)
    pool.release(0, prompt)
    pool.trim_idle(0)  # evicts slot 0's cache
    assert ("rm", 0, 0) in memory.ops
    (seq_id,), reused = pool.acquire(prompt, 1)
    assert reused == 0 and seq_id == 0


def test_the_prompts_last_token_is_always_read_again() -> None:
    pool = SlotPool(Memory(), 1, share_cells=False)
    prompt = list(range(2 * BLOCK))
    pool.acquire([1], 1)
    pool.release(0, [*prompt, 5, 6])
    _, reused = pool.acquire(prompt, 1)
    assert reused == len(prompt) - 1
