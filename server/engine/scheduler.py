"""One scheduler thread per loaded model: it alone touches the llama.cpp context.

Each step decodes, in a single llama_decode, the next token of every running choice plus a chunk
of the prompt of any request still being read, then samples each choice with its native sampler
chain. Requests arrive through a queue and leave through their JobStream; a cancelled request
leaves the batch at the next step and its KV cells are freed.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque

import llama_cpp as lc

from server.engine.base import GenerationRequest, PromptTokens, TokenLogprob, is_token_ids
from server.engine.context import ContextConfig, context_params, create_context
from server.engine.jobs import Choice, Job, JobStream
from server.engine.logprobs import LogitReader
from server.engine.native import NativeModel, SamplerChain, check_grammar, grammar_sampler
from server.engine.slots import SlotPool
from server.engine.textstream import StopTextStream
from server.engine.vocab import check_tokens, read_prompt
from server.errors import (
    ContextLengthExceeded,
    EngineFailure,
    InvalidRequest,
    ServerOverloaded,
    ServerShuttingDown,
)
from server.metrics import Metrics, SchedulerMetrics
from server.prompts import Prompt

log = logging.getLogger("server.engine")

_WAKE = object()


class Scheduler:
    """Owns a model's llama_context and runs continuous batching on its own thread."""

    def __init__(self, model: NativeModel, config: ContextConfig, name: str,
                 metrics: Metrics) -> None:
        self.model = model
        self._metrics = SchedulerMetrics(metrics, name)
        self.config = config
        self.kv_cells = max(config.kv_cells, config.n_ctx)
        params = context_params(config)
        params.n_ctx = self.kv_cells
        params.n_batch = params.n_ubatch = config.batch_tokens
        params.n_seq_max = config.parallel
        params.kv_unified = config.kv_unified
        self.ctx = create_context(model, params, f"a context of {self.kv_cells} tokens; lower "
                                  "n_ctx or parallel")
        self._memory = lc.llama_get_memory(self.ctx)
        self._batch = lc.llama_batch_init(config.batch_tokens, 0, config.parallel)
        self._inbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._waiting: deque[Job] = deque()
        self._running: list[Job] = []
        self._slots = SlotPool(self._memory, config.parallel, share_cells=config.kv_unified)
        self._reserved = 0
        self._closing = False
        self._submitted = 0  # written by the event loop only
        self._dequeued = 0  # written by the scheduler thread only
        self._model_stop_tokens = self._stop_token_ids(config.stop)
        self._logits = LogitReader(self.ctx, model.n_vocab, model.special_piece)
        self._thread = threading.Thread(target=self._run, name=f"scheduler:{name}", daemon=True)
        self._thread.start()

    # ---- called from the event loop -------------------------------------------------------

    def tokenize(self, prompt: Prompt) -> list[int]:
        """The tokens the model reads for `prompt`: its segments, after a BOS if the model
        wants one and the prompt does not start with it."""
        return read_prompt(self.model, prompt)[0]

    def _prompt_tokens(self, request: GenerationRequest) -> tuple[list[int], bool]:
        """The request's prompt as tokens, and whether a BOS was added to it."""
        prompt = request.prompt
        if is_token_ids(prompt):
            check_tokens(self.model, prompt, "prompt")
            return list(prompt), False
        return read_prompt(self.model, prompt)

    def submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> JobStream:
        """Check `request` against the context, queue it, and return its event stream."""
        if self._closing:
            raise ServerShuttingDown("The server is shutting down; retry on another replica.")
        if self.waiting >= self.config.max_waiting:
            raise ServerOverloaded(
                f"{self.waiting} requests are already waiting for this model (the limit is "
                f"{self.config.max_waiting}); retry shortly.")
        if request.n > self.config.parallel:
            raise InvalidRequest(
                f"n={request.n} is more than this server decodes at once for a request "
                f"({self.config.parallel}); lower n or raise the 'parallel' setting.", param="n")
        tokens, bos_added = self._prompt_tokens(request)
        if not tokens:
            raise InvalidRequest("The prompt is empty; send at least one token of text.",
                                 param="prompt")
        room = self.config.n_ctx - len(tokens)
        wanted = request.max_tokens
        if room < (0 if wanted == 0 else 1) or (wanted is not None and wanted > room):
            raise ContextLengthExceeded(n_prompt_tokens=len(tokens), n_ctx=self.config.n_ctx,
                                        max_tokens=wanted)
        check_tokens(self.model, request.stop_tokens, "stop")
        if request.grammar is not None:
            check_grammar(self.model.vocab, request.grammar)
        stream = JobStream(loop, lambda: self._inbox.put(_WAKE))
        stop_tokens = self._model_stop_tokens | self._stop_token_ids(request.stop) | \
            frozenset(request.stop_tokens)
        job = Job(request, tokens, room if wanted is None else wanted, stop_tokens, stream,
                  bos_added=bos_added)
        if job.reservation > self.kv_cells:
            raise InvalidRequest(
                f"n={request.n} choices of up to {job.max_new} tokens after a "
                f"{len(tokens)}-token prompt need {job.reservation} KV cells; this model has "
                f"{self.kv_cells}. Lower n or max_tokens.", param="n")
        self._submitted += 1
        self._inbox.put(job)
        return stream

    @property
    def waiting(self) -> int:
        """Requests submitted and not yet running (or dropped)."""
        return self._submitted - self._dequeued

    def close(self) -> None:
        """Fail what is queued or running, stop the thread, free the context."""
        self._closing = True
        self._inbox.put(None)
        self._thread.join()
        lc.llama_batch_free(self._batch)
        lc.llama_free(self.ctx)

    # ---- the scheduler thread -------------------------------------------------------------

    def _stop_token_ids(self, stops: tuple[str, ...]) -> frozenset[int]:
        ids = (self.model.single_token(s) for s in stops if s)
        return frozenset(i for i in ids if i is not None)

    def _run(self) -> None:
        try:
            while self._receive():
                self._drop_cancelled()
                self._admit()
                if self._running:
                    self._step()
                self._report()
        except Exception as exc:  # pragma: no cover - a bug or a llama.cpp failure
            log.exception("scheduler crashed")
            self._fail_all(EngineFailure(f"The engine failed: {exc}"))
        else:
            self._fail_all(ServerShuttingDown("The server shut down before this request ran."))

    def _report(self) -> None:
        running = [c for job in self._running for c in job.choices if c.finish is None]
        held = sum(job.prefilled + len(c.fed) for job in self._running for c in job.choices
                   if c.finish is None) + self._slots.idle_cells()
        self._metrics.report(len(running), self.waiting, held, self.kv_cells)

    def _receive(self) -> bool:
        """Take new requests from the inbox, blocking while idle; False once closing."""
        block = not (self._running or self._waiting)
        while True:
            try:
                item = self._inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            if item is None:
                return False
            if isinstance(item, Job):
                self._waiting.append(item)

    def _drop_cancelled(self) -> None:
        for job in [j for j in self._waiting if j.stream.cancelled]:
            self._waiting.remove(job)
            self._dequeued += 1
            job.flush(final=True)
        for job in [j for j in self._running if j.stream.cancelled]:
            for choice in job.choices:
                if choice.finish is None:
                    choice.finish = "stop"
                    self._release_choice(job, choice)
            self._retire(job, notify=True)

    def _admit(self) -> None:
        while self._waiting:
            job = self._waiting[0]
            if len(self._slots.idle) < job.request.n or \
                    self._reserved + job.reservation > self.kv_cells:
                return
            self._waiting.popleft()
            self._dequeued += 1
            self._metrics.queue_wait.observe(time.perf_counter() - job.submitted)
            self._reserved += job.reservation
            # Prompt log-probabilities need the logits of every prompt position: no reuse.
            seq_ids, job.prefilled = self._slots.acquire(job.tokens, job.request.n,
                                                         reuse=not job.wants_prompt_logits)
            job.cached = job.prefilled
            self._slots.trim_idle(self.kv_cells - self._reserved)
            seed = job.request.sampling.seed
            grammar = job.request.grammar
            for index, seq_id in enumerate(seq_ids):
                choice_seed = None if seed is None else (seed + index) & 0x7FFFFFFF
                sampler = SamplerChain(job.request.sampling, self.model.n_vocab, choice_seed,
                                       grammar and grammar_sampler(self.model.vocab, grammar))
                sampler.prime(job.tokens)
                job.choices.append(Choice(index, seq_id, sampler,
                                          StopTextStream(self.config.stop + job.request.stop)))
            self._running.append(job)

    def _step(self) -> None:
        """Fill one batch, decode it, sample every choice that has logits in it."""
        # Each running choice's next token, then prompt chunks up to the batch size, first
        # come first served.
        decoding = [(job, c) for job in self._running if not job.prefilling
                    for c in job.choices if c.finish is None]
        budget = self.config.batch_tokens - len(decoding)
        chunks: list[tuple[Job, int]] = []
        for job in self._running:
            if job.prefilling and budget > 0:
                size = min(len(job.tokens) - job.prefilled, budget)
                chunks.append((job, size))
                budget -= size
        # In ascending sequence order: with a KV stream per sequence, llama.cpp decodes
        # consecutive sequence ids in one ubatch and splits the batch at every gap or reversal.
        entries: list[tuple[int, Job, Choice | None, int]] = \
            [(c.seq_id, job, c, 1) for job, c in decoding] + \
            [(job.choices[0].seq_id, job, None, size) for job, size in chunks]
        entries.sort(key=lambda entry: entry[0])
        rows: list[tuple[Job, Choice, int]] = []
        read: list[tuple[Job, int, int]] = []  # prompt chunks: (job, first position, batch row)
        n = 0
        for _, job, choice, size in entries:
            if choice is not None:
                self._put(n, choice.next_token, choice.pos, [choice.seq_id], True)
                choice.pos += 1
                choice.fed.append(choice.next_token)
                rows.append((job, choice, n))
                n += 1
            else:
                read.append((job, job.prefilled, n))
                n = self._put_prompt_chunk(job, n, size, rows)
        self._batch.n_tokens = n
        status = lc.llama_decode(self.ctx, self._batch)
        self._metrics.decoded(len(rows))
        if status != 0:
            self._fail_batch(rows, status)
            return
        for job, start, row in read:
            if job.request.echo:
                self._echo(job, range(start, job.prefilled), row)
            if not job.prefilling:
                self._share_prompt(job)
        self._sample(rows)
        for job in list(self._running):
            job.flush(final=job.done)
            if job.done:
                self._retire(job, notify=False)

    def _put(self, i: int, token: int, pos: int, seqs: list[int], logits: bool) -> None:
        batch = self._batch
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = len(seqs)
        for k, seq in enumerate(seqs):
            batch.seq_id[i][k] = seq
        batch.logits[i] = logits

    def _put_prompt_chunk(self, job: Job, n: int, size: int,
                          rows: list[tuple[Job, Choice, int]]) -> int:
        """Add the next `size` tokens of `job`'s prompt; its last token yields logits."""
        # Separate KV streams cannot share cells: the first choice reads the prompt and the
        # others get a copy of its stream once it is read (_share_prompt).
        seqs = [c.seq_id for c in job.choices] if self.config.kv_unified \
            else [job.choices[0].seq_id]
        end = job.prefilled + size
        every = job.wants_prompt_logits
        for pos in range(job.prefilled, end):
            last = pos == len(job.tokens) - 1
            self._put(n, job.tokens[pos], pos, seqs, last or every)
            if last:
                for choice in job.choices:
                    choice.pos = len(job.tokens)
                    rows.append((job, choice, n))
            n += 1
        job.prefilled = end
        return n

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
        rest = job.prompt_scores or [TokenLogprob(t, self.model.special_piece(t), None)
                                     for t in tokens[1:]]
        first = b"" if job.bos_added else self.model.special_piece(tokens[0])
        job.pending.append(PromptTokens((TokenLogprob(tokens[0], first, None), *rest)))

    def _sample(self, rows: list[tuple[Job, Choice, int]]) -> None:
        """Pick each row's next token (and its log-probability when the request asks)."""
        sampled = []
        for job, choice, index in rows:
            if job.max_new == 0:  # only reading the prompt (echo with max_tokens 0)
                self._finish(job, choice, "length")
            else:
                sampled.append((job, choice, index, choice.sampler.sample(self.ctx, index)))
        wanted = [s for s in sampled if s[0].request.logprobs is not None]
        for (_, choice, _, _), entry in zip(wanted, self._score_rows(wanted), strict=True):
            choice.logprobs.append(entry)
        for job, choice, _, token in sampled:
            self._advance(job, choice, token)

    def _score_rows(self, rows: list[tuple[Job, Choice, int, int]]) -> list[TokenLogprob]:
        return self._logits.score([r for _, _, r, _ in rows], [t for *_, t in rows],
                                  [job.request.logprobs or 0 for job, *_ in rows])

    def _share_prompt(self, job: Job) -> None:
        """After the prompt is read, every choice's sequence holds it (copied if needed)."""
        primary = job.choices[0]
        for choice in job.choices[1:]:
            if not self.config.kv_unified:
                lc.llama_memory_seq_cp(self._memory, primary.seq_id, choice.seq_id, -1, -1)
        for choice in job.choices:
            choice.has_prompt = True

    def _advance(self, job: Job, choice: Choice, token: int) -> None:
        """Account for a sampled token: emit its text or end the choice."""
        if self.model.is_eog(token) or token in job.stop_tokens:
            if choice.logprobs:  # the end token is reported (as vLLM does) but adds no text
                end = choice.logprobs[-1]
                choice.logprobs[-1] = TokenLogprob(end.token, b"", end.logprob, end.top)
            self._finish(job, choice, "stop")
            return
        choice.generated += 1
        job.emit_text(choice, choice.text.feed(self.model.piece(token)))
        if choice.text.stopped:
            self._finish(job, choice, "stop")
        elif choice.generated >= job.max_new or choice.pos >= self.config.n_ctx:
            self._finish(job, choice, "length")
        else:
            choice.next_token = token

    def _finish(self, job: Job, choice: Choice, reason: str) -> None:
        choice.finish = reason  # type: ignore[assignment]
        # Log-probabilities still held go out with the last text, unless a stop string cut
        # that text (their tokens made the stop string).
        job.emit_text(choice, choice.text.flush(), last=not choice.text.stopped)
        self._release_choice(job, choice)
        job.emit_finish(choice)

    def _release_choice(self, job: Job, choice: Choice) -> None:
        """Free the choice's sequence; its KV stays cached for a prompt that starts alike."""
        holds_prompt = choice.has_prompt or choice.index == 0 or self.config.kv_unified
        prompt = job.tokens[:job.prefilled] if holds_prompt else []
        self._slots.release(choice.seq_id, prompt + choice.fed)
        choice.sampler.close()

    def _retire(self, job: Job, notify: bool) -> None:
        self._running.remove(job)
        self._reserved -= job.reservation
        if notify:
            job.flush(final=True)

    def _fail_batch(self, rows: list[tuple[Job, Choice, int]], status: int) -> None:
        log.error("llama_decode failed with status %d", status)
        for job in {id(j): j for j, _, _ in rows}.values():
            for choice in job.choices:
                if choice.finish is None:
                    choice.finish = "stop"
                    choice.sampler.close()
                    self._slots.discard(choice.seq_id)
            job.pending = [EngineFailure(f"llama.cpp failed to decode (status {status}).")]
            self._retire(job, notify=True)

    def _fail_all(self, error: Exception) -> None:
        for job in list(self._running) + list(self._waiting):
            job.pending = [error]
            job.flush(final=True)
        self._running.clear()
        self._waiting.clear()
