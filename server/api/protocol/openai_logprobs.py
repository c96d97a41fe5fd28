"""Log-probabilities on the wire: chat's `logprobs.content` and completions' parallel lists."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel

from server.engine.base import TokenLogprob

MAX_TOP_LOGPROBS = 20


def _text(piece: bytes) -> str:
    return piece.decode("utf-8", errors="replace")


# ---------------------------------------------------------------- chat --------------------


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatCompletionTokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[ChatCompletionTokenLogprob] | None
    refusal: list[ChatCompletionTokenLogprob] | None = None

    @classmethod
    def of(cls, entries: Sequence[TokenLogprob]) -> ChoiceLogprobs:
        return cls(content=[ChatCompletionTokenLogprob(
            token=_text(e.piece), logprob=e.logprob or 0.0, bytes=list(e.piece),
            top_logprobs=[TopLogprob(token=_text(piece), logprob=lp, bytes=list(piece))
                          for _, piece, lp in e.top]) for e in entries])


# ---------------------------------------------------------------- completions -------------


class CompletionLogprobs(BaseModel):
    text_offset: list[int]
    token_logprobs: list[float | None]
    tokens: list[str]
    top_logprobs: list[dict[str, float] | None]

    @classmethod
    def of(cls, entries: Sequence[TokenLogprob], offset: int = 0) -> CompletionLogprobs:
        """The lists for `entries`, whose text starts at `offset` in the choice's text."""
        out = cls(text_offset=[], token_logprobs=[], tokens=[], top_logprobs=[])
        for entry in entries:
            text = _text(entry.piece)
            out.text_offset.append(offset)
            out.tokens.append(text)
            out.token_logprobs.append(entry.logprob)
            out.top_logprobs.append(None if entry.logprob is None else
                                    {_text(piece): lp for _, piece, lp in entry.top})
            offset += len(text)
        return out

    def extend(self, other: CompletionLogprobs) -> None:
        self.text_offset += other.text_offset
        self.token_logprobs += other.token_logprobs
        self.tokens += other.tokens
        self.top_logprobs += other.top_logprobs
