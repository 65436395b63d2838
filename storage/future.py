"""A concurrent.futures.Future that builds its Condition only when somebody waits on it."""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, InvalidStateError
from concurrent.futures._base import (
    CANCELLED,
    CANCELLED_AND_NOTIFIED,
    FINISHED,
    PENDING,
    RUNNING,
)
from typing import Any, TypeVar

T = TypeVar("T")
# The logger concurrent.futures reports callback failures on, so handlers set for it apply.
log = logging.getLogger("concurrent.futures")

_ENDED = (CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED)
_CANCELLED = (CANCELLED, CANCELLED_AND_NOTIFIED)


class LightFuture(Future[T]):
    """Behaves as `concurrent.futures.Future` (wait, as_completed and asyncio.wrap_future
    included), but most futures of a payment only ever get a callback and a result: a plain
    lock guards their state, and the Condition (with its RLock, deque and waiters) that
    `Future` makes for each is made only for a thread that blocks on `result`/`exception` or
    for `wait`. Every state change happens under `_lock` and, once a waiter created the
    Condition (under `_lock`), under that Condition too, which also wakes the waiters: so a
    waiter holding the Condition sees a state that cannot move, and is woken when it does."""

    def __init__(self) -> None:  # no super().__init__(): it builds the Condition
        self._lock = threading.Lock()
        self._cond: threading.Condition | None = None
        self._state = PENDING
        self._result: Any = None
        self._exception: BaseException | None = None
        self._waiters: list[Any] = []
        self._done_callbacks: list[Any] = []

    @property
    def _condition(self) -> threading.Condition:  # type: ignore[override]
        with self._lock:
            if self._cond is None:
                self._cond = threading.Condition()
            return self._cond

    def _change(self, change: Callable[[], bool], notify: str | None) -> bool:
        """Run `change()`, which reads and sets the state and says whether it moved, under
        `_lock` and, once a waiter made a Condition, under that Condition too (as
        concurrent.futures.wait reads the states of several futures while holding theirs);
        then wake the waiters if it moved."""
        while True:
            cond = self._cond
            if cond is None:
                with self._lock:
                    if self._cond is None:
                        return change()
                continue  # a waiter made one meanwhile
            with cond:
                with self._lock:
                    changed = change()
                if changed:
                    if notify is not None:
                        for waiter in self._waiters:
                            getattr(waiter, notify)(self)
                    cond.notify_all()
                return changed

    def cancel(self) -> bool:
        def change() -> bool:
            if self._state in (RUNNING, FINISHED, *_CANCELLED):
                return False
            self._state = CANCELLED
            return True

        if not self._change(change, None):
            return self._state in _CANCELLED  # cancelled before: still True
        self._invoke_callbacks()
        return True

    def cancelled(self) -> bool:
        return self._state in _CANCELLED

    def running(self) -> bool:
        return self._state == RUNNING

    def done(self) -> bool:
        return self._state in _ENDED

    def add_done_callback(self, fn: Any) -> None:
        with self._lock:
            if self._state not in _ENDED:
                self._done_callbacks.append(fn)
                return
        try:
            fn(self)
        except Exception:
            log.exception("exception calling callback for %r", self)

    def _invoke_callbacks(self) -> None:
        for callback in self._done_callbacks:
            try:
                callback(self)
            except Exception:
                log.exception("exception calling callback for %r", self)

    def _outcome(self, timeout: float | None, want_result: bool) -> Any:
        if self._state not in _ENDED:
            cond = self._condition
            with cond:
                if self._state not in _ENDED:
                    cond.wait(timeout)
        if self._state in _CANCELLED:
            raise CancelledError()
        if self._state != FINISHED:
            raise TimeoutError()
        if not want_result:
            return self._exception
        if self._exception is not None:
            raise self._exception
        return self._result

    def result(self, timeout: float | None = None) -> T:
        try:
            return self._outcome(timeout, True)
        finally:
            del self  # no cycle through the raised exception's traceback

    def exception(self, timeout: float | None = None) -> BaseException | None:
        return self._outcome(timeout, False)

    def set_running_or_notify_cancel(self) -> bool:
        if self._cond is None:  # the common case, nobody waiting: no closure, one lock
            with self._lock:
                if self._cond is None and self._state == PENDING:
                    self._state = RUNNING
                    return True
        prior = PENDING

        def change() -> bool:
            nonlocal prior
            prior = self._state
            if prior == PENDING:
                self._state = RUNNING
            elif prior == CANCELLED:
                self._state = CANCELLED_AND_NOTIFIED
                return True  # waiters hear of the cancel
            return False

        self._change(change, "add_cancelled")
        if prior == PENDING:
            return True
        if prior != CANCELLED:  # logged and raised outside the lock, as repr() takes it
            log.critical("Future %s in unexpected state: %s", id(self), prior)
            raise RuntimeError("Future in unexpected state")
        return False

    def set_result(self, result: Any) -> None:
        if self._cond is None:  # the common case, nobody waiting: no closure, one lock
            with self._lock:
                done = self._cond is None and self._state not in _ENDED
                if done:
                    self._result, self._state = result, FINISHED
            if done:
                self._invoke_callbacks()
                return
        self._finish(result, None, "add_result")

    def set_exception(self, exception: BaseException | None) -> None:
        self._finish(None, exception, "add_exception")

    def _finish(self, result: Any, exception: BaseException | None, notify: str) -> None:
        def change() -> bool:
            if self._state in _ENDED:
                return False
            self._result, self._exception = result, exception
            self._state = FINISHED
            return True

        if not self._change(change, notify):  # raised outside the lock: repr() takes it
            raise InvalidStateError(f"{self._state}: {self!r}")
        self._invoke_callbacks()
