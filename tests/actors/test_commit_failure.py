"""A channel actor does not wait for its commits: when one fails, its effects are never
emitted, its caller gets the error, the actor restarts from the store, and its chain lets no
later write land. Failures are injected into the writer's `apply` for one node's store."""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lmdb
import pytest
from commit_faults import DEPOSIT, FailingCommits, Served, check_agreement

import paychan
from paychan.actors.channel_actor import payment_key
from paychan.actors.node import result_of
from paychan.protocol.errors import PaychanError, StorageError, Timeout
from paychan.protocol.identity import decode_channel_id
from paychan.storage.env import Store
from paychan.storage.errors import ChainBroken

WAIT = 5.0


@pytest.fixture
def failing(monkeypatch: pytest.MonkeyPatch) -> FailingCommits:
    return FailingCommits(monkeypatch)


@contextmanager
def writer_held(node: paychan.Node) -> Iterator[None]:
    """Keep the node's writer inside one request: commits made meanwhile wait for the next
    batch, so several of one actor's commits are in flight at once."""
    started, release = threading.Event(), threading.Event()

    def hold(txn: lmdb.Transaction, s: Store) -> None:
        started.set()
        release.wait(WAIT)

    held = node._core.store.writer.submit_fn(hold)
    assert started.wait(WAIT)
    try:
        yield
    finally:
        release.set()
    held.result(WAIT)


def stored(node: paychan.Node, ch: str) -> bytes | None:
    return node._core.store.get("channels", decode_channel_id(ch))


def outcome(node: paychan.Node, ch: str, pid: str) -> bytes | None:
    return node._core.store.get("outcomes", payment_key(decode_channel_id(ch), pid))


def settled(node: paychan.Node, ch: str) -> bool:
    s = node._core.state(decode_channel_id(ch))
    return not s.outgoing and not s.serving


@pytest.mark.parametrize("error", [
    lambda: lmdb.MapFullError("injected: map full"),
    lambda: StorageError("injected: write failed"),
], ids=["map-full", "storage-error"])
def test_failed_commit_emits_nothing_and_the_channel_recovers(pair, channel, failing, error,
                                                              wait_until):
    a, b = pair
    served = Served()
    b.on_payment_received(served)
    assert a.send_message_and_pay(channel, "warm up", 2, payment_id="p-warm") == [
        "served", "warm up", 2]
    before_a, before_b = a.balances(channel), b.balances(channel)
    before_record = stored(a, channel)
    restarts = a._core.supervisor.restarts

    failing.arm(a, error)
    with pytest.raises(PaychanError) as exc:
        a.send_message_and_pay(channel, "lost", 7, timeout=WAIT, payment_id="p-lost")
    assert not isinstance(exc.value, Timeout)  # answered with the failure, not left hanging
    assert isinstance(exc.value, StorageError)
    assert len(failing.failed) == 1
    wait_until(lambda: a._core.supervisor.restarts == restarts + 1, timeout=WAIT,
               what="A's channel actor to restart")
    # Nothing of the failed step is stored or left pending, and nothing reached B.
    assert stored(a, channel) == before_record
    assert a._core.store.get_latest("channels", decode_channel_id(channel)) == before_record
    assert outcome(a, channel, "p-lost") is None
    assert a.balances(channel) == before_a
    assert b.balances(channel) == before_b
    assert served.served == ["p-warm"]

    # A new payment: it must not carry the lost one (B would see a voucher of 2 + 7 + 3).
    assert a.send_message_and_pay(channel, "after", 3, timeout=WAIT,
                                  payment_id="p-after") == ["served", "after", 3]
    assert served.served == ["p-warm", "p-after"]
    check_agreement(a, b, channel, 5)
    # The failed payment again, by its id: paid once, now.
    assert a.send_message_and_pay(channel, "lost", 7, timeout=WAIT,
                                  payment_id="p-lost") == ["served", "lost", 7]
    assert served.served == ["p-warm", "p-after", "p-lost"]
    check_agreement(a, b, channel, 12)
    assert a._core.supervisor.restarts == restarts + 1
    wait_until(lambda: settled(a, channel) and settled(b, channel), timeout=WAIT,
               what="both sides to settle")


def test_a_command_refused_behind_a_failed_commit_goes_to_the_successor(
        pair, channel, failing, wait_until):
    """Two payments in flight on one actor: the first commit fails, so the second (built on
    it) is refused by the chain and nothing of either is sent. The first caller hears of the
    failure; the second command, refused only because of the first, is taken again by the
    successor rebuilt from the store and paid exactly once."""
    a, b = pair
    served = Served()
    b.on_payment_received(served)
    cid = decode_channel_id(channel)
    before_record = stored(a, channel)
    restarts = a._core.supervisor.restarts
    failing.arm(a, lambda: StorageError("injected: write failed"))
    with writer_held(a):
        first = a._core.pay_future(cid, "p-1", 5, "one")
        second = a._core.pay_future(cid, "p-2", 6, "two")
        # The actor went on without waiting: both commits are pending, the newest visible.
        assert not first.done() and not second.done()
        found, latest = a._core.store.writer.pending("channels", cid)
        assert found and latest != before_record
    with pytest.raises(StorageError) as one:
        first.result(WAIT)
    assert not isinstance(one.value, ChainBroken)
    assert result_of(second.result(WAIT)) == ["served", "two", 6]
    assert len(failing.failed) == 1  # the refused one never reached the store
    wait_until(lambda: a._core.supervisor.restarts == restarts + 1, timeout=WAIT,
               what="A's channel actor to restart")
    assert served.served == ["p-2"]
    check_agreement(a, b, channel, 6)
    # The failed one again: paid exactly once.
    assert a.send_message_and_pay(channel, "one", 5, timeout=WAIT, payment_id="p-1") == [
        "served", "one", 5]
    assert served.served == ["p-2", "p-1"]
    check_agreement(a, b, channel, 11)


def test_successor_does_not_build_on_a_commit_that_then_fails(nodes, ledger, failing,
                                                              wait_until):
    """An actor evicted (max_live_channels) with a commit still pending is succeeded by one
    that reads that pending state (Store.get_latest). If the pending commit then fails, its
    caller is told the payment failed: then nothing the successor stores or sends may carry
    it (its Chain says a later write never lands without an earlier one)."""
    a = nodes.open("a", max_live_channels=1)
    b = nodes.open("b")
    ledger.mint(a.address, 2 * DEPOSIT)
    served = Served()
    b.on_payment_received(served)
    ch1 = a.create_channel(b, DEPOSIT, dispute_period=60)
    ch2 = a.create_channel(b, DEPOSIT, dispute_period=60)
    for ch in (ch1, ch2):
        wait_until(lambda ch=ch: b.balances(ch)["deposited_by_peer"] == DEPOSIT,
                   timeout=WAIT, what="B to see the funding")
    c1, c2 = decode_channel_id(ch1), decode_channel_id(ch2)
    sup = a._core.supervisor
    with writer_held(a):
        first = a._core.pay_future(c1, "p-1", 5, "one")
        # ch2's actor evicts ch1's, which stops at once with its commit still pending.
        other = a._core.pay_future(c2, "p-x", 1, "other")
        assert c1 not in sup._live
        failing.arm(a, lambda: StorageError("injected: write failed"))  # p-1's commit
        # ch1's successor starts from p-1's pending state and pays on top of it.
        second = a._core.pay_future(c1, "p-2", 6, "two")
    with pytest.raises(StorageError):
        first.result(WAIT)
    got: Any
    try:
        got = second.result(WAIT)
    except PaychanError as exc:  # refusing p-2 would be fine too
        got = exc
    assert other.result(WAIT)["response"] == ["served", "other", 1]
    assert len(failing.failed) == 1
    # p-1 was reported failed: no voucher counting its 5 may be stored by A or held by B.
    stored_state = a._core.state(c1)
    assert [o.payment_id for o in stored_state.outgoing] == [], got
    assert a.balances(ch1)["sent_by_me"] in (0, 6), got
    assert b.balances(ch1)["sent_by_peer"] in (0, 6), got
    assert "p-1" not in served.served
    # The failed payment, retried: paid once, and both sides agree.
    assert a.send_message_and_pay(ch1, "one", 5, timeout=WAIT, payment_id="p-1") == [
        "served", "one", 5]
    if not isinstance(got, PaychanError):
        check_agreement(a, b, ch1, 11)
