"""A time budget for pure-Python work in the current thread, such as rendering a template.

On expiry a timer thread raises an exception inside the working thread
(PyThreadState_SetAsyncExc), which Python delivers at its next bytecode boundary: a template
looping in Jinja stops there. A single long C call finishes first; sandbox.py keeps those small.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class DeadlineExceeded(Exception):
    """The work ran past its time budget and was stopped."""


class _Expired(BaseException):
    """Raised asynchronously in the working thread; a BaseException so that no
    `except Exception` on the way (Jinja's, a template's filters') can swallow it."""


def _set_async_exc(thread_id: int, exc: type[BaseException] | None) -> None:
    # None (NULL) clears an exception that is set but not yet delivered.
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), ctypes.py_object(exc) if exc is not None else None)


class _Alarm:
    def __init__(self, thread_id: int) -> None:
        self.thread_id = thread_id
        self.lock = threading.Lock()
        self.armed = True
        self.fired = False

    def fire(self) -> None:
        with self.lock:
            if self.armed:
                self.fired = True
                _set_async_exc(self.thread_id, _Expired)

    def disarm(self) -> None:
        with self.lock:
            self.armed = False
            if self.fired:
                _set_async_exc(self.thread_id, None)


def call_with_deadline(work: Callable[[], T], seconds: float) -> T:
    """`work()`, or DeadlineExceeded if it runs longer than `seconds`."""
    alarm = _Alarm(threading.get_ident())
    timer = threading.Timer(seconds, alarm.fire)
    timer.daemon = True
    try:
        try:
            timer.start()
            return work()
        finally:
            # After disarm() returns, no exception is set or pending in this thread; one
            # delivered before it (here included) propagates to the handler below.
            alarm.disarm()
            timer.cancel()
    except _Expired:
        raise DeadlineExceeded(f"stopped after {seconds:g} s") from None
