"""One worker thread per loaded embedding model: it alone touches the model's llama_context,
created with embeddings on and a pooling type. Requests queue for it, one at a time.

A request's inputs are packed into as few llama_decode calls (llama_encode for encoder models)
as the context holds: one sequence per input, the KV memory cleared before each call. Vectors
come back L2-normalised, as OpenAI's API and llama-server return them.

A reranker runs with rank pooling: each sequence is a query-document pair, and llama.cpp's
classification head gives its score (the first of n_cls_out floats, as llama-server reads it).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import llama_cpp as lc

from server.chat.template import Prompt, prompt_text
from server.engine.base import Embeddings, Ranking
from server.engine.llama.context import ContextConfig, context_params, create_context
from server.engine.llama.native import NativeModel
from server.engine.llama.rerank import check_pair, pair_tokens
from server.engine.llama.vocab import check_tokens
from server.errors import (
    EngineFailure,
    InputTooLong,
    InvalidRequest,
    NotAReranker,
    RerankerOnly,
    ServerOverloaded,
    ServerShuttingDown,
)
from server.metrics import Metrics

log = logging.getLogger("server.engine")
Result = TypeVar("Result")
POOLING = {"mean": lc.LLAMA_POOLING_TYPE_MEAN, "cls": lc.LLAMA_POOLING_TYPE_CLS,
           "last": lc.LLAMA_POOLING_TYPE_LAST, "rank": lc.LLAMA_POOLING_TYPE_RANK}


def gguf_pooling(model: NativeModel) -> str:
    """The pooling the GGUF declares, or mean when it declares none (a decoder LLM)."""
    value = model.meta(f"{model.meta('general.architecture')}.pooling_type") or ""
    own = int(value) if value.isdigit() else 0
    return next((name for name, kind in POOLING.items() if kind == own), "mean")


class Embedder:
    """Owns an embedding model's llama_context; `embed()` runs on its worker thread.

    Offers what the engine's residency uses of a Scheduler: `model`, `config.max_waiting`,
    `waiting`, `kv_cells`, `failure`, `tokenize()` and `close()`.
    """

    failure: str | None = None  # a request's failure is its own; the worker never dies

    def __init__(self, model: NativeModel, config: ContextConfig, pooling: str | None,
                 name: str, metrics: Metrics) -> None:
        self.model = model
        self.config = config
        self.kv_cells = config.n_ctx  # every input of a decode call shares one n_ctx cache
        self.pooling = pooling or gguf_pooling(model)
        self.name = name
        if self.pooling == "rank" and gguf_pooling(model) != "rank":
            log.warning("model %s: rank pooling, but its GGUF declares no reranker (pooling type "
                        "rank, a classification head): its scores may mean nothing", name)
        # what llama_get_embeddings_seq gives per sequence: a vector, or the classifier's outputs
        self.n_embd = int(lc.llama_model_n_cls_out(model.ptr) if self.pooling == "rank"
                          else lc.llama_model_n_embd_out(model.ptr))
        self._n_seq = min(config.n_ctx, int(lc.llama_max_parallel_sequences()))
        self._encoder = bool(lc.llama_model_has_encoder(model.ptr))
        self._decode_calls = metrics.decode_calls.labels(name)
        self.ctx = self._new_context()
        self._memory = lc.llama_get_memory(self.ctx)  # None for models without a KV cache
        self._batch = lc.llama_batch_init(config.n_ctx, 0, 1)
        self._worker = ThreadPoolExecutor(1, thread_name_prefix=f"embedder:{name}")
        self._lock = threading.Lock()
        self._queued = 0
        self._closing = False

    # ---- called from the event loop -------------------------------------------------------

    def tokenize(self, prompt: Prompt) -> list[int]:
        """The tokens an input text becomes, as llama-server embeds it: special-token text
        parsed, and the BOS/EOS (CLS/SEP) the vocabulary asks for."""
        return self.model.tokenize(prompt_text(prompt), parse_special=True, add_special=True)

    async def embed(self, inputs: list[list[int]] | list[str]) -> Embeddings:
        """Queue `inputs` for the worker thread; typed errors raise here."""
        if self.pooling == "rank":
            raise RerankerOnly(self.name)
        return await self._queued_job(self._embed, inputs)

    async def rerank(self, query: str, documents: list[str]) -> Ranking:
        """Score each (query, document) pair on the worker thread; typed errors raise here."""
        if self.pooling != "rank":
            raise NotAReranker(self.name)
        return await self._queued_job(self._rank, query, documents)

    async def _queued_job(self, job: Callable[..., Result], *args: Any) -> Result:
        """Run `job(given_up, *args)` on the worker thread once the requests before it are done."""
        with self._lock:
            if self._closing:
                raise ServerShuttingDown("The server is shutting down; retry on another replica.")
            if self._queued >= self.config.max_waiting:
                raise ServerOverloaded(
                    f"{self._queued} requests are already waiting for this model (the limit is "
                    f"{self.config.max_waiting}); retry shortly.")
            self._queued += 1
            given_up = threading.Event()
            future = self._worker.submit(self._started, job, given_up, *args)
        future.add_done_callback(self._forget_if_cancelled)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:  # timed out or shut down: stop at the next decode
            given_up.set()
            raise

    @property
    def waiting(self) -> int:
        """Requests queued and not yet started."""
        return self._queued

    def close(self) -> None:
        """Fail queued requests, stop the running one after its decode call, free the context."""
        with self._lock:
            self._closing = True
        self._worker.shutdown(wait=True)
        lc.llama_batch_free(self._batch)
        lc.llama_free(self.ctx)

    # ---- the context, and the worker thread ----------------------------------------------

    def _new_context(self) -> Any:
        cfg = self.config
        params = context_params(cfg)
        params.n_ctx = params.n_batch = cfg.n_ctx
        # Pooling needs each sequence whole in one micro-batch (non-causal models: the batch).
        params.n_ubatch = cfg.n_ctx
        params.n_seq_max = self._n_seq
        params.kv_unified = True
        params.embeddings = True
        params.pooling_type = POOLING[self.pooling]
        # Flash attention keeps f16 partial sums: pooled vectors drift by up to 1e-2 from the
        # plain attention that llama-cpp-python's Llama.embed and sentence-transformers use.
        # So only an explicit --flash-attn on turns it on here ("auto" does not).
        params.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if cfg.flash_attn == "on" \
            else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        return create_context(self.model, params, f"an embedding context of {cfg.n_ctx} "
                              "tokens; lower n_ctx")

    def _forget_if_cancelled(self, future: Future[Any]) -> None:
        if future.cancelled():  # never started: it leaves the queue here
            with self._lock:
                self._queued -= 1

    def _started(self, job: Callable[..., Result], given_up: threading.Event,
                 *args: Any) -> Result:
        with self._lock:
            self._queued -= 1
        return job(given_up, *args)

    def _embed(self, given_up: threading.Event, inputs: list[list[int]] | list[str]) -> Embeddings:
        items: list[list[int] | str] = list(inputs)
        tokens = [self._input_tokens(index, item) for index, item in enumerate(items)]
        vectors = [_unit(values) for values in self._outputs(tokens, given_up)]
        return Embeddings(vectors, sum(len(t) for t in tokens))

    def _rank(self, given_up: threading.Event, query: str, documents: list[str]) -> Ranking:
        tokens = [check_pair(pair_tokens(self.model, query, document), index, self.config.n_ctx)
                  for index, document in enumerate(documents)]
        scores = [values[0] for values in self._outputs(tokens, given_up)]
        return Ranking(scores, sum(len(t) for t in tokens))

    def _outputs(self, tokens: list[list[int]], given_up: threading.Event) -> list[list[float]]:
        """Each input's pooled output, decoded in as few calls as the context allows."""
        outputs: list[list[float]] = []
        for group in self._groups(tokens):
            if self._closing or given_up.is_set():
                raise ServerShuttingDown("The server shut down before this request finished.")
            outputs += self._decode(group)
        return outputs

    def _input_tokens(self, index: int, item: list[int] | str) -> list[int]:
        if isinstance(item, str):
            tokens = self.model.tokenize(item, parse_special=True, add_special=True)
        else:
            check_tokens(self.model, item, "input")
            tokens = item
        if not tokens:
            raise InvalidRequest(f"Input {index} is empty; send at least one token of text.",
                                 param="input")
        if len(tokens) > self.config.n_ctx:
            raise InputTooLong(index=index, n_tokens=len(tokens), n_ctx=self.config.n_ctx)
        return tokens

    def _groups(self, inputs: list[list[int]]) -> Iterator[list[list[int]]]:
        """Consecutive inputs packed up to the context's tokens and sequences."""
        group: list[list[int]] = []
        used = 0
        for tokens in inputs:
            if group and (used + len(tokens) > self.config.n_ctx or len(group) == self._n_seq):
                yield group
                group, used = [], 0
            group.append(tokens)
            used += len(tokens)
        if group:
            yield group

    def _decode(self, group: list[list[int]]) -> list[list[float]]:
        if self._memory:
            lc.llama_memory_clear(self._memory, True)
        batch, n = self._batch, 0
        for seq, tokens in enumerate(group):
            for pos, token in enumerate(tokens):
                batch.token[n] = token
                batch.pos[n] = pos
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq
                batch.logits[n] = True  # pooling reads every token's output
                n += 1
        batch.n_tokens = n
        run = lc.llama_encode if self._encoder else lc.llama_decode
        status = run(self.ctx, batch)
        self._decode_calls.inc()
        if status != 0:
            raise EngineFailure(f"llama.cpp failed to embed (status {status}).")
        return [self._pooled(seq) for seq in range(len(group))]

    def _pooled(self, seq: int) -> list[float]:
        pooled = lc.llama_get_embeddings_seq(self.ctx, seq)
        if not pooled:
            raise EngineFailure("llama.cpp returned no pooled output for a sequence.")
        values: list[float] = pooled[:self.n_embd]
        return values


def _unit(values: list[float]) -> list[float]:
    norm = math.hypot(*values)
    return [v / norm for v in values] if norm > 0 else values
