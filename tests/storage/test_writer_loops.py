"""Event loops that write their own lone requests: who writes, in which batch and order."""
from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from pathlib import Path
from typing import Any, TypeVar

import pytest

from paychan.storage.env import Store
from paychan.storage.errors import StorageError
from paychan.storage.writer import Chain, Put, Writer

T = TypeVar("T")

WAIT = 10.0
WRITER_THREAD = "paychan-storage-writer"


class LoopThread:
    """An asyncio event loop running on a thread of its own."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="test-event-loop", daemon=True)
        self.thread.start()

    def run(self, fn: Callable[[], T]) -> T:
        """`fn()` run as one callback (so within one turn) of the loop; its result here."""
        done: Future[T] = Future()

        def call() -> None:
            try:
                done.set_result(fn())
            except BaseException as exc:
                done.set_exception(exc)

        self.loop.call_soon_threadsafe(call)
        return done.result(WAIT)

    def join(self) -> None:
        self.thread.join(WAIT)
        # A loop thread blocked in a callback means the writer deadlocked it.
        assert not self.thread.is_alive(), "the event loop thread is stuck"

    def close(self) -> None:
        if self.loop.is_closed():
            return
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.join()
        self.loop.close()


class DoneOn:
    """A done-callback that records the thread it ran on, and what `also()` said there."""

    def __init__(self, expected: int, also: Callable[[], Any] = lambda: None) -> None:
        self.threads: list[threading.Thread] = []
        self.seen: list[Any] = []
        self._expected = expected
        self._also = also
        self._lock = threading.Lock()
        self._all = threading.Event()

    def __call__(self, future: Future[Any]) -> None:
        seen = self._also()
        with self._lock:
            self.threads.append(threading.current_thread())
            self.seen.append(seen)
            if len(self.threads) == self._expected:
                self._all.set()

    def wait(self) -> list[threading.Thread]:
        # Waiting on the future is not enough: its waiters wake before its callbacks run.
        assert self._all.wait(WAIT), f"{len(self.threads)} of {self._expected} callbacks ran"
        return self.threads


@pytest.fixture
def looper() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


def grew(w: Writer, before: dict[str, int]) -> tuple[int, int]:
    """Batches and requests written since `before`."""
    now = w.stats
    return now["batches"] - before["batches"], now["requests"] - before["requests"]


def test_a_lone_request_is_written_by_its_loop(store: Store, looper: LoopThread) -> None:
    w = store.writer
    w.write_on(looper.loop)
    before = w.stats
    done = DoneOn(1, also=lambda: store.get("kv", b"lone"))

    def submit() -> tuple[Future[list[int]], bool]:
        f = w.submit([Put("kv", b"lone", b"v")], loop=looper.loop)
        f.add_done_callback(done)
        return f, f.done()

    future, done_in_turn = looper.run(submit)
    # It waits for the end of the turn: nothing woke the writer thread for it.
    assert not done_in_turn
    assert future.result(WAIT) == []
    assert done.wait() == [looper.thread]
    assert done.seen == [b"v"]  # durable by the time the future completed
    assert grew(w, before) == (1, 1)
    assert store.get("kv", b"lone") == b"v"


def test_a_request_made_by_the_completion_of_a_lone_write_is_written_by_the_loop_too(
        store: Store, looper: LoopThread) -> None:
    # A payee's second commit is submitted while its first one completes, on the loop: it has
    # its own end of turn, and must not wake the writer thread.
    w = store.writer
    w.write_on(looper.loop)
    before = w.stats
    second = DoneOn(1)
    chained: list[Future[list[int]]] = []

    def then_submit(_: Future[list[int]]) -> None:
        # The loop's next turn starts slowly: a writer thread woken for the second request
        # would take it meanwhile.
        looper.loop.call_soon(time.sleep, 0.05)
        f = w.submit([Put("kv", b"second", b"2")], loop=looper.loop)
        f.add_done_callback(second)
        chained.append(f)

    def submit() -> Future[list[int]]:
        f = w.submit([Put("kv", b"first", b"1")], loop=looper.loop)
        f.add_done_callback(then_submit)
        return f

    looper.run(submit).result(WAIT)
    assert second.wait() == [looper.thread]
    assert chained[0].result(WAIT) == []
    assert grew(w, before) == (2, 2)
    assert store.get("kv", b"second") == b"2"


def test_requests_of_one_turn_are_written_by_the_loop_in_one_batch(
        store: Store, looper: LoopThread) -> None:
    w = store.writer
    w.write_on(looper.loop)
    before = w.stats
    done = DoneOn(5)

    def submit() -> tuple[list[Future[list[int]]], list[bool]]:
        futures = [w.submit([Put("kv", b"k%d" % i, b"v%d" % i)], loop=looper.loop)
                   for i in range(5)]
        for f in futures:
            f.add_done_callback(done)
        return futures, [f.done() for f in futures]

    futures, done_in_turn = looper.run(submit)
    assert done_in_turn == [False] * 5
    assert [f.result(WAIT) for f in futures] == [[]] * 5
    # One durable transaction for the whole turn, written by the loop at its end.
    assert done.wait() == [looper.thread] * 5
    assert grew(w, before) == (1, 5)
    assert [store.get("kv", b"k%d" % i) for i in range(5)] == [b"v%d" % i for i in range(5)]


def test_requests_of_a_turn_wait_for_a_batch_being_written_then_go_to_the_writer_thread(
        store: Store, looper: LoopThread) -> None:
    # Another thread is writing (it holds the write lock) when the turn ends: the loop does
    # not wait for it, and the writer thread takes the turn's requests once it is free.
    w = store.writer
    w.write_on(looper.loop)
    done = DoneOn(3)
    with w._write_lock:
        futures = looper.run(lambda: [
            w.submit([Put("kv", b"busy%d" % i, b"v")], loop=looper.loop) for i in range(3)])
        for f in futures:
            f.add_done_callback(done)
        looper.run(lambda: None)  # the turn that submitted them has ended
        assert not any(f.done() for f in futures)
    assert [f.result(WAIT) for f in futures] == [[]] * 3
    threads = done.wait()
    assert all(t.name.startswith(WRITER_THREAD) for t in threads), threads


def test_a_loop_not_registered_leaves_its_requests_to_the_writer_thread(
        store: Store, looper: LoopThread) -> None:
    w = store.writer
    before = w.stats
    done = DoneOn(1)

    def submit() -> Future[list[int]]:
        f = w.submit([Put("kv", b"lone", b"v")], loop=looper.loop)
        f.add_done_callback(done)
        return f

    assert looper.run(submit).result(WAIT) == []
    [thread] = done.wait()
    assert thread is not looper.thread
    assert thread.name.startswith(WRITER_THREAD)
    assert grew(w, before) == (1, 1)
    assert store.get("kv", b"lone") == b"v"


def test_a_sequential_stream_from_a_coroutine_is_written_by_its_loop(
        store: Store, looper: LoopThread) -> None:
    w = store.writer
    w.write_on(looper.loop)
    before = w.stats
    done = DoneOn(20)

    async def stream() -> None:
        loop = asyncio.get_running_loop()
        for i in range(20):
            f = w.submit([Put("kv", b"s%d" % i, b"%d" % i)], loop=loop)
            f.add_done_callback(done)
            await asyncio.wrap_future(f)

    asyncio.run_coroutine_threadsafe(stream(), looper.loop).result(WAIT)
    assert done.wait() == [looper.thread] * 20
    assert grew(w, before) == (20, 20)
    assert [store.get("kv", b"s%d" % i) for i in range(20)] == [b"%d" % i for i in range(20)]


@pytest.mark.parametrize("b_within_the_turn", [True, False])
def test_chain_order_holds_between_a_loop_and_another_thread(
        store: Store, looper: LoopThread, b_within_the_turn: bool) -> None:
    """A (on the loop, left for the end of its turn) then B (another thread, which wakes the
    writer thread at once), both of one chain: whichever thread writes which, A lands first.
    B is queued either within the loop's turn or racing with its end."""
    w = store.writer
    w.write_on(looper.loop)
    jitter = random.Random(1234)
    # (key, the value last submitted for it): what the watcher may never see go back.
    latest: tuple[bytes, int] = (b"", 0)
    regressions: list[str] = []
    finished = threading.Event()

    def watch() -> None:
        while not finished.is_set():
            key, expected = latest
            if key:
                found, value = w.pending("kv", key)
                if not found:  # everything submitted so far is written
                    value = store.get("kv", key)
                got = int(value) if value else 0
                if got < expected:
                    regressions.append(f"{key!r}: saw {got} after {expected} was submitted")
            time.sleep(0)

    def latest_value(key: bytes) -> bytes | None:
        found, value = w.pending("kv", key)
        return value if found else store.get("kv", key)

    def race(key: bytes) -> tuple[list[str], list[bool]]:
        chain = Chain(key.decode())
        order: list[str] = []
        a_done_at_b: list[bool] = []
        futures: list[Future[list[int]]] = []
        delay = jitter.choice([0.0, 0.0, 1e-5, 5e-5, 1e-4, 3e-4])

        def elsewhere(a: Future[list[int]]) -> None:
            nonlocal latest
            if delay:  # shifts B against the end of the loop's turn (and frees the GIL)
                time.sleep(delay)
            b = w.submit([Put("kv", key, b"2")], chain)
            latest = (key, 2)

            def b_done(f: Future[list[int]]) -> None:
                a_done_at_b.append(a.done())
                order.append("B")

            b.add_done_callback(b_done)
            futures.append(b)

        def on_loop() -> threading.Thread:
            nonlocal latest
            a = w.submit([Put("kv", key, b"1")], chain, loop=looper.loop)
            latest = (key, 1)
            a.add_done_callback(lambda f: order.append("A"))
            futures.append(a)
            other = threading.Thread(target=elsewhere, args=(a,))
            other.start()
            if b_within_the_turn:
                other.join(WAIT)
                assert not other.is_alive()
                assert latest_value(key) == b"2"
            return other

        other = looper.run(on_loop)
        other.join(WAIT)
        assert not other.is_alive()
        assert latest_value(key) == b"2"
        for f in futures:
            assert f.result(WAIT) == []
        deadline = time.monotonic() + WAIT
        while len(order) < 2 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert chain.broken is None
        return order, a_done_at_b

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        for i in range(300):
            key = b"race-%03d" % i
            order, a_done_at_b = race(key)
            assert order == ["A", "B"], key
            assert a_done_at_b == [True], key  # "together" means A was set first
            assert store.get("kv", key) == b"2"
            assert w.pending("kv", key) == (False, None)
    finally:
        finished.set()
        watcher.join(WAIT)
    assert not watcher.is_alive()
    assert regressions == []


@pytest.mark.parametrize("rescue", ["wake", "close"])
def test_a_request_left_by_a_stopped_loop_is_still_written(
        tmp_path: Path, rescue: str) -> None:
    path = tmp_path / "data"
    s = Store.open(path)
    lt = LoopThread()
    try:
        w = s.writer
        w.write_on(lt.loop)
        done = DoneOn(1)

        def submit_and_stop() -> Future[list[int]]:
            f = w.submit([Put("kv", b"left", b"v")], loop=lt.loop)
            f.add_done_callback(done)
            # The loop ends with this turn: the end-of-turn write never runs.
            lt.loop.stop()
            return f

        future = lt.run(submit_and_stop)
        lt.join()
        lt.loop.close()
        assert wait_futures([future], timeout=0.1).not_done == {future}
        if rescue == "wake":
            w.wake()
            assert future.result(WAIT) == []
            [thread] = done.wait()
            assert thread.name.startswith(WRITER_THREAD)
            assert s.get("kv", b"left") == b"v"
        else:
            s.close()  # stops the writer, which drains its queue first
            assert future.result(0) == []
            s = Store.open(path)
            assert s.get("kv", b"left") == b"v"
    finally:
        lt.close()
        if not s.closed:
            s.close()


def test_a_loop_closed_in_the_turn_of_a_submit_does_not_hold_later_requests(
        store: Store) -> None:
    # The loop stops in the very turn it submitted, so its end-of-turn write never runs; a
    # later request naming that loop must still reach the writer thread by itself.
    w = store.writer
    lt = LoopThread()
    w.write_on(lt.loop)

    def submit_and_stop() -> Future[list[int]]:
        f = w.submit([Put("kv", b"a", b"1")], loop=lt.loop)
        lt.loop.stop()
        return f

    first = lt.run(submit_and_stop)
    lt.join()
    lt.loop.close()
    w.wake()
    assert first.result(WAIT) == []
    second = w.submit([Put("kv", b"b", b"2")], loop=lt.loop)
    assert second.result(WAIT) == []
    assert store.get("kv", b"b") == b"2"


def test_a_closed_loop_leaves_its_requests_to_the_writer_thread(store: Store) -> None:
    w = store.writer
    loop = asyncio.new_event_loop()
    w.write_on(loop)
    loop.close()
    with pytest.raises(RuntimeError):
        loop.call_soon(lambda: None)
    before = w.stats
    done = DoneOn(2)
    # Twice: the first refusal must not leave the loop counted as having a write scheduled.
    for key in (b"first", b"second"):
        future = w.submit([Put("kv", key, b"v")], loop=loop)
        future.add_done_callback(done)
        assert future.result(WAIT) == []
        assert store.get("kv", key) == b"v"
    threads = done.wait()
    assert all(t.name.startswith(WRITER_THREAD) for t in threads), threads
    assert grew(w, before) == (2, 2)


def test_waiting_on_the_writer_from_a_loop_writing_is_refused(
        store: Store, looper: LoopThread) -> None:
    w = store.writer
    w.write_on(looper.loop)

    def inside() -> tuple[bool, str]:
        on_writer = w.on_writer_thread()
        try:
            w.commit([Put("kv", b"inner", b"x")], timeout=WAIT)
        except StorageError as exc:
            return on_writer, str(exc)
        return on_writer, "commit returned"

    done = DoneOn(1, also=inside)

    def submit() -> Future[list[int]]:
        f = w.submit([Put("kv", b"outer", b"v")], loop=looper.loop)
        f.add_done_callback(done)
        return f

    assert looper.run(submit).result(WAIT) == []
    assert done.wait() == [looper.thread]
    [(on_writer, refused)] = done.seen
    assert on_writer
    assert "deadlock" in refused
    # Once the batch is written the loop is an ordinary thread again.
    assert not looper.run(w.on_writer_thread)
    assert w.commit([Put("kv", b"after", b"y")], timeout=WAIT) == []
    assert store.get("kv", b"outer") == b"v"
    assert store.get("kv", b"inner") is None  # the refused commit queued nothing
    assert store.get("kv", b"after") == b"y"


def test_a_helping_caller_writes_its_request_without_waking_the_writer_thread(
        store: Store) -> None:
    w = store.writer
    before = w.stats
    done = DoneOn(1)
    future = w.submit([Put("kv", b"helped", b"v")], helping=True)
    future.add_done_callback(done)
    # Queued, and nobody told the writer thread: the caller is about to write it.
    assert not future.done() and w._bell.empty()
    w.help()
    assert future.done() and future.result(0) == []
    assert done.wait() == [threading.current_thread()]
    assert grew(w, before) == (1, 1)
    assert store.get("kv", b"helped") == b"v"


def test_a_helping_caller_that_cannot_write_wakes_the_writer_thread(store: Store) -> None:
    # Another thread holds the write lock (as while it writes a batch): help() cannot write,
    # so it must ring, or the request would wait for an unrelated wake-up.
    w = store.writer
    done = DoneOn(1)
    with w._write_lock:
        future = w.submit([Put("kv", b"rung", b"v")], helping=True)
        future.add_done_callback(done)
        w.help()
        assert not future.done()
    assert future.result(WAIT) == []
    [thread] = done.wait()
    assert thread.name.startswith(WRITER_THREAD)
    assert store.get("kv", b"rung") == b"v"


def test_naming_a_loop_from_another_thread_leaves_the_request_to_the_writer_thread(
        store: Store, looper: LoopThread) -> None:
    # The loop is idle on its own thread: its end of turn may never come for this request.
    w = store.writer
    w.write_on(looper.loop)
    done = DoneOn(1)
    future = w.submit([Put("kv", b"other", b"v")], loop=looper.loop)
    future.add_done_callback(done)
    assert future.result(WAIT) == []
    [thread] = done.wait()
    assert thread.name.startswith(WRITER_THREAD)
    assert store.get("kv", b"other") == b"v"


def test_an_interrupted_help_still_wakes_the_writer_thread(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    w = store.writer
    future = w.submit([Put("kv", b"interrupted", b"v")], helping=True)

    def interrupted() -> bool:
        raise KeyboardInterrupt

    monkeypatch.setattr(w, "_help", interrupted)
    with pytest.raises(KeyboardInterrupt):
        w.help()
    monkeypatch.undo()
    assert future.result(WAIT) == []
    assert store.get("kv", b"interrupted") == b"v"
