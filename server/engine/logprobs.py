"""Log-probabilities from a decoded batch's logits, for the requests that ask for them.

Only rows a request asked logits for are read; everything here runs on the scheduler thread
right after llama_decode, before the next decode overwrites the logits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import llama_cpp as lc
import numpy as np

from server.engine.base import TokenLogprob


class LogitReader:
    """Reads rows of a context's output logits as log-softmax distributions."""

    def __init__(self, ctx: Any, n_vocab: int, piece: Callable[[int], bytes]) -> None:
        self._ctx = ctx
        self._n_vocab = n_vocab
        self._piece = piece

    def _log_softmax(self, rows: Sequence[int]) -> np.ndarray[Any, np.dtype[np.float64]]:
        logits = np.empty((len(rows), self._n_vocab), dtype=np.float64)
        for k, row in enumerate(rows):
            ptr = lc.llama_get_logits_ith(self._ctx, row)
            logits[k] = np.ctypeslib.as_array(ptr, shape=(self._n_vocab,))
        peak = logits.max(axis=1, keepdims=True)
        shifted = logits - peak
        result: np.ndarray[Any, np.dtype[np.float64]] = \
            shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        return result

    def score(self, rows: Sequence[int], tokens: Sequence[int],
              tops: Sequence[int]) -> list[TokenLogprob]:
        """`tokens[k]`'s log-probability under the distribution of batch row `rows[k]`, with
        the `tops[k]` most likely tokens there."""
        if not rows:
            return []
        dist = self._log_softmax(rows)
        return [TokenLogprob(token, self._piece(token), float(dist[k, token]),
                             self._top(dist[k], top))
                for k, (token, top) in enumerate(zip(tokens, tops, strict=True))]

    def _top(self, dist: np.ndarray[Any, np.dtype[np.float64]],
             top: int) -> tuple[tuple[int, bytes, float], ...]:
        if top <= 0:
            return ()
        best = np.argpartition(-dist, top - 1)[:top]
        best = best[np.argsort(-dist[best], kind="stable")]
        return tuple((int(t), self._piece(int(t)), float(dist[t])) for t in best)
