"""LoopCalls keeps call order across threads: a call made on the loop's own thread does not
overtake calls other threads queued before it (e.g. HttpTransport.send from the writer thread,
then from an actor run on the loop: frames to one peer must leave in the order emitted). Only
with nothing queued does a call on the loop run at once."""
from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from paychan.actors.loopcall import LoopCalls

WAIT = 5.0


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop running forever in a thread of its own."""
    lp = asyncio.new_event_loop()
    thread = threading.Thread(target=lp.run_forever, name="test-loop", daemon=True)
    thread.start()
    try:
        yield lp
    finally:
        lp.call_soon_threadsafe(lp.stop)
        thread.join(WAIT)
        assert not thread.is_alive(), "the loop thread did not stop"
        lp.close()


def test_call_on_the_loop_does_not_overtake_calls_queued_from_another_thread(loop):
    calls = LoopCalls.of(loop)
    order: list[str] = []
    queued, done = threading.Event(), threading.Event()
    ran_at_once: list[bool] = []

    def on_loop() -> None:  # e.g. an actor run inline on the transport's loop
        assert queued.wait(WAIT)
        calls.call(order.append, "second: on the loop")
        ran_at_once.append("second: on the loop" in order)
        loop.call_soon(done.set)  # after the flush already scheduled

    loop.call_soon_threadsafe(on_loop)
    # From this thread, while the loop is held in on_loop: queued, its flush scheduled.
    calls.call(order.append, "first: from another thread")
    queued.set()
    assert done.wait(WAIT), "the loop never got through"
    assert order == ["first: from another thread", "second: on the loop"]
    assert ran_at_once == [False]

    # With nothing queued, a call on the loop still runs at once (no wake-up).
    def alone() -> Any:
        calls.call(order.append, "third: alone")
        return list(order)

    async def run_alone() -> Any:
        return alone()

    seen = asyncio.run_coroutine_threadsafe(run_alone(), loop).result(WAIT)
    assert seen[-1] == "third: alone"


def test_a_call_made_by_a_flushed_call_queues_behind_the_rest_of_the_flush(loop):
    calls = LoopCalls.of(loop)
    order: list[str] = []
    hold, done = threading.Event(), threading.Event()
    loop.call_soon_threadsafe(lambda: hold.wait(WAIT))  # busy while the two calls queue

    def first() -> None:
        order.append("A")
        calls.call(order.append, "C")  # on the loop, while B still waits in the flush

    def last() -> None:
        order.append("B")
        done.set()

    calls.call(first)
    calls.call(last)
    hold.set()
    assert done.wait(WAIT)
    # C was queued by A during the flush, behind B: it runs in that same flush, after B.
    settled = threading.Event()
    calls.call(settled.set)
    assert settled.wait(WAIT)
    assert order == ["A", "B", "C"]
