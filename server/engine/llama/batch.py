"""Planning one llama_decode: which sequences put how many tokens into the batch, in what order.

Pure logic, no llama.cpp: the scheduler turns a plan into batch rows. With a KV stream per
sequence, llama.cpp splits a batch into passes over the weights (ubatches) of consecutive,
ascending sequence ids that each take the same number of tokens per sequence
(`llama_batch_allocr::split_equal(sequential=true)`); `passes()` counts them, so the plan keeps
running sequences consecutive and the metrics can show how often a step was split, and
`fill_gaps()` closes the gaps that idle or waiting sequences leave between running ones.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Entry:
    """`size` tokens of sequence `seq_id` for the caller's item `key` (a running choice: its
    next token and any draft tokens to verify; or the next chunk of a prompt). A `filler` is
    one placeholder token, at position `key`, of a sequence that is not in the step."""

    key: int
    seq_id: int
    size: int
    prefill: bool
    filler: bool = False


def plan_batch(decoding: Sequence[tuple[int, int]], prefilling: Sequence[tuple[int, int, int]],
               capacity: int, drafted: Mapping[int, int] | None = None) -> list[Entry]:
    """Every decoding `(key, seq_id)` gets one token, plus `drafted[key]` draft tokens; prompts
    `(key, seq_id, remaining)` share what is left of `capacity`, first come first served;
    ordered by ascending sequence id."""
    if len(decoding) > capacity:
        raise ValueError(f"{len(decoding)} running sequences exceed a batch of {capacity}")
    drafted = drafted or {}
    entries = [Entry(key, seq, 1 + drafted.get(key, 0), False) for key, seq in decoding]
    budget = capacity - sum(e.size for e in entries)
    for key, seq, remaining in prefilling:
        if budget <= 0:
            break
        size = min(remaining, budget)
        entries.append(Entry(key, seq, size, True))
        budget -= size
    entries.sort(key=lambda e: e.seq_id)
    return entries


def passes(entries: Sequence[Entry], n_ubatch: int, sequential: bool = True) -> int:
    """How many ubatches llama.cpp makes of `entries` (ordered as planned)."""
    if len(entries) <= 1:
        return len(entries) if not entries or entries[0].size <= n_ubatch else \
            -(-entries[0].size // n_ubatch)
    if not sequential:  # one KV cache for all: plain splits of n_ubatch tokens
        total = sum(e.size for e in entries)
        return -(-total // n_ubatch)
    left = {e.seq_id: e.size for e in entries}
    order = [e.seq_id for e in entries]
    count = 0
    while left:
        run = [order[0]]
        for seq in order[1:]:
            if seq == run[-1] + 1 and len(run) < n_ubatch:
                run.append(seq)
            elif seq != run[-1] + 1:
                break
        each = max(1, min(min(left[s] for s in run), n_ubatch // len(run)))
        for seq in run:
            left[seq] -= each
            if left[seq] <= 0:
                del left[seq]
        order = [s for s in order if s in left]
        count += 1
    return count


def fill_gaps(entries: Sequence[Entry], free: Mapping[int, int], capacity: int,
              n_ubatch: int, widest: float) -> list[Entry]:
    """`entries` (as planned) with fillers in the gaps between planned sequences, where that
    saves passes: a gap of at most `widest` sequences, each of which can take one (`free`: its
    next position).

    Planned sequences 0, 2 and 5 take three passes over the weights; with fillers in 1, 3 and
    4 they take one. Each gap filled saves a pass for as many rows as the gap is wide: on a GPU
    a pass costs about a whole step and a row next to nothing (any width pays); on a CPU a row
    costs about as much as the fixed part of a pass (a gap of one, at most). The caller removes
    a filler's KV cell after the decode.
    """
    room = capacity - sum(e.size for e in entries)
    fillers: list[Entry] = []
    for left, right in itertools.pairwise(entries):
        gap = range(left.seq_id + 1, right.seq_id)
        if 0 < len(gap) <= min(widest, room - len(fillers)) and all(s in free for s in gap):
            fillers += [Entry(free[s], s, 1, False, filler=True) for s in gap]
    if not fillers:
        return list(entries)
    filled = sorted([*entries, *fillers], key=lambda e: e.seq_id)
    return filled if passes(filled, n_ubatch) < passes(entries, n_ubatch) else list(entries)
