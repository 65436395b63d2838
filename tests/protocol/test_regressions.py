"""Failures the stateful fuzz test (test_fuzz_channel.py) found, replayed as explicit steps.

Each test names the rule that broke and repeats hypothesis's minimal example step by step
(the fuzz rule each step came from is in the comment) over `Pair`: two real state machines, the
wire codec between them, and the settlement contract as ledger.
"""
from __future__ import annotations

from typing import Any

import pytest

from paychan.protocol import channel, contract, wire
from paychan.protocol.channel import (
    ActionCloseSolo,
    ActionDeposit,
    ActionHandlerDone,
    ActionPay,
    ActionSync,
    ChannelState,
    InvalidInput,
    LedgerUpdate,
    NotifyPayOutcome,
    Phase,
    Send,
    SubmitCloseMutual,
    SubmitCloseSolo,
    SubmitConfirm,
    SubmitCreate,
    SubmitDeposit,
    SubmitFraudProof,
)
from paychan.protocol.contract import ChannelRecord, Payouts
from paychan.protocol.errors import (
    HandlerError,
    InsufficientBalance,
    NotAllowedAtState,
    PaychanError,
)
from paychan.protocol.identity import Identity
from paychan.protocol.wire import ChannelParams, Pay, Sync, Voucher

FAILED = HandlerError("the handler failed").to_wire()
EVENTS = {SubmitCreate: "create", SubmitDeposit: "deposit", SubmitCloseMutual: "close_mutual",
          SubmitCloseSolo: "close_solo", SubmitConfirm: "confirm",
          SubmitFraudProof: "fraud_proof"}


class Pair:
    """A (initiator) and B over the codec, the contract as ledger, confirms held as tasks."""

    def __init__(self, dep_a: int, dep_b: int = 0, dispute: int = 1) -> None:
        self.keys = {"A": Identity(b"\x0a" * 32), "B": Identity(b"\x0b" * 32)}
        params = ChannelParams(self.keys["A"].public, self.keys["B"].public, "base", dispute,
                               b"\x00" * 32, "fuzz")
        self.now = 0
        self.record: ChannelRecord | None = None
        self.events: list[str] = []
        self.paid = {"A": 0, "B": 0}
        self.in_flight: list[tuple[str, bytes]] = []  # (recipient, bytes), in sending order
        self.results: dict[str, dict[str, Any]] = {"A": {}, "B": {}}
        self.tasks: dict[str, list[SubmitConfirm]] = {"A": [], "B": []}
        self.lagging: dict[str, list[LedgerUpdate]] = {}  # watchers that see the ledger late
        a, eff_a = channel.initiate(params, self.keys["A"].public, dep_a)
        b, eff_b = channel.respond(wire.decode(wire.encode(eff_a[0].msg)),  # type: ignore[arg-type]
                                   self.keys["B"].public)
        self.states = {"A": a, "B": b}
        self.act("A", channel.receive(wire.decode(wire.encode(eff_b[0].msg))))
        if dep_b:
            self.act("B", ActionDeposit(dep_b))

    def state(self, name: str) -> ChannelState:
        return self.states[name]

    def public(self, name: str) -> bytes:
        return self.keys[name].public

    def act(self, name: str, inp: Any) -> list[Any]:
        new, effects = channel.step(self.states[name], inp, self.now, self.keys[name])
        self.states[name] = new
        for eff in effects:
            if isinstance(eff, Send):
                self.in_flight.append(("B" if name == "A" else "A", wire.encode(eff.msg)))
            elif isinstance(eff, channel.RecordResult):
                self.results[name][eff.result.payment_id] = eff.result
            elif isinstance(eff, SubmitConfirm):
                self.tasks[name].append(eff)
            elif isinstance(eff, (SubmitCreate, SubmitDeposit, SubmitCloseMutual,
                                  SubmitCloseSolo, SubmitFraudProof)):
                self.submit(name, eff)
        return effects

    def deliver(self, index: int = 0) -> list[Any]:
        recipient, data = self.in_flight.pop(index)
        msg = wire.decode(data)
        known = self.results[recipient].get(msg.payment_id) if isinstance(msg, Pay) else None
        return self.act(recipient, channel.receive(msg, known))

    def submit(self, name: str, eff: Any) -> None:
        """Apply a transaction; a refused one changes nothing."""
        rec, sender = self.record, self.public(name)
        payouts: Payouts = ()
        try:
            if isinstance(eff, SubmitCreate):
                new = contract.create(eff.params, sender, eff.deposit)
            else:
                assert rec is not None
                if isinstance(eff, SubmitDeposit):
                    new = contract.deposit_(rec, sender, eff.amount)
                elif isinstance(eff, SubmitCloseMutual):
                    new, payouts = contract.close_mutual(
                        rec, eff.period, eff.sent_initiator, eff.sent_responder,
                        eff.sig_initiator, eff.sig_responder)
                elif isinstance(eff, SubmitCloseSolo):
                    new = contract.close_solo(rec, sender, eff.period, eff.declared_sent_self,
                                              eff.peer_voucher, self.now)
                elif isinstance(eff, SubmitConfirm):
                    new, payouts = contract.confirm(rec, sender, eff.period,
                                                    eff.additional_sent, self.now)
                else:
                    new, payouts = contract.fraud_proof(rec, sender, eff.period, eff.voucher)
        except PaychanError:
            return
        self.ledger(new, EVENTS[type(eff)], payouts)

    def ledger(self, new: ChannelRecord, event: str, payouts: Payouts = ()) -> None:
        """A ledger change, seen by both parties."""
        self.record = new
        self.events.append(event)
        for who, amount in payouts:
            self.paid["A" if who == self.public("A") else "B"] += amount
        for name in ("A", "B"):
            if name in self.lagging:
                self.lagging[name].append(LedgerUpdate(new, event, payouts))
            else:
                self.act(name, LedgerUpdate(new, event, payouts))

    def lag(self, name: str) -> None:
        self.lagging[name] = []

    def catch_up(self, name: str) -> None:
        for update in self.lagging.pop(name):
            self.act(name, update)

    def advance(self, seconds: int) -> None:
        """Time passes; every confirm that is due lands."""
        self.now += seconds
        for name in ("A", "B"):
            for task in [t for t in self.tasks[name] if t.not_before <= self.now]:
                self.tasks[name].remove(task)
                self.submit(name, task)


def test_money_of_a_call_in_service_cannot_be_spent_and_its_refund_never_overdraws() -> None:
    """B spent the 1 A paid for a call B was still serving; the call then failed and its
    refund voucher took B's balance to -1 (InternalError: my balance -1 is negative)."""
    pair = Pair(dep_a=1, dep_b=0)                      # open_channel(dep_a=1, dep_b=0)
    pair.act("A", ActionPay("A1", 1, "call 1"))        # pay(name='A', amount=1)
    pair.deliver()                                     # deliver: B serves A1
    with pytest.raises(InsufficientBalance):           # pay(name='B', amount=1)
        pair.act("B", ActionPay("B2", 1, "call 2"))
    pair.act("B", ActionHandlerDone("A1", None, FAILED))  # answer(ok=False): B refunds
    pair.deliver()
    a, b = pair.state("A"), pair.state("B")
    assert (a.my_balance, b.my_balance) == (1, 0)
    assert (a.peer_sent, a.credit) == (1, 0)  # the refund is money back, not credit


def test_fraud_evidence_that_arrives_after_the_close_is_used() -> None:
    """A cheater closed alone declaring 0 while a sync carrying its voucher for 1 was on the
    way; the honest peer took the voucher but only confirmed, and was paid 0 of the 1 it held
    (honest B holds 1, was paid 0)."""
    pair = Pair(dep_a=1, dep_b=0)                      # open_channel(dep_a=1, A cheats)
    pair.act("A", ActionPay("A1", 0, "call 1"))        # pay(name='A', amount=0)
    pair.act("A", ActionPay("A2", 1, "call 2"))        # pay(name='A', amount=1)
    pair.in_flight.clear()                             # (neither payment arrives)
    pair.act("A", ActionSync())                        # crash(name='A'): A syncs on restart
    rec = pair.record
    assert rec is not None                             # cheater_stale_close(cut=0):
    pair.ledger(contract.close_solo(rec, pair.public("A"), 1, 0, None, pair.now), "close_solo")
    assert pair.tasks["B"] and not pair.paid["B"]      # B holds nothing yet: it confirms
    effects = pair.deliver(0)                          # deliver the sync: the voucher for 1
    assert any(isinstance(e, SubmitFraudProof) for e in effects)
    assert pair.events[-1] == "fraud_proof"
    assert pair.paid == {"A": 0, "B": 1}


def test_a_solo_close_waits_for_a_refund_still_on_its_way() -> None:
    """Found as 'honest A holds 1, was paid 0': A paid 1 for a call that failed; the refund
    was on its way when A closed alone; the peer never admitted it and the window ran out.
    DESIGN §5 gives a solo closer no way to show the ledger a voucher that reaches it after its
    close (only the peer's confirm can), so a solo close is refused while answers are awaited,
    unless forced (a silent peer)."""
    pair = Pair(dep_a=1, dep_b=0)                      # open_channel(dep_a=1, B cheats)
    pair.act("A", ActionPay("A1", 1, "call 1"))        # pay(name='A', amount=1)
    pair.deliver()                                     # deliver: B serves A1
    pair.act("B", ActionHandlerDone("A1", None, FAILED))  # answer(ok=False): refund on its way
    with pytest.raises(NotAllowedAtState, match="await answers"):
        pair.act("A", ActionCloseSolo())               # close(name='A', solo=True): not yet
    assert pair.state("A").phase is Phase.OPEN
    pair.deliver()                                     # deliver: the refund reaches A
    assert pair.state("A").my_balance == 1
    pair.act("A", ActionCloseSolo())                   # now the close shows the refund
    pair.tasks["B"].clear()                            # cheater_withholds: no confirm from B
    pair.advance(1)                                    # advance_time: A's confirm lands
    assert pair.events[-1] == "confirm"
    assert pair.paid["A"] == 1


def test_a_closing_party_never_lowers_what_it_declares_after_a_sync() -> None:
    """A's voucher went back from (nonce 1, sent 8) to (nonce 2, sent 0): the peer held a
    voucher of A's with a higher nonce but a lower sent (A forged it; a party restored from an
    old copy can sign such a pair too), and a sync made the closing A adopt it. A closing party
    signs nothing new, so it must keep declaring the higher of the two."""
    pair = Pair(dep_a=20)                              # open_channel, deposit(name='A')
    a = pair.state("A")
    forged = Voucher.create(pair.keys["A"], a.channel_id, 1, 2, 0)
    pair.in_flight.append(("B", wire.encode(Sync(a.channel_id, 1, forged, None, False))))
    pair.deliver()                                     # cheater_forges_voucher(nonce_step=2)
    assert pair.state("B").peer_voucher == forged
    pair.act("B", ActionSync())                        # sync(name='B'): yours = A's nonce 2
    sync = pair.in_flight.pop()
    pair.act("A", ActionPay("A1", 8, "call"))          # pay(name='A', amount=8)
    pair.act("A", ActionCloseSolo(force=True))         # A closes (a stale close in the run)
    assert pair.state("A").phase is Phase.CLOSING
    pair.in_flight.append(sync)
    pair.deliver(-1)                                   # the sync reaches the closing A
    assert (pair.state("A").my_nonce, pair.state("A").my_sent) == (1, 8)


def test_a_sync_with_our_forgotten_voucher_and_the_peers_refund_is_taken_at_once() -> None:
    """A duplicate of B's sync changed A's state: the sync carried A's own voucher for 1
    (which A did not hold) and B's refund of that 1. A checked the refund against what it
    knew it had paid before learning its own voucher, so it dropped the refund the first time
    and took it the second."""
    pair = Pair(dep_a=1)                               # open_channel, deposit(name='A', 1)
    a = pair.state("A")
    paid = Voucher.create(pair.keys["A"], a.channel_id, 1, 1, 1)
    pair.in_flight.append(("B", wire.encode(Pay(a.channel_id, "X1", paid, 1, "forged"))))
    pair.deliver()                                     # cheater_forges_voucher: B serves X1
    pair.act("B", ActionHandlerDone("X1", None, FAILED))  # answer(ok=False): refund of 1
    pair.in_flight.clear()
    pair.act("B", ActionSync())                        # sync(name='B')
    _, data = pair.in_flight.pop()
    for _ in range(2):                                 # redeliver: twice
        pair.in_flight.append(("A", data))
        pair.deliver()
        a = pair.state("A")
        assert (a.my_sent, a.peer_sent, a.my_balance) == (1, 1, 1)


def test_a_refund_that_counts_on_an_unseen_deposit_waits_instead_of_being_lost() -> None:
    """B's watcher had not yet seen A's deposit when A's refund of B's failed call arrived: B
    found it overdrew and dropped it as invalid, ending the payment unrefunded; the refunded
    money then stayed with B as credit for calls that never come."""
    pair = Pair(dep_a=0, dep_b=1)                      # open_channel(dep_a=0, dep_b=1)
    pair.lag("B")
    pair.act("A", ActionDeposit(1))                    # deposit(name='A', 1): B sees it late
    pair.act("A", ActionPay("A1", 1, "call 1"))        # pay(name='A', amount=1)
    pair.in_flight.clear()                             # (it stays in flight)
    pair.act("B", ActionPay("B2", 1, "call 2"))        # pay(name='B', amount=1)
    pair.deliver()                                     # deliver_and_answer(ok=False):
    pair.act("A", ActionHandlerDone("B2", None, FAILED))  # A refunds, counting on its deposit
    effects = pair.deliver()                           # deliver: the refund reaches B
    assert not any(isinstance(e, InvalidInput) for e in effects)
    assert [o.payment_id for o in pair.state("B").outgoing] == ["B2"]  # not over yet
    pair.catch_up("B")                                 # B's watcher sees the deposit
    pair.act("B", ActionSync())                        # the next sync re-sends B2 ...
    pair.in_flight = [(r, d) for r, d in pair.in_flight if wire.decode(d).TYPE == "pay"]
    pair.deliver()                                     # ... A answers from its results
    outcomes = [e for e in pair.deliver() if isinstance(e, NotifyPayOutcome)]
    assert [(o.payment_id, o.refunded) for o in outcomes] == [("B2", True)]
    b = pair.state("B")  # its 1 back; A1's 1 (still in flight) is credit until A1 arrives
    assert (b.my_balance, b.credit, b.spendable) == (2, 1, 1)
