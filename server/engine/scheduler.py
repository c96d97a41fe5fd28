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
from dataclasses import dataclass
from typing import Any

import llama_cpp as lc

from server.engine.base import GenerationRequest
from server.engine.jobs import Choice, Job, JobStream
from server.engine.native import NativeModel, SamplerChain
from server.engine.slots import SlotPool
from server.engine.textstream import StopTextStream
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

_ROPE_SCALING = {"none": 0, "linear": 1, "yarn": 2}
_WAKE = object()


@dataclass(frozen=True)
class ContextConfig:
    """How a model's llama.cpp context is sized and tuned."""

    n_ctx: int  # tokens one request may hold (prompt + output)
    parallel: int  # sequences decoded together
    batch_tokens: int
    threads: int
    rope: dict[str, Any]
    stop: tuple[str, ...] = ()
    kv_cells: int = 0  # KV budget in tokens for all sequences; at least n_ctx
    max_waiting: int = 256  # requests queued for a slot before new ones get a 503
    # One KV cache shared by all sequences (n > 1 shares the prompt's cells), or one stream
    # per sequence (attention spans only the sequence's own cells: faster prefill; n > 1
    # copies the prompt's stream).
    kv_unified: bool = False


class Scheduler:
    """Owns a model's llama_context and runs continuous batching on its own thread."""

    def __init__(self, model: NativeModel, config: ContextConfig, name: str,
                 metrics: Metrics) -> None:
        self.model = model
        self._metrics = SchedulerMetrics(metrics, name)
        self.config = config
        self.kv_cells = max(config.kv_cells, config.n_ctx)
        self.ctx = self._new_context()
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
        self._thread = threading.Thread(target=self._run, name=f"scheduler:{name}", daemon=True)
        self._thread.start()

    # ---- called from the event loop -------------------------------------------------------

    def tokenize(self, prompt: Prompt) -> list[int]:
        tokens: list[int] = []
        for segment in prompt:
            tokens += self.model.tokenize(segment.text, parse_special=segment.special)
        if self.model.add_bos and self.model.bos >= 0 and tokens[:1] != [self.model.bos]:
            tokens.insert(0, self.model.bos)
        return tokens

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
        tokens = self.tokenize(request.prompt)
        if not tokens:
            raise InvalidRequest("The prompt is empty; send at least one token of text.",
                                 param="prompt")
        room = self.config.n_ctx - len(tokens)
        wanted = request.max_tokens
        if room < 1 or (wanted is not None and wanted > room):
            raise ContextLengthExceeded(n_prompt_tokens=len(tokens), n_ctx=self.config.n_ctx,
                                        max_tokens=wanted)
        stream = JobStream(loop, lambda: self._inbox.put(_WAKE))
        stop_tokens = self._model_stop_tokens | self._stop_token_ids(request.stop)
        job = Job(request, tokens, min(wanted or room, room), stop_tokens, stream)
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

    def _new_context(self) -> Any:
        cfg = self.config
        params = lc.llama_context_default_params()
        params.n_ctx = self.kv_cells
        params.n_batch = params.n_ubatch = cfg.batch_tokens
        params.n_seq_max = cfg.parallel
        params.n_threads = params.n_threads_batch = cfg.threads
        params.kv_unified = cfg.kv_unified
        params.no_perf = True
        for key, value in cfg.rope.items():
            setattr(params, key, _ROPE_SCALING[value] if key == "rope_scaling_type" else value)
        ctx = lc.llama_init_from_model(self.model.ptr, params)
        if not ctx:
            raise EngineFailure(f"llama.cpp could not create a context of {self.kv_cells} "
                                "tokens; lower n_ctx or parallel")
        return ctx

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
            seq_ids, job.prefilled = self._slots.acquire(job.tokens, job.request.n)
            job.cached = job.prefilled
            self._slots.trim_idle(self.kv_cells - self._reserved)
            seed = job.request.sampling.seed
            for index, seq_id in enumerate(seq_ids):
                choice_seed = None if seed is None else (seed + index) & 0x7FFFFFFF
                job.choices.append(Choice(
                    index, seq_id,
                    SamplerChain(job.request.sampling, self.model.n_vocab, choice_seed),
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
        n = 0
        for _, job, choice, size in entries:
            if choice is not None:
                self._put(n, choice.next_token, choice.pos, [choice.seq_id], True)
                choice.pos += 1
                choice.fed.append(choice.next_token)
                rows.append((job, choice, n))
                n += 1
            else:
                n = self._put_prompt_chunk(job, n, size, rows)
        self._batch.n_tokens = n
        status = lc.llama_decode(self.ctx, self._batch)
        self._metrics.decoded(len(rows))
        if status != 0:
            self._fail_batch(rows, status)
            return
        for job, _ in chunks:
            if not job.prefilling:
                self._share_prompt(job)
        for job, choice, index in rows:
            self._advance(job, choice, choice.sampler.sample(self.ctx, index))
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
        for pos in range(job.prefilled, end):
            last = pos == len(job.tokens) - 1
            self._put(n, job.tokens[pos], pos, seqs, last)
            if last:
                for choice in job.choices:
                    choice.pos = len(job.tokens)
                    rows.append((job, choice, n))
            n += 1
        job.prefilled = end
        return n

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
        job.emit_text(choice, choice.text.flush())
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
