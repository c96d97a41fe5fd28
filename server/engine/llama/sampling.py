"""Picking each sequence's next token: a native llama.cpp sampler chain per sequence, run inside
the decode graph (backend sampling) where the chain allows it, on the CPU where it does not.

A grammar never filters the whole vocabulary up front (19-28 ms a token at a 49K vocabulary,
serially on the scheduler thread, while every other sequence waits). As llama.cpp's
common_sampler does, the chain samples first and the grammar checks the one token chosen; only a
rejected token makes the grammar filter candidates, and then the highest-scoring few hundred
before the whole vocabulary (exact whenever at least `top_k` of them pass, and always for
greedy decoding). Where even those cannot decide, `try_sample()` hands the whole-vocabulary
filter to `resolve()`, which the scheduler runs on another thread while the batch goes on
without this sequence.
"""

from __future__ import annotations

import ctypes
import functools
import math
from typing import Any

import llama_cpp as lc
import numpy as np

from server.engine.base import Grammar, SamplingParams
from server.errors import InvalidRequest

PENALTY_WINDOW = 64  # tokens the repetition penalties look back over (llama.cpp's default)
# Candidates the grammar filters after a rejection before it falls back to the whole vocabulary.
_PREFIX_MIN = 256
_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
assert _TOKEN_DATA.itemsize == ctypes.sizeof(lc.llama_token_data)


@functools.cache
def _float_array(n: int) -> Any:
    return ctypes.c_float * n


def logits_row(ctx: Any, row: int, n_vocab: int) -> np.ndarray[Any, np.dtype[np.float32]]:
    """Batch row `row`'s logits as a numpy view (valid until the next decode); cheaper than
    np.ctypeslib.as_array, which builds a ctypes array type on every call."""
    address = ctypes.cast(lc.llama_get_logits_ith(ctx, row), ctypes.c_void_p).value
    return np.frombuffer(_float_array(n_vocab).from_address(address), dtype=np.float32)


def _chain() -> Any:
    return lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())


class SequenceSampler:
    """One sequence's sampler: its chain (bias, penalties, truncation, temperature, draw) and
    optionally a grammar that the chosen token must satisfy."""

    def __init__(self, params: SamplingParams, n_vocab: int, seed: int | None,
                 grammar: Any = None) -> None:
        self._n_vocab = n_vocab
        self._params = params
        self._grammar = grammar or None
        self.chain = _chain()
        self._penalties = _penalties(params, n_vocab)
        self._add_bias_and_penalties(self.chain, self._penalties)
        self._add_selection(self.chain, params, seed)
        self.in_graph = False  # attached to the context as a backend sampler
        self._cur: np.ndarray[Any, Any] | None = None  # candidate buffer, grammar path only
        # The one candidate a grammar checks per token, allocated once.
        self._one = lc.llama_token_data()
        self._one_arr = lc.llama_token_data_array(data=ctypes.pointer(self._one), size=1,
                                                  selected=-1, sorted=False)
        self.rejections = 0  # tokens the grammar refused (metrics, tests)
        # Greedy without penalties is an argmax: numpy does it in a few µs where the native
        # chain first copies the whole vocabulary into candidates (~50 µs at 32K tokens).
        self._argmax = params.temperature <= 0 and self._penalties is None and grammar is None
        self._bias_ids = np.fromiter(params.logit_bias, np.int64, len(params.logit_bias))
        self._bias_values = np.fromiter(params.logit_bias.values(), np.float32,
                                        len(params.logit_bias))
        self._bias_set = frozenset(params.logit_bias)

    def _add_bias_and_penalties(self, chain: Any, penalties: Any) -> None:
        """The logit bias, then `penalties` (this sampler's own, or a clone of them)."""
        if self._params.logit_bias:
            lc.llama_sampler_chain_add(chain, _logit_bias(self._params, self._n_vocab))
        if penalties is not None:
            lc.llama_sampler_chain_add(chain, penalties)

    @staticmethod
    def _add_selection(chain: Any, params: SamplingParams, seed: int | None) -> None:
        def add(sampler: Any) -> None:
            lc.llama_sampler_chain_add(chain, sampler)

        if params.temperature <= 0:
            add(lc.llama_sampler_init_greedy())
            return
        if params.top_k > 0:
            add(lc.llama_sampler_init_top_k(params.top_k))
        if params.top_p < 1:
            add(lc.llama_sampler_init_top_p(params.top_p, 1))
        if params.min_p > 0:
            add(lc.llama_sampler_init_min_p(params.min_p, 1))
        add(lc.llama_sampler_init_temp(params.temperature))
        add(lc.llama_sampler_init_dist(lc.LLAMA_DEFAULT_SEED if seed is None else seed))

    def prime(self, prompt: list[int]) -> None:
        """Let the penalties count the prompt's last tokens too, as llama-server's do."""
        if self._penalties is not None:
            for token in prompt[-PENALTY_WINDOW:]:
                lc.llama_sampler_accept(self._penalties, token)

    def attach(self, ctx: Any, seq_id: int) -> bool:
        """Run this chain inside the decode graph for `seq_id`; False when llama.cpp cannot."""
        if self._grammar is not None:
            return False
        self.in_graph = bool(lc.llama_set_sampler(ctx, seq_id, self.chain))
        return self.in_graph

    def detach(self, ctx: Any, seq_id: int) -> None:
        if self.in_graph:
            lc.llama_set_sampler(ctx, seq_id, None)
            self.in_graph = False

    def sample(self, ctx: Any, row: int) -> int:
        """The next token from the logits of batch row `row`, accepted by the chain."""
        token = self.try_sample(ctx, row)
        return self.resolve() if token is None else token

    def try_sample(self, ctx: Any, row: int) -> int | None:
        """As sample(), or None where the grammar refused the chain's choice and only filtering
        the whole vocabulary can decide: the row's logits are copied, and `resolve()` (on any
        thread, before this sampler is used again) finishes the sampling."""
        if self.in_graph:
            token = int(lc.llama_get_sampled_token_ith(ctx, row))
            if token != lc.LLAMA_TOKEN_NULL:
                lc.llama_sampler_accept(self.chain, token)
                return token
        if self._argmax:
            return self._greedy(ctx, row)
        if self._grammar is None:
            return int(lc.llama_sampler_sample(self.chain, ctx, row))
        if self._penalties is None:
            # llama.cpp builds the candidates (a Python copy of the vocabulary costs more than
            # the chain) and accepts the token into the chain, which keeps no state that a
            # refused token could change when it has no penalties.
            chosen = int(lc.llama_sampler_sample(self.chain, ctx, row))
            if self._allowed(chosen):
                lc.llama_sampler_accept(self._grammar, chosen)
                return chosen
        else:
            cur, arr = self._candidates(ctx, row)
            lc.llama_sampler_apply(self.chain, ctypes.byref(arr))
            chosen = int(cur["id"][arr.selected])
            if self._allowed(chosen):
                self._accept(chosen)
                return chosen
        self.rejections += 1
        picked = self._sample_from_prefix(ctx, row)
        if picked is None:
            self._candidates(ctx, row)  # a copy: the next decode overwrites the row
            return None
        self._accept(picked)
        return picked

    def resolve(self) -> int:
        """The token of a deferred try_sample(): the whole vocabulary through the grammar, then
        the chain over what passes. Pure host work that releases the GIL in llama.cpp."""
        assert self._cur is not None
        arr = _array(self._cur, len(self._cur))
        lc.llama_sampler_apply(self._grammar, ctypes.byref(arr))
        lc.llama_sampler_apply(self.chain, ctypes.byref(arr))
        token = int(self._cur["id"][arr.selected])
        self._accept(token)
        return token

    def _accept(self, token: int) -> None:
        lc.llama_sampler_accept(self._grammar, token)
        lc.llama_sampler_accept(self.chain, token)

    def _greedy(self, ctx: Any, row: int) -> int:
        """The highest logit after the logit bias (the first one on ties, as llama.cpp's
        greedy sampler); accepting it changes no state of such a chain."""
        logits = logits_row(ctx, row, self._n_vocab)
        best = int(np.argmax(logits))
        if not len(self._bias_ids):
            return best
        if best in self._bias_set:  # the favourite is biased: rank everything again
            biased = logits.copy()
            biased[self._bias_ids] += self._bias_values
            return int(np.argmax(biased))
        # Only the biased tokens can overtake the unbiased favourite.
        scores = logits[self._bias_ids] + self._bias_values
        top = int(np.argmax(scores))
        rival, score = int(self._bias_ids[top]), float(scores[top])
        if score > logits[best] or (score == logits[best] and rival < best):
            return rival
        return best

    # ---- the grammar path ------------------------------------------------------------------

    def _candidates(self, ctx: Any, row: int) -> tuple[np.ndarray[Any, Any], Any]:
        """Every token with its logit of row `row`, in id order (as llama.cpp builds them)."""
        if self._cur is None:
            self._cur = np.zeros(self._n_vocab, dtype=_TOKEN_DATA)
            self._fresh = self._cur.copy()
            self._fresh["id"] = np.arange(self._n_vocab, dtype=np.int32)
        cur = self._cur
        words, fresh = cur.view(np.float32).reshape(-1, 3), \
            self._fresh.view(np.float32).reshape(-1, 3)  # as floats: copies that numpy vectorises
        np.copyto(words, fresh)
        words[:, 1] = logits_row(ctx, row, self._n_vocab)
        return cur, _array(cur, len(cur))

    def _allowed(self, token: int) -> bool:
        one = self._one
        one.id, one.logit, one.p = token, 1.0, 0.0  # type: ignore[assignment]
        lc.llama_sampler_apply(self._grammar, ctypes.byref(self._one_arr))
        return math.isfinite(one.logit)

    def _sample_from_prefix(self, ctx: Any, row: int) -> int | None:
        """Filter only the best-scoring candidates through the grammar; None when they cannot
        decide what filtering the whole vocabulary would.

        Every token outside the prefix scores below all of it. The prefix decides when it holds
        the first allowed token (greedy), or `top_k` allowed tokens (top-k then keeps only
        those), or when min-p would cut every token outside it anyway: the prefix's last score
        is already under min-p's threshold relative to the best allowed token (top-p's
        normaliser then differs by those tokens' mass, below min-p of the best).
        """
        top_k, greedy, min_p = self._params.top_k, self._params.temperature <= 0, \
            self._params.min_p
        if not greedy and top_k <= 0 and min_p <= 0:
            return None
        logits = logits_row(ctx, row, self._n_vocab)
        ranked = self._ranking(ctx, row) if self._params.logit_bias or self._penalties \
            else logits  # bias and penalties change the order: rank after them
        size = min(self._n_vocab, max(_PREFIX_MIN, 4 * top_k))
        best = np.argpartition(-ranked, size - 1)[:size]
        best = best[np.argsort(-ranked[best], kind="stable")]
        prefix = np.empty(size, dtype=_TOKEN_DATA)  # the raw logits, in order of preference
        prefix["id"], prefix["logit"], prefix["p"] = best, logits[best], 0
        masked = prefix.copy()
        lc.llama_sampler_apply(self._grammar, ctypes.byref(_array(masked, len(masked))))
        passed = np.isfinite(masked["logit"])
        if not passed.any():
            return None
        if greedy:
            return int(prefix["id"][np.argmax(passed)])
        scores = ranked[best]
        enough = 0 < top_k <= int(passed.sum())
        cut_by_min_p = min_p > 0 and scores[-1] < scores[np.argmax(passed)] + math.log(min_p)
        if not (enough or cut_by_min_p):
            return None
        kept = np.ascontiguousarray(prefix[passed])
        arr = _array(kept, len(kept))
        lc.llama_sampler_apply(self.chain, ctypes.byref(arr))  # its own random state draws
        return int(kept["id"][arr.selected])

    def _ranking(self, ctx: Any, row: int) -> np.ndarray[Any, np.dtype[np.float32]]:
        """Row `row`'s logits after the logit bias and the penalties, by token id."""
        cur, _ = self._candidates(ctx, row)
        pre = _chain()
        try:
            # The penalties cloned with their history, which the chain's own keep.
            self._add_bias_and_penalties(pre, self._penalties and
                                         lc.llama_sampler_clone(self._penalties))
            lc.llama_sampler_apply(pre, ctypes.byref(_array(cur, len(cur))))
        finally:
            lc.llama_sampler_free(pre)
        return cur["logit"].copy()

    def close(self) -> None:
        for name in ("chain", "_grammar"):
            ptr = getattr(self, name)
            if ptr:
                lc.llama_sampler_free(ptr)
                setattr(self, name, None)


def parse_grammar(vocab: Any, grammar: Grammar) -> Any:
    """A llama.cpp grammar sampler for `grammar` (lazy when it has a trigger); InvalidRequest
    when llama.cpp cannot parse it. Parsing a large schema's grammar takes a while: call this
    off the event loop."""
    if grammar.trigger_pattern is None:
        sampler = lc.llama_sampler_init_grammar(vocab, grammar.gbnf.encode(), b"root")
    else:
        patterns = (ctypes.c_char_p * 1)(grammar.trigger_pattern.encode())
        sampler = lc.llama_sampler_init_grammar_lazy_patterns(
            vocab, grammar.gbnf.encode(), b"root", patterns, 1, None, 0)
    if not sampler:
        raise InvalidRequest("llama.cpp could not parse the grammar made for this request; "
                             "simplify the schema", param=grammar.param)
    return sampler


def free_sampler(sampler: Any) -> None:
    if sampler:
        lc.llama_sampler_free(sampler)


def _penalties(params: SamplingParams, n_vocab: int) -> Any:
    """The repetition penalties sampler `params` asks for; None when all are off."""
    if (params.repeat_penalty, params.frequency_penalty, params.presence_penalty) == (1, 0, 0):
        return None
    return lc.llama_sampler_init_penalties(n_vocab, PENALTY_WINDOW, params.repeat_penalty,
                                           params.frequency_penalty, params.presence_penalty)


def _logit_bias(params: SamplingParams, n_vocab: int) -> Any:
    biases = (lc.llama_logit_bias * len(params.logit_bias))()
    for slot, (token, bias) in zip(biases, params.logit_bias.items(), strict=True):
        slot.token, slot.bias = token, bias
    return lc.llama_sampler_init_logit_bias(n_vocab, len(biases), biases)


def _array(data: np.ndarray[Any, Any], size: int) -> Any:
    return lc.llama_token_data_array(
        data=data.ctypes.data_as(lc.llama_token_data_p), size=size, selected=-1, sorted=False)
