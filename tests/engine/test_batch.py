"""The batch planner and the ubatch count, without llama.cpp."""

from __future__ import annotations

import pytest

from server.engine.llama.batch import Entry, passes, plan_batch


def test_every_running_sequence_gets_one_row_and_prompts_share_the_rest() -> None:
    entries = plan_batch([(0, 3), (1, 1)], [(0, 0, 100), (1, 2, 100)], capacity=16)
    # seq 0's prompt takes what the two decode rows leave; seq 2's prompt waits
    assert [(e.seq_id, e.size, e.prefill) for e in entries] == [
        (0, 14, True), (1, 1, False), (3, 1, False)]
    assert sum(e.size for e in entries) == 16


def test_prompts_are_served_first_come_first_served_within_the_budget() -> None:
    entries = plan_batch([], [(0, 5, 10), (1, 2, 10), (2, 0, 10)], capacity=15)
    sizes = {e.seq_id: e.size for e in entries}
    assert sizes == {5: 10, 2: 5}  # the third prompt waits for the next step
    assert [e.seq_id for e in entries] == [2, 5]  # ascending sequence ids


def test_more_running_sequences_than_the_batch_holds_is_refused() -> None:
    with pytest.raises(ValueError, match="exceed a batch"):
        plan_batch([(k, k) for k in range(5)], [], capacity=4)


def test_consecutive_decode_rows_are_one_pass() -> None:
    assert passes([Entry(k, k, 1, False) for k in range(8)], 512) == 1


def test_a_gap_in_sequence_ids_or_a_prompt_chunk_splits_the_step() -> None:
    assert passes([Entry(0, 0, 1, False), Entry(1, 2, 1, False)], 512) == 2
    # the prompt's sequence takes one token beside the others, then the rest alone
    mixed = [Entry(0, 0, 1, False), Entry(1, 1, 1, False), Entry(0, 2, 100, True)]
    assert passes(mixed, 512) == 2
    assert passes(mixed, 512, sequential=False) == 1
    assert passes([Entry(0, 0, 600, True)], 512, sequential=False) == 2
    assert passes([], 512) == 0
