"""One scheduler thread per loaded model: it alone touches the llama.cpp context.

Each step decodes, in a single llama_decode, the next token of every running choice (and its
draft tokens when it speculates: speculative.py) plus a chunk of the prompt of any request still
being read (batch.py plans it), then samples each choice (sampling.py: in the decode graph where
the chain allows, else on the CPU). What a step wrote to the KV cache is committed to its
sequences only after llama_decode succeeds; a failed decode removes it again and fails only the
requests it touched. A crash of the thread marks the model failed: queued and new requests get
the error at once.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque

import llama_cpp as lc

from server.chat.template import Prompt
from server.engine.base import GenerationRequest, TokenLogprob
from server.engine.llama.batch import Entry, passes, plan_batch
from server.engine.llama.buffer import BatchBuffer
from server.engine.llama.context import ContextConfig, context_params, create_context
from server.engine.llama.jobs import (
    Choice,
    Job,
    JobStream,
    deliver_all,
    prepare_job,
    stop_token_ids,
)
from server.engine.llama.kv import ContextKv, state_fingerprint
from server.engine.llama.logits import LogitReader
from server.engine.llama.lora import Adapters, Turns
from server.engine.llama.native import NativeModel
from server.engine.llama.prompt_cache import PromptCache
from server.engine.llama.resolver import Resolver
from server.engine.llama.rows import BatchRows
from server.engine.llama.sampling import SequenceSampler
from server.engine.llama.slots import SlotPool
from server.engine.llama.speculative import Speculation, Speculator, drop_rejected
from server.engine.llama.vocab import read_prompt
from server.engine.textstream import StopTextStream
from server.errors import (
    AdapterNotFound,
    EngineFailure,
    InvalidRequest,
    ServerOverloaded,
    ServerShuttingDown,
)
from server.metrics import Metrics, SchedulerMetrics

log = logging.getLogger("server.engine")

_WAKE = object()
REPORT_INTERVAL_S = 0.05  # the gauges need not move with every step (hundreds a second)


class Scheduler:
    """Owns a model's llama_context and runs continuous batching on its own thread."""

    def __init__(self, model: NativeModel, config: ContextConfig, name: str,
                 metrics: Metrics, speculation: Speculation | None = None,
                 adapters: Adapters | None = None) -> None:
        if config.parallel > config.batch_tokens:
            raise EngineFailure(
                f"parallel ({config.parallel}) is larger than the batch ({config.batch_tokens} "
                "tokens): every running sequence needs a row in each step. Lower --parallel or "
                "raise GGSERVE_BATCH_TOKENS.")
        self.model = model
        self.name = name
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
        self._buffer = BatchBuffer(config.batch_tokens, config.parallel)
        self._inbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._waiting: deque[Job] = deque()
        self._running: list[Job] = []
        self._cache = PromptCache(config.prompt_cache, state_fingerprint(model, config)) \
            if config.prompt_cache.enabled else None
        self._slots = SlotPool(ContextKv(self.ctx), config.parallel,
                               share_cells=config.kv_unified, cache=self._cache)
        self._reserved = 0
        self._closing = False
        self.failure: str | None = None  # why the scheduler thread died, if it did
        self._submitted = 0  # written by the event loop only
        self._dequeued = 0  # written by the scheduler thread only
        self._reported = 0.0  # when the gauges were last refreshed
        self._model_stop_tokens = stop_token_ids(model, config.stop)
        self._logits = LogitReader(self.ctx, model.n_vocab, model.special_piece)
        self._rows = BatchRows(self._buffer, self._memory, self._logits, model,
                               config.kv_unified, lc.llama_n_ctx_seq(self.ctx))
        # A filler would advance a recurrent state, which no removal takes back.
        self._gap_fill = 0.0 if config.kv_unified or lc.llama_model_is_recurrent(model.ptr) \
            or lc.llama_model_is_hybrid(model.ptr) else config.gap_fill
        try:
            self._spec = None if speculation is None else \
                Speculator(model, speculation, config, metrics, name)
        except Exception:
            lc.llama_free(self.ctx)
            raise
        self._resolver = Resolver(name)  # grammar filters of the whole vocabulary
        self._adapters = adapters or Adapters()  # LoRA: one on the context per step
        self._turns = Turns()
        self._metrics.report_adapters(len(self._adapters), (), ())
        self._metrics.track_waiting(lambda: self.waiting)
        self._thread = threading.Thread(target=self._run, name=f"scheduler:{name}", daemon=True)
        self._thread.start()

    # ---- called from the event loop -------------------------------------------------------

    def tokenize(self, prompt: Prompt) -> list[int]:
        """The tokens the model reads for `prompt`: its segments, after a BOS if the model
        wants one and the prompt does not start with it."""
        return read_prompt(self.model, prompt)[0]

    async def submit(self, request: GenerationRequest) -> JobStream:
        """Check `request` against the context, queue it, and return its event stream.

        Tokenizing the prompt and parsing a grammar run in a worker thread, off the event loop.
        """
        self._check_accepting(request)
        loop = asyncio.get_running_loop()
        job = await asyncio.to_thread(self._prepare, request, loop)
        try:
            self._check_accepting(request)
        except Exception:
            job.close()
            raise
        self._submitted += 1
        self._inbox.put(job)
        return job.stream

    def _check_accepting(self, request: GenerationRequest) -> None:
        if self.failure is not None:
            raise EngineFailure(f"The model '{self.name}' failed ({self.failure}); an admin can "
                                "unload and reload it.")
        if self._closing:
            raise ServerShuttingDown("The server is shutting down; retry on another replica.")
        if self.waiting >= self.config.max_waiting:
            raise ServerOverloaded(
                f"{self.waiting} requests are already waiting for this model (the limit is "
                f"{self.config.max_waiting}); retry shortly.")
        if request.adapter is not None and request.adapter not in self._adapters:
            # the registry names an adapter this loaded model lacks (reloaded meanwhile)
            raise AdapterNotFound(request.served_model, self.name, self._adapters.names)
        if request.n > self.config.parallel:
            raise InvalidRequest(
                f"n={request.n} is more than this server decodes at once for a request "
                f"({self.config.parallel}); lower n or raise the 'parallel' setting.", param="n")

    def _prepare(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> Job:
        stream = JobStream(loop, lambda: self._inbox.put(_WAKE))
        return prepare_job(self.model, self.config.n_ctx, self.kv_cells,
                           self._model_stop_tokens, request, stream)

    @property
    def waiting(self) -> int:
        """Requests submitted and not yet running (or dropped)."""
        return self._submitted - self._dequeued

    def close(self) -> None:
        """Fail what is queued or running, stop the thread, free the context."""
        self._closing = True
        self._inbox.put(None)
        self._thread.join()
        self._resolver.close()
        if self._cache is not None:
            if self._cache.durable:
                self._slots.persist()  # the slots' caches, for the next start
            self._cache.close()
        lc.llama_free(self.ctx)
        if self._spec:
            self._spec.close()

    # ---- the scheduler thread -------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._receive():
                self._drop_cancelled()
                self._admit()
                if self._running:
                    self._step()
                self._report()
        except Exception as exc:
            log.exception("the scheduler of model %s crashed", self.name)
            self.failure = f"its scheduler crashed: {type(exc).__name__}: {exc}"
            self._fail_all(EngineFailure(f"The engine failed: {exc}"))
            self._drain_inbox()
        else:
            self._fail_all(ServerShuttingDown("The server shut down before this request ran."))

    def _drain_inbox(self) -> None:
        """After a crash: fail whatever still arrives until close() says stop."""
        while (item := self._inbox.get()) is not None:
            if isinstance(item, Job):
                self._dequeued += 1
                item.fail(EngineFailure(f"The model '{self.name}' failed ({self.failure})."))

    def _report(self) -> None:
        """Refresh the gauges, at most every REPORT_INTERVAL_S (and whenever idle)."""
        now = time.monotonic()
        if self._running and now < self._reported + REPORT_INTERVAL_S:
            return
        self._reported = now
        running = [c for job in self._running for c in job.choices if c.finish is None]
        self._metrics.report(len(running), self._cells_in_use(), self.kv_cells,
                             self._slots.idle_cells())
        self._metrics.report_adapters(len(self._adapters),
                                      (job.request.adapter for job in self._running),
                                      (job.request.adapter for job in self._waiting))
        if self._cache is not None:
            cache = self._cache
            self._metrics.report_cache(cache.hits, cache.restored_tokens, cache.ram_used,
                                       cache.disk_used)

    def _cells_in_use(self) -> int:
        """KV cells the running requests hold: each unfinished choice's output, and its
        prompt once per KV stream that holds it (once per request in a unified cache, whose
        choices share the prompt's cells). Idle slots' cached prefixes are not counted: a new
        request evicts them when it needs the room, as vLLM counts its cached free blocks."""
        cells = 0
        for job in self._running:
            live = [c for c in job.choices if c.finish is None]
            streams = min(len(live), 1) if self.config.kv_unified else \
                sum(1 for c in live if c.has_prompt or c.index == 0)
            cells += job.prefilled * streams + sum(len(c.fed) for c in live)
        return cells

    def _receive(self) -> bool:
        """Take new requests from the inbox, blocking while idle; False once closing."""
        block = not (self._running or self._waiting)
        if not block and self._inbox.empty():
            return True
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
            job.close()
            job.pending.append(job.usage())
            job.flush(final=True)
        for job in [j for j in self._running if j.stream.cancelled]:
            for choice in job.choices:
                if choice.finish is None:
                    choice.finish = "stop"
                    self._release_choice(job, choice)
            job.pending.append(job.usage())  # a cancelled request's tokens still count
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
            seq_ids, job.prefilled = self._slots.acquire(
                job.tokens, job.request.n, reuse=not job.wants_prompt_logits,
                tag=self._adapters.tag(job.request.adapter))  # never another adapter's KV
            job.cached = job.prefilled
            self._slots.trim_idle(self.kv_cells - self._reserved)
            for index, seq_id in enumerate(seq_ids):
                job.choices.append(self._new_choice(job, index, seq_id))
            job.grammar = None  # each choice owns a copy now
            self._running.append(job)

    def _new_choice(self, job: Job, index: int, seq_id: int) -> Choice:
        seed = job.request.sampling.seed
        choice_seed = None if seed is None else (seed + index) & 0x7FFFFFFF
        grammar = job.grammar and lc.llama_sampler_clone(job.grammar)
        sampler = SequenceSampler(job.request.sampling, self.model.n_vocab, choice_seed, grammar)
        sampler.prime(job.tokens)
        spec = None if self._spec is None else self._spec.start(job)
        # In the decode graph unless the request reads the raw logits (log-probabilities), has
        # a grammar (llama.cpp keeps that chain on the CPU), samples n > 1 choices (their
        # first tokens all come from the prompt's last row, in the first choice's sequence,
        # which a backend sampler would answer for all of them), or speculates.
        if self.config.backend_sampling and job.request.logprobs is None and \
                not job.wants_prompt_logits and job.request.n == 1 and spec is None:
            sampler.attach(self.ctx, seq_id)
        return Choice(index, seq_id, sampler, StopTextStream(self.config.stop + job.request.stop),
                      job, spec=spec)

    # ---- one step -------------------------------------------------------------------------

    def _group(self) -> list[Job]:
        """The running requests this step decodes: those of one adapter (None: the base
        model), which lora.Turns picks and which goes on the context (one per llama_decode)."""
        if not self._adapters:  # every request is the base model's: nothing to pick per step
            return self._running
        live = [job for job in self._running
                if job.prefilling or any(c.finish is None for c in job.choices)]
        adapter = self._turns.next({job.request.adapter for job in live})
        self._adapters.apply(self.ctx, adapter)
        return [job for job in live if job.request.adapter == adapter]

    def _step(self) -> None:
        """Plan one batch, decode it, commit it, sample every choice that has logits in it."""
        began = time.perf_counter()
        group = self._group()
        resolved = self._take_resolved() if self._resolver else 0
        decoding = [c for job in group if not job.prefilling for c in job.choices
                    if c.finish is None]
        prefilling = [job for job in group if job.prefilling]
        if self._resolver:  # a choice whose grammar is still filtering sits this step out
            decoding = [c for c in decoding if c not in self._resolver]
        if not decoding and not prefilling:  # every choice waits for a filter, or just ended
            self._deliver()
            if self._resolver:
                self._resolver.wait(timeout=0.05)
            return
        drafted = self._spec.plan(decoding, self.config.batch_tokens, bool(prefilling)) \
            if self._spec else None
        entries = plan_batch(
            [(k, c.seq_id) for k, c in enumerate(decoding)],
            [(k, job.choices[0].seq_id, len(job.tokens) - job.prefilled)
             for k, job in enumerate(prefilling)], self.config.batch_tokens, drafted)
        if self._gap_fill:
            entries = self._rows.close_gaps(entries, self._gap_fill)
        rows = self._rows.fill(entries, decoding, prefilling)
        # The last step's events go out now, just before llama_decode lets go of the GIL: the
        # event loop wakes to a free interpreter instead of waiting for this thread's Python.
        self._deliver()
        filled = time.perf_counter()
        status = lc.llama_decode(self.ctx, self._buffer.ready())
        decoded = time.perf_counter()
        self._rows.drop_fillers()
        if status != 0:
            self._fail_batch(entries, decoding, prefilling, status)
            return
        self._rows.commit(entries, decoding, prefilling)
        emitted = self._sample(rows) + resolved
        if not any(c.finish is None for job in self._running for c in job.choices):
            self._deliver()  # no next step to carry them
        self._metrics.stepped(len(rows), self._buffer.n, decoded - filled,
                              time.perf_counter() - began - (decoded - filled),
                              passes(entries, self.config.batch_tokens,
                                     sequential=not self.config.kv_unified), emitted)

    def _deliver(self) -> None:
        """Hand the step's events to the event loop: one wake-up for all requests."""
        ready = []
        for job in list(self._running):
            done = job.done
            if done or job.deliverable:
                ready.append((job, done))
            if done:
                self._retire(job, notify=False)
        deliver_all(ready)

    def _sample(self, rows: list[tuple[Job, Choice, int]]) -> int:
        """Pick each row's next token (and its log-probability when the request asks), or
        verify a choice's drafts; how many tokens the choices gained."""
        sampled, emitted = [], 0
        for job, choice, index in rows:
            if job.max_new == 0:  # only reading the prompt (echo with max_tokens 0)
                self._finish(job, choice, "length")
            elif choice.spec and choice.spec.draft:
                emitted += self._take_drafted(job, choice, index)
            else:
                rejected = choice.sampler.rejections
                # A grammar's whole-vocabulary filter runs on a worker: the batch goes on.
                # Log-probabilities need this row's logits, so those requests wait for it.
                token = choice.sampler.try_sample(self.ctx, index) if \
                    job.request.logprobs is None else choice.sampler.sample(self.ctx, index)
                if choice.sampler.rejections != rejected:
                    self._metrics.grammar_rejections.inc()
                if token is None:
                    self._resolver.submit(choice)
                else:
                    sampled.append((job, choice, index, token))
        wanted = [s for s in sampled if s[0].request.logprobs is not None]
        for (_, choice, _, _), entry in zip(wanted, self._score_rows(wanted), strict=True):
            choice.logprobs.append(entry)
        for job, choice, _, token in sampled:
            self._advance(job, choice, token)
        return emitted + len(sampled)

    def _take_resolved(self) -> int:
        """Advance the choices whose grammar filter has ended; how many tokens they gained."""
        count = 0
        for choice, token in self._resolver.done():
            self._advance(choice.job, choice, token)
            count += 1
        return count

    def _take_drafted(self, job: Job, choice: Choice, row: int) -> int:
        """Verify the choice's drafts (its rows from `row` on) and emit the tokens accepted;
        the KV of the rejected ones goes. How many tokens it emitted."""
        assert self._spec is not None
        tokens = self._spec.verify(choice, self.ctx, row,
                                   lambda t: self.model.is_eog(t) or t in job.stop_tokens)
        for k, token in enumerate(tokens):
            if k:  # the draft token before it is the sequence's now
                choice.fed.append(tokens[k - 1])
                choice.pos += 1
            self._advance(job, choice, token)
            if choice.finish is not None:
                break
        drop_rejected(self._memory, choice)
        return k + 1

    def _score_rows(self, rows: list[tuple[Job, Choice, int, int]]) -> list[TokenLogprob]:
        return self._logits.score([r for _, _, r, _ in rows], [t for *_, t in rows],
                                  [job.request.logprobs or 0 for job, *_ in rows])

    def _advance(self, job: Job, choice: Choice, token: int) -> None:
        """Account for a sampled token: emit its text or end the choice."""
        if self.model.is_eog(token) or token in job.stop_tokens:
            if choice.logprobs:  # the end token is reported (as vLLM does) but adds no text
                end = choice.logprobs[-1]
                choice.logprobs[-1] = TokenLogprob(end.token, b"", end.logprob, end.top)
            if token in job.stop_tokens:  # a stop string that is one token: which one
                choice.text.matched = self.model.special_piece(token).decode("utf-8", "replace")
            self._finish(job, choice, "stop")
            return
        choice.generated += 1
        piece = self.model.special_piece(token) if token in job.preserved else \
            self.model.output_piece(token)
        job.emit_text(choice, choice.text.feed(piece))
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
        self._close_sampler(choice)

    def _close_sampler(self, choice: Choice) -> None:
        self._resolver.forget(choice)  # no worker may still use the sampler
        choice.sampler.detach(self.ctx, choice.seq_id)
        choice.sampler.close()

    def _retire(self, job: Job, notify: bool) -> None:
        self._running.remove(job)
        self._reserved -= job.reservation
        if notify:
            job.flush(final=True)

    def _fail_batch(self, entries: list[Entry], decoding: list[Choice], prefilling: list[Job],
                    status: int) -> None:
        """Remove what the failed batch wrote to the KV cache and fail the requests it
        touched; their sequences are forgotten, never offered as a cached prefix."""
        touched: dict[int, Job] = {}
        for entry in [e for e in entries if not e.filler]:
            job = prefilling[entry.key] if entry.prefill else decoding[entry.key].job
            touched[id(job)] = job
        log.error("llama_decode failed with status %d; failing the %d requests in the batch",
                  status, len(touched))
        error = EngineFailure(f"llama.cpp failed to decode (status {status}); retry the "
                              "request.")
        for job in touched.values():
            for choice in job.choices:
                if choice.finish is None:
                    choice.finish = "stop"
                    self._close_sampler(choice)
                self._slots.discard(choice.seq_id)
            self._retire(job, notify=False)
            job.fail(error)

    def _fail_all(self, error: Exception) -> None:
        for job in list(self._running) + list(self._waiting):
            for choice in job.choices:
                if choice.finish is None:
                    choice.finish = "stop"
                    self._close_sampler(choice)
            job.close()
            job.fail(error)
        self._running.clear()
        self._waiting.clear()
