"""Speculative decoding inside the continuous batcher.

Before a step, each running choice that may speculate gets up to its window of draft tokens
(SpecState.accepted adapts it to how its drafts fared, up to `draft_max`): from prompt lookup
(what followed the latest earlier occurrence of its last n tokens, in its prompt or output) or
else from the draft model (draft.py). The choice then puts its next token and its
k drafts into the step's one llama_decode as k + 1 rows, all with logits, beside every other
sequence's rows. Verification samples the choice's own chain at each row in turn and accepts
drafts while they equal what it sampled (llama-server's common_sampler_sample_and_accept_n): the
first token that differs, or the token after the last draft, comes from the model itself, and
the KV of the rejected drafts is removed. Every emitted token is drawn from the model's
distribution given the tokens before it, by the same chain calls in the same order as without
speculation: greedy output, and a seeded request's sampled output, are unchanged (up to the
rounding of batches of other shapes). With deterministic drafts (prompt lookup, a greedy draft
model) this accepts a draft exactly as often as the standard rejection scheme would, p(draft).

Not speculated: grammar-constrained choices, choices with log-probabilities, steps with more
than `max_sequences` sequences decoding (drafts there would split the batch into more passes
over the weights, where the batch already keeps the hardware busy).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import llama_cpp as lc

from server.engine.llama.context import ContextConfig
from server.engine.llama.draft import DraftModel
from server.engine.llama.native import NativeModel
from server.engine.llama.sampling import SequenceSampler
from server.metrics import Metrics
from server.registry import SpeculativeSpec

if TYPE_CHECKING:
    from server.engine.llama.jobs import Choice, Job


@dataclass(frozen=True)
class Speculation:
    """How a loaded model speculates: the settings, and the draft model if it has one."""

    spec: SpeculativeSpec
    draft: NativeModel | None = None


class PromptLookup:
    """A sequence's tokens, with where each n-gram last ended, to propose what followed it."""

    def __init__(self, spec: SpeculativeSpec) -> None:
        self._sizes = range(spec.ngram_max, spec.ngram_min - 1, -1)  # longest first
        self.tokens: list[int] = []
        self._ends: dict[tuple[int, ...], int] = {}

    def extend(self, tokens: Sequence[int]) -> None:
        """Append `tokens`; every n-gram but those ending at the last token is indexed."""
        seq, ends = self.tokens, self._ends
        start = len(seq)
        seq.extend(tokens)
        for end in range(max(start - 1, 0), len(seq) - 1):
            for n in self._sizes:
                if end + 1 >= n:
                    ends[tuple(seq[end + 1 - n:end + 1])] = end

    def propose(self, limit: int) -> list[int]:
        """Up to `limit` tokens that followed the latest earlier occurrence of the longest
        n-gram the sequence ends with."""
        seq = self.tokens
        for n in self._sizes:
            end = self._ends.get(tuple(seq[-n:])) if n <= len(seq) else None
            if end is not None:
                return seq[end + 1:end + 1 + limit]
        return []


@dataclass(eq=False)
class SpecState:
    """One choice's speculation: its lookup index, how long a draft it may verify next, and
    this step's draft and its source."""

    lookup: PromptLookup | None
    window: int
    draft: list[int] = field(default_factory=list)
    method: str = ""

    def accepted(self, count: int, drafted: int, longest: int) -> None:
        """Adapt the window: double it after a draft accepted whole, else shrink it to one
        more than was accepted. On a CPU every verified row costs about half a decode step
        (docs/benchmarks.md), so drafts stay short where they keep failing."""
        self.window = min(2 * self.window, longest) if count == drafted else count + 1


def accept(sampler: SequenceSampler, ctx: Any, row: int, draft: Sequence[int],
           ends: Callable[[int], bool]) -> list[int]:
    """Sample the rows from `row` on (the next token's, then each draft token's) while the
    sampled token equals the draft; the tokens to emit, the last one the model's own."""
    tokens = []
    for i in range(len(draft) + 1):
        token = sampler.sample(ctx, row + i)
        tokens.append(token)
        if i == len(draft) or token != draft[i] or ends(token):
            break
    return tokens


FIRST_WINDOW = 4  # a choice's first draft: at most this long, doubled while drafts hold

# A choice that may draft this step: its index, itself, its state, its longest draft.
_Wanted = tuple[int, "Choice", SpecState, int]


class Speculator:
    """A model's speculative decoding, called by its scheduler thread."""

    def __init__(self, model: NativeModel, speculation: Speculation, config: ContextConfig,
                 metrics: Metrics, name: str) -> None:
        self.spec = speculation.spec
        self._is_eog = model.is_eog
        draft = speculation.draft
        self._draft = None if draft is None else DraftModel(draft, config)
        self._n_ctx = config.n_ctx
        self._drafted = {m: metrics.spec_draft_tokens.labels(name, m) for m in ("ngram", "draft")}
        self._accepted = {m: metrics.spec_accepted_tokens.labels(name, m)
                          for m in ("ngram", "draft")}

    def close(self) -> None:
        if self._draft is not None:
            self._draft.close()

    def start(self, job: Job) -> SpecState | None:
        """The speculation state of a new choice of `job`, or None when it does not speculate
        (a speculating chain samples several rows a step: it stays on the CPU)."""
        if job.request.grammar is not None or job.request.logprobs is not None:
            return None
        return SpecState(PromptLookup(self.spec) if self.spec.ngram else None,
                         window=min(FIRST_WINDOW, self.spec.draft_max))

    def plan(self, decoding: Sequence[Choice], capacity: int,
             prefilling: bool) -> dict[int, int]:
        """Draft for this step's `decoding` choices; their draft lengths by index. Drafts take
        at most what the decode rows leave of `capacity` (half of it while prompts are read)."""
        if len(decoding) > self.spec.max_sequences:
            return {}
        shortest = max(1, self.spec.draft_min)
        wanted: list[_Wanted] = []
        for k, choice in enumerate(decoding):
            if choice.spec is None:
                continue
            choice.spec.draft = []
            limit = min(choice.spec.window, choice.job.max_new - choice.generated - 1,
                        self._n_ctx - 1 - choice.pos)
            if limit >= shortest:
                wanted.append((k, choice, choice.spec, limit))
        self._look_up(wanted)
        self._ask_draft_model([w for w in wanted if len(w[2].draft) < shortest])
        room = capacity - len(decoding)
        room = room // 2 if prefilling else room
        sizes: dict[int, int] = {}
        for k, choice, state, _ in wanted:
            del state.draft[max(room, 0):]
            # Nothing after an end token would be emitted.
            stops = choice.job.stop_tokens
            end = next((i for i, t in enumerate(state.draft) if t in stops or self._is_eog(t)),
                       None)
            if end is not None:
                del state.draft[end + 1:]
            if len(state.draft) < shortest:
                state.draft = []
                continue
            sizes[k] = len(state.draft)
            room -= sizes[k]
        return sizes

    @staticmethod
    def _look_up(wanted: list[_Wanted]) -> None:
        for _, choice, state, limit in wanted:
            lookup, job = state.lookup, choice.job
            if lookup is None:
                continue
            if not lookup.tokens:
                lookup.extend(job.tokens)
            # The index holds prompt + output as of the last step: add what the choice decoded
            # since, and the token it decodes next.
            lookup.extend([*choice.fed[len(lookup.tokens) - len(job.tokens):],
                           choice.next_token])
            state.draft, state.method = lookup.propose(limit), "ngram"

    def _ask_draft_model(self, wanted: list[_Wanted]) -> None:
        if self._draft is None or not wanted:
            return
        drafts = self._draft.propose(
            [(c.seq_id, c.job.tokens + c.fed + [c.next_token], limit)
             for _, c, _, limit in wanted], self.spec.draft_p_min)
        for (_, _, state, _), draft in zip(wanted, drafts, strict=True):
            state.draft, state.method = draft, "draft"

    def verify(self, choice: Choice, ctx: Any, row: int,
               ends: Callable[[int], bool]) -> list[int]:
        """The tokens `choice` emits from its rows (from `row` on), counted in the metrics."""
        state = choice.spec
        assert state is not None
        draft, state.draft = state.draft, []
        tokens = accept(choice.sampler, ctx, row, draft, ends)
        accepted = sum(1 for t, d in zip(tokens, draft, strict=False) if t == d)
        state.accepted(accepted, len(draft), self.spec.draft_max)
        self._drafted[state.method].inc(len(draft))
        self._accepted[state.method].inc(accepted)
        return tokens


def drop_rejected(memory: Any, choice: Choice) -> None:
    """Remove the KV the choice's sequence holds past its accepted tokens (rejected drafts)."""
    lc.llama_memory_seq_rm(memory, choice.seq_id, choice.pos, -1)
