"""Payment handlers set with `quick=True` run where the payment lands, not on the handler pool,
and otherwise behave as any handler: the right response, a refund when they raise, every
payment served once under load. Also the asyncio twin's timeout and cancel: the payment goes
on, and a retry with the same payment_id gets its answer without paying twice."""
from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

import paychan
from paychan.protocol.errors import HandlerError, NotAllowedAtState, Timeout
from paychan.protocol.identity import decode_channel_id

WAIT = 5.0
DEPOSIT = 1_000  # conftest's channel deposit, made by A
POOL_PREFIX = "paychan-handler"


class Served:
    """A handler that records each payment and the thread it ran on; `react` decides the rest."""

    def __init__(self, react: Callable[[paychan.Payment], Any] | None = None) -> None:
        self.react = react or (lambda p: ["served", p.message, p.amount])
        self.lock = threading.Lock()
        self.calls: list[tuple[paychan.Payment, str]] = []

    def __call__(self, p: paychan.Payment) -> Any:
        with self.lock:
            self.calls.append((p, threading.current_thread().name))
        return self.react(p)

    @property
    def thread_names(self) -> set[str]:
        with self.lock:
            return {name for _, name in self.calls}

    def count(self, payment_id: str) -> int:
        with self.lock:
            return sum(1 for p, _ in self.calls if p.payment_id == payment_id)


def landed(node: paychan.Node, ch: str, payment_id: str) -> threading.Event:
    """Set once the pending payment's outcome landed and every callback on it before ours ran
    (a future's done callbacks run in the order they were added)."""
    event = threading.Event()
    node._core.waiters[(decode_channel_id(ch), payment_id)].add_done_callback(
        lambda _: event.set())
    return event


@pytest.fixture
def release() -> Iterator[threading.Event]:
    """An event blocking handlers wait on; set at teardown whatever happened."""
    event = threading.Event()
    yield event
    event.set()


def test_quick_handler_runs_off_the_handler_pool(
        pair: tuple[paychan.Node, paychan.Node], channel: str) -> None:
    a, b = pair
    quick = Served()
    b.on_payment_received(quick, quick=True)
    assert a.send_message_and_pay(channel, "hello", 3, timeout=WAIT) == ["served", "hello", 3]
    assert a.send_message_and_pay(channel, {"k": [1, 2]}, 4, timeout=WAIT) == [
        "served", {"k": [1, 2]}, 4]
    assert len(quick.calls) == 2
    assert not any(name.startswith(POOL_PREFIX) for name in quick.thread_names), (
        quick.thread_names)
    assert quick.calls[0][0].amount == 3 and quick.calls[0][0].channel_id == channel
    assert quick.calls[0][0].peer == a.address


def test_default_handler_runs_on_the_handler_pool(
        pair: tuple[paychan.Node, paychan.Node], channel: str) -> None:
    a, b = pair
    pooled = Served()
    b.on_payment_received(pooled)
    assert a.send_message_and_pay(channel, "hello", 3, timeout=WAIT) == ["served", "hello", 3]
    assert len(pooled.calls) == 1
    assert all(name.startswith(POOL_PREFIX) for name in pooled.thread_names), (
        pooled.thread_names)


@pytest.mark.parametrize("quick", [False, True], ids=["pooled", "quick"])
def test_a_raising_handler_refunds_the_payer(
        pair: tuple[paychan.Node, paychan.Node], channel: str, quick: bool) -> None:
    a, b = pair

    def fail(p: paychan.Payment) -> Any:
        raise ValueError(f"no {p.message}")
    handler = Served(fail)
    b.on_payment_received(handler, quick=quick)

    with pytest.raises(HandlerError) as raised:
        a.send_message_and_pay(channel, "coffee", 7, timeout=WAIT, payment_id="fails")
    assert "ValueError: no coffee" in str(raised.value)
    assert "refunded" in str(raised.value)
    assert handler.count("fails") == 1

    payer, payee = a.balances(channel), b.balances(channel)
    assert payer["sent_by_me"] == 7 and payer["sent_by_peer"] == 7
    assert payer["my_balance"] == DEPOSIT and payer["peer_balance"] == 0
    assert payee["sent_by_peer"] == 7 and payee["sent_by_me"] == 7
    assert payee["my_balance"] == 0 and payee["peer_balance"] == DEPOSIT

    # The same payment_id again gets the same refusal and neither pays nor serves again.
    with pytest.raises(HandlerError):
        a.send_message_and_pay(channel, "coffee", 7, timeout=WAIT, payment_id="fails")
    assert handler.count("fails") == 1
    assert a.balances(channel) == payer

    # The channel still works for the next payment.
    b.on_payment_received(Served(), quick=quick)
    assert a.send_message_and_pay(channel, "tea", 2, timeout=WAIT) == ["served", "tea", 2]
    assert a.balances(channel)["my_balance"] == DEPOSIT - 2
    assert b.balances(channel)["my_balance"] == 2


def test_a_quick_handler_may_not_block_where_commits_are_written(
        pair: tuple[paychan.Node, paychan.Node], channel: str, ledger: paychan.Ledger) -> None:
    a, b = pair
    ledger.mint(b.address, 1_000)
    b.deposit(channel, 100)  # so that b could pay: only the place of the call refuses it
    tried: list[BaseException] = []

    def pay_back(p: paychan.Payment) -> Any:
        # It runs on the thread writing b's batch: a blocking payment would wait for a commit
        # that this very thread holds up, until its timeout.
        try:
            b.send_message_and_pay(channel, "nested", 1, timeout=WAIT)
        except Exception as exc:
            tried.append(exc)
            raise
        return "paid back"
    b.on_payment_received(pay_back, quick=True)

    with pytest.raises(HandlerError, match="would wait for itself"):
        a.send_message_and_pay(channel, "pay back", 3, timeout=3 * WAIT)
    assert [type(exc) for exc in tried] == [NotAllowedAtState]
    assert a.balances(channel)["my_balance"] == DEPOSIT  # the refused call was refunded
    assert b.balances(channel)["sent_by_me"] == 3  # the refund; nothing paid from the handler
    assert b.balances(channel)["my_balance"] == 100


@pytest.mark.parametrize("how", ["threads", "asyncio"])
def test_many_concurrent_payments_with_a_quick_handler(
        pair: tuple[paychan.Node, paychan.Node], how: str) -> None:
    a, b = pair
    handler = Served(lambda p: f"{p.message}:{p.amount}:{p.payment_id}")
    b.on_payment_received(handler, quick=True)
    with ThreadPoolExecutor(10) as pool:
        chs = list(pool.map(lambda _: a.create_channel(b, 500, dispute_period=60, timeout=WAIT),
                            range(10)))
    assert len(set(chs)) == 10
    payments = [(chs[i % 10], f"m{i}", 1 + i % 3, f"pid-{i}") for i in range(200)]

    if how == "threads":
        with ThreadPoolExecutor(20) as pool:
            replies = list(pool.map(
                lambda job: a.send_message_and_pay(job[0], job[1], job[2], timeout=WAIT,
                                                   payment_id=job[3]), payments))
    else:
        async def main() -> list[Any]:
            return await asyncio.wait_for(asyncio.gather(*(
                a.asend_message_and_pay(ch, msg, amount, timeout=WAIT, payment_id=pid)
                for ch, msg, amount, pid in payments)), WAIT * 2)
        replies = asyncio.run(main())

    assert replies == [f"{msg}:{amount}:{pid}" for _, msg, amount, pid in payments]
    served = Counter(p.payment_id for p, _ in handler.calls)
    assert served == Counter(pid for *_, pid in payments)  # each exactly once
    assert not any(name.startswith(POOL_PREFIX) for name in handler.thread_names)
    for ch in chs:
        expected = sum(amount for c, _, amount, _ in payments if c == ch)
        payer, payee = a.balances(ch), b.balances(ch)
        assert payer["sent_by_me"] == payee["sent_by_peer"] == expected, ch
        assert payer["sent_by_peer"] == payee["sent_by_me"] == 0, ch
        assert payer["my_balance"] == payee["peer_balance"] == 500 - expected, ch


def test_async_timeout_then_retry_gets_the_answer_once(
        pair: tuple[paychan.Node, paychan.Node], channel: str,
        release: threading.Event) -> None:
    a, b = pair
    handler = Served(lambda p: release.wait(WAIT) and f"late {p.message}")
    b.on_payment_received(handler)  # not quick: it blocks

    async def main() -> Any:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(Timeout):
            await a.asend_message_and_pay(channel, "x", 7, timeout=0.3, payment_id="p")
        assert 0.25 <= loop.time() - started < 2.0
        release.set()
        return await a.asend_message_and_pay(channel, "x", 7, timeout=WAIT, payment_id="p")

    assert asyncio.run(asyncio.wait_for(main(), WAIT * 2)) == "late x"
    assert handler.count("p") == 1
    assert a.balances(channel)["sent_by_me"] == 7
    assert b.balances(channel)["sent_by_peer"] == 7
    # Asked once more, the stored answer comes back without serving or paying again.
    assert a.send_message_and_pay(channel, "x", 7, timeout=WAIT, payment_id="p") == "late x"
    assert handler.count("p") == 1
    assert a.balances(channel)["sent_by_me"] == 7


def test_async_cancel_then_retry_gets_the_answer_once(
        pair: tuple[paychan.Node, paychan.Node], channel: str,
        release: threading.Event) -> None:
    a, b = pair
    handler = Served(lambda p: release.wait(WAIT) and f"late {p.message}")
    b.on_payment_received(handler)

    async def main() -> Any:
        task = asyncio.create_task(
            a.asend_message_and_pay(channel, "y", 5, timeout=WAIT, payment_id="p"))
        for _ in range(100):  # until the payee's handler holds the payment
            if handler.count("p"):
                break
            await asyncio.sleep(0.02)
        assert handler.count("p") == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        return await a.asend_message_and_pay(channel, "y", 5, timeout=WAIT, payment_id="p")

    assert asyncio.run(asyncio.wait_for(main(), WAIT * 2)) == "late y"
    assert handler.count("p") == 1
    assert a.balances(channel)["sent_by_me"] == 5
    assert b.balances(channel)["sent_by_peer"] == 5


def test_async_retry_on_a_new_loop_after_a_timeout(
        pair: tuple[paychan.Node, paychan.Node], channel: str,
        release: threading.Event) -> None:
    # A caller using asyncio.run per call: the first loop is closed when the answer lands.
    a, b = pair
    handler = Served(lambda p: release.wait(WAIT) and f"late {p.message}")
    b.on_payment_received(handler)

    with pytest.raises(Timeout):
        asyncio.run(a.asend_message_and_pay(channel, "z", 4, timeout=0.3, payment_id="p"))
    answer_landed = landed(a, channel, "p")
    release.set()
    assert answer_landed.wait(WAIT)
    answer = asyncio.run(a.asend_message_and_pay(channel, "z", 4, timeout=WAIT,
                                                 payment_id="p"))
    assert answer == "late z"
    assert handler.count("p") == 1
    assert b.balances(channel)["sent_by_peer"] == 4


def test_an_answer_landing_after_its_loop_closed_logs_no_error(
        pair: tuple[paychan.Node, paychan.Node], channel: str,
        release: threading.Event, caplog: pytest.LogCaptureFixture) -> None:
    # The documented way out of a Timeout is a retry; the answer of the abandoned wait landing
    # later (its loop gone with asyncio.run) is expected, not an error with a traceback.
    a, b = pair
    b.on_payment_received(Served(lambda p: release.wait(WAIT) and "late"))
    with pytest.raises(Timeout):
        asyncio.run(a.asend_message_and_pay(channel, "w", 2, timeout=0.3, payment_id="p"))
    answer_landed = landed(a, channel, "p")
    caplog.clear()
    release.set()
    assert answer_landed.wait(WAIT)
    assert a.send_message_and_pay(channel, "w", 2, timeout=WAIT, payment_id="p") == "late"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]
