"""The settlement contract of DESIGN §5 as pure functions over one channel's ledger record."""
from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Any

from paychan.protocol.errors import (
    BadSignature,
    Conflict,
    DecodeError,
    InsufficientBalance,
    NotAllowedAtState,
    NotFound,
    Unauthorized,
    ValueTooLow,
)
from paychan.protocol.identity import check_amount
from paychan.protocol.wire import ChannelParams, Voucher, verify_close

Payouts = tuple[tuple[bytes, int], ...]


class Status(enum.Enum):
    OPEN = "open"
    CLOSING = "closing"


@dataclass(frozen=True, slots=True)
class CloseInProgress:
    closer: bytes
    declared_sent_closer: int
    peer_sent: int
    started_at: int


@dataclass(frozen=True, slots=True)
class ChannelRecord:
    """What the ledger keeps per channel."""

    params: ChannelParams
    period: int = 1
    deposit_initiator: int = 0
    deposit_responder: int = 0
    status: Status = Status.OPEN
    close: CloseInProgress | None = None
    delegate_initiator: bytes | None = None
    delegate_responder: bytes | None = None

    @property
    def channel_id(self) -> bytes:
        return self.params.channel_id

    @property
    def total(self) -> int:
        return self.deposit_initiator + self.deposit_responder

    def deposit_of(self, party: bytes) -> int:
        return self.deposit_initiator if party == self.params.initiator else self.deposit_responder

    def to_obj(self) -> list[Any]:
        close = None if self.close is None else [
            self.close.closer, self.close.declared_sent_closer, self.close.peer_sent,
            self.close.started_at]
        return [self.params.to_obj(), self.period, self.deposit_initiator, self.deposit_responder,
                self.status.value, close, self.delegate_initiator, self.delegate_responder]

    @classmethod
    def from_obj(cls, obj: Any) -> ChannelRecord:
        try:
            params, period, d_i, d_r, status, close, del_i, del_r = obj
            return cls(ChannelParams.from_obj(params), period, d_i, d_r, Status(status),
                       None if close is None else CloseInProgress(*close), del_i, del_r)
        except (TypeError, ValueError) as exc:
            raise DecodeError(f"bad channel record: {exc}") from None


def _party(rec: ChannelRecord, sender: bytes) -> None:
    if sender not in (rec.params.initiator, rec.params.responder):
        raise Unauthorized("only a party of the channel may do this")


def _period(rec: ChannelRecord, period: int) -> None:
    if period != rec.period:
        raise Conflict(f"channel is in period {rec.period}, not {period}")


def _balances(rec: ChannelRecord, sent_initiator: int, sent_responder: int) -> tuple[int, int]:
    bal_i = rec.deposit_initiator - sent_initiator + sent_responder
    bal_r = rec.deposit_responder - sent_responder + sent_initiator
    if bal_i < 0 or bal_r < 0:
        raise InsufficientBalance(
            f"sent amounts {sent_initiator}/{sent_responder} overdraw deposits "
            f"{rec.deposit_initiator}/{rec.deposit_responder}")
    return bal_i, bal_r


def _settle(rec: ChannelRecord, payouts: list[tuple[bytes, int]]) -> tuple[ChannelRecord, Payouts]:
    """Pay out and start the next period with empty deposits."""
    assert sum(a for _, a in payouts) == rec.total, "payouts must conserve the deposits"
    nxt = replace(rec, period=rec.period + 1, deposit_initiator=0, deposit_responder=0,
                  status=Status.OPEN, close=None)
    return nxt, tuple((who, amt) for who, amt in payouts if amt > 0)


def create(params: ChannelParams, sender: bytes, deposit: int) -> ChannelRecord:
    """A new channel in period 1, OPEN, with the sender's deposit credited."""
    check_amount(deposit, "deposit")
    if sender not in (params.initiator, params.responder):
        raise Unauthorized("only a party of the channel may create it")
    rec = ChannelRecord(params)
    return deposit_(rec, sender, deposit)


def deposit_(rec: ChannelRecord, sender: bytes, amount: int) -> ChannelRecord:
    _party(rec, sender)
    check_amount(amount, "deposit")
    if rec.status is not Status.OPEN:
        raise NotAllowedAtState("no deposits while the channel is closing")
    if sender == rec.params.initiator:
        new = replace(rec, deposit_initiator=rec.deposit_initiator + amount)
    else:
        new = replace(rec, deposit_responder=rec.deposit_responder + amount)
    check_amount(new.total, "channel total")
    return new


def set_delegate(rec: ChannelRecord, sender: bytes, delegate: bytes | None) -> ChannelRecord:
    """A party names an account that may submit fraud proofs on its behalf."""
    _party(rec, sender)
    if sender == rec.params.initiator:
        return replace(rec, delegate_initiator=delegate)
    return replace(rec, delegate_responder=delegate)


def close_mutual(rec: ChannelRecord, period: int, sent_initiator: int, sent_responder: int,
                 sig_initiator: bytes, sig_responder: bytes) -> tuple[ChannelRecord, Payouts]:
    """Both parties signed the final sent amounts: pay out now. Beats a dispute in progress."""
    _period(rec, period)
    check_amount(sent_initiator, "sent_initiator")
    check_amount(sent_responder, "sent_responder")
    p = rec.params
    if not verify_close(p.initiator, rec.channel_id, period, sent_initiator, sent_responder,
                        sig_initiator):
        raise BadSignature("initiator's close signature does not verify")
    if not verify_close(p.responder, rec.channel_id, period, sent_initiator, sent_responder,
                        sig_responder):
        raise BadSignature("responder's close signature does not verify")
    bal_i, bal_r = _balances(rec, sent_initiator, sent_responder)
    return _settle(rec, [(p.initiator, bal_i), (p.responder, bal_r)])


def close_solo(rec: ChannelRecord, sender: bytes, period: int, declared_sent_self: int,
               peer_voucher: Voucher | None, now: int) -> ChannelRecord:
    """One party closes alone with what it declares it sent and the peer's best voucher."""
    _party(rec, sender)
    _period(rec, period)
    check_amount(declared_sent_self, "declared_sent_self")
    if rec.status is not Status.OPEN:
        raise NotAllowedAtState("a close is already in progress")
    peer = rec.params.peer_of(sender)
    peer_sent = 0
    if peer_voucher is not None:
        if peer_voucher.channel_id != rec.channel_id or peer_voucher.period != rec.period:
            raise Conflict("the peer voucher is for another channel or period")
        if not peer_voucher.verify(peer):
            raise BadSignature("the peer voucher is not signed by the peer")
        peer_sent = peer_voucher.sent
    sent_i, sent_r = ((declared_sent_self, peer_sent) if sender == rec.params.initiator
                      else (peer_sent, declared_sent_self))
    _balances(rec, sent_i, sent_r)
    return replace(rec, status=Status.CLOSING,
                   close=CloseInProgress(sender, declared_sent_self, peer_sent, now))


def window_ends(rec: ChannelRecord) -> int:
    assert rec.close is not None
    return rec.close.started_at + rec.params.dispute_period


def confirm(rec: ChannelRecord, sender: bytes, period: int, additional_sent: int,
            now: int) -> tuple[ChannelRecord, Payouts]:
    """Settle a solo close: by the non-closer at any time, by anyone after the window."""
    _period(rec, period)
    check_amount(additional_sent, "additional_sent")
    if rec.status is not Status.CLOSING or rec.close is None:
        raise NotAllowedAtState("no close in progress")
    c = rec.close
    non_closer = rec.params.peer_of(c.closer)
    if sender != non_closer:
        if additional_sent:
            raise Unauthorized("only the non-closer may admit additional sending")
        if now < window_ends(rec):
            raise NotAllowedAtState(
                f"the dispute window ends at {window_ends(rec)}; it is {now}")
    peer_sent = c.peer_sent + additional_sent
    sent_i, sent_r = ((c.declared_sent_closer, peer_sent) if c.closer == rec.params.initiator
                      else (peer_sent, c.declared_sent_closer))
    bal_i, bal_r = _balances(rec, sent_i, sent_r)
    return _settle(rec, [(rec.params.initiator, bal_i), (rec.params.responder, bal_r)])


def fraud_proof(rec: ChannelRecord, sender: bytes, period: int,
                closer_voucher: Voucher) -> tuple[ChannelRecord, Payouts]:
    """The closer under-declared: a newer voucher of its own hands the whole channel to the peer."""
    _period(rec, period)
    if rec.status is not Status.CLOSING or rec.close is None:
        raise NotAllowedAtState("no close in progress")
    c = rec.close
    non_closer = rec.params.peer_of(c.closer)
    delegate = (rec.delegate_initiator if non_closer == rec.params.initiator
                else rec.delegate_responder)
    if sender != non_closer and (delegate is None or sender != delegate):
        raise Unauthorized("only the non-closer or its delegate may prove fraud")
    if closer_voucher.channel_id != rec.channel_id or closer_voucher.period != rec.period:
        raise Conflict("the voucher is for another channel or period")
    if not closer_voucher.verify(c.closer):
        raise BadSignature("the voucher is not signed by the closer")
    if closer_voucher.sent <= c.declared_sent_closer:
        raise ValueTooLow(
            f"voucher sent {closer_voucher.sent} does not exceed the declared "
            f"{c.declared_sent_closer}")
    return _settle(rec, [(non_closer, rec.total)])


def require(rec: ChannelRecord | None, channel_id: bytes) -> ChannelRecord:
    if rec is None:
        raise NotFound("no such channel on the ledger")
    return rec
