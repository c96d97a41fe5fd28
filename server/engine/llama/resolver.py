"""Grammar filters of the whole vocabulary, off the scheduler thread.

When a grammar refuses the token a constrained sequence sampled and its best-scoring candidates
cannot decide either, the grammar must filter the whole vocabulary: 5-30 ms of host work. Done
on the scheduler thread, every other sequence in the batch waits for it (on a GPU, where a step
takes a few milliseconds, one such filter costs the batch several steps). Here it runs on a
worker thread (llama.cpp releases the GIL) while the batch goes on without that sequence; the
sequence takes its token at the first step after the filter ends.
"""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Iterator

from server.engine.llama.jobs import Choice

WORKERS = 2  # constrained sequences whose filters run at once


class Resolver:
    """The choices whose next token a worker thread is picking."""

    def __init__(self, name: str) -> None:
        self._pool = cf.ThreadPoolExecutor(WORKERS, thread_name_prefix=f"grammar:{name}")
        self._pending: dict[Choice, cf.Future[int]] = {}

    def __bool__(self) -> bool:
        return bool(self._pending)

    def __contains__(self, choice: Choice) -> bool:
        return choice in self._pending

    def submit(self, choice: Choice) -> None:
        """Finish `choice`'s deferred sample (SequenceSampler.try_sample gave None)."""
        self._pending[choice] = self._pool.submit(choice.sampler.resolve)

    def done(self) -> Iterator[tuple[Choice, int]]:
        """The choices whose token is picked, with it (a failed filter raises here)."""
        for choice, future in [(c, f) for c, f in self._pending.items() if f.done()]:
            del self._pending[choice]
            yield choice, future.result()

    def wait(self, timeout: float) -> None:
        """Block until a pending choice's token is picked, or `timeout` seconds."""
        cf.wait(list(self._pending.values()), timeout, return_when=cf.FIRST_COMPLETED)

    def forget(self, choice: Choice) -> None:
        """Drop `choice` (finished, cancelled, failed); returns once no worker uses its
        sampler, which the caller then frees."""
        future = self._pending.pop(choice, None)
        if future is not None and not future.cancel():
            cf.wait([future])

    def close(self) -> None:
        for choice in list(self._pending):
            self.forget(choice)
        self._pool.shutdown(wait=True)
