"""The prompt cache without llama.cpp: what the slot pool saves when it evicts, what it restores,
its bounds, adapters kept apart, and the disk store across a restart."""

from __future__ import annotations

import pickle
import random
from pathlib import Path

from server.engine.llama.prefix import BLOCK
from server.engine.llama.prompt_cache import PromptCache, PromptCacheConfig
from server.engine.llama.slots import SlotPool

MIN = 2 * BLOCK


class Kv:
    """Each sequence's tokens, as llama.cpp's KV would hold them; states are their pickles."""

    def __init__(self, seqs: int, fail_restore: bool = False) -> None:
        self.seqs: list[list[int]] = [[] for _ in range(seqs)]
        self.saves = 0
        self.fail_restore = fail_restore

    def remove(self, seq_id: int, start: int) -> None:
        del self.seqs[seq_id][start:]

    def copy(self, src: int, dst: int, end: int) -> None:
        self.seqs[dst] = self.seqs[src][:end]

    def state_size(self, seq_id: int) -> int:
        return len(pickle.dumps(self.seqs[seq_id]))

    def save(self, seq_id: int) -> bytearray:
        self.saves += 1
        return bytearray(pickle.dumps(self.seqs[seq_id]))

    def restore(self, seq_id: int, data: bytearray) -> bool:
        if self.fail_restore:
            self.seqs[seq_id] = [-1]  # a failed restore may leave anything behind
            return False
        self.seqs[seq_id] = pickle.loads(bytes(data))
        return True


def run(pool: SlotPool, kv: Kv, prompt: list[int], out: int = 3,
        tag: str | None = None) -> tuple[int, int]:
    """One request through the pool, as the scheduler drives it: (its seq id, tokens reused)."""
    (seq,), reused = pool.acquire(prompt, 1, tag=tag)
    assert kv.seqs[seq] == prompt[:reused]  # what the pool says is in KV is in KV
    generated = [7] * out
    kv.seqs[seq] = prompt + generated
    pool.release(seq, prompt + generated)
    return seq, reused


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000, 50_000) for _ in range(n)]


def cache(ram: int = 1 << 30, directory: Path | None = None,
          fingerprint: str = "f") -> PromptCache:
    return PromptCache(PromptCacheConfig(ram_bytes=ram, min_tokens=MIN, disk_dir=directory,
                                         disk_bytes=1 << 30), fingerprint)


def test_a_document_evicted_from_its_slot_is_restored_for_the_next_conversation() -> None:
    kv, store = Kv(2), cache()
    pool = SlotPool(kv, 2, share_cells=False, cache=store)
    document = tokens(2000, 0)
    run(pool, kv, [*document, 1, 2, 3])
    for k in range(4):  # four other conversations pass through both slots
        run(pool, kv, tokens(1000, k + 1))
    assert all(document[:100] != s[:100] for s in kv.seqs)  # no slot holds it any more
    _seq, reused = run(pool, kv, [*document, 4, 5])
    assert reused == len(document)
    assert store.hits == 1 and store.restored_tokens == len(document)


def test_without_a_cache_the_document_is_read_again() -> None:
    kv = Kv(2)
    pool = SlotPool(kv, 2, share_cells=False)
    document = tokens(2000, 0)
    run(pool, kv, [*document, 1])
    for k in range(4):
        run(pool, kv, tokens(1000, k + 1))
    assert run(pool, kv, [*document, 4])[1] == 0


def test_short_caches_are_not_saved_and_a_slots_own_prefix_wins() -> None:
    kv, store = Kv(1), cache()
    pool = SlotPool(kv, 1, share_cells=False, cache=store)
    run(pool, kv, tokens(MIN - 10, 0))
    run(pool, kv, tokens(500, 1))  # evicts a cache shorter than MIN: nothing saved
    assert kv.saves == 0 and len(store) == 0
    long = tokens(500, 1)
    assert run(pool, kv, [*long, 9])[1] == 500  # its own slot still has it: no restore
    assert store.hits == 0


def test_a_restore_must_beat_the_slots_own_prefix_by_a_block() -> None:
    kv, store = Kv(2), cache()
    pool = SlotPool(kv, 2, share_cells=False, cache=store)
    document = tokens(1000, 0)
    run(pool, kv, document + tokens(400, 5))  # slot 0: document + a long tail
    run(pool, kv, tokens(600, 1))  # slot 0 again (lowest id): document + tail saved
    assert len(store) == 1
    # slot 0 now holds the 600-token prompt; a prompt sharing 1,200 tokens with the saved
    # state restores it into the lowest idle slot
    _seq, reused = run(pool, kv, document + tokens(400, 5)[:200] + [1])
    assert reused == 1200 and store.hits == 1


def test_caches_under_different_adapters_are_never_shared() -> None:
    kv, store = Kv(2), cache()
    pool = SlotPool(kv, 2, share_cells=False, cache=store)
    document = tokens(1000, 0)
    run(pool, kv, [*document, 1], tag="sql")
    assert run(pool, kv, [*document, 2])[1] == 0  # the base model: not the adapter's KV
    assert run(pool, kv, [*document, 3], tag="sql")[1] == 1000
    for k in range(3):
        run(pool, kv, tokens(700, 10 + k))  # evict both
    assert run(pool, kv, [*document, 4], tag="other")[1] == 0
    assert run(pool, kv, [*document, 5], tag="sql")[1] == 1000
    assert run(pool, kv, [*document, 6])[1] == 1000  # the base's own saved state


def test_the_ram_bound_drops_the_least_recently_used_state() -> None:
    kv = Kv(1)
    size = len(pickle.dumps(tokens(503, 0)))
    store = cache(ram=int(2.5 * size))
    pool = SlotPool(kv, 1, share_cells=False, cache=store)
    docs = [tokens(500, k) for k in range(4)]
    for doc in docs:
        run(pool, kv, doc)
    run(pool, kv, tokens(300, 99))  # evicts docs[3]: states of docs 1..3 fit, docs[0] goes
    assert len(store) == 2 and store.ram_used <= 2.5 * size
    assert run(pool, kv, docs[0] + [1])[1] == 0
    assert run(pool, kv, docs[3] + [1])[1] == 500


def test_a_longer_state_replaces_the_prefixes_it_covers() -> None:
    kv, store = Kv(1), cache()
    pool = SlotPool(kv, 1, share_cells=False, cache=store)
    document = tokens(600, 0)
    run(pool, kv, document, out=0)
    run(pool, kv, tokens(600, 1))  # the document saved
    run(pool, kv, document + tokens(500, 2))  # restored, extended
    run(pool, kv, tokens(600, 3))  # the extended one saved: it covers the document
    states = sorted(len(s.tokens) for s in store._entries)
    assert states == [603, 1103]  # tokens(600, 1) + 3 is there; the document alone is gone


def test_a_failed_restore_falls_back_to_reading_the_prompt() -> None:
    kv, store = Kv(1, fail_restore=True), cache()
    pool = SlotPool(kv, 1, share_cells=False, cache=store)
    document = tokens(600, 0)
    run(pool, kv, document)
    run(pool, kv, tokens(600, 1))
    assert run(pool, kv, [*document, 1])[1] == 0  # and the KV it says is empty is empty


def test_states_on_disk_outlive_the_process(tmp_path: Path) -> None:
    kv, store = Kv(1), cache(ram=0, directory=tmp_path)
    pool = SlotPool(kv, 1, share_cells=False, cache=store)
    document = tokens(700, 0)
    run(pool, kv, document)
    pool.persist()  # at shutdown: the slot's cache
    store.close()
    assert len(list(tmp_path.glob("*.kv"))) == 1

    kv, store = Kv(1), cache(ram=0, directory=tmp_path)  # a restart
    pool = SlotPool(kv, 1, share_cells=False, cache=store)
    assert run(pool, kv, [*document, 1])[1] == 700
    store.close()
    other = cache(directory=tmp_path, fingerprint="another model")  # not this model's
    assert len(other) == 0
    other.close()


def test_a_state_larger_than_the_cache_is_not_saved() -> None:
    kv = Kv(1)
    store = cache(ram=len(pickle.dumps(tokens(400, 0))))
    pool = SlotPool(kv, 1, share_cells=False, cache=store)
    run(pool, kv, tokens(300, 1))
    run(pool, kv, tokens(500, 2))  # the first fits: saved
    run(pool, kv, tokens(300, 3))  # the second does not: skipped, the first stays
    assert kv.saves == 1 and len(store) == 1  # (the size is asked first: no copy made)
    assert run(pool, kv, [*tokens(300, 1), 5])[1] == 300


def test_the_disk_bound_deletes_the_oldest_files(tmp_path: Path) -> None:
    size = len(pickle.dumps(tokens(503, 0)))
    store = PromptCache(PromptCacheConfig(ram_bytes=0, min_tokens=MIN, disk_dir=tmp_path,
                                          disk_bytes=int(1.5 * size)), "f")
    kv = Kv(1)
    pool = SlotPool(kv, 1, share_cells=False, cache=store)
    for k in range(3):
        run(pool, kv, tokens(500, k))
    run(pool, kv, tokens(300, 9))
    store.close()
    assert len(list(tmp_path.glob("*.kv"))) == 1 == len(store)
    assert not list(tmp_path.glob("*.part"))


def test_a_damaged_file_is_dropped_and_the_prompt_read_again(tmp_path: Path) -> None:
    kv, store = Kv(1), cache(ram=0, directory=tmp_path)
    pool = SlotPool(kv, 1, share_cells=False, cache=store)
    document = tokens(700, 0)
    run(pool, kv, document)
    pool.persist()
    store.close()
    (saved,) = tmp_path.glob("*.kv")
    saved.write_bytes(saved.read_bytes()[:-10])  # cut short (a full disk, another writer)

    kv, store = Kv(1), cache(ram=0, directory=tmp_path)
    pool = SlotPool(kv, 1, share_cells=False, cache=store)
    assert len(store) == 1  # the header still reads
    assert run(pool, kv, [*document, 1])[1] == 0  # but its state does not: read again
    store.close()
    assert not saved.exists() and len(store) == 0


def test_a_failed_restore_into_a_slot_that_shared_a_prefix_claims_nothing() -> None:
    kv, store = Kv(1, fail_restore=True), cache()
    pool = SlotPool(kv, 1, share_cells=False, cache=store)
    document, tail = tokens(1000, 0), tokens(400, 1)
    run(pool, kv, document + tail)
    run(pool, kv, document[:100] + tokens(600, 2))  # keeps 100 tokens; the rest is saved
    # the slot shares 100 tokens, the saved state 1,200: its restore is tried, and fails
    assert run(pool, kv, document + tail[:200])[1] == 0  # (run checks the KV holds that)
