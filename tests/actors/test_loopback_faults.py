"""A lossy loopback network (drop, duplicate, delay and so reorder): retries with the same
payment_id and sync give exactly-once accounting, and a mutual close pays out the deposits."""
from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

import paychan
from paychan.actors.loopback import Faults, LoopbackNetwork
from paychan.actors.node import NodeCore
from paychan.protocol.errors import Timeout
from paychan.protocol.identity import decode_channel_id


@pytest.fixture
def network() -> Iterator[LoopbackNetwork]:
    net = LoopbackNetwork()
    yield net
    net.close()


@pytest.fixture
def lossy_pair(network, nodes, ledger, tmp_path) -> tuple[paychan.Node, paychan.Node]:
    """Two nodes alone on `network`, each with FUNDS on the ledger."""
    a = nodes.add(paychan.Node(NodeCore(str(tmp_path / "la"), ledger.client, network=network)))
    b = nodes.add(paychan.Node(NodeCore(str(tmp_path / "lb"), ledger.client, network=network)))
    ledger.mint(a.address, 10_000)
    ledger.mint(b.address, 10_000)
    return a, b


class Served:
    """A payment handler that counts how often each payment id was served."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls: Counter[str] = Counter()
        self.lock = threading.Lock()

    def __call__(self, p: paychan.Payment) -> Any:
        with self.lock:
            self.calls[p.payment_id] += 1
        return [self.name, p.message, p.amount]


def pay_with_retries(node: paychan.Node, ch: str, message: Any, amount: int, pid: str,
                     retries: list[int]) -> Any:
    """Short timeouts; on each Timeout, sync (to push resends both ways) and retry the same id."""
    for _ in range(100):
        try:
            return node.send_message_and_pay(ch, message, amount, timeout=0.25, payment_id=pid)
        except Timeout:
            retries.append(1)
            node.sync(ch)
    raise AssertionError(f"payment {pid} did not finish after 100 tries")


def test_exactly_once_accounting_under_faults(lossy_pair, ledger, network, wait_until):
    a, b = lossy_pair
    served_a, served_b = Served("a"), Served("b")
    a.on_payment_received(served_a)
    b.on_payment_received(served_b)
    ch = a.create_channel(b, 1_000, dispute_period=60)
    b.deposit(ch, 200)
    wait_until(lambda: a.balances(ch)["deposited_by_peer"] == 200, what="A to see B's deposit")
    ledger_a, ledger_b = ledger.balance(a.address), ledger.balance(b.address)

    network.set_faults(Faults(drop=0.2, duplicate=0.2, delay=0.02, seed=1))
    retries: list[int] = []
    acked_a = acked_b = 0
    for i in range(100):
        amount = 1 + i % 7
        reply = pay_with_retries(a, ch, {"i": i}, amount, f"a-{i}", retries)
        assert reply == ["b", {"i": i}, amount]
        acked_a += amount
        if i % 5 == 4:  # the other direction too, interleaved
            reply = pay_with_retries(b, ch, i, 2, f"b-{i}", retries)
            assert reply == ["a", i, 2]
            acked_b += 2
    assert retries, "the faults never made a payment time out: the test proves nothing"
    assert network.dropped > 0

    network.set_faults(Faults())
    a.sync(ch)
    b.sync(ch)
    cid = decode_channel_id(ch)
    wait_until(lambda: not a._core.state(cid).outgoing and not b._core.state(cid).outgoing
               and not a._core.state(cid).serving and not b._core.state(cid).serving,
               what="nothing in flight")
    bal_a, bal_b = a.balances(ch), b.balances(ch)
    assert bal_a["sent_by_me"] == acked_a == bal_b["sent_by_peer"]
    assert bal_b["sent_by_me"] == acked_b == bal_a["sent_by_peer"]
    assert set(served_b.calls) == {f"a-{i}" for i in range(100)}
    assert set(served_a.calls) == {f"b-{i}" for i in range(4, 100, 5)}
    # A retry of any finished payment returns its outcome and pays nothing more.
    assert a.send_message_and_pay(ch, {"i": 0}, 1, payment_id="a-0") == ["b", {"i": 0}, 1]
    assert a.balances(ch)["sent_by_me"] == acked_a

    a.close(ch)
    expect_a = 1_000 - acked_a + acked_b
    expect_b = 200 - acked_b + acked_a
    assert ledger.balance(a.address) == ledger_a + expect_a
    wait_until(lambda: ledger.balance(b.address) == ledger_b + expect_b, what="B's payout")
    assert expect_a + expect_b == 1_200  # exactly the deposits


def test_duplicated_pays_run_the_handler_once(lossy_pair, network):
    """Every envelope delivered twice: each paid call is served once, the copy is answered from
    the stored result (or ignored while the call runs), never by running the handler again."""
    a, b = lossy_pair
    served = Served("b")
    b.on_payment_received(served)
    ch = a.create_channel(b, 1_000, dispute_period=60)
    network.set_faults(Faults(duplicate=1.0, seed=2))
    for i in range(50):
        assert a.send_message_and_pay(ch, i, 1, timeout=5, payment_id=f"d-{i}") == ["b", i, 1]
    network.set_faults(Faults())
    assert a.balances(ch)["sent_by_me"] == 50
    twice = {pid: n for pid, n in served.calls.items() if n != 1}
    assert twice == {}, f"handler ran more than once for {len(twice)} of 50 payments: {twice}"


def test_a_message_that_must_arrive_is_a_zero_payment(lossy_pair, network, wait_until):
    """A third of the envelopes dropped: free messages are best effort and some are lost, while a
    message paid with 0 arrives exactly once and moves no money (the README's advice)."""
    a, b = lossy_pair
    served = Served("b")
    b.on_payment_received(served)
    heard: list[Any] = []
    b.on("message", lambda event: heard.append(event["body"]))
    ch = a.create_channel(b, 1_000, dispute_period=60)
    network.set_faults(Faults(drop=0.3, seed=3))
    for i in range(30):
        a.send_message(ch, f"free {i}")
    retries: list[int] = []
    for i in range(15):
        assert pay_with_retries(a, ch, f"paid {i}", 0, f"z-{i}", retries) == ["b", f"paid {i}", 0]
    network.set_faults(Faults())
    a.send_message(ch, "last")  # events are dispatched in order: once it is heard, all are
    wait_until(lambda: heard and heard[-1] == "last", what="the last free message")
    assert len(heard) - 1 < 30, "no free message was lost: the faults prove nothing"
    assert served.calls == Counter({f"z-{i}": 1 for i in range(15)})
    assert a.balances(ch)["sent_by_me"] == 0 and b.balances(ch)["sent_by_me"] == 0
    assert a.balances(ch)["my_balance"] == 1_000
