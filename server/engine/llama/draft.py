"""A draft model for speculative decoding: a small model with the target's vocabulary, in a
llama_context of its own whose sequence ids mirror the target's.

Each draft sequence keeps the tokens its KV holds (from position 0); drafting for a target
sequence first brings the draft's KV to that sequence's tokens (dropping what diverged, such as
rejected drafts or another request's output, and reading what is new), then decodes greedily,
one row per drafting sequence per pass, until the draft is long enough or the draft model's
top token is less likely than `p_min` (llama.cpp's draft-simple: top token, `--draft-p-min`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import llama_cpp as lc
import numpy as np

from server.engine.llama.buffer import BatchBuffer
from server.engine.llama.context import ContextConfig, context_params, create_context
from server.engine.llama.native import NativeModel
from server.engine.llama.prefix import common_prefix
from server.engine.llama.sampling import logits_row
from server.errors import ModelLoadFailed

log = logging.getLogger("server.engine")
# As llama.cpp's common_speculative_are_compatible: token texts are compared from this id on.
_FIRST_CHECKED_TOKEN = 5


def vocab_mismatch(target: NativeModel, draft: NativeModel) -> str | None:
    """Why `draft` cannot draft for `target`, or None: the same vocabulary type, BOS and EOS
    handling, size and token texts (llama.cpp also allows sizes 128 apart; a draft token the
    target does not have could not be verified, so here the sizes must be equal)."""
    tv, dv = target.vocab, draft.vocab
    if lc.llama_vocab_type(tv) != lc.llama_vocab_type(dv):
        return "the vocabulary types differ"
    if (target.add_bos, target.eos) != (draft.add_bos, draft.eos) or \
            (target.add_bos and target.bos != draft.bos):
        return "the BOS/EOS tokens differ"
    if target.n_vocab != draft.n_vocab:
        return f"the vocabularies have {target.n_vocab} and {draft.n_vocab} tokens"
    for token in range(_FIRST_CHECKED_TOKEN, target.n_vocab):
        if lc.llama_vocab_get_text(tv, token) != lc.llama_vocab_get_text(dv, token):
            return f"token {token} differs ({target.token_text(token)!r} against " \
                   f"{draft.token_text(token)!r})"
    return None


def load_draft(path: Path, target: NativeModel, n_gpu_layers: int, repack: bool) -> NativeModel:
    """The draft model at `path`, checked against `target`'s vocabulary."""
    draft = NativeModel(path, n_gpu_layers=n_gpu_layers, repack=repack)
    why = vocab_mismatch(target, draft)
    if why is not None:
        draft.close()
        raise ModelLoadFailed(f"the draft model {path.name} cannot draft for this model: {why}")
    return draft


class DraftModel:
    """The draft model's context; used by the target's scheduler thread only."""

    def __init__(self, model: NativeModel, config: ContextConfig) -> None:
        self.model = model
        params = context_params(config)
        # A stream of n_ctx cells per sequence, whatever the target's cache layout.
        params.n_ctx = config.n_ctx * config.parallel
        params.n_batch = params.n_ubatch = config.batch_tokens
        params.n_seq_max = config.parallel
        params.kv_unified = False
        self.ctx = create_context(model, params, "the draft model's context")
        self._memory = lc.llama_get_memory(self.ctx)
        self._buffer = BatchBuffer(config.batch_tokens, 1)
        self._held: list[list[int]] = [[] for _ in range(config.parallel)]  # tokens in its KV

    def close(self) -> None:
        lc.llama_free(self.ctx)
        self.model.close()

    def propose(self, wanted: Sequence[tuple[int, list[int], int]],
                p_min: float) -> list[list[int]]:
        """Greedy drafts for each `(seq_id, tokens so far, limit)`: up to `limit` tokens after
        the last one, stopping where the top token's probability is under `p_min`."""
        drafts: list[list[int]] = [[] for _ in wanted]
        if not self._catch_up(wanted):
            return drafts
        rows = [(i, tokens[-1], len(tokens) - 1) for i, (_, tokens, _) in enumerate(wanted)]
        while rows:
            buffer = self._buffer
            buffer.clear()
            buffer.add_rows([t for _, t, _ in rows], [pos for *_, pos in rows],
                            [wanted[i][0] for i, _, _ in rows])
            if not self._decode([wanted[i][0] for i, _, _ in rows]):
                return [[] for _ in wanted]
            following = []
            for row, (i, token, pos) in enumerate(rows):
                seq, _, limit = wanted[i]
                self._held[seq].append(token)
                best, p = self._top(row)
                if p < p_min:
                    continue
                drafts[i].append(best)
                if len(drafts[i]) < limit and not self.model.is_eog(best):
                    following.append((i, best, pos + 1))
            rows = following
        return drafts

    def _catch_up(self, wanted: Sequence[tuple[int, list[int], int]]) -> bool:
        """Make each sequence's KV hold all of its tokens but the last (read next, for its
        logits): drop what diverged, read what is missing in batches without logits."""
        buffer = self._buffer
        buffer.clear()
        pending: list[int] = []
        for seq, tokens, _ in wanted:
            held = self._held[seq]
            keep = min(common_prefix(held, tokens), len(tokens) - 1)
            if keep < len(held):
                lc.llama_memory_seq_rm(self._memory, seq, keep, -1)
                del held[keep:]
            start = keep
            while start < len(tokens) - 1:
                if buffer.n == buffer.capacity:
                    if not self._decode(pending):
                        return False
                    buffer.clear()
                    pending = []
                chunk = tokens[start:min(len(tokens) - 1, start + buffer.capacity - buffer.n)]
                buffer.add_tokens(chunk, start, [seq], False)
                held.extend(chunk)
                pending.append(seq)
                start += len(chunk)
        return not buffer.n or self._decode(pending)

    def _decode(self, seqs: Sequence[int]) -> bool:
        status = lc.llama_decode(self.ctx, self._buffer.ready())
        if status == 0:
            return True
        # What a failed decode left in these sequences is unknown: read them again next time.
        log.warning("the draft model failed to decode (status %d); no drafts this step", status)
        for seq in set(seqs):
            lc.llama_memory_seq_rm(self._memory, seq, 0, -1)
            self._held[seq] = []
        return False

    def _top(self, row: int) -> tuple[int, float]:
        """The draft model's most likely next token at batch row `row`, and its probability."""
        logits = logits_row(self.ctx, row, self.model.n_vocab)
        best = int(np.argmax(logits))
        return best, float(1.0 / np.exp(logits - logits[best]).sum())
