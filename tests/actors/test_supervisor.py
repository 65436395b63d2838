"""The supervisor: a failing channel actor restarts from storage; one failing too often is
quarantined and reported. Failures are injected by wrapping the machine's `step` as the channel
actor calls it, raising an exception that is not a PaychanError (a bug, not a refusal)."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

import paychan
from paychan.actors import channel_actor, supervisor
from paychan.protocol.errors import (
    NOT_ALLOWED_AT_STATE,
    REJECTED,
    PaychanError,
    Timeout,
)
from paychan.protocol.identity import decode_channel_id


class Injected(RuntimeError):
    """The failure a test injects into a channel actor."""


class Faulty:
    """Replaces `step` in the channel actor's path; fails inputs chosen by `should_fail`."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.real = channel_actor.machine.step
        self.lock = threading.Lock()
        self.failed: list[str] = []
        self.should_fail = lambda inp: False
        monkeypatch.setattr(channel_actor.machine, "step", self.step)

    def once(self, kind: str) -> None:
        """Fail the next input of type `kind`, once, on whichever node sees it first."""
        def pick(inp: Any) -> bool:
            return type(inp).__name__ == kind and not self.failed
        self.should_fail = pick

    def always(self, kind: str) -> None:
        self.should_fail = lambda inp: type(inp).__name__ == kind

    def off(self) -> None:
        self.should_fail = lambda inp: False

    def step(self, state: Any, inp: Any, now: int, key: Any) -> Any:
        with self.lock:
            fail = self.should_fail(inp)
            if fail:
                self.failed.append(type(inp).__name__)
        if fail:
            raise Injected(f"injected failure on {type(inp).__name__}")
        return self.real(state, inp, now, key)


@pytest.fixture
def faulty(monkeypatch: pytest.MonkeyPatch) -> Faulty:
    return Faulty(monkeypatch)


def restarts(*nodes: paychan.Node) -> int:
    return sum(n._core.supervisor.restarts for n in nodes)


def agree(a: paychan.Node, b: paychan.Node, ch: str) -> tuple[int, int]:
    """Both sides' view of A's total: (A's sent_by_me, B's sent_by_peer)."""
    return a.balances(ch)["sent_by_me"], b.balances(ch)["sent_by_peer"]


def pay_until_done(a: paychan.Node, ch: str, message: Any, amount: int, pid: str,
                   first_timeout: float = 1.0) -> Any:
    """Pay; on a Timeout or a clean refusal, retry with the same payment_id."""
    timeout = first_timeout
    for _ in range(5):
        try:
            return a.send_message_and_pay(ch, message, amount, timeout=timeout, payment_id=pid)
        except PaychanError as exc:
            last = exc
            timeout = 5.0
    raise AssertionError(f"payment {pid} never finished: {last!r}")


@pytest.mark.parametrize("kind", [
    "ActionPay",  # the payer's actor, on the API's command
    "ReceivePay",  # the payee's actor, on the peer's request
    "ActionHandlerDone",  # the payee's actor, with the handler's result
    "ReceivePayResult",  # the payer's actor, with the answer
])
def test_failure_mid_payment_restarts_from_storage(pair, channel, faulty, kind):
    a, b = pair
    a.send_message_and_pay(channel, "warm up", 1)
    before = restarts(a, b)
    faulty.once(kind)
    outcome: Any = None
    try:
        outcome = a.send_message_and_pay(channel, "payload", 5, timeout=1.0,
                                         payment_id="p-1")
    except PaychanError as exc:  # a clean refusal or a Timeout; anything else fails the test
        outcome = exc
    assert faulty.failed == [kind]
    assert restarts(a, b) == before + 1
    assert isinstance(outcome, (list, PaychanError)), outcome
    # A retry with the same payment_id finishes it (or returns what already finished).
    assert pay_until_done(a, channel, "payload", 5, "p-1") == ["served", "payload", 5]
    assert agree(a, b, channel) == (6, 6)
    # The restarted actors work on: another payment, and the totals still agree.
    assert a.send_message_and_pay(channel, "after", 2) == ["served", "after", 2]
    assert agree(a, b, channel) == (8, 8)
    for node in (a, b):
        state = node._core.state(decode_channel_id(channel))
        assert not state.outgoing and not state.serving


def test_a_failure_on_the_api_path_is_a_paychan_error(pair, channel, faulty):
    a, b = pair
    faulty.once("ActionPay")
    with pytest.raises(PaychanError) as exc:
        a.send_message_and_pay(channel, "x", 5, timeout=5.0, payment_id="p-2")
    assert not isinstance(exc.value, Timeout)  # answered at once, not left to time out
    assert agree(a, b, channel) == (0, 0)  # nothing was signed
    assert a.send_message_and_pay(channel, "x", 5, payment_id="p-2") == ["served", "x", 5]
    assert agree(a, b, channel) == (5, 5)


def test_repeated_failures_quarantine_the_channel(pair, channel, faulty, wait_until):
    a, b = pair
    other = a.create_channel(b, 100, dispute_period=60)
    a.send_message_and_pay(channel, "before", 3)
    events: list[dict[str, Any]] = []
    a.on("channel_quarantined", events.append)
    before = a.balances(channel), b.balances(channel)
    faulty.always("ActionPay")
    for i in range(supervisor.MAX_FAILURES):
        with pytest.raises(PaychanError):
            a.send_message_and_pay(channel, i, 1, timeout=5.0)
    assert a._core.supervisor.restarts == supervisor.MAX_FAILURES
    faulty.off()
    # Quarantined: refused at once with 3/1018, even though the fault is gone.
    for call in (lambda: a.send_message_and_pay(channel, "again", 1, timeout=5.0),
                 lambda: a.deposit(channel, 10),
                 lambda: a.sync(channel)):
        with pytest.raises(supervisor.Quarantined) as exc:
            call()
        assert exc.value.code == REJECTED
        assert exc.value.data is not None and exc.value.data[0]["code"] == NOT_ALLOWED_AT_STATE
    wait_until(lambda: len(events) == 1, what="the channel_quarantined event")
    assert events[0]["channel_id"] == channel
    assert "Injected" in events[0]["error"]
    assert a._core.supervisor.restarts == supervisor.MAX_FAILURES  # nothing more was started
    # The stored state is kept and readable; other channels and the peer are unaffected.
    assert (a.balances(channel), b.balances(channel)) == before
    assert a.send_message_and_pay(other, "other", 2) == ["served", "other", 2]
    # Once released, the channel runs again from its stored state.
    a._core.supervisor.release(decode_channel_id(channel))
    assert a.send_message_and_pay(channel, "released", 4) == ["served", "released", 4]
    assert agree(a, b, channel) == (7, 7)


def test_failures_spread_beyond_the_window_do_not_quarantine(pair, channel, faulty,
                                                             monkeypatch):
    a, _ = pair
    monkeypatch.setattr(supervisor, "FAILURE_WINDOW", 0.5)
    faulty.always("ActionPay")
    for i in range(supervisor.MAX_FAILURES - 1):
        with pytest.raises(PaychanError):
            a.send_message_and_pay(channel, i, 1, timeout=5.0)
    threading.Event().wait(0.6)  # the first failures fall out of the window
    with pytest.raises(PaychanError) as exc:
        a.send_message_and_pay(channel, "fifth", 1, timeout=5.0)
    assert not isinstance(exc.value, supervisor.Quarantined)
    assert a._core.supervisor.quarantined == {}
    faulty.off()
    assert a.send_message_and_pay(channel, "fine", 1) == ["served", "fine", 1]
    faulty.always("ActionPay")
    for i in range(supervisor.MAX_FAILURES - 1):  # with the fifth, five within the window
        with pytest.raises(PaychanError):
            a.send_message_and_pay(channel, i, 1, timeout=5.0)
    assert decode_channel_id(channel) in a._core.supervisor.quarantined


def test_inputs_queued_behind_a_failure_are_not_lost(pair, channel, monkeypatch):
    """Payments queued in the actor's mailbox when it fails go to its restarted successor."""
    a, b = pair
    real = channel_actor.machine.step
    inside, release = threading.Event(), threading.Event()

    def stall_then_fail(state: Any, inp: Any, now: int, key: Any) -> Any:
        if type(inp).__name__ == "ActionPay" and inp.message == "boom":
            inside.set()
            release.wait(10)
            raise Injected("injected failure with inputs queued behind it")
        return real(state, inp, now, key)

    monkeypatch.setattr(channel_actor.machine, "step", stall_then_fail)
    cid = decode_channel_id(channel)
    with ThreadPoolExecutor(4) as pool:
        boom = pool.submit(a.send_message_and_pay, channel, "boom", 50, timeout=10.0)
        assert inside.wait(5)
        queued = [pool.submit(a.send_message_and_pay, channel, i, 1, timeout=5.0)
                  for i in range(3)]
        ref = a._core.supervisor._live[cid][0]
        deadline = threading.Event()
        for _ in range(500):
            if ref.actor_inbox.qsize() >= 3:
                break
            deadline.wait(0.01)
        assert ref.actor_inbox.qsize() >= 3
        release.set()
        with pytest.raises(PaychanError) as exc:
            boom.result()
        assert not isinstance(exc.value, Timeout)
        assert sorted(f.result()[1] for f in queued) == [0, 1, 2]
    assert a._core.supervisor.restarts == 1
    assert agree(a, b, channel) == (3, 3)
