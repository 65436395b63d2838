"""Disputes on the ledger (DESIGN §5): a stale solo close loses everything even when the victim
was down at the moment, the closer cannot prove fraud against itself, and a silent peer is
closed solo and paid out after the window. Real nodes and ledger, on LMDB in tmp_path."""
from __future__ import annotations

import os
import threading
import time
from typing import Any

import pytest

import paychan
from paychan.protocol.contract import Status
from paychan.protocol.errors import PaychanError, Unauthorized
from paychan.protocol.identity import decode_channel_id
from paychan.protocol.tx import make_tx

DISPUTE = 60
DEPOSIT_A, DEPOSIT_B = 500, 300


class Events:
    """What a node's callbacks saw, for the events the tests wait on."""

    NAMES = ("channel_closing", "channel_closed", "channel_closed_with_fraud_proof")

    def __init__(self, node: paychan.Node) -> None:
        self.seen: list[dict[str, Any]] = []
        self._cv = threading.Condition()
        for name in self.NAMES:
            node.on(name, self._add)

    def _add(self, event: dict[str, Any]) -> None:
        with self._cv:
            self.seen.append(event)
            self._cv.notify_all()

    def named(self, name: str) -> list[dict[str, Any]]:
        with self._cv:
            return [e for e in self.seen if e["event"] == name]

    def wait(self, name: str, timeout: float = 15.0) -> dict[str, Any]:
        with self._cv:
            if not self._cv.wait_for(lambda: any(e["event"] == name for e in self.seen),
                                     timeout):
                raise AssertionError(f"no {name} event in {timeout} s; saw {self.seen}")
            return next(e for e in self.seen if e["event"] == name)


def wait_until(predicate, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)


@pytest.fixture
def world(tmp_path):
    """A ledger and two nodes, a and b, with a channel funded by both and used both ways."""
    ledger = paychan.Ledger.embedded(data_dir=str(tmp_path / "ledger"),
                                     clock=paychan.VirtualClock())
    opened: list[paychan.Node] = []

    def open_node(name: str) -> paychan.Node:
        node = paychan.Node.open(str(tmp_path / name), ledger=ledger)
        node.on_payment_received(lambda p: [name, p.message])
        opened.append(node)
        return node

    a, b = open_node("a"), open_node("b")
    ledger.mint(a.address, 1_000)
    ledger.mint(b.address, 1_000)
    ch = a.create_channel(b, DEPOSIT_A, dispute_period=DISPUTE)
    b.deposit(ch, DEPOSIT_B)
    wait_until(lambda: a.balances(ch)["deposited_by_peer"] == DEPOSIT_B, "a sees b's deposit")
    for i in range(3):
        assert a.send_message_and_pay(ch, f"a{i}", 20) == ["b", f"a{i}"]
    for i in range(4):
        assert b.send_message_and_pay(ch, f"b{i}", 10) == ["a", f"b{i}"]
    assert a.balances(ch)["sent_by_me"] == b.balances(ch)["sent_by_peer"] == 60
    assert b.balances(ch)["sent_by_me"] == a.balances(ch)["sent_by_peer"] == 40
    yield {"ledger": ledger, "a": a, "b": b, "ch": ch, "cid": decode_channel_id(ch),
           "open": open_node}
    for node in opened:
        node.stop()
    ledger.close()


def stale_close(w: dict[str, Any]) -> dict[str, Any]:
    """b closes alone declaring it sent nothing (it sent 40), as a cheater would."""
    b, cid = w["b"], w["cid"]
    state = b._core.state(cid)
    tx = make_tx(b._core.identity, "close_solo", {
        "channel_id": cid, "period": state.period, "declared_sent_self": 0,
        "peer_voucher": state.peer_voucher.to_obj() if state.peer_voucher else None,
    }, os.urandom(16))
    return w["ledger"].client.submit(tx.to_bytes())


def accounts(w: dict[str, Any]) -> dict[str, int]:
    return {n: w["ledger"].balance(w[n].address) for n in ("a", "b")}


def test_stale_close_while_the_victim_is_down_loses_everything(world):
    w = world
    ledger, cid = w["ledger"], w["cid"]
    before = accounts(w)
    cheater = Events(w["b"])
    w["a"].stop()  # the victim is down when the stale close lands

    stale_close(w)
    rec = ledger.client.channel(cid)
    assert rec.status is Status.CLOSING and rec.close.declared_sent_closer == 0
    ledger.advance(DISPUTE - 10)  # the victim comes back late, but inside the window

    a = w["open"]("a")
    wait_until(lambda: ledger.client.channel(cid).period == 2, "the period settles")
    wait_until(lambda: a.balances(w["ch"])["period"] == 2, "the victim's node sees it")
    # Registered only now, after the recovery in Node.open did everything: the events of
    # that recovery still reach the application (it must learn that it was cheated).
    victim = Events(a)
    settled = ledger.client.events_since(0)[-1]
    assert settled["event"] == "fraud_proof" and settled["sender"] == a._core.identity.public
    paid = {n: v - before[n] for n, v in accounts(w).items()}
    assert paid == {"a": DEPOSIT_A + DEPOSIT_B, "b": 0}

    fraud = victim.wait("channel_closed_with_fraud_proof")
    assert (fraud["payout_me"], fraud["payout_peer"]) == (DEPOSIT_A + DEPOSIT_B, 0)
    assert fraud["period"] == 1
    closing = victim.wait("channel_closing")
    assert closing["mutual"] is False and closing["by_peer"] is True
    lost = cheater.wait("channel_closed_with_fraud_proof")
    assert (lost["payout_me"], lost["payout_peer"]) == (0, DEPOSIT_A + DEPOSIT_B)
    assert a.balances(w["ch"])["period"] == 2
    assert a.balances(w["ch"])["status"] == "open"


def test_the_closer_cannot_prove_fraud_against_itself(world):
    w = world
    ledger, cid, b = w["ledger"], w["cid"], w["b"]
    w["a"].stop()  # else a's watcher would settle first and the proof would fail for that
    stale_close(w)
    before = {"record": ledger.client.channel(cid), "height": ledger.client.height(),
              **accounts(w)}
    own = b._core.state(cid).my_voucher  # b's own voucher: sent 40 > the declared 0
    assert own is not None and own.sent == 40
    tx = make_tx(b._core.identity, "fraud_proof",
                 {"channel_id": cid, "period": 1, "voucher": own.to_obj()}, os.urandom(16))
    with pytest.raises(Unauthorized) as caught:
        ledger.client.submit(tx.to_bytes())
    assert caught.value.code == 1
    assert isinstance(caught.value, PaychanError)
    after = {"record": ledger.client.channel(cid), "height": ledger.client.height(),
             **accounts(w)}
    assert after == before
    assert after["record"].status is Status.CLOSING

    # The rightful party still can.
    a = w["open"]("a")
    wait_until(lambda: ledger.client.channel(cid).period == 2, "the victim proves fraud")
    assert ledger.client.events_since(0)[-1]["sender"] == a._core.identity.public
    assert accounts(w)["a"] - before["a"] == DEPOSIT_A + DEPOSIT_B


def test_silent_peer_is_closed_solo_and_paid_after_the_window(world):
    w = world
    ledger, cid, ch, a = w["ledger"], w["cid"], w["ch"], w["a"]
    seen = Events(a)
    expect = a.balances(ch)
    assert (expect["my_balance"], expect["peer_balance"]) == (480, 320)
    before = accounts(w)
    w["b"].stop()  # and never comes back

    result = a.close(ch, mutual=True, wait=False, mutual_timeout=1.0)
    assert result == {"period": 1, "mutual": False}
    wait_until(lambda: ledger.client.channel(cid).status is Status.CLOSING,
               "the solo close lands")
    rec = ledger.client.channel(cid)
    assert rec.close.closer == a._core.identity.public
    assert (rec.close.declared_sent_closer, rec.close.peer_sent) == (60, 40)
    assert [e["mutual"] for e in seen.named("channel_closing")][-1] is False

    ledger.advance(DISPUTE - 1)  # not yet: the window is still open
    time.sleep(0.6)
    assert ledger.client.channel(cid).period == 1
    ledger.advance(2)
    closed = seen.wait("channel_closed")
    assert (closed["payout_me"], closed["payout_peer"]) == (480, 320)
    assert ledger.client.channel(cid).period == 2
    paid = {n: v - before[n] for n, v in accounts(w).items()}
    assert paid == {"a": 480, "b": 320}
    assert ledger.client.events_since(0)[-1]["event"] == "confirm"
    assert a.balances(ch)["status"] == "open" and a.balances(ch)["period"] == 2
    assert not seen.named("channel_closed_with_fraud_proof")
