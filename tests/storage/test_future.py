"""LightFuture behaves as concurrent.futures.Future: each test runs against both classes."""
from __future__ import annotations

import asyncio
import logging
import random
import re
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import (
    ALL_COMPLETED,
    FIRST_COMPLETED,
    CancelledError,
    Future,
    InvalidStateError,
    as_completed,
    wait,
)
from typing import Any, cast

import pytest

from paychan.storage.future import LightFuture

WAIT = 10.0
BLOCK = 3 * WAIT
FutureClass = type[Future[Any]]


@pytest.fixture(params=[Future, LightFuture], ids=["Future", "LightFuture"])
def cls(request: pytest.FixtureRequest) -> FutureClass:
    return cast(FutureClass, request.param)


def _until(predicate: Callable[[], object]) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.001)


def _start(*targets: Callable[[], object]) -> list[threading.Thread]:
    threads = [threading.Thread(target=target, daemon=True) for target in targets]
    for t in threads:
        t.start()
    return threads


def _join(threads: list[threading.Thread]) -> None:
    """Every thread returns within WAIT (threads that block give themselves BLOCK)."""
    deadline = time.monotonic() + WAIT
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert [t.is_alive() for t in threads] == [False] * len(threads), "a thread did not return"


def _in_thread(fn: Callable[[], object]) -> BaseException | None:
    raised: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as e:
            raised.append(e)

    _join(_start(run))
    return raised[0] if raised else None


def test_result_and_exception_when_done(cls: FutureClass) -> None:
    ok, bad, err = cls(), cls(), ValueError("no")
    ok.set_result(7)
    bad.set_exception(err)
    assert ok.result() == 7 and ok.result(timeout=0) == 7 and ok.exception() is None
    assert bad.exception() is err and bad.exception(timeout=0) is err
    with pytest.raises(ValueError) as info:
        bad.result()
    assert info.value is err


def test_timeout_while_pending_and_cancelled_error(cls: FutureClass) -> None:
    f = cls()
    with pytest.raises(TimeoutError):
        f.result(timeout=0.01)
    with pytest.raises(TimeoutError):
        f.exception(timeout=0)
    assert f.cancel()
    with pytest.raises(CancelledError):
        f.result(timeout=0)
    with pytest.raises(CancelledError):
        f.exception()


def _blocked(f: Future[Any], n: int) -> bool:
    """n threads wait on f's Condition (a LightFuture's is looked at, not made)."""
    cond = vars(f).get("_cond") if isinstance(f, LightFuture) else f._condition
    return cond is not None and len(cast(Any, cond)._waiters) == n


@pytest.mark.parametrize("how", ["set_result", "set_exception", "cancel"])
def test_blocked_threads_are_woken(cls: FutureClass, how: str) -> None:
    f, err = cls(), KeyError("k")
    got: dict[str, object] = {}

    def call(name: str) -> None:
        try:
            got[name] = getattr(f, name)(timeout=BLOCK)
        except BaseException as e:
            got[name] = e

    threads = _start(lambda: call("result"), lambda: call("exception"))
    _until(lambda: _blocked(f, 2))
    getattr(f, how)(*{"set_result": ("v",), "set_exception": (err,), "cancel": ()}[how])
    _join(threads)
    if how == "cancel":
        assert [type(got[n]) for n in ("result", "exception")] == [CancelledError] * 2
    else:
        assert got == ({"result": "v", "exception": None} if how == "set_result"
                       else {"result": err, "exception": err})


def test_states_and_cancel(cls: FutureClass) -> None:
    pending, running, finished = cls(), cls(), cls()
    assert (pending.cancelled(), pending.running(), pending.done()) == (False, False, False)
    assert running.set_running_or_notify_cancel()
    assert (running.cancelled(), running.running(), running.done()) == (False, True, False)
    assert not running.cancel() and running.running()
    finished.set_result(1)
    assert not finished.cancel()
    assert (finished.cancelled(), finished.running(), finished.done()) == (False, False, True)
    with pytest.raises(RuntimeError, match="Future in unexpected state"):
        finished.set_running_or_notify_cancel()
    assert pending.cancel() and pending.cancel()
    assert (pending.cancelled(), pending.running(), pending.done()) == (True, False, True)
    assert not pending.set_running_or_notify_cancel()
    assert pending.cancelled() and pending.done()


@pytest.mark.parametrize(("first", "second"), [
    ("set_result", "set_result"), ("set_result", "set_exception"),
    ("set_exception", "set_result"), ("cancel", "set_exception")])
def test_second_outcome_is_refused(cls: FutureClass, first: str, second: str) -> None:
    f, err = cls(), OSError("first")
    getattr(f, first)(*{"set_result": (1,), "set_exception": (err,), "cancel": ()}[first])
    raised = _in_thread(lambda: getattr(f, second)(2 if second == "set_result" else KeyError()))
    assert isinstance(raised, InvalidStateError)
    assert f.cancelled() == (first == "cancel")
    if first != "cancel":
        assert f.exception() is (err if first == "set_exception" else None)
        assert first == "set_exception" or f.result() == 1


@pytest.mark.parametrize("how", ["set_result", "cancel"])
def test_done_callbacks(cls: FutureClass, how: str, caplog: pytest.LogCaptureFixture) -> None:
    f, calls = cls(), []

    def boom(fut: Future[Any]) -> None:
        raise ValueError("callback failed")

    f.add_done_callback(lambda fut: calls.append(("a", fut)))
    f.add_done_callback(boom)
    f.add_done_callback(lambda fut: calls.append(("b", fut)))
    assert calls == []
    if how == "set_result":
        f.set_result(1)
    else:
        f.cancel()
        f.set_running_or_notify_cancel()
    assert calls == [("a", f), ("b", f)]
    f.add_done_callback(lambda fut: calls.append(("late", fut)))
    f.add_done_callback(boom)
    assert calls == [("a", f), ("b", f), ("late", f)]
    errors = [r for r in caplog.records if "exception calling callback" in r.getMessage()]
    assert len(errors) == 2
    assert all(r.exc_info and isinstance(r.exc_info[1], ValueError) for r in errors)


def test_log_records(cls: FutureClass, caplog: pytest.LogCaptureFixture) -> None:
    f = cls()
    f.add_done_callback(lambda fut: 1 / 0)
    f.set_result(None)
    with pytest.raises(RuntimeError):
        f.set_running_or_notify_cancel()
    assert [(r.name, r.levelno) for r in caplog.records] == [
        ("concurrent.futures", logging.ERROR), ("concurrent.futures", logging.CRITICAL)]


def _set_when_waited(f: Future[Any], value: object) -> list[threading.Thread]:
    """Complete f from another thread once wait/as_completed has installed its waiter on it."""
    def run() -> None:
        _until(lambda: f._waiters)
        f.set_result(value)

    return _start(run)


def test_wait(cls: FutureClass) -> None:
    a, b, c = cls(), cls(), cls()
    a.set_result(1)
    assert wait([a, b], timeout=WAIT, return_when=FIRST_COMPLETED) == ({a}, {b})
    assert wait([a, b], timeout=0, return_when=ALL_COMPLETED) == ({a}, {b})
    setter = _set_when_waited(b, 2)
    assert wait([b, c], timeout=WAIT, return_when=FIRST_COMPLETED) == ({b}, {c})
    _join(setter)
    setter = _set_when_waited(c, 3)
    assert wait([a, b, c], timeout=WAIT, return_when=ALL_COMPLETED) == ({a, b, c}, set())
    _join(setter)
    assert not a._waiters and not b._waiters and not c._waiters


def test_as_completed(cls: FutureClass) -> None:
    fs = [cls() for _ in range(3)]
    fs[2].set_result(2)
    it = as_completed(fs, timeout=WAIT)
    assert next(it) is fs[2]
    setter = _set_when_waited(fs[0], 0)
    assert next(it) is fs[0]
    _join(setter)
    fs[1].set_exception(ValueError())
    assert next(it) is fs[1]
    with pytest.raises(StopIteration):
        next(it)
    assert not any(f._waiters for f in fs)


def test_asyncio_wrap_future(cls: FutureClass) -> None:
    ok, bad, pending = cls(), cls(), cls()

    async def main() -> list[object]:
        wrapped = [asyncio.wrap_future(f) for f in (ok, bad, pending)]
        _start(lambda: ok.set_result(42), lambda: bad.set_exception(KeyError("x")))
        wrapped[2].cancel()
        return await asyncio.wait_for(asyncio.gather(*wrapped, return_exceptions=True), WAIT)

    value, error, cancelled = asyncio.run(main())
    assert value == 42 and isinstance(error, KeyError)
    assert isinstance(cancelled, asyncio.CancelledError) and pending.cancelled()


def test_stress_set_result_against_waiters(cls: FutureClass) -> None:
    fs, rnd, ok = [cls() for _ in range(5000)], random.Random(0), []

    def by_result() -> None:
        ok.append([f.result(timeout=BLOCK) for f in fs] == list(range(len(fs))))

    def by_wait() -> None:
        ok.append(all(not wait([f], timeout=BLOCK).not_done for f in fs))

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = _start(*[by_result, by_wait] * 3)
        for i, f in enumerate(fs):
            end = time.perf_counter() + rnd.random() * 1e-4
            while time.perf_counter() < end:
                pass
            f.set_result(i)
        _join(threads)
    finally:
        sys.setswitchinterval(switch)
    assert ok == [True] * 6


def test_repr(cls: FutureClass) -> None:
    running, returned, raised, cancelled = cls(), cls(), cls(), cls()
    running.set_running_or_notify_cancel()
    returned.set_result(3)
    raised.set_exception(KeyError("k"))
    cancelled.cancel()
    states = [(cls(), "pending"), (running, "running"), (returned, "finished returned int"),
              (raised, "finished raised KeyError"), (cancelled, "cancelled")]
    for f, state in states:
        assert re.fullmatch(rf"<{cls.__name__} at 0x[0-9a-f]+ state={state}>", repr(f))
