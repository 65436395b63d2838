"""LoopCalls: calls handed to an asyncio loop from other threads run on the loop, in call order,
many per wake-up; on the loop's own thread a call runs at once; a failing call is reported to
the loop's exception handler and does not drop the others. Every test runs a real loop in a
thread of its own."""
from __future__ import annotations

import asyncio
import gc
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from paychan.actors.loopcall import LoopCalls

WAIT = 5.0


class LoopThread:
    """An event loop running forever in a thread; `blocked()` holds it inside a callback."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-loop",
                                       daemon=True)
        self.thread.start()
        self.run(lambda: None)  # returns once the loop is running

    def run(self, fn: Callable[[], Any]) -> Any:
        """`fn()` on the loop's thread; its result, once it ran."""
        async def call() -> Any:
            return fn()
        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(WAIT)

    def block(self) -> threading.Event:
        """Hold the loop inside a callback until the returned event is set."""
        entered, release = threading.Event(), threading.Event()

        def hold() -> None:
            entered.set()
            release.wait(WAIT)
        self.loop.call_soon_threadsafe(hold)
        assert entered.wait(WAIT), "the loop never ran the blocking callback"
        return release

    def stop(self) -> None:
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(WAIT)
            assert not self.thread.is_alive(), "the loop thread did not stop"
            self.loop.close()


@pytest.fixture
def running() -> Iterator[LoopThread]:
    lt = LoopThread()
    try:
        yield lt
    finally:
        lt.stop()


class Recorder:
    """Records (tag, thread) per call; `wait(n)` until n calls ran."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.seen: list[tuple[Any, threading.Thread]] = []

    def __call__(self, tag: Any) -> None:
        with self.cond:
            self.seen.append((tag, threading.current_thread()))
            self.cond.notify_all()

    def wait(self, n: int) -> list[Any]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.seen) >= n, WAIT), (
                f"only {len(self.seen)} of {n} calls ran")
            return [tag for tag, _ in self.seen]

    @property
    def threads(self) -> set[threading.Thread]:
        with self.cond:
            return {thread for _, thread in self.seen}


def count_flush_wakeups(monkeypatch: pytest.MonkeyPatch, loop: asyncio.AbstractEventLoop,
                        calls: LoopCalls) -> list[int]:
    """Wrap this loop's `call_soon_threadsafe`; the list holds one entry per flush scheduled."""
    real = loop.call_soon_threadsafe
    flushes: list[int] = []

    def counting(callback: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if callback == calls._flush:
            flushes.append(1)
        return real(callback, *args, **kwargs)
    monkeypatch.setattr(loop, "call_soon_threadsafe", counting)
    return flushes


def test_calls_from_other_threads_run_on_the_loop_in_order_once_each(
        running: LoopThread) -> None:
    calls = LoopCalls.of(running.loop)
    record = Recorder()
    threads, per_thread = 8, 200
    start = threading.Barrier(threads)

    def caller(t: int) -> None:
        start.wait(WAIT)
        for i in range(per_thread):
            calls.call(record, (t, i))

    workers = [threading.Thread(target=caller, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(WAIT)
    tags = record.wait(threads * per_thread)

    assert record.threads == {running.thread}
    assert sorted(tags) == [(t, i) for t in range(threads) for i in range(per_thread)]
    for t in range(threads):
        assert [i for tt, i in tags if tt == t] == list(range(per_thread)), (
            f"thread {t}'s calls ran out of order")


def test_calls_made_while_the_loop_is_busy_share_one_wakeup(
        running: LoopThread, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = LoopCalls.of(running.loop)
    flushes = count_flush_wakeups(monkeypatch, running.loop, calls)
    record = Recorder()
    release = running.block()
    try:
        caller = threading.Thread(target=lambda: [calls.call(record, i) for i in range(100)])
        caller.start()
        caller.join(WAIT)
        assert record.wait(0) == []  # nothing ran while the loop was held
    finally:
        release.set()

    assert record.wait(100) == list(range(100))
    assert record.threads == {running.thread}
    assert len(flushes) == 1
    # The next call after the flush wakes the loop again.
    calls.call(record, "after")
    assert record.wait(101)[-1] == "after"
    assert len(flushes) == 2


def test_a_call_on_the_loops_own_thread_runs_before_call_returns(
        running: LoopThread, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = LoopCalls.of(running.loop)
    flushes = count_flush_wakeups(monkeypatch, running.loop, calls)
    record = Recorder()

    def on_loop() -> list[Any]:
        calls.call(record, "inline")
        return [tag for tag, _ in record.seen]  # read before anything else runs

    assert running.run(on_loop) == ["inline"]
    assert record.threads == {running.thread}
    assert flushes == []

    async def in_coroutine() -> list[Any]:
        calls.call(record, "from a task")
        return [tag for tag, _ in record.seen]
    done = asyncio.run_coroutine_threadsafe(in_coroutine(), running.loop).result(WAIT)
    assert done == ["inline", "from a task"]
    assert flushes == []


def test_a_failing_call_is_reported_and_the_rest_of_its_flush_runs(
        running: LoopThread, monkeypatch: pytest.MonkeyPatch) -> None:
    reported: list[dict[str, Any]] = []
    running.loop.set_exception_handler(lambda loop, context: reported.append(context))
    calls = LoopCalls.of(running.loop)
    flushes = count_flush_wakeups(monkeypatch, running.loop, calls)
    record = Recorder()
    boom = ValueError("boom")

    def fail(_: Any) -> None:
        raise boom

    release = running.block()
    try:
        calls.call(record, "before")
        calls.call(fail, "x")
        calls.call(record, "after")
    finally:
        release.set()

    assert record.wait(2) == ["before", "after"]
    assert len(flushes) == 1  # all three in one flush
    running.run(lambda: None)  # the flush finished
    assert len(reported) == 1
    assert reported[0]["exception"] is boom
    assert "fail" in reported[0]["message"]
    # The loop goes on serving calls.
    calls.call(record, "later")
    assert record.wait(3)[-1] == "later"


def test_of_returns_one_instance_per_loop(running: LoopThread) -> None:
    other = asyncio.new_event_loop()
    try:
        first = LoopCalls.of(running.loop)
        assert LoopCalls.of(running.loop) is first
        assert LoopCalls.of(other) is not first
        assert LoopCalls.of(other) is LoopCalls.of(other)
        # From many threads at once, still one.
        seen: list[LoopCalls] = []
        start = threading.Barrier(8)

        def look() -> None:
            start.wait(WAIT)
            seen.append(LoopCalls.of(other))
        workers = [threading.Thread(target=look) for _ in range(8)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(WAIT)
        assert len(seen) == 8 and {id(c) for c in seen} == {id(LoopCalls.of(other))}
    finally:
        other.close()


def test_the_registry_does_not_keep_a_closed_loop_alive() -> None:
    # `of` keeps instances in a WeakKeyDictionary keyed by loop; its value must not keep the
    # key alive, or every loop ever used (one per asyncio.run) stays in memory.
    loop = asyncio.new_event_loop()
    LoopCalls.of(loop)
    loop.close()
    gone = weakref.ref(loop)
    del loop
    gc.collect()
    assert gone() is None, "LoopCalls.of keeps a closed loop alive"


def test_calling_after_the_loop_is_closed_raises(running: LoopThread) -> None:
    calls = LoopCalls.of(running.loop)
    record = Recorder()
    calls.call(record, "open")
    record.wait(1)
    running.stop()
    assert running.loop.is_closed()
    with pytest.raises(RuntimeError):
        running.loop.call_soon_threadsafe(record, "direct")
    with pytest.raises(RuntimeError):
        calls.call(record, "closed")
    assert record.wait(1) == ["open"]


def test_every_call_after_the_loop_is_closed_raises(running: LoopThread) -> None:
    # call_soon_threadsafe refuses every call on a closed loop; a LoopCalls whose flush could
    # not be scheduled must not then take later calls silently (they would never run).
    calls = LoopCalls.of(running.loop)
    record = Recorder()
    running.stop()
    for attempt in range(3):
        with pytest.raises(RuntimeError):
            calls.call(record, attempt)
    assert record.seen == []
