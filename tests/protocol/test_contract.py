"""The settlement contract of DESIGN §5: every refusal with its code, and conservation."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from paychan.protocol import contract
from paychan.protocol.contract import ChannelRecord, Status
from paychan.protocol.errors import (
    BadSignature,
    Conflict,
    DecodeError,
    InsufficientBalance,
    NegativeAmount,
    NotAllowedAtState,
    NotANumber,
    NotFound,
    PaychanError,
    Unauthorized,
    ValueTooLow,
)
from paychan.protocol.identity import Identity
from paychan.protocol.wire import ChannelParams, Voucher, sign_close

A = Identity(bytes([1]) * 32)  # initiator
B = Identity(bytes([2]) * 32)  # responder
C = Identity(bytes([3]) * 32)  # a third party
D = Identity(bytes([4]) * 32)  # a delegate
PARAMS = ChannelParams(A.public, B.public, "base", 600, bytes([9]) * 32, "testnet")
OTHER = ChannelParams(A.public, B.public, "base", 600, bytes([8]) * 32, "testnet")
CID = PARAMS.channel_id
T0 = 1_000_000


def expect(cls: type[PaychanError], code: int, detail: int | None, fn: Any, *args: Any) -> None:
    """`fn(*args)` raises exactly `cls` with the code/detail pair of DESIGN §8."""
    with pytest.raises(PaychanError) as exc:
        fn(*args)
    assert type(exc.value) is cls, f"expected {cls.__name__}, got {exc.value!r}"
    assert (exc.value.code, exc.value.detail) == (code, detail)


def funded(dep_a: int = 100, dep_b: int = 50) -> ChannelRecord:
    rec = contract.create(PARAMS, A.public, dep_a)
    return contract.deposit_(rec, B.public, dep_b) if dep_b else rec


def voucher(key: Identity, sent: int, nonce: int = 1, period: int = 1,
            cid: bytes = CID) -> Voucher:
    return Voucher.create(key, cid, period, nonce, sent)


def close_sigs(si: int, sr: int, period: int = 1, cid: bytes = CID) -> tuple[bytes, bytes]:
    return sign_close(A, cid, period, si, sr), sign_close(B, cid, period, si, sr)


def closing(rec: ChannelRecord | None = None, closer: Identity = A, declared: int = 10,
            peer_v: Voucher | None = None) -> ChannelRecord:
    return contract.close_solo(rec or funded(), closer.public, 1, declared, peer_v, T0)


def paid(payouts: contract.Payouts) -> dict[bytes, int]:
    return dict(payouts)


# --- create and deposit ---------------------------------------------------------------------

def test_create_registers_period_one_open_with_the_deposit() -> None:
    rec = contract.create(PARAMS, B.public, 70)
    assert (rec.period, rec.status, rec.close) == (1, Status.OPEN, None)
    assert (rec.deposit_initiator, rec.deposit_responder) == (0, 70)
    assert rec.channel_id == CID


def test_create_by_a_non_party_is_unauthorized() -> None:
    expect(Unauthorized, 1, None, contract.create, PARAMS, C.public, 10)


@pytest.mark.parametrize("amount, cls, detail", [(-1, NegativeAmount, 1002),
                                                 (2**63, NotANumber, 1008),
                                                 (1.5, NotANumber, 1008),
                                                 (True, NotANumber, 1008)])
def test_create_and_deposit_check_amounts(amount: Any, cls: type[PaychanError],
                                          detail: int) -> None:
    expect(cls, 3, detail, contract.create, PARAMS, A.public, amount)
    expect(cls, 3, detail, contract.deposit_, funded(), A.public, amount)


def test_deposit_adds_to_the_senders_side() -> None:
    rec = contract.deposit_(funded(100, 50), A.public, 5)
    rec = contract.deposit_(rec, B.public, 7)
    assert (rec.deposit_initiator, rec.deposit_responder, rec.total) == (105, 57, 162)


def test_deposit_by_a_non_party_is_unauthorized() -> None:
    expect(Unauthorized, 1, None, contract.deposit_, funded(), C.public, 10)


def test_deposit_while_closing_is_not_allowed() -> None:
    rec = closing()
    expect(NotAllowedAtState, 3, 1018, contract.deposit_, rec, A.public, 10)
    expect(NotAllowedAtState, 3, 1018, contract.deposit_, rec, B.public, 10)


def test_the_channel_total_stays_below_2_63() -> None:
    rec = funded(2**62, 0)
    expect(NotANumber, 3, 1008, contract.deposit_, rec, B.public, 2**62)


# --- close_mutual ---------------------------------------------------------------------------

def test_close_mutual_pays_balances_and_starts_the_next_period() -> None:
    rec = funded(100, 50)
    new, payouts = contract.close_mutual(rec, 1, 30, 5, *close_sigs(30, 5))
    assert paid(payouts) == {A.public: 75, B.public: 75}
    assert sum(paid(payouts).values()) == rec.total
    assert (new.period, new.status, new.deposit_initiator, new.deposit_responder) == (
        2, Status.OPEN, 0, 0)
    assert new.close is None


def test_close_mutual_with_the_wrong_period_is_a_conflict() -> None:
    rec = funded()
    expect(Conflict, 3, 107, contract.close_mutual, rec, 2, 0, 0, *close_sigs(0, 0, period=2))
    expect(Conflict, 3, 107, contract.close_mutual, rec, 0, 0, 0, *close_sigs(0, 0))


@pytest.mark.parametrize("case", ["swapped", "other figures", "other channel", "other period",
                                  "voucher domain", "garbage", "one party twice"])
def test_close_mutual_with_a_bad_signature(case: str) -> None:
    rec = funded()
    sig_a, sig_b = close_sigs(10, 0)
    if case == "swapped":
        sig_a, sig_b = sig_b, sig_a
    elif case == "other figures":
        sig_b = close_sigs(10, 1)[1]
    elif case == "other channel":
        sig_a = close_sigs(10, 0, cid=OTHER.channel_id)[0]
    elif case == "other period":
        sig_b = close_sigs(10, 0, period=2)[1]
    elif case == "voucher domain":
        sig_a = voucher(A, 10).sig
    elif case == "garbage":
        sig_b = bytes(64)
    else:
        sig_b = sig_a
    expect(BadSignature, 3, 1017, contract.close_mutual, rec, 1, 10, 0, sig_a, sig_b)


@pytest.mark.parametrize("si, sr", [(151, 0), (101, 0), (0, 51), (200, 49)])
def test_close_mutual_that_overdraws_is_insufficient_balance(si: int, sr: int) -> None:
    rec = funded(100, 50)
    expect(InsufficientBalance, 3, 1001, contract.close_mutual, rec, 1, si, sr,
           *close_sigs(si, sr))


def test_close_mutual_refuses_bad_amounts() -> None:
    expect(NegativeAmount, 3, 1002, contract.close_mutual, funded(), 1, -1, 0, bytes(64),
           bytes(64))


def test_close_mutual_is_allowed_while_closing_and_beats_the_dispute() -> None:
    rec = closing(declared=0)
    new, payouts = contract.close_mutual(rec, 1, 20, 0, *close_sigs(20, 0))
    assert paid(payouts) == {A.public: 80, B.public: 70}
    assert (new.period, new.status, new.close) == (2, Status.OPEN, None)


def test_a_close_signature_does_not_replay_in_the_next_period() -> None:
    sigs = close_sigs(0, 0)
    new, _ = contract.close_mutual(funded(), 1, 0, 0, *sigs)
    new = contract.deposit_(new, A.public, 10)
    expect(Conflict, 3, 107, contract.close_mutual, new, 1, 0, 0, *sigs)
    expect(BadSignature, 3, 1017, contract.close_mutual, new, 2, 0, 0, *sigs)


# --- close_solo -----------------------------------------------------------------------------

def test_close_solo_starts_the_dispute_window() -> None:
    rec = closing(closer=B, declared=5, peer_v=voucher(A, 20))
    assert rec.status is Status.CLOSING
    assert rec.close == contract.CloseInProgress(B.public, 5, 20, T0)
    assert contract.window_ends(rec) == T0 + 600
    assert rec.period == 1 and rec.total == 150


def test_close_solo_by_a_non_party_is_unauthorized() -> None:
    expect(Unauthorized, 1, None, contract.close_solo, funded(), C.public, 1, 0, None, T0)


def test_close_solo_twice_is_not_allowed() -> None:
    rec = closing()
    expect(NotAllowedAtState, 3, 1018, contract.close_solo, rec, A.public, 1, 10, None, T0)
    expect(NotAllowedAtState, 3, 1018, contract.close_solo, rec, B.public, 1, 0, None, T0)


def test_close_solo_in_the_wrong_period_is_a_conflict() -> None:
    expect(Conflict, 3, 107, contract.close_solo, funded(), A.public, 2, 0, None, T0)


@pytest.mark.parametrize("bad", ["other channel", "other period"])
def test_close_solo_with_a_voucher_from_another_channel_or_period(bad: str) -> None:
    v = (voucher(B, 5, cid=OTHER.channel_id) if bad == "other channel"
         else voucher(B, 5, period=2))
    expect(Conflict, 3, 107, contract.close_solo, funded(), A.public, 1, 0, v, T0)


@pytest.mark.parametrize("signer", ["closer", "third party", "tampered"])
def test_close_solo_with_a_voucher_not_the_peers(signer: str) -> None:
    if signer == "closer":
        v = voucher(A, 5)
    elif signer == "third party":
        v = voucher(C, 5)
    else:
        good = voucher(B, 5)
        v = Voucher(good.channel_id, good.period, good.nonce, 40, good.sig)
    expect(BadSignature, 3, 1017, contract.close_solo, funded(), A.public, 1, 0, v, T0)


@pytest.mark.parametrize("declared, peer_sent", [(101, 0), (151, 0), (0, 51), (200, 49)])
def test_close_solo_that_overdraws_is_insufficient_balance(declared: int, peer_sent: int) -> None:
    v = voucher(B, peer_sent) if peer_sent else None
    expect(InsufficientBalance, 3, 1001, contract.close_solo, funded(100, 50), A.public, 1,
           declared, v, T0)


# --- confirm --------------------------------------------------------------------------------

def test_the_non_closer_confirms_at_any_time() -> None:
    rec = closing(closer=A, declared=30, peer_v=voucher(B, 10))
    new, payouts = contract.confirm(rec, B.public, 1, 0, T0)
    assert paid(payouts) == {A.public: 80, B.public: 70}
    assert (new.period, new.status, new.close, new.total) == (2, Status.OPEN, None, 0)


def test_the_non_closer_may_admit_additional_sending() -> None:
    rec = closing(closer=A, declared=30, peer_v=voucher(B, 10))
    _, payouts = contract.confirm(rec, B.public, 1, 15, T0 + 1)
    assert paid(payouts) == {A.public: 95, B.public: 55}


def test_admitting_more_than_the_deposit_is_insufficient_balance() -> None:
    rec = closing(closer=A, declared=30, peer_v=voucher(B, 10))
    expect(InsufficientBalance, 3, 1001, contract.confirm, rec, B.public, 1, 71, T0)


@pytest.mark.parametrize("who", [A, C], ids=["closer", "third party"])
def test_confirm_before_the_window_by_others_is_not_allowed(who: Identity) -> None:
    rec = closing()
    end = contract.window_ends(rec)
    expect(NotAllowedAtState, 3, 1018, contract.confirm, rec, who.public, 1, 0, end - 1)
    expect(NotAllowedAtState, 3, 1018, contract.confirm, rec, who.public, 1, 0, T0)


@pytest.mark.parametrize("who", [A, C], ids=["closer", "third party"])
def test_anyone_confirms_once_the_window_has_passed(who: Identity) -> None:
    rec = closing(closer=A, declared=30)
    new, payouts = contract.confirm(rec, who.public, 1, 0, contract.window_ends(rec))
    assert paid(payouts) == {A.public: 70, B.public: 80}
    assert new.period == 2


@pytest.mark.parametrize("who", [A, C], ids=["closer", "third party"])
def test_additional_sent_from_anyone_but_the_non_closer_is_unauthorized(who: Identity) -> None:
    rec = closing()
    late = contract.window_ends(rec) + 10
    expect(Unauthorized, 1, None, contract.confirm, rec, who.public, 1, 5, late)


def test_confirm_without_a_close_is_not_allowed() -> None:
    expect(NotAllowedAtState, 3, 1018, contract.confirm, funded(), B.public, 1, 0, T0)


def test_confirm_in_the_wrong_period_is_a_conflict() -> None:
    expect(Conflict, 3, 107, contract.confirm, closing(), B.public, 2, 0, T0)


def test_confirm_refuses_a_negative_admission() -> None:
    expect(NegativeAmount, 3, 1002, contract.confirm, closing(), B.public, 1, -1, T0)


# --- fraud_proof ----------------------------------------------------------------------------

def test_fraud_proof_gives_the_whole_channel_to_the_non_closer() -> None:
    rec = closing(closer=A, declared=10)
    new, payouts = contract.fraud_proof(rec, B.public, 1, voucher(A, 11, nonce=4))
    assert paid(payouts) == {B.public: 150}
    assert (new.period, new.status, new.total) == (2, Status.OPEN, 0)


def test_fraud_proof_by_the_closer_itself_is_unauthorized() -> None:
    rec = closing(closer=A, declared=10)
    expect(Unauthorized, 1, None, contract.fraud_proof, rec, A.public, 1, voucher(A, 50))


def test_fraud_proof_by_a_third_party_is_unauthorized() -> None:
    rec = closing(closer=A, declared=10)
    expect(Unauthorized, 1, None, contract.fraud_proof, rec, C.public, 1, voucher(A, 50))


def test_a_delegate_of_the_non_closer_may_prove_fraud() -> None:
    rec = contract.set_delegate(funded(), B.public, D.public)
    rec = closing(rec, closer=A, declared=10)
    _, payouts = contract.fraud_proof(rec, D.public, 1, voucher(A, 50))
    assert paid(payouts) == {B.public: 150}  # paid to the party, not to its delegate


def test_the_closers_delegate_may_not_prove_fraud() -> None:
    rec = contract.set_delegate(funded(), A.public, D.public)
    rec = closing(rec, closer=A, declared=10)
    expect(Unauthorized, 1, None, contract.fraud_proof, rec, D.public, 1, voucher(A, 50))


def test_only_a_party_names_a_delegate() -> None:
    expect(Unauthorized, 1, None, contract.set_delegate, funded(), C.public, C.public)


@pytest.mark.parametrize("sent", [0, 9, 10])
def test_fraud_proof_with_sent_not_above_declared_is_value_too_low(sent: int) -> None:
    rec = closing(closer=A, declared=10)
    expect(ValueTooLow, 3, 105, contract.fraud_proof, rec, B.public, 1, voucher(A, sent, 9))


def test_fraud_proof_when_not_closing_is_not_allowed() -> None:
    expect(NotAllowedAtState, 3, 1018, contract.fraud_proof, funded(), B.public, 1,
           voucher(A, 50))


def test_fraud_proof_with_a_voucher_not_the_closers() -> None:
    rec = closing(closer=A, declared=10)
    expect(BadSignature, 3, 1017, contract.fraud_proof, rec, B.public, 1, voucher(B, 50))
    expect(BadSignature, 3, 1017, contract.fraud_proof, rec, B.public, 1, voucher(C, 50))


def test_fraud_proof_with_a_voucher_of_another_channel_or_period() -> None:
    rec = closing(closer=A, declared=10)
    expect(Conflict, 3, 107, contract.fraud_proof, rec, B.public, 1,
           voucher(A, 50, cid=OTHER.channel_id))
    expect(Conflict, 3, 107, contract.fraud_proof, rec, B.public, 1, voucher(A, 50, period=2))
    expect(Conflict, 3, 107, contract.fraud_proof, rec, B.public, 2, voucher(A, 50, period=2))


def test_a_refused_transaction_leaves_the_record_as_it_was() -> None:
    rec = closing(closer=A, declared=10)
    before = rec.to_obj()
    with pytest.raises(ValueTooLow):
        contract.fraud_proof(rec, B.public, 1, voucher(A, 10))
    assert rec.to_obj() == before


# --- require, records -----------------------------------------------------------------------

def test_require_none_is_not_found() -> None:
    expect(NotFound, 3, 100, contract.require, None, CID)
    rec = funded()
    assert contract.require(rec, CID) is rec


def test_record_round_trip() -> None:
    rec = contract.set_delegate(closing(closer=B, declared=3, peer_v=voucher(A, 7)), A.public,
                                D.public)
    assert ChannelRecord.from_obj(rec.to_obj()) == rec
    assert ChannelRecord.from_obj(funded().to_obj()) == funded()


@pytest.mark.parametrize("obj", [None, [], [1, 2, 3], "x"])
def test_a_malformed_record_is_a_decode_error(obj: Any) -> None:
    with pytest.raises(DecodeError):
        ChannelRecord.from_obj(obj)


# --- conservation (property) ----------------------------------------------------------------

deposits = st.integers(min_value=0, max_value=10**12)


@st.composite
def scenario(draw: st.DrawFn) -> tuple[int, int, int, int]:
    """Deposits and the two sent totals of a period that overdraw neither side."""
    dep_a, dep_b = draw(deposits), draw(deposits)
    sent_b = draw(st.integers(min_value=0, max_value=dep_b + 10**6))
    sent_a = draw(st.integers(min_value=0, max_value=dep_a + sent_b))
    sent_b = min(sent_b, dep_b + sent_a)
    return dep_a, dep_b, sent_a, sent_b


@given(scenario())
def test_close_mutual_conserves_the_deposits(s: tuple[int, int, int, int]) -> None:
    dep_a, dep_b, sent_a, sent_b = s
    rec = replace(funded(0, 0), deposit_initiator=dep_a, deposit_responder=dep_b)
    new, payouts = contract.close_mutual(rec, 1, sent_a, sent_b, *close_sigs(sent_a, sent_b))
    got = paid(payouts)
    assert sum(got.values()) == dep_a + dep_b
    assert got.get(A.public, 0) == dep_a - sent_a + sent_b
    assert got.get(B.public, 0) == dep_b - sent_b + sent_a
    assert all(amount > 0 for _, amount in payouts)
    assert (new.period, new.total) == (2, 0)


@given(scenario(), st.booleans(), st.booleans(), st.integers(min_value=0, max_value=10**6))
def test_close_solo_then_confirm_conserves_the_deposits(s: tuple[int, int, int, int],
                                                        a_closes: bool, by_peer: bool,
                                                        extra: int) -> None:
    dep_a, dep_b, sent_a, sent_b = s
    rec = replace(funded(0, 0), deposit_initiator=dep_a, deposit_responder=dep_b)
    closer, peer = (A, B) if a_closes else (B, A)
    declared, shown = (sent_a, sent_b) if a_closes else (sent_b, sent_a)
    rec = contract.close_solo(rec, closer.public, 1, declared,
                              voucher(peer, shown) if shown else None, T0)
    if by_peer:
        # the non-closer may admit at most what leaves its own balance at zero
        extra = min(extra, rec.deposit_of(peer.public) - shown + declared)
        new, payouts = contract.confirm(rec, peer.public, 1, extra, T0)
    else:
        extra = 0
        new, payouts = contract.confirm(rec, C.public, 1, 0, contract.window_ends(rec))
    got = paid(payouts)
    assert sum(got.values()) == dep_a + dep_b
    peer_bal = rec.deposit_of(peer.public) - (shown + extra) + declared
    assert got.get(peer.public, 0) == peer_bal
    assert new.period == 2


@given(scenario(), st.integers(min_value=1, max_value=10**6))
def test_fraud_proof_conserves_the_deposits(s: tuple[int, int, int, int], more: int) -> None:
    dep_a, dep_b, sent_a, sent_b = s
    rec = replace(funded(0, 0), deposit_initiator=dep_a, deposit_responder=dep_b)
    rec = contract.close_solo(rec, A.public, 1, sent_a, voucher(B, sent_b) if sent_b else None,
                              T0)
    _, payouts = contract.fraud_proof(rec, B.public, 1, voucher(A, sent_a + more, nonce=7))
    total = dep_a + dep_b
    assert paid(payouts) == ({B.public: total} if total else {})
