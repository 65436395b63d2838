"""Ledger clocks: the wall clock, and a virtual clock that tests and simulations advance by hand."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable


class WallClock:
    """Whole seconds of real time."""

    def now(self) -> int:
        return int(time.time())

    def advance(self, seconds: int) -> None:
        raise TypeError("the wall clock cannot be advanced; use paychan.VirtualClock()")


class VirtualClock:
    """A clock that only moves when `advance` is called; listeners hear each move."""

    def __init__(self, start: int = 1_700_000_000) -> None:
        self._now = start
        self._lock = threading.Lock()
        self._listeners: list[Callable[[int], None]] = []

    def now(self) -> int:
        with self._lock:
            return self._now

    def advance(self, seconds: int) -> None:
        if isinstance(seconds, bool) or not isinstance(seconds, int) or seconds < 0:
            raise ValueError("advance takes a non-negative whole number of seconds")
        with self._lock:
            self._now += seconds
            now, listeners = self._now, list(self._listeners)
        for listener in listeners:
            listener(now)

    def listen(self, callback: Callable[[int], None]) -> None:
        with self._lock:
            self._listeners.append(callback)
