"""The channel state machine, two parties at a time through ChannelPair (DESIGN §4, §5)."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import msgpack
import pytest
from pair import DEFER, ChannelPair, Party

from paychan.protocol.channel import (
    MAX_POSTPONED,
    ActionCloseMutual,
    ActionCloseSolo,
    ActionDeposit,
    ActionHandlerDone,
    ActionMessage,
    ActionPay,
    ActionSync,
    CallHandler,
    ChannelState,
    InvalidInput,
    LedgerUpdate,
    NotifyEvent,
    NotifyPayOutcome,
    Phase,
    RecordResult,
    Send,
    SubmitCloseMutual,
    SubmitConfirm,
    SubmitFraudProof,
    step,
)
from paychan.protocol.contract import Status
from paychan.protocol.errors import (
    BadSignature,
    Conflict,
    HandlerError,
    InsufficientBalance,
    LocalProtocolError,
    NotAllowedAtState,
    PaychanError,
    Rejected,
    from_wire,
)
from paychan.protocol.wire import (
    CloseCoSigned,
    CloseProposal,
    OpenAccept,
    OpenPropose,
    Pay,
    PayResult,
    Sync,
    Voucher,
    decode,
    encode,
    sign_close,
)


def st(party: Party) -> ChannelState:
    assert party.state is not None
    return party.state


def balances(pair: ChannelPair) -> tuple[int, int]:
    """(A's balance, B's balance), after checking that both sides agree on them."""
    a, b = st(pair.a), st(pair.b)
    assert (a.my_balance, a.peer_balance) == (b.peer_balance, b.my_balance)
    return a.my_balance, b.my_balance


def events(party: Party, name: str) -> list[dict[str, Any]]:
    return [e.info for e in party.of_type(NotifyEvent) if e.name == name]


def pay(pair: ChannelPair, payer: Party, pid: str, amount: int, message: Any = None) -> None:
    pair.act(payer, ActionPay(pid, amount, message))
    pair.flush()


def assert_conserved(pair: ChannelPair) -> None:
    assert sum(pair.paid.values()) + (pair.record.total if pair.record else 0) == sum(
        pair.deposited.values())


def expected_payouts(pair: ChannelPair) -> dict[bytes, int]:
    """What each party is owed at settlement from the outcomes the payers were told: a call
    that succeeded costs its amount, a call that failed (refunded or not) costs nothing."""
    owed = {pair.a.public: pair.deposited[pair.a.public],
            pair.b.public: pair.deposited[pair.b.public]}
    for payer in (pair.a, pair.b):
        payee = pair.peer_of(payer)
        for pid, outcome in payer.notified_outcomes().items():
            if outcome.error is None:
                amount = next(c.amount for c in payee.calls if c.payment_id == pid)
                owed[payer.public] -= amount
                owed[payee.public] += amount
    return owed


def failing_handler(party: Party, call: CallHandler) -> Any:
    if call.message == "fail":
        raise Rejected("the service is down")
    if call.message == "crash":
        raise RuntimeError("bug in the handler")
    return ["served", call.message]


# --- opening --------------------------------------------------------------------------------

def test_open_handshake() -> None:
    pair = ChannelPair(deposit_a=100, deposit_b=0).propose()
    assert st(pair.a).phase is Phase.AWAITING_ACCEPT
    assert pair.b.state is None
    proposal = decode(pair.b.inbox[0])
    assert isinstance(proposal, OpenPropose)
    assert (proposal.params, proposal.deposit) == (pair.params, 100)

    pair.deliver(pair.b)
    assert st(pair.b).phase is Phase.AWAITING_FUNDING
    assert events(pair.b, "channel_created_by_peer") == [{"deposit": 100}]
    assert isinstance(decode(pair.a.inbox[0]), OpenAccept)
    assert pair.record is None

    pair.deliver(pair.a)  # the accept: A creates the channel on the ledger, both see it
    assert pair.events == ["create"]
    assert pair.record is not None and pair.record.deposit_initiator == 100
    for party in (pair.a, pair.b):
        assert st(party).phase is Phase.OPEN
        assert len(events(party, "channel_open")) == 1
    assert (st(pair.a).deposit_me, st(pair.a).deposit_peer) == (100, 0)
    assert (st(pair.b).deposit_me, st(pair.b).deposit_peer) == (0, 100)
    assert balances(pair) == (100, 0)
    assert not pair.a.inbox and not pair.b.inbox and not pair.ledger_errors


def test_a_duplicate_accept_creates_nothing_twice() -> None:
    pair = ChannelPair().propose()
    pair.deliver(pair.b)
    dup = pair.a.inbox[0]
    pair.flush()
    pair.a.inbox.append(dup)
    pair.flush()
    assert pair.events == ["create"] and not pair.ledger_errors


def test_the_responder_deposits_and_both_see_it() -> None:
    pair = ChannelPair(deposit_a=100, deposit_b=50).open()
    assert pair.events == ["create", "deposit"]
    assert balances(pair) == (100, 50)
    assert events(pair.a, "deposit_confirmed")[-1] == {"deposit_me": 100, "deposit_peer": 50}


# --- paying ---------------------------------------------------------------------------------

def test_pays_both_ways() -> None:
    pair = ChannelPair(deposit_a=100, deposit_b=50).open()
    pay(pair, pair.a, "a1", 30, "hi")
    assert pair.a.notified_outcomes()["a1"] == NotifyPayOutcome("a1", ["served", "hi"], None)
    assert pair.b.calls == [CallHandler("a1", 30, "hi")]
    assert balances(pair) == (70, 80)

    pay(pair, pair.b, "b1", 45, {"q": 1})
    assert pair.b.notified_outcomes()["b1"].response == ["served", {"q": 1}]
    assert balances(pair) == (115, 35)
    assert (st(pair.a).my_sent, st(pair.b).my_sent) == (30, 45)
    assert st(pair.a).my_voucher == st(pair.b).peer_voucher
    assert st(pair.b).my_voucher == st(pair.a).peer_voucher
    assert [e["payment_id"] for e in events(pair.b, "payment_received")] == ["a1"]
    assert not st(pair.a).outgoing and not st(pair.b).serving


def test_a_zero_payment_is_a_plain_call() -> None:
    pair = ChannelPair().open()
    pay(pair, pair.a, "z", 0, "ping")
    assert pair.a.notified_outcomes()["z"].response == ["served", "ping"]
    assert balances(pair) == (100, 0)


def test_both_pay_at_the_same_time() -> None:
    pair = ChannelPair(deposit_a=100, deposit_b=100).open()
    pair.act(pair.a, ActionPay("a1", 10))
    pair.act(pair.b, ActionPay("b1", 25))
    pair.act(pair.a, ActionPay("a2", 5))
    pair.flush()
    assert set(pair.a.notified_outcomes()) == {"a1", "a2"}
    assert set(pair.b.notified_outcomes()) == {"b1"}
    assert all(o.error is None for o in pair.a.notified_outcomes().values())
    assert balances(pair) == (110, 90)


def test_pipelined_payments_delivered_out_of_order_are_served_against_credit() -> None:
    pair = ChannelPair(deposit_a=100).open()
    for pid, amount in [("p1", 10), ("p2", 20), ("p3", 5)]:
        pair.act(pair.a, ActionPay(pid, amount, pid))
    assert len(pair.b.inbox) == 3
    pair.deliver(pair.b, 2)  # p3 first: its voucher (nonce 3, sent 35) covers it
    pair.deliver(pair.b, 0)  # p1: an older voucher, served from the credit
    pair.deliver(pair.b, 0)  # p2
    assert [c.payment_id for c in pair.b.calls] == ["p3", "p1", "p2"]
    b = st(pair.b)
    assert (b.peer_voucher.nonce if b.peer_voucher else 0, b.peer_sent) == (3, 35)
    assert b.credit_used == 35 and b.credit == 0
    pair.flush()
    outcomes = pair.a.notified_outcomes()
    assert {pid: o.response for pid, o in outcomes.items()} == {
        "p1": ["served", "p1"], "p2": ["served", "p2"], "p3": ["served", "p3"]}
    assert balances(pair) == (65, 35)


def test_a_duplicate_pay_is_answered_from_the_stored_result() -> None:
    pair = ChannelPair(deposit_a=100).open()
    pair.act(pair.a, ActionPay("p1", 10, "x"))
    copy = pair.b.inbox[0]
    pair.deliver(pair.b)
    first_reply = pair.a.inbox[0]
    pair.flush()
    b_before, a_before = st(pair.b), st(pair.a)
    assert "p1" in pair.b.results

    pair.b.inbox.append(copy)  # the network (or a retrying payer) delivers it again
    effects = pair.deliver(pair.b)
    assert effects == [Send(pair.b.results["p1"])]
    assert st(pair.b) == b_before
    assert pair.a.inbox == [first_reply]  # the very same answer
    assert len(pair.b.calls) == 1  # the handler ran once
    pair.flush()
    assert st(pair.a) == a_before  # the payer ignores the second answer
    assert len(pair.a.of_type(NotifyPayOutcome)) == 1
    assert balances(pair) == (90, 10)


def test_a_payer_retry_resends_the_same_voucher() -> None:
    pair = ChannelPair(deposit_a=100).open()
    pair.act(pair.a, ActionPay("p1", 10, "x"))
    pair.act(pair.a, ActionPay("p1", 10, "x"))  # the application retries before an answer
    assert len(pair.b.inbox) == 2 and pair.b.inbox[0] == pair.b.inbox[1]
    pair.flush()
    assert len(pair.b.calls) == 1
    assert balances(pair) == (90, 10)


def test_a_handler_error_refunds_the_payer() -> None:
    pair = ChannelPair(deposit_a=100, deposit_b=50, handler=failing_handler).open()
    pay(pair, pair.a, "ok", 10, "fine")
    pay(pair, pair.a, "bad", 30, "fail")
    outcome = pair.a.notified_outcomes()["bad"]
    assert outcome.refunded is True and outcome.response is None
    err = from_wire(outcome.error)
    assert type(err) is Rejected and err.code == 3
    assert balances(pair) == (90, 60)  # as if the failed call had not been made
    stored = pair.b.results["bad"]
    assert stored.refund is not None and stored.refund.sent == 30
    assert st(pair.b).my_voucher == stored.refund == st(pair.a).peer_voucher
    # The refund is money back, not credit for the payee's own requests.
    assert st(pair.a).credit == 0
    pay(pair, pair.a, "after", 5, "fine")
    assert balances(pair) == (85, 65)


def test_a_crashing_handler_is_a_handler_error_with_a_refund() -> None:
    pair = ChannelPair(deposit_a=100, handler=failing_handler).open()
    pay(pair, pair.a, "p", 40, "crash")
    outcome = pair.a.notified_outcomes()["p"]
    err = from_wire(outcome.error)
    assert type(err) is HandlerError and (err.code, err.detail) == (3, 1100)
    assert outcome.refunded
    assert balances(pair) == (100, 0)


def test_the_payee_may_pay_from_its_balance_after_a_refund() -> None:
    pair = ChannelPair(deposit_a=100, handler=failing_handler).open()
    pay(pair, pair.a, "ok", 50, "fine")
    pay(pair, pair.a, "bad", 20, "fail")
    pay(pair, pair.b, "back", 50, "fine")  # B holds exactly 50
    assert pair.b.notified_outcomes()["back"].error is None
    assert balances(pair) == (100, 0)


def test_a_tampered_voucher_gets_bad_signature_and_changes_nothing() -> None:
    pair = ChannelPair(deposit_a=100).open()
    pay(pair, pair.a, "p0", 5)
    pair.act(pair.a, ActionPay("p1", 10, "x"))
    msg = decode(pair.b.inbox[0])
    assert isinstance(msg, Pay)
    v = msg.voucher
    forged = replace(msg, voucher=Voucher(v.channel_id, v.period, v.nonce, v.sent + 50, v.sig),
                     amount=60)
    pair.b.inbox[0] = encode(forged)
    before = st(pair.b)
    effects = pair.deliver(pair.b)
    assert st(pair.b) == before
    assert not [e for e in effects if isinstance(e, CallHandler)]
    invalid = [e.error for e in effects if isinstance(e, InvalidInput)]
    assert len(invalid) == 1 and type(invalid[0]) is BadSignature
    reply = decode(pair.a.inbox[0])
    assert isinstance(reply, PayResult) and reply.payment_id == "p1" and reply.refund is None
    err = from_wire(reply.error)
    assert type(err) is BadSignature and (err.code, err.detail) == (3, 1017)
    assert len(pair.b.calls) == 1  # only p0


@pytest.mark.parametrize("tamper", ["channel", "period", "signer"])
def test_a_voucher_for_another_channel_period_or_signer_is_refused(tamper: str) -> None:
    pair = ChannelPair(deposit_a=100).open()
    pair.act(pair.a, ActionPay("p1", 10))
    msg = decode(pair.b.inbox[0])
    assert isinstance(msg, Pay)
    a = pair.a.key
    if tamper == "channel":
        v = Voucher.create(a, bytes(32), 1, 1, 10)
    elif tamper == "period":
        v = Voucher.create(a, msg.channel_id, 2, 1, 10)
    else:
        v = Voucher.create(pair.b.key, msg.channel_id, 1, 1, 10)
    pair.b.inbox[0] = encode(replace(msg, voucher=v))
    before = st(pair.b)
    pair.deliver(pair.b)
    assert st(pair.b) == before
    assert not pair.b.calls
    reply = decode(pair.a.inbox[0])
    assert isinstance(reply, PayResult) and reply.error is not None


def test_an_amount_beyond_the_voucher_is_refused() -> None:
    pair = ChannelPair(deposit_a=100).open()
    pair.act(pair.a, ActionPay("p1", 10))
    msg = decode(pair.b.inbox[0])
    assert isinstance(msg, Pay)
    pair.b.inbox[0] = encode(replace(msg, amount=11))  # claims more than the voucher carries
    before = st(pair.b)
    effects = pair.deliver(pair.b)
    assert st(pair.b) == before and not pair.b.calls
    invalid = [e.error for e in effects if isinstance(e, InvalidInput)]
    assert [type(e) for e in invalid] == [InsufficientBalance]


def test_an_overdrawing_pay_waits_for_the_deposit() -> None:
    pair = ChannelPair(deposit_a=100).open()
    pair.b.follow_ledger = False
    pair.act(pair.a, ActionDeposit(50))
    assert st(pair.a).deposit_me == 150 and st(pair.b).deposit_peer == 100
    pair.act(pair.a, ActionPay("big", 120, "x"))
    effects = pair.deliver(pair.b)
    assert effects == []  # postponed: no call, no answer
    assert [p.payment_id for p in st(pair.b).postponed] == ["big"]
    assert not pair.b.calls and not pair.a.inbox

    pair.release_ledger(pair.b)
    assert st(pair.b).deposit_peer == 150
    assert not st(pair.b).postponed
    assert [c.payment_id for c in pair.b.calls] == ["big"]
    pair.flush()
    assert pair.a.notified_outcomes()["big"].error is None
    assert balances(pair) == (30, 120)


def test_a_pay_before_the_funding_is_seen_waits() -> None:
    pair = ChannelPair(deposit_a=100).propose()
    pair.deliver(pair.b)
    pair.b.follow_ledger = False
    pair.flush()  # A creates; B does not see it yet
    assert st(pair.a).phase is Phase.OPEN and st(pair.b).phase is Phase.AWAITING_FUNDING
    pair.act(pair.a, ActionPay("early", 10))
    assert pair.deliver(pair.b) == []
    pair.release_ledger(pair.b)
    pair.flush()
    assert pair.a.notified_outcomes()["early"].error is None
    assert balances(pair) == (90, 10)


# --- misuse ---------------------------------------------------------------------------------

def test_local_protocol_error_names_the_phase_and_the_input() -> None:
    pair = ChannelPair().propose()
    before = st(pair.a)
    with pytest.raises(LocalProtocolError) as exc:
        pair.act(pair.a, ActionPay("p", 1))
    assert "ActionPay" in str(exc.value) and "AWAITING_ACCEPT" in str(exc.value)
    assert (exc.value.code, exc.value.detail) == (3, 1018)
    assert isinstance(exc.value, NotAllowedAtState)
    assert st(pair.a) == before and not pair.b.inbox[1:]


@pytest.mark.parametrize("action", [ActionDeposit(5), ActionPay("p", 1)],
                         ids=["deposit", "pay"])
def test_local_actions_while_closing_are_refused(action: Any) -> None:
    pair = ChannelPair(deposit_a=100).open()
    pair.act(pair.a, ActionCloseMutual())
    with pytest.raises(LocalProtocolError) as exc:
        pair.act(pair.a, action)
    assert "CLOSING" in str(exc.value) and type(action).__name__ in str(exc.value)


def test_paying_more_than_the_balance_is_insufficient_balance() -> None:
    pair = ChannelPair(deposit_a=100).open()
    before = st(pair.a)
    with pytest.raises(InsufficientBalance) as exc:
        pair.act(pair.a, ActionPay("p", 101))
    assert type(exc.value) is InsufficientBalance
    assert (exc.value.code, exc.value.detail) == (3, 1001)
    assert st(pair.a) == before and not pair.b.inbox
    pay(pair, pair.a, "all", 100)
    assert balances(pair) == (0, 100)
    with pytest.raises(InsufficientBalance):
        pair.act(pair.a, ActionPay("more", 1))


def test_the_wrong_key_is_refused() -> None:
    pair = ChannelPair().open()
    with pytest.raises(LocalProtocolError):
        step(st(pair.a), ActionPay("p", 1), pair.now, pair.b.key)


def test_finishing_a_call_that_is_not_being_served_is_refused() -> None:
    pair = ChannelPair().open()
    with pytest.raises(LocalProtocolError):
        pair.act(pair.b, ActionHandlerDone("nope", 1))


@pytest.mark.parametrize("action", [
    lambda: ActionPay("", 1), lambda: ActionPay("x" * 65, 1), lambda: ActionPay("p", -1),
    lambda: ActionPay("p", 2**63), lambda: ActionPay("p", 1, {1: "int key"}),
    lambda: ActionDeposit(-5), lambda: ActionMessage(b"x" * 70_000),
], ids=["empty-id", "long-id", "negative", "huge", "bad-body", "neg-deposit", "big-message"])
def test_invalid_actions_cannot_be_built(action: Any) -> None:
    with pytest.raises(PaychanError):
        action()


# --- sync and recovery ----------------------------------------------------------------------

def test_sync_after_a_restore_recovers_the_own_latest_voucher() -> None:
    pair = ChannelPair(deposit_a=100).open()
    pay(pair, pair.a, "p1", 10)
    old = st(pair.a)  # the backup
    pay(pair, pair.a, "p2", 20)
    pay(pair, pair.a, "p3", 5)
    latest = st(pair.a).my_voucher
    assert latest is not None and latest.sent == 35

    pair.a.state = old  # restored from the backup: it believes it sent 10
    assert st(pair.a).my_sent == 10
    pair.act(pair.a, ActionSync())
    pair.flush()
    assert st(pair.a).my_voucher == latest
    assert events(pair.a, "own_voucher_recovered") == [{"nonce": 3, "sent": 35}]
    assert balances(pair) == (65, 35)
    # Now a solo close declares the truth and is not punished.
    pair.act(pair.a, ActionCloseSolo())
    assert not pair.b.of_type(SubmitFraudProof)
    assert pair.paid == {pair.a.public: 65, pair.b.public: 35}
    assert_conserved(pair)


def test_sync_resends_what_the_peer_lacks() -> None:
    pair = ChannelPair(deposit_a=100).open()
    pair.act(pair.a, ActionPay("lost", 10, "x"))
    pair.b.inbox.clear()  # the pay was lost on the way
    pair.act(pair.a, ActionSync())
    pair.flush()
    assert pair.a.notified_outcomes()["lost"].response == ["served", "x"]
    assert balances(pair) == (90, 10)


def test_sync_after_the_answer_was_lost_does_not_charge_twice() -> None:
    pair = ChannelPair(deposit_a=100).open()
    pair.act(pair.a, ActionPay("p", 10, "x"))
    pair.deliver(pair.b)
    pair.a.inbox.clear()  # the answer was lost
    pair.act(pair.a, ActionSync())
    pair.flush()
    assert pair.a.notified_outcomes()["p"].response == ["served", "x"]
    assert len(pair.b.calls) == 1
    assert balances(pair) == (90, 10)


def test_a_stale_or_forged_sync_changes_nothing() -> None:
    pair = ChannelPair(deposit_a=100).open()
    pay(pair, pair.a, "p1", 10)
    pay(pair, pair.a, "p2", 10)
    a_before, b_before = st(pair.a), st(pair.b)
    stale = Sync(st(pair.a).channel_id, 1, None, None, False)
    pair.a.inbox.append(encode(stale))
    pair.b.inbox.append(encode(stale))
    cid = st(pair.a).channel_id
    forged = Voucher.create(pair.b.key, cid, 1, 9, 99)  # "your voucher", signed by the wrong key
    pair.a.inbox.append(encode(Sync(cid, 1, None, forged, False)))
    pair.flush()
    assert st(pair.a) == a_before and st(pair.b) == b_before


# --- closing --------------------------------------------------------------------------------

def test_mutual_close_pays_the_balances() -> None:
    pair = ChannelPair(deposit_a=100, deposit_b=50).open()
    pay(pair, pair.a, "a1", 30)
    pay(pair, pair.b, "b1", 5)
    assert balances(pair) == (75, 75)
    pair.act(pair.a, ActionCloseMutual())
    assert st(pair.a).phase is Phase.CLOSING
    pair.flush()
    assert "close_mutual" in pair.events
    assert pair.paid == {pair.a.public: 75, pair.b.public: 75}
    assert_conserved(pair)
    for party in (pair.a, pair.b):
        s = st(party)
        assert (s.phase, s.period, s.deposit_me, s.deposit_peer, s.my_voucher) == (
            Phase.OPEN, 2, 0, 0, None)
        assert events(party, "channel_closed")[-1] == {"period": 1, "payout_me": 75,
                                                       "payout_peer": 75}
    assert len(pair.b.of_type(SubmitCloseMutual)) == 1


def test_a_close_proposal_received_again_is_announced_once() -> None:
    pair = ChannelPair(deposit_a=100, deposit_b=50).open()
    pay(pair, pair.a, "a1", 30)
    pair.b.follow_ledger = False  # B co-signs, its close has not landed for it yet
    pair.act(pair.a, ActionCloseMutual())
    pair.act(pair.a, ActionCloseMutual())  # asked again: the same proposal again
    assert len(pair.b.inbox) == 2 and pair.b.inbox[0] == pair.b.inbox[1]
    first, again = pair.deliver(pair.b), pair.deliver(pair.b)
    # Both answers co-sign (the first may have been lost), only the first announces the close.
    for effects in (first, again):
        assert [type(e.msg) for e in effects if isinstance(e, Send)] == [CloseCoSigned]
    assert events(pair.b, "channel_closing") == [{"mutual": True}]
    pair.release_ledger(pair.b)
    pair.flush()
    assert pair.paid == {pair.a.public: 70, pair.b.public: 80}
    assert events(pair.b, "channel_closing") == [{"mutual": True}]
    assert_conserved(pair)


def test_the_channel_is_reused_in_the_next_period() -> None:
    pair = ChannelPair(deposit_a=100, deposit_b=50).open()
    pay(pair, pair.a, "a1", 30)
    pair.act(pair.a, ActionCloseMutual())
    pair.flush()
    pair.act(pair.b, ActionDeposit(40))
    pay(pair, pair.b, "b2", 15)
    assert st(pair.a).period == 2 and balances(pair) == (15, 25)
    pair.act(pair.b, ActionCloseMutual())
    pair.flush()
    assert pair.paid == {pair.a.public: 70 + 15, pair.b.public: 80 + 25}
    assert_conserved(pair)


def test_a_proposal_that_shortchanges_us_is_refused() -> None:
    pair = ChannelPair(deposit_a=100, deposit_b=50).open()
    pay(pair, pair.a, "a1", 30)
    cid = st(pair.a).channel_id
    # A proposes as if it had sent nothing: B's balance would drop from 80 to 50.
    sig = sign_close(pair.a.key, cid, 1, 0, 0)
    pair.b.inbox.append(encode(CloseProposal(cid, 1, 0, 0, sig)))
    before = st(pair.b)
    effects = pair.deliver(pair.b)
    assert st(pair.b) == before
    assert not [e for e in effects if isinstance(e, SubmitCloseMutual)]
    assert [type(e.error) for e in effects if isinstance(e, InvalidInput)] == [
        Conflict]
    assert pair.events == ["create", "deposit"]


def test_solo_close_with_a_stale_voucher_loses_everything_to_the_victim() -> None:
    pair = ChannelPair(deposit_a=100, deposit_b=50).open()
    stale = st(pair.a)  # A keeps a copy from before it paid
    pay(pair, pair.a, "a1", 30)
    pay(pair, pair.a, "a2", 20)
    assert balances(pair) == (50, 100)

    pair.a.state = stale  # the cheater closes with what it had sent back then (nothing)
    pair.act(pair.a, ActionCloseSolo())
    proofs = pair.b.of_type(SubmitFraudProof)
    assert len(proofs) == 1
    assert (proofs[0].period, proofs[0].voucher.sent, proofs[0].voucher.nonce) == (1, 50, 2)
    assert proofs[0].voucher.verify(pair.a.public)
    assert "fraud_proof" in pair.events
    assert pair.paid == {pair.a.public: 0, pair.b.public: 150}
    assert events(pair.b, "channel_closed_with_fraud_proof") == [
        {"period": 1, "payout_me": 150, "payout_peer": 0}]
    # The cheater's own confirm, due after the window, finds the period already settled.
    pair.advance(600)
    assert [(who, type(err)) for who, _, err in pair.ledger_errors] == [("A", Conflict)]
    assert pair.paid == {pair.a.public: 0, pair.b.public: 150}
    assert_conserved(pair)


def test_an_honest_solo_close_confirms_after_the_window() -> None:
    pair = ChannelPair(deposit_a=100, deposit_b=50, dispute_period=600).open()
    pay(pair, pair.a, "a1", 30)
    pair.b.follow_ledger = False  # B is offline: nobody confirms early
    pair.act(pair.a, ActionCloseSolo())
    assert pair.record is not None and pair.record.status is Status.CLOSING
    started = pair.record.close.started_at if pair.record.close else -1
    assert started == pair.now
    confirms = pair.a.of_type(SubmitConfirm)
    assert confirms == [SubmitConfirm(1, 0, started + 600)]
    pair.advance(599)
    assert pair.record.status is Status.CLOSING and pair.paid[pair.a.public] == 0
    pair.advance(1)
    assert pair.events[-1] == "confirm"
    assert pair.paid == {pair.a.public: 70, pair.b.public: 80}
    assert st(pair.a).period == 2
    pair.release_ledger(pair.b)
    assert st(pair.b).period == 2
    assert_conserved(pair)


def test_the_peer_of_a_solo_close_confirms_at_once() -> None:
    pair = ChannelPair(deposit_a=100, deposit_b=50).open()
    pay(pair, pair.a, "a1", 30)
    pay(pair, pair.b, "b1", 10)
    pair.act(pair.a, ActionCloseSolo())
    assert pair.b.of_type(SubmitConfirm) == [SubmitConfirm(1, 0, 0)]
    assert pair.events[-2:] == ["close_solo", "confirm"]
    assert pair.paid == {pair.a.public: 80, pair.b.public: 70}
    assert not pair.ledger_errors
    assert_conserved(pair)


def test_the_peer_admits_sending_the_closer_did_not_show() -> None:
    pair = ChannelPair(deposit_a=100, deposit_b=50).open()
    pay(pair, pair.b, "b1", 10)
    pair.act(pair.b, ActionPay("b2", 15))  # in flight: A has not seen this voucher
    pair.act(pair.a, ActionCloseSolo())   # A shows B's voucher for 10
    assert pair.b.of_type(SubmitConfirm) == [SubmitConfirm(1, 15, 0)]
    assert pair.paid == {pair.a.public: 125, pair.b.public: 25}
    assert_conserved(pair)


def test_a_refund_never_proves_fraud_against_an_honest_closer() -> None:
    pair = ChannelPair(deposit_a=100, deposit_b=50, handler=failing_handler).open()
    pay(pair, pair.a, "bad", 30, "fail")  # B refunds: B's own voucher now says 30
    pay(pair, pair.b, "b1", 5, "fine")
    pair.act(pair.b, ActionCloseSolo())  # B declares 35, A holds B's voucher for 35
    assert not pair.a.of_type(SubmitFraudProof)
    assert pair.paid == {pair.a.public: 105, pair.b.public: 45}
    assert_conserved(pair)


def test_ledger_updates_are_idempotent() -> None:
    pair = ChannelPair(deposit_a=100, deposit_b=50).open()
    pay(pair, pair.a, "a1", 30)
    assert pair.record is not None
    update = LedgerUpdate(pair.record, "deposit", ())
    a_before = st(pair.a)
    pair.act(pair.a, update)
    pair.act(pair.a, update)
    assert st(pair.a) == a_before


# --- money held for calls not yet answered ----------------------------------------------------
# These pin down that a failed call costs nothing (DESIGN §4) however it fails.

def slow_or_failing(party: Party, call: CallHandler) -> Any:
    if call.message == "slow":
        return DEFER
    return failing_handler(party, call)


def test_money_held_for_a_call_in_service_cannot_be_spent() -> None:
    """B paid A 10 for a call A is still serving: if the call fails A must refund those 10, so
    A may not spend them meanwhile."""
    pair = ChannelPair(deposit_a=100, deposit_b=60, handler=slow_or_failing).open()
    pair.act(pair.b, ActionPay("b1", 10, "slow"))
    pair.flush()
    assert st(pair.a).serving == (("b1", 10),)
    with pytest.raises(InsufficientBalance):
        pair.act(pair.a, ActionPay("a1", 101))
    pair.act(pair.a, ActionPay("a2", 100, "fine"))
    pair.flush()
    pair.act(pair.a, ActionHandlerDone("b1", None, Rejected("down").to_wire()))
    pair.flush()
    assert pair.b.notified_outcomes()["b1"].refunded
    assert balances(pair) == (0, 160)


def test_credit_for_a_call_not_yet_arrived_cannot_be_spent() -> None:
    """B's second voucher (covering its first, failing call) arrives first: until that call is
    answered the 10 it carries may have to be refunded."""
    pair = ChannelPair(deposit_a=100, deposit_b=60, handler=failing_handler).open()
    pair.act(pair.b, ActionPay("b1", 10, "fail"))
    pair.act(pair.b, ActionPay("b2", 0, "fine"))
    pair.deliver(pair.a, 1)
    assert st(pair.a).credit == 10
    with pytest.raises(InsufficientBalance):
        pair.act(pair.a, ActionPay("a1", 101))
    pair.act(pair.a, ActionPay("a2", 100, "fine"))
    pair.flush()
    assert pair.b.notified_outcomes()["b1"].refunded
    assert balances(pair) == (0, 160)


def close_mutual_when_possible(pair: ChannelPair, closer: Party) -> None:
    """Ask for a mutual close; if it is refused or does not land (a correct machine may wait
    for calls in progress), finish every call and ask again."""
    try:
        pair.act(closer, ActionCloseMutual())
    except NotAllowedAtState:
        pass
    pair.flush()
    if "close_mutual" in pair.events:
        return
    for party in (pair.a, pair.b):
        for pid, _ in st(party).serving:
            pair.act(party, ActionHandlerDone(pid, "done"))
        pair.act(party, ActionSync())  # and resend whatever was lost
    pair.flush()
    pair.act(closer, ActionCloseMutual())
    pair.flush()


def test_a_mutual_close_never_charges_for_a_call_still_being_served() -> None:
    pair = ChannelPair(deposit_a=100, deposit_b=50, handler=slow_or_failing).open()
    pair.act(pair.a, ActionPay("a1", 30, "slow"))
    pair.flush()
    assert st(pair.b).serving == (("a1", 30),)
    close_mutual_when_possible(pair, pair.b)
    assert "close_mutual" in pair.events
    assert pair.paid == expected_payouts(pair)
    assert_conserved(pair)


def test_a_mutual_close_never_charges_for_a_call_that_has_not_arrived() -> None:
    pair = ChannelPair(deposit_a=100, deposit_b=60).open()
    pair.act(pair.b, ActionPay("b1", 10, "first"))
    pair.act(pair.b, ActionPay("b2", 0, "second"))
    pair.deliver(pair.a, 1)  # A holds B's voucher for 10 but has not seen the call it pays for
    close_mutual_when_possible(pair, pair.a)
    assert "close_mutual" in pair.events
    assert pair.paid == expected_payouts(pair)
    assert_conserved(pair)


def test_a_mutual_close_never_charges_for_a_call_whose_answer_is_lost() -> None:
    """B served A's call but the answer was lost: A, still waiting, must not settle in a way
    that charges it while it reports the call as failed."""
    pair = ChannelPair(deposit_a=100, deposit_b=50).open()
    pair.act(pair.a, ActionPay("a1", 30, "x"))
    pair.deliver(pair.b)
    pair.a.inbox.clear()
    assert [o.payment_id for o in st(pair.a).outgoing] == ["a1"]
    close_mutual_when_possible(pair, pair.b)
    assert "close_mutual" in pair.events
    assert pair.paid == expected_payouts(pair)
    assert_conserved(pair)


def test_a_payment_refused_without_refund_costs_nothing_and_blocks_no_close() -> None:
    """More pays than B may hold back overdraw the deposit B knows of, and the one over the
    limit is turned away. Whatever A is told about it, A pays only for calls reported served,
    and the credit that call's voucher carried must not keep a mutual close from landing."""
    pair = ChannelPair(deposit_a=100).open()
    pair.b.follow_ledger = False
    pair.act(pair.a, ActionDeposit(1000))
    for i in range(MAX_POSTPONED + 1):
        pair.act(pair.a, ActionPay(f"p{i}", 101 if i == 0 else 1))
    pair.flush()
    assert len(st(pair.b).postponed) == MAX_POSTPONED  # the last one is turned away
    pair.release_ledger(pair.b)
    pair.flush()
    pay(pair, pair.a, "after", 1)
    assert pair.a.notified_outcomes()["after"].error is None
    close_mutual_when_possible(pair, pair.a)
    assert "close_mutual" in pair.events
    assert pair.paid == expected_payouts(pair)
    assert_conserved(pair)


def test_a_restored_party_that_synced_is_never_proved_fraudulent() -> None:
    """B restores an old copy, asks A for its latest voucher, but a failing call of A's that
    was already on its way makes B sign a refund first, from the stale nonce. After the sync
    B must still know that it signed a voucher for 10, or its solo close loses everything."""
    pair = ChannelPair(deposit_a=100, deposit_b=60, handler=failing_handler).open()
    backup = st(pair.b)
    pay(pair, pair.b, "b1", 10, "fine")
    assert st(pair.a).peer_voucher is not None and st(pair.a).peer_voucher.sent == 10

    pair.b.state, pair.b.results = backup, {}
    pair.act(pair.b, ActionSync())
    pair.act(pair.a, ActionPay("a1", 1, "fail"))
    pair.deliver(pair.b)  # A's call reaches B before the sync reply
    pair.flush()          # the sync completes
    assert st(pair.b).my_sent >= 10
    pair.act(pair.b, ActionCloseSolo())
    pair.advance(600)
    assert "fraud_proof" not in pair.events
    assert pair.paid[pair.b.public] > 0
    assert_conserved(pair)


# --- persistence ----------------------------------------------------------------------------

def busy_pair() -> ChannelPair:
    """A pair whose states hold something in every field that can hold something."""
    pair = ChannelPair(deposit_a=100, deposit_b=50,
                       handler=lambda p, c: DEFER if c.message == "slow" else "ok").open()
    pay(pair, pair.a, "done", 10, "x")
    pair.act(pair.a, ActionPay("in-flight", 5, {"k": [1, 2.5, b"\x00"]}))  # outgoing
    pair.act(pair.b, ActionPay("slow-b", 3, "slow"))
    pair.deliver(pair.a)  # A serving "slow-b"
    pair.b.follow_ledger = False
    pair.act(pair.a, ActionDeposit(500))
    pair.act(pair.a, ActionPay("postponed", 400, None))
    pair.deliver(pair.b, len(pair.b.inbox) - 1)  # B postpones it
    return pair


def test_state_round_trips_through_to_obj_and_msgpack() -> None:
    pair = busy_pair()
    a, b = st(pair.a), st(pair.b)
    assert a.outgoing and a.serving and b.postponed
    for s in (a, b):
        assert ChannelState.from_obj(s.to_obj()) == s
        wire_obj = msgpack.unpackb(msgpack.packb(s.to_obj(), use_bin_type=True), raw=False)
        assert ChannelState.from_obj(wire_obj) == s


def test_closing_states_round_trip() -> None:
    pair = ChannelPair(deposit_a=100, deposit_b=50).open()
    pay(pair, pair.a, "a1", 30)
    pair.b.follow_ledger = False
    pair.act(pair.a, ActionCloseMutual())  # A holds a mutual close in progress
    s = st(pair.a)
    assert s.mutual is not None
    assert ChannelState.from_obj(msgpack.unpackb(msgpack.packb(s.to_obj()))) == s
    pair2 = ChannelPair(deposit_a=100).open()
    pair2.b.follow_ledger = False
    pair2.act(pair2.a, ActionCloseSolo())
    s2 = st(pair2.a)
    assert s2.ledger_close is not None
    assert ChannelState.from_obj(msgpack.unpackb(msgpack.packb(s2.to_obj()))) == s2


def test_a_restored_copy_carries_on_exactly_like_the_original() -> None:
    pair = busy_pair()
    pair.a.state = ChannelState.from_obj(st(pair.a).to_obj())
    pair.b.state = ChannelState.from_obj(st(pair.b).to_obj())
    pair.act(pair.a, ActionHandlerDone("slow-b", "late answer"))
    pair.release_ledger(pair.b)
    pair.flush()
    assert pair.b.notified_outcomes()["slow-b"].response == "late answer"
    assert pair.a.notified_outcomes()["postponed"].error is None
    assert pair.a.notified_outcomes()["in-flight"].error is None
    assert balances(pair) == (600 - 10 - 5 - 400 + 3, 50 + 10 + 5 + 400 - 3)


# --- the pair itself ------------------------------------------------------------------------

def test_the_pair_stores_results_and_passes_them_back() -> None:
    pair = ChannelPair().open()
    pay(pair, pair.a, "p", 1, "m")
    assert pair.b.of_type(RecordResult) == [RecordResult(pair.b.results["p"])]
    assert pair.b.results["p"].response == ["served", "m"]
