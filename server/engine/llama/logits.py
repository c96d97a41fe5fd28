"""Log-probabilities from a decoded batch's logits, for the requests that ask for them.

Only rows a request asked logits for are read; everything here runs on the scheduler thread
right after llama_decode, before the next decode overwrites the logits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from server.engine.base import TokenLogprob
from server.engine.llama.sampling import logits_row


class LogitReader:
    """Reads rows of a context's output logits as log-softmax distributions."""

    def __init__(self, ctx: Any, n_vocab: int, piece: Callable[[int], bytes]) -> None:
        self._ctx = ctx
        self._n_vocab = n_vocab
        self._piece = piece

    def _log_softmax(self, row: int) -> np.ndarray[Any, np.dtype[np.float32]]:
        logits = logits_row(self._ctx, row, self._n_vocab)
        shifted = logits - logits.max()
        # The normaliser in float64: a 152K-term sum of float32 loses digits.
        norm = np.log(np.exp(shifted).sum(dtype=np.float64))
        result: np.ndarray[Any, np.dtype[np.float32]] = shifted - np.float32(norm)
        return result

    def score(self, rows: Sequence[int], tokens: Sequence[int],
              tops: Sequence[int]) -> list[TokenLogprob]:
        """`tokens[k]`'s log-probability under the distribution of batch row `rows[k]`, with
        the `tops[k]` most likely tokens there. One row at a time, in float32: a 512-row echo
        step at a 152K vocabulary holds one row (0.6 MB), not all of them (~300 MB)."""
        scores = []
        for row, token, top in zip(rows, tokens, tops, strict=True):
            dist = self._log_softmax(row)
            scores.append(TokenLogprob(token, self._piece(token), float(dist[token]),
                                       self._top(dist, top)))
        return scores

    def _top(self, dist: np.ndarray[Any, np.dtype[np.float32]],
             top: int) -> tuple[tuple[int, bytes, float], ...]:
        if top <= 0:
            return ()
        best = np.argpartition(-dist, top - 1)[:top]
        best = best[np.argsort(-dist[best], kind="stable")]
        return tuple((int(t), self._piece(int(t)), float(dist[t])) for t in best)
