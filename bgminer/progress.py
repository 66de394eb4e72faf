"""Progress reporting and cancellation shared by every long-running engine call.

Engine functions take ``progress: ProgressFn | None`` and ``cancel: CancelToken | None``;
they call ``progress(done, total, message)`` now and then and ``cancel.check()`` between
batches. The jobs module connects both to a job row in the store.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol


class Cancelled(Exception):
    """Raised inside a long-running call when its cancel token was set."""


class ProgressFn(Protocol):
    def __call__(self, done: int, total: int, message: str = "") -> None: ...


class CancelToken:
    """Thread-safe flag; ``check()`` raises :class:`Cancelled` once it is set."""

    def __init__(self, is_set: Callable[[], bool] | None = None):
        self._event = threading.Event()
        self._is_set = is_set  # an extra source of truth, e.g. the job row in the store

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        if not self._event.is_set() and self._is_set is not None and self._is_set():
            self._event.set()
        return self._event.is_set()

    def check(self) -> None:
        if self.cancelled:
            raise Cancelled()


@dataclass
class RateMeter:
    """Items/s and ETA over a run, for progress messages."""

    total: int
    start: float = field(default_factory=time.perf_counter)

    def message(self, done: int, unit: str = "images") -> str:
        elapsed = time.perf_counter() - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        if rate <= 0:
            return f"{done}/{self.total} {unit}"
        eta = (self.total - done) / rate
        return f"{done}/{self.total} {unit}, {rate:.1f} {unit}/s, ETA {eta:.0f} s"


def check(cancel: CancelToken | None) -> None:
    if cancel is not None:
        cancel.check()


def report(progress: ProgressFn | None, done: int, total: int, message: str = "") -> None:
    if progress is not None:
        progress(done, total, message)
