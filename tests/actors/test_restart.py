"""Stop and reopen nodes on their data dirs: channels, balances, vouchers and payment outcomes
come back from storage, and a payment in flight at shutdown finishes exactly once."""
from __future__ import annotations

import threading
from typing import Any

import pytest

import paychan
from paychan.actors import channel_actor
from paychan.protocol.errors import REJECTED, TIMEOUT, HandlerError, Timeout
from paychan.protocol.identity import decode_channel_id


def record(node: paychan.Node) -> dict[str, Any]:
    """Everything a node must still know after a restart, per channel."""
    out = {}
    for ch in node.channels():
        s = node._core.state(decode_channel_id(ch))
        out[ch] = (node.balances(ch), s.my_voucher, s.peer_voucher, s.credit_used, s.params)
    return out


class Handler:
    """B's payment handler: counts calls, fails on "fail", blocks on "slow" until released."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.entered = threading.Event()
        self.gate = threading.Event()

    def __call__(self, p: paychan.Payment) -> Any:
        self.calls.append(p.payment_id)
        if p.message == "fail":
            raise ValueError("refused by the application")
        if p.message == "slow":
            self.entered.set()
            self.gate.wait(30)
        return ["served", p.message, p.amount]


def agree(a: paychan.Node, b: paychan.Node, ch: str) -> bool:
    sa, sb = a.balances(ch), b.balances(ch)
    return (sa["sent_by_me"], sa["sent_by_peer"]) == (sb["sent_by_peer"], sb["sent_by_me"])


def settled(node: paychan.Node, ch: str) -> bool:
    s = node._core.state(decode_channel_id(ch))
    return not s.outgoing and not s.serving and not s.postponed


def test_reopened_nodes_keep_channels_balances_vouchers_and_outcomes(nodes, ledger, pair,
                                                                     wait_until):
    a, b = pair
    handler = Handler()
    b.on_payment_received(handler)
    a.on_payment_received(lambda p: ["a got", p.message])
    ledger.mint(b.address, 500)
    ab1 = a.create_channel(b, 1_000, dispute_period=60)
    ab2 = a.create_channel(b, 300, dispute_period=120)
    ba = b.create_channel(a, 400, dispute_period=60)
    b.deposit(ab1, 50)  # B funds its side of A's channel too
    for i in range(10):
        assert a.send_message_and_pay(ab1, i, 3 + i, payment_id=f"ab1-{i}")[1] == i
    assert a.send_message_and_pay(ab2, "two", 20, payment_id="ab2-0") == ["served", "two", 20]
    with pytest.raises(HandlerError):
        a.send_message_and_pay(ab1, "fail", 9, payment_id="ab1-fail")
    assert b.send_message_and_pay(ab1, "back", 11, payment_id="back-0") == ["a got", "back"]
    assert b.send_message_and_pay(ba, "ba", 40, payment_id="ba-0") == ["a got", "ba"]
    for ch in (ab1, ab2, ba):
        wait_until(lambda ch=ch: agree(a, b, ch) and settled(a, ch) and settled(b, ch),
                   what=f"both sides of {ch} to settle")
    before_a, before_b = record(a), record(b)
    assert set(before_a) == set(before_b) == {ab1, ab2, ba}
    served = list(handler.calls)
    address_a, address_b = a.address, b.address

    a.stop()
    b.stop()
    a = nodes.open("a")
    b = nodes.open("b")
    b.on_payment_received(handler)
    a.on_payment_received(lambda p: ["a got", p.message])

    assert (a.address, b.address) == (address_a, address_b)  # the identity is stored
    assert record(a) == before_a
    assert record(b) == before_b
    # Retrying finished payments returns their stored outcome and pays nothing again.
    assert a.send_message_and_pay(ab1, 0, 3, payment_id="ab1-0") == ["served", 0, 3]
    assert a.send_message_and_pay(ab1, 9, 12, payment_id="ab1-9") == ["served", 9, 12]
    assert a.send_message_and_pay(ab2, "two", 20, payment_id="ab2-0") == ["served", "two", 20]
    assert b.send_message_and_pay(ba, "ba", 40, payment_id="ba-0") == ["a got", "ba"]
    with pytest.raises(HandlerError):
        a.send_message_and_pay(ab1, "fail", 9, payment_id="ab1-fail")
    assert handler.calls == served
    assert record(a) == before_a and record(b) == before_b
    # And the channels carry on from where they were.
    assert a.send_message_and_pay(ab1, "new", 5) == ["served", "new", 5]
    bal = a.balances(ab1)
    assert bal["sent_by_me"] == before_a[ab1][0]["sent_by_me"] + 5
    wait_until(lambda: agree(a, b, ab1), what="B to agree on the new payment")
    # A mutual close pays out exactly the balances both sides kept.
    ledger_a, ledger_b = ledger.balance(a.address), ledger.balance(b.address)
    expect_a, expect_b = bal["my_balance"], bal["peer_balance"]
    a.close(ab1)
    assert ledger.balance(a.address) == ledger_a + expect_a
    wait_until(lambda: ledger.balance(b.address) == ledger_b + expect_b,
               what="B's payout")


def test_payment_in_flight_at_shutdown_finishes_once_after_reopen(nodes, pair, channel,
                                                                  wait_until):
    a, b = pair
    handler = Handler()
    b.on_payment_received(handler)
    assert a.send_message_and_pay(channel, "first", 5, payment_id="p1") == ["served", "first", 5]
    with pytest.raises(Timeout) as exc:
        a.send_message_and_pay(channel, "slow", 7, timeout=0.5, payment_id="p2")
    assert exc.value.code == REJECTED and exc.value.data[0]["code"] == TIMEOUT
    assert handler.entered.is_set()

    a.stop()
    # B's stop is watched from a thread: test_stop_does_not_wait_for_a_running_handler checks
    # that it returns promptly; here the scenario goes on either way.
    stopper = threading.Thread(target=b.stop, name="stop-b", daemon=True)
    stopper.start()
    stopper.join(2)
    a = nodes.open("a")
    b = nodes.open("b")
    b.on_payment_received(handler)
    handler.gate.set()
    stopper.join(30)
    assert not stopper.is_alive()

    # The retry with the same payment_id returns the outcome, whether sync already finished
    # the payment or the retry does.
    assert a.send_message_and_pay(channel, "slow", 7, timeout=10, payment_id="p2") == [
        "served", "slow", 7]
    wait_until(lambda: settled(a, channel) and settled(b, channel) and agree(a, b, channel),
               what="both sides to settle and agree")
    assert a.balances(channel)["sent_by_me"] == b.balances(channel)["sent_by_peer"] == 12
    assert a.send_message_and_pay(channel, "slow", 7, payment_id="p2") == ["served", "slow", 7]
    assert a.send_message_and_pay(channel, "next", 1) == ["served", "next", 1]
    wait_until(lambda: agree(a, b, channel), what="agreement after the next payment")
    assert a.balances(channel)["sent_by_me"] == b.balances(channel)["sent_by_peer"] == 13


@pytest.mark.parametrize("first", ["a", "b"])
def test_in_flight_payment_resolves_by_sync_without_a_retry(nodes, pair, channel, wait_until,
                                                            first):
    """A goes down with a payment outstanding; B serves it but its answer finds A gone. After
    both reopen (in either order) sync alone settles the payment on both sides."""
    a, b = pair
    handler = Handler()
    b.on_payment_received(handler)
    with pytest.raises(Timeout):
        a.send_message_and_pay(channel, "slow", 7, timeout=0.5, payment_id="p3")
    a.stop()
    handler.gate.set()
    wait_until(lambda: settled(b, channel), what="B to finish serving")
    b.stop()
    reopened = {name: nodes.open(name) for name in (first, "b" if first == "a" else "a")}
    a, b = reopened["a"], reopened["b"]
    b.on_payment_received(handler)
    wait_until(lambda: settled(a, channel), timeout=5,
               what=f"sync to resolve A's outstanding payment (reopened {first} first)")
    assert agree(a, b, channel)
    assert a.balances(channel)["sent_by_me"] == 7
    assert a.send_message_and_pay(channel, "slow", 7, payment_id="p3") == ["served", "slow", 7]
    assert a.balances(channel)["sent_by_me"] == b.balances(channel)["sent_by_peer"] == 7
    assert handler.calls == ["p3"]


def test_stop_does_not_wait_for_a_running_handler(pair, channel):
    """A node stops promptly even while the application's handler is still busy; the payment
    stays in `serving` and is served again after a restart."""
    a, b = pair
    handler = Handler()
    b.on_payment_received(handler)
    with pytest.raises(Timeout):
        a.send_message_and_pay(channel, "slow", 7, timeout=0.5, payment_id="p4")
    stopper = threading.Thread(target=b.stop, name="stop-b", daemon=True)
    stopper.start()
    stopper.join(5)
    stopped_promptly = not stopper.is_alive()
    handler.gate.set()
    stopper.join(30)
    assert stopped_promptly, "Node.stop() blocked until the payment handler returned"


def test_a_retry_crossing_the_result_does_not_pay_twice(pair, channel, monkeypatch):
    """The retry's stored-outcome check and the answer race: the answer is committed after the
    check but before the retried ActionPay reaches the channel actor."""
    a, b = pair
    handler = Handler()
    b.on_payment_received(handler)
    with pytest.raises(Timeout):
        a.send_message_and_pay(channel, "slow", 7, timeout=0.3, payment_id="p5")
    real = channel_actor.machine.step
    answer_arrived, retry_queued = threading.Event(), threading.Event()

    def hold_the_answer(state: Any, inp: Any, now: int, key: Any) -> Any:
        if type(inp).__name__ == "ReceivePayResult" and inp.msg.payment_id == "p5":
            answer_arrived.set()
            retry_queued.wait(10)
        return real(state, inp, now, key)

    monkeypatch.setattr(channel_actor.machine, "step", hold_the_answer)
    handler.gate.set()
    assert answer_arrived.wait(10)
    result: list[Any] = []
    retry = threading.Thread(target=lambda: result.append(a.send_message_and_pay(
        channel, "slow", 7, timeout=10, payment_id="p5")))
    retry.start()
    cid = decode_channel_id(channel)
    inbox = a._core.supervisor._live[cid][0].actor_inbox
    for _ in range(500):
        if not inbox.empty():
            break
        threading.Event().wait(0.01)
    assert not inbox.empty(), "the retry never reached the channel actor"
    retry_queued.set()
    retry.join(15)
    assert result == [["served", "slow", 7]]
    threading.Event().wait(0.3)  # let any second voucher travel
    assert a.balances(channel)["sent_by_me"] == 7
    assert b.balances(channel)["sent_by_peer"] == 7
    assert handler.calls == ["p5"]
