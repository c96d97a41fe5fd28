"""The batch planner and the ubatch count, without llama.cpp."""

from __future__ import annotations

import pytest

from server.engine.llama.batch import Entry, fill_gaps, passes, plan_batch


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


def decode_rows(*seq_ids: int) -> list[Entry]:
    return [Entry(k, s, 1, False) for k, s in enumerate(seq_ids)]


def test_fillers_close_the_gaps_between_running_sequences_into_one_pass() -> None:
    entries = decode_rows(0, 2, 5)
    assert passes(entries, 512) == 3
    filled = fill_gaps(entries, {1: 40, 3: 0, 4: 17, 6: 9}, 512, 512, widest=float("inf"))
    assert [(e.seq_id, e.filler) for e in filled] == [
        (0, False), (1, True), (2, False), (3, True), (4, True), (5, False)]
    # a filler sits at the position its sequence would take next; 6 is past the last: no row
    assert [(e.seq_id, e.key) for e in filled if e.filler] == [(1, 40), (3, 0), (4, 17)]
    assert passes(filled, 512) == 1


def test_a_gap_wider_than_a_pass_is_worth_stays() -> None:
    # on a CPU (widest 1) the gap of one is filled, the gap of two costs less as a pass
    filled = fill_gaps(decode_rows(0, 2, 5), {1: 0, 3: 0, 4: 0}, 512, 512, widest=1)
    assert [e.seq_id for e in filled] == [0, 1, 2, 5]
    assert passes(filled, 512) == 2


def test_a_gap_with_a_sequence_that_cannot_take_a_filler_stays() -> None:
    # 3 has no free cell: 0-2 and 4-5 are two passes instead of three
    filled = fill_gaps(decode_rows(0, 2, 4, 5), {1: 5, 6: 5}, 512, 512, widest=8)
    assert [e.seq_id for e in filled] == [0, 1, 2, 4, 5]
    assert passes(filled, 512) == 2
    # nothing to gain: the plan stays as it was
    assert fill_gaps(decode_rows(0, 2), {}, 512, 512, 8) == decode_rows(0, 2)
    assert fill_gaps(decode_rows(0, 1, 2), {5: 0}, 512, 512, 8) == decode_rows(0, 1, 2)
    assert fill_gaps(decode_rows(0, 2), {1: 0}, 512, 512, widest=0) == decode_rows(0, 2)


def test_fillers_fit_in_the_batch_or_are_left_out() -> None:
    # room for one more row only: 0,1,2 | 4 is still better than 0 | 2 | 4
    filled = fill_gaps(decode_rows(0, 2, 4), {1: 0, 3: 0}, capacity=4, n_ubatch=4, widest=8)
    assert [e.seq_id for e in filled] == [0, 1, 2, 4]
    assert fill_gaps(decode_rows(0, 2, 4), {1: 0, 3: 0}, 3, 3, 8) == decode_rows(0, 2, 4)
