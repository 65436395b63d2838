"""Calls handed to an asyncio loop from other threads, many per wake-up of the loop."""
from __future__ import annotations

import asyncio
import threading
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

_by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopCalls] = (
    weakref.WeakKeyDictionary())
_by_loop_lock = threading.Lock()


class LoopCalls:
    """`call(fn, *args)` runs `fn(*args)` on the loop, in call order, from any thread.

    `loop.call_soon_threadsafe` writes to the loop's wake-up pipe on every call; under load
    (a writer batch completing twenty payments, each with a frame to send) this wakes the
    loop once for all of them. On the loop's own thread the call runs at once."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # Weak: the registry must not keep a finished loop (one per asyncio.run) alive.
        self._loop = weakref.ref(loop)
        self._calls: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._scheduled = False
        self._lock = threading.Lock()

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> LoopCalls:
        """The one instance for `loop` (so that every caller shares its wake-ups)."""
        with _by_loop_lock:
            calls = _by_loop.get(loop)
            if calls is None:
                calls = _by_loop[loop] = cls(loop)
            return calls

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        """RuntimeError once the loop is closed (or gone), as with call_soon_threadsafe."""
        loop = self._loop()
        if loop is None:
            raise RuntimeError("the event loop is gone")
        with self._lock:
            # On the loop with nothing queued or being flushed ahead of it: no wake-up needed.
            run_now = asyncio._get_running_loop() is loop and not self._scheduled
        if run_now:
            fn(*args)
            return
        with self._lock:
            if loop.is_closed():
                raise RuntimeError("Event loop is closed")
            self._calls.append((fn, args))
            if self._scheduled:
                return  # the flush already scheduled runs this one too
            self._scheduled = True
        try:
            loop.call_soon_threadsafe(self._flush)
        except RuntimeError:
            with self._lock:  # closed meanwhile: nothing queued will ever run
                self._calls.clear()
                self._scheduled = False
            raise

    def _flush(self) -> None:
        # One at a time, so that a call made by one of them queues behind the rest.
        while True:
            with self._lock:
                if not self._calls:
                    self._scheduled = False
                    return
                fn, args = self._calls.popleft()
            try:
                fn(*args)
            except Exception as exc:  # one failing call must not drop the others
                loop = self._loop()
                if loop is not None:
                    loop.call_exception_handler(
                        {"message": f"exception in {fn!r}", "exception": exc})
