"""Token bytes → safe output text: whole UTF-8 characters only, stop strings held back and cut."""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class StopTextStream:
    """Turns the byte pieces of generated tokens into text that may be sent to a client.

    Text that could still become the start of a stop string is held back until it can't; a
    completed stop string ends the stream and neither it nor anything after it is ever emitted.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the stream

    def feed(self, piece: bytes) -> str:
        """Add a token's bytes; return the text now safe to emit (maybe empty)."""
        if self.stopped:
            return ""
        if not self._stops:
            return self._decoder.decode(piece)
        self._pending += self._decoder.decode(piece)
        hit = self._earliest_stop()
        if hit is not None:
            at, self.matched = hit
            out, self._pending, self.stopped = self._pending[:at], "", True
            return out
        keep = self._held_back_length()
        cut = len(self._pending) - keep
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out

    def flush(self) -> str:
        """At the end of generation: text held back for a stop string that never completed.

        Bytes of an unfinished UTF-8 character are dropped rather than sent broken.
        """
        out, self._pending = self._pending, ""
        self._decoder.reset()
        return "" if self.stopped else out

    def _earliest_stop(self) -> tuple[int, str] | None:
        found = [(i, s) for s in self._stops if (i := self._pending.find(s)) >= 0]
        return min(found, key=lambda hit: hit[0]) if found else None

    def _held_back_length(self) -> int:
        """Length of the longest tail of the pending text that begins some stop string."""
        return max((partial_suffix(self._pending, stop) for stop in self._stops), default=0)


def partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of `text` that begins `tag` (and is not all of it): the
    text to hold back while `tag` may still be arriving."""
    for size in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0
