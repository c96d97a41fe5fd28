"""One step's batch: the planned rows written into the llama_batch and, once llama_decode has
succeeded, committed to their sequences (a token is a sequence's only after its decode; a failed
decode commits nothing: see Scheduler._fail_batch). Filler rows (batch.fill_gaps) are written
too and their KV cells removed after the decode, whatever it returned."""

from __future__ import annotations

import itertools
from typing import Any

import llama_cpp as lc

from server.engine.base import PromptTokens, TokenLogprob
from server.engine.llama.batch import Entry, fill_gaps
from server.engine.llama.buffer import BatchBuffer
from server.engine.llama.jobs import Choice, Job
from server.engine.llama.logits import LogitReader
from server.engine.llama.native import NativeModel


class BatchRows:
    """Writes a plan (batch.plan_batch) into `buffer` and commits it after the decode."""

    def __init__(self, buffer: BatchBuffer, memory: Any, logits: LogitReader,
                 model: NativeModel, kv_unified: bool, n_ctx_seq: int) -> None:
        self._buffer = buffer
        self._memory = memory
        self._logits = logits
        self._model = model
        self._kv_unified = kv_unified
        self._n_ctx_seq = n_ctx_seq  # cells in each sequence's KV stream
        self._fillers: list[Entry] = []  # those fill() wrote, until drop_fillers()

    def close_gaps(self, entries: list[Entry], widest: float) -> list[Entry]:
        """The plan with fillers in the gaps of at most `widest` sequences between planned ones
        (batch.fill_gaps): separate KV streams then decode in fewer passes over the weights."""
        if not entries or entries[-1].seq_id - entries[0].seq_id < len(entries):  # no gap
            return entries
        free = {}
        for left, right in itertools.pairwise(entries):
            if right.seq_id - left.seq_id - 1 <= widest:
                for seq in range(left.seq_id + 1, right.seq_id):
                    # an idle slot's cache, or a waiting sequence: its positions run from 0
                    position = lc.llama_memory_seq_pos_max(self._memory, seq) + 1
                    if position < self._n_ctx_seq:
                        free[seq] = position
        capacity = self._buffer.capacity
        return fill_gaps(entries, free, capacity, capacity, widest)

    def drop_fillers(self) -> None:
        """Remove the KV cells of the fillers fill() wrote (after the decode, whatever it
        returned)."""
        for entry in self._fillers:
            lc.llama_memory_seq_rm(self._memory, entry.seq_id, entry.key, -1)
        self._fillers.clear()

    def fill(self, entries: list[Entry], decoding: list[Choice],
             prefilling: list[Job]) -> list[tuple[Job, Choice, int]]:
        """Write the planned tokens into the batch; the rows whose logits get sampled."""
        buffer = self._buffer
        buffer.clear()
        rows: list[tuple[Job, Choice, int]] = []
        run: list[Choice] = []  # consecutive decode rows, written together

        def flush_run() -> None:
            if run:
                first = buffer.add_rows([c.next_token for c in run], [c.pos for c in run],
                                        [c.seq_id for c in run])
                rows.extend((c.job, c, first + k) for k, c in enumerate(run))
                run.clear()

        for entry in entries:
            if not entry.prefill and entry.size == 1 and not entry.filler:
                run.append(decoding[entry.key])
                continue
            flush_run()
            if entry.filler:  # any token: no logits, and its cell goes after the decode
                buffer.add_tokens([0], entry.key, [entry.seq_id], False)
                self._fillers.append(entry)
                continue
            if not entry.prefill:  # the next token and its drafts, each with logits
                c = decoding[entry.key]
                draft = c.spec.draft if c.spec else []
                rows.append((c.job, c, buffer.add_tokens([c.next_token, *draft], c.pos,
                                                         [c.seq_id], True)))
                continue
            job = prefilling[entry.key]
            # Separate KV streams cannot share cells: the first choice reads the prompt and
            # the others get a copy of its stream once it is read (_share_prompt).
            seqs = [c.seq_id for c in job.choices] if self._kv_unified \
                else [job.choices[0].seq_id]
            end = job.prefilled + entry.size
            last = end == len(job.tokens)
            logits: bool | str = True if job.wants_prompt_logits else ("last" if last else False)
            first = buffer.add_tokens(job.tokens[job.prefilled:end], job.prefilled, seqs, logits)
            job.chunk_row = first
            if last:
                rows.extend((job, c, first + entry.size - 1) for c in job.choices)
        flush_run()
        return rows

    def commit(self, entries: list[Entry], decoding: list[Choice],
               prefilling: list[Job]) -> None:
        """The decode succeeded: the batch's tokens now belong to their sequences."""
        for entry in entries:
            if entry.filler:
                continue
            if not entry.prefill:
                choice = decoding[entry.key]
                choice.fed.append(choice.next_token)
                choice.pos += 1
                continue
            job = prefilling[entry.key]
            start = job.prefilled
            job.prefilled += entry.size
            if job.request.echo:
                self._echo(job, range(start, job.prefilled), job.chunk_row)
            if not job.prefilling:
                for choice in job.choices:
                    choice.pos = len(job.tokens)
                self._share_prompt(job)

    def _echo(self, job: Job, positions: range, first_row: int) -> None:
        """Score the prompt tokens that follow `positions` (read into batch rows from
        `first_row` on) if asked; once the whole prompt is read, send its tokens."""
        tokens, top = job.tokens, job.request.prompt_logprobs
        if top is not None:
            # A position's logits are the distribution of the token after it.
            ahead = [p for p in positions if p + 1 < len(tokens)]
            job.prompt_scores += self._logits.score(
                [first_row + p - positions.start for p in ahead],
                [tokens[p + 1] for p in ahead], [top] * len(ahead))
        if job.prefilling:
            return
        # Without log-probabilities (or with a prompt of one token) the rest is just tokens.
        rest = job.prompt_scores or [TokenLogprob(t, self._model.special_piece(t), None)
                                     for t in tokens[1:]]
        first = b"" if job.bos_added else self._model.special_piece(tokens[0])
        job.pending.append(PromptTokens((TokenLogprob(tokens[0], first, None), *rest)))

    def _share_prompt(self, job: Job) -> None:
        """After the prompt is read, every choice's sequence holds it (copied if needed)."""
        primary = job.choices[0]
        for choice in job.choices[1:]:
            if not self._kv_unified:
                lc.llama_memory_seq_cp(self._memory, primary.seq_id, choice.seq_id, -1, -1)
        for choice in job.choices:
            choice.has_prompt = True
