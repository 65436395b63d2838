"""A concurrent.futures.Future that builds its Condition only when somebody waits on it."""
from __future__ import annotations

import logging
import threading
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
    for `wait`. Every state change happens under `_lock`; waking waiters happens afterwards
    under the Condition, if there is one, which a waiter creates under `_lock` and holds while
    it checks the state: so a waiter either sees the final state or is woken."""

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

    def _wake(self, notify_waiters: str | None) -> None:
        cond = self._cond  # read after the state changed under _lock (see the class doc)
        if cond is None:
            return
        with cond:
            if notify_waiters is not None:
                for waiter in self._waiters:
                    getattr(waiter, notify_waiters)(self)
            cond.notify_all()

    def cancel(self) -> bool:
        with self._lock:
            if self._state in (RUNNING, FINISHED):
                return False
            if self._state in _CANCELLED:
                return True
            self._state = CANCELLED
        self._wake(None)
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
        with self._lock:
            state = self._state
            if state == PENDING:
                self._state = RUNNING
                return True
            if state == CANCELLED:
                self._state = CANCELLED_AND_NOTIFIED
        if state != CANCELLED:  # logged and raised outside the lock, as repr() takes it
            log.critical("Future %s in unexpected state: %s", id(self), state)
            raise RuntimeError("Future in unexpected state")
        self._wake("add_cancelled")
        return False

    def set_result(self, result: Any) -> None:
        self._finish(result, None, "add_result")

    def set_exception(self, exception: BaseException | None) -> None:
        self._finish(None, exception, "add_exception")

    def _finish(self, result: Any, exception: BaseException | None, notify: str) -> None:
        # Once a Condition exists, the state changes under it too: concurrent.futures.wait
        # reads the state of several futures while holding their Conditions.
        while True:
            cond = self._cond
            if cond is None:
                with self._lock:
                    if self._cond is not None:
                        continue  # a waiter made one meanwhile
                    ended = self._state in _ENDED
                    if not ended:
                        self._result, self._exception = result, exception
                        self._state = FINISHED
                break
            with cond:
                with self._lock:
                    ended = self._state in _ENDED
                    if not ended:
                        self._result, self._exception = result, exception
                        self._state = FINISHED
                if not ended:
                    for waiter in self._waiters:
                        getattr(waiter, notify)(self)
                    cond.notify_all()
            break
        if ended:  # raised outside the lock: repr() takes it
            raise InvalidStateError(f"{self._state}: {self!r}")
        self._invoke_callbacks()
