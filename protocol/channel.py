"""The sans-IO channel state machine of one party: step(state, input, now, key)."""
from __future__ import annotations

import enum
import operator
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from paychan.protocol.contract import ChannelRecord, CloseInProgress, Status
from paychan.protocol.errors import (
    BadSignature,
    Conflict,
    InsufficientBalance,
    InternalError,
    LocalProtocolError,
    NotAllowedAtState,
    PaychanError,
)
from paychan.protocol.identity import Identity, check_amount
from paychan.protocol.wire import (
    ChannelParams,
    CloseCoSigned,
    CloseProposal,
    ErrorMsg,
    Message,
    Msg,
    OpenAccept,
    OpenPropose,
    OpenReject,
    Pay,
    PayResult,
    Sync,
    Voucher,
    check_body,
    check_error,
    decode,
    encode,
    sign_close,
    verify_close,
)

MAX_POSTPONED = 64  # pays held while a deposit or the funding is not yet seen on the ledger


class Phase(enum.Enum):
    """What the channel waits for."""

    AWAITING_ACCEPT = "awaiting_accept"
    AWAITING_FUNDING = "awaiting_funding"
    OPEN = "open"
    CLOSING = "closing"
    REJECTED = "rejected"

    # Members are singletons compared by identity, so identity can hash them too, in C: the
    # transition table is looked up by phase on every step (Enum hashes the name in Python).
    __hash__ = object.__hash__


ALL_PHASES = tuple(Phase)
LIVE = (Phase.AWAITING_FUNDING, Phase.OPEN, Phase.CLOSING)


@dataclass(frozen=True, slots=True)
class OutPay:
    """A payment we sent and whose result we still wait for."""

    payment_id: str
    amount: int
    voucher: Voucher
    message: Any


@dataclass(frozen=True, slots=True)
class MutualClose:
    sent_initiator: int
    sent_responder: int
    my_sig: bytes


@dataclass(frozen=True, slots=True)
class ChannelState:
    params: ChannelParams
    me: bytes
    phase: Phase
    period: int = 1
    deposit_me: int = 0
    deposit_peer: int = 0
    my_voucher: Voucher | None = None
    peer_voucher: Voucher | None = None
    credit_used: int = 0  # of the peer's sent total: served requests and refunds received
    outgoing: tuple[OutPay, ...] = ()
    serving: tuple[tuple[str, int], ...] = ()
    postponed: tuple[Pay, ...] = ()
    mutual: MutualClose | None = None
    ledger_close: CloseInProgress | None = None
    open_deposit: int = 0

    @property
    def channel_id(self) -> bytes:
        return self.params.channel_id

    @property
    def peer(self) -> bytes:
        return self.params.peer_of(self.me)

    @property
    def is_initiator(self) -> bool:
        return self.me == self.params.initiator

    @property
    def my_sent(self) -> int:
        return self.my_voucher.sent if self.my_voucher else 0

    @property
    def my_nonce(self) -> int:
        return self.my_voucher.nonce if self.my_voucher else 0

    @property
    def peer_sent(self) -> int:
        return self.peer_voucher.sent if self.peer_voucher else 0

    @property
    def my_balance(self) -> int:
        return self.deposit_me - self.my_sent + self.peer_sent

    @property
    def peer_balance(self) -> int:
        return self.deposit_peer - self.peer_sent + self.my_sent

    @property
    def credit(self) -> int:
        """What the peer has paid us and not yet used on a request."""
        return self.peer_sent - self.credit_used

    @property
    def spendable(self) -> int:
        """What we may pay out now: our balance less what we may still have to refund, that is
        the peer's credit (the calls it pays for have not arrived yet) and the calls we are
        serving (a failing handler refunds them)."""
        return self.my_balance - self.credit - sum(amount for _, amount in self.serving)

    def sent_pair(self, mine: int, peers: int) -> tuple[int, int]:
        """(sent_initiator, sent_responder) from my and the peer's figures."""
        return (mine, peers) if self.is_initiator else (peers, mine)

    def to_obj(self) -> list[Any]:
        return [
            self.params.to_obj(), self.me, self.phase._value_, self.period, self.deposit_me,
            self.deposit_peer, _v(self.my_voucher), _v(self.peer_voucher), self.credit_used,
            [[o.payment_id, o.amount, o.voucher.to_obj(), o.message] for o in self.outgoing],
            [list(x) for x in self.serving], [encode(p) for p in self.postponed],
            None if self.mutual is None else [self.mutual.sent_initiator,
                                              self.mutual.sent_responder, self.mutual.my_sig],
            None if self.ledger_close is None else [
                self.ledger_close.closer, self.ledger_close.declared_sent_closer,
                self.ledger_close.peer_sent, self.ledger_close.started_at],
            self.open_deposit,
        ]

    @classmethod
    def from_obj(cls, obj: list[Any]) -> ChannelState:
        (params, me, phase, period, dep_me, dep_peer, myv, peerv, used, outgoing, serving,
         postponed, mutual, lclose, open_deposit) = obj
        return cls(
            ChannelParams.from_obj(params), me, Phase(phase), period, dep_me, dep_peer,
            None if myv is None else Voucher.from_obj(myv),
            None if peerv is None else Voucher.from_obj(peerv), used,
            tuple(OutPay(p, a, Voucher.from_obj(v), m) for p, a, v, m in outgoing),
            tuple((p, a) for p, a in serving),
            tuple(_as_pay(decode(b)) for b in postponed),
            None if mutual is None else MutualClose(*mutual),
            None if lclose is None else CloseInProgress(*lclose), open_deposit)


_STATE_FIELDS = tuple(f.name for f in fields(ChannelState))
_STATE_FIELD_SET = frozenset(_STATE_FIELDS)
_state_values = operator.attrgetter(*_STATE_FIELDS)
_set = object.__setattr__


def replace(s: ChannelState, **changes: Any) -> ChannelState:
    """`dataclasses.replace` for a ChannelState at a third of its cost (a step makes one or
    two per payment). ChannelState has no `__post_init__`, so nothing is skipped."""
    new = object.__new__(ChannelState)
    for name, value in zip(_STATE_FIELDS, _state_values(s), strict=True):
        _set(new, name, value)
    for name, value in changes.items():
        if name not in _STATE_FIELD_SET:
            raise TypeError(f"ChannelState has no field {name!r}")
        _set(new, name, value)
    return new


def _v(v: Voucher | None) -> list[Any] | None:
    return None if v is None else v.to_obj()


def _as_pay(m: Msg) -> Pay:
    assert isinstance(m, Pay)
    return m


# --- inputs ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ActionPay:
    payment_id: str
    amount: int
    message: Any = None

    def __post_init__(self) -> None:
        if not isinstance(self.payment_id, str) or not 1 <= len(self.payment_id) <= 64:
            raise LocalProtocolError("payment_id must be a string of 1..64 characters")
        check_amount(self.amount)
        check_body(self.message)


@dataclass(frozen=True, slots=True)
class ActionHandlerDone:
    """The handler's answer; a response that could not travel is refused here, where the
    node can still turn it into a handler failure."""

    payment_id: str
    response: Any = None
    error: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        check_body(self.response, "response")
        if self.error is not None:
            check_error(self.error, "error")


@dataclass(frozen=True, slots=True)
class ActionDeposit:
    amount: int

    def __post_init__(self) -> None:
        check_amount(self.amount, "deposit")


@dataclass(frozen=True, slots=True)
class ActionMessage:
    body: Any

    def __post_init__(self) -> None:
        check_body(self.body)


@dataclass(frozen=True, slots=True)
class ActionCloseMutual:
    pass


@dataclass(frozen=True, slots=True)
class ActionCloseSolo:
    """`force`: close even while our payments await answers. A refund reaching us after our
    close cannot be shown to the ledger (DESIGN §5 lets only the peer's confirm admit it)."""

    force: bool = False


@dataclass(frozen=True, slots=True)
class ActionSync:
    pass


@dataclass(frozen=True, slots=True)
class ReceiveOpenPropose:
    msg: OpenPropose


@dataclass(frozen=True, slots=True)
class ReceiveOpenAccept:
    msg: OpenAccept


@dataclass(frozen=True, slots=True)
class ReceiveOpenReject:
    msg: OpenReject


@dataclass(frozen=True, slots=True)
class ReceivePay:
    msg: Pay
    known_result: PayResult | None = None  # the stored reply when this payment_id was answered


@dataclass(frozen=True, slots=True)
class ReceivePayResult:
    msg: PayResult


@dataclass(frozen=True, slots=True)
class ReceiveMessage:
    msg: Message


@dataclass(frozen=True, slots=True)
class ReceiveSync:
    msg: Sync


@dataclass(frozen=True, slots=True)
class ReceiveCloseProposal:
    msg: CloseProposal


@dataclass(frozen=True, slots=True)
class ReceiveCloseCoSigned:
    msg: CloseCoSigned


@dataclass(frozen=True, slots=True)
class ReceiveError:
    msg: ErrorMsg


@dataclass(frozen=True, slots=True)
class LedgerUpdate:
    """The ledger's record of this channel after `event` (a snapshot: replaying it is harmless)."""

    record: ChannelRecord
    event: str = ""
    payouts: tuple[tuple[bytes, int], ...] = ()


def receive(msg: Msg, known_result: PayResult | None = None) -> Any:
    """The Receive* input for a decoded peer message."""
    if isinstance(msg, Pay):
        return ReceivePay(msg, known_result)
    return _RECEIVE[type(msg)](msg)


_RECEIVE: dict[type, Callable[[Any], Any]] = {
    OpenPropose: ReceiveOpenPropose, OpenAccept: ReceiveOpenAccept,
    OpenReject: ReceiveOpenReject, PayResult: ReceivePayResult, Message: ReceiveMessage,
    Sync: ReceiveSync, CloseProposal: ReceiveCloseProposal, CloseCoSigned: ReceiveCloseCoSigned,
    ErrorMsg: ReceiveError,
}


# --- effects --------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Send:
    msg: Msg


@dataclass(frozen=True, slots=True)
class SubmitCreate:
    params: ChannelParams
    deposit: int


@dataclass(frozen=True, slots=True)
class SubmitDeposit:
    period: int
    amount: int


@dataclass(frozen=True, slots=True)
class SubmitCloseMutual:
    period: int
    sent_initiator: int
    sent_responder: int
    sig_initiator: bytes
    sig_responder: bytes


@dataclass(frozen=True, slots=True)
class SubmitCloseSolo:
    period: int
    declared_sent_self: int
    peer_voucher: Voucher | None


@dataclass(frozen=True, slots=True)
class SubmitConfirm:
    period: int
    additional_sent: int
    not_before: int  # ledger time; 0 = at once


@dataclass(frozen=True, slots=True)
class SubmitFraudProof:
    period: int
    voucher: Voucher


@dataclass(frozen=True, slots=True)
class CallHandler:
    payment_id: str
    amount: int
    message: Any


@dataclass(frozen=True, slots=True)
class RecordResult:
    result: PayResult


@dataclass(frozen=True, slots=True)
class NotifyPayOutcome:
    payment_id: str
    response: Any
    error: dict[str, Any] | None
    refunded: bool = False


@dataclass(frozen=True, slots=True)
class NotifyEvent:
    name: str
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class InvalidInput:
    """The peer sent something the protocol forbids; nothing changed."""

    error: PaychanError


Effects = list[Any]


# --- construction ---------------------------------------------------------------------------

def initiate(params: ChannelParams, me: bytes, deposit: int) -> tuple[ChannelState, Effects]:
    """The initiator proposes a channel; the ledger create follows the peer's accept."""
    check_amount(deposit, "deposit")
    if me != params.initiator:
        raise LocalProtocolError("only the initiator proposes a channel")
    state = ChannelState(params, me, Phase.AWAITING_ACCEPT, open_deposit=deposit)
    return state, [Send(OpenPropose(params.channel_id, params, deposit))]


def respond(msg: OpenPropose, me: bytes) -> tuple[ChannelState, Effects]:
    """The responder accepts a proposed channel and waits for the initiator's funding."""
    if msg.params.responder != me:
        raise LocalProtocolError("this proposal is not addressed to us")
    state = ChannelState(msg.params, me, Phase.AWAITING_FUNDING, deposit_peer=0)
    return state, [Send(OpenAccept(msg.channel_id)),
                   NotifyEvent("channel_created_by_peer", {"deposit": msg.deposit})]


# --- transitions ----------------------------------------------------------------------------

def _refuse_pay(s: ChannelState, m: Pay, err: PaychanError, invalid: bool) -> Effects:
    out: Effects = [Send(PayResult(s.channel_id, m.payment_id, None, err.to_wire(), None))]
    if invalid:
        out.append(InvalidInput(err))
    return out


def _check_peer_voucher(s: ChannelState, v: Voucher) -> PaychanError | None:
    """Why the peer's voucher cannot be taken, or None. Overdraft is checked by the caller."""
    if v.channel_id != s.channel_id:
        return Conflict("voucher is for another channel")
    if v.period != s.period:
        return Conflict(f"voucher is for period {v.period}, the channel is in {s.period}")
    if not v.verify(s.peer):
        return BadSignature("voucher is not signed by the peer")
    held = s.peer_voucher
    if held is not None:
        if v.nonce > held.nonce and v.sent < held.sent:
            return Conflict("a newer voucher must not decrease sent")
        if v.nonce == held.nonce and v != held:
            return Conflict("two different vouchers with one nonce")
        if v.nonce < held.nonce and v.sent > held.sent:
            return Conflict("an older voucher must not exceed a newer one")
    return None


def _newer(s: ChannelState, v: Voucher) -> bool:
    return s.peer_voucher is None or v.nonce > s.peer_voucher.nonce


def _overdraws(s: ChannelState, v: Voucher) -> bool:
    return v.sent > s.deposit_peer + s.my_sent


def _pay(s: ChannelState, a: ActionPay, now: int, key: Identity) -> tuple[ChannelState, Effects]:
    if s.mutual is not None:
        raise NotAllowedAtState("a mutual close is in progress")
    for o in s.outgoing:
        if o.payment_id == a.payment_id:  # a retry: the same voucher again
            return s, [Send(Pay(s.channel_id, o.payment_id, o.voucher, o.amount, o.message))]
    if a.amount > s.spendable:
        raise InsufficientBalance(
            f"amount {a.amount} exceeds what can be spent: {s.spendable} of the balance "
            f"{s.my_balance} (the rest may have to be refunded)")
    v = Voucher.create(key, s.channel_id, s.period, s.my_nonce + 1, s.my_sent + a.amount)
    out = OutPay(a.payment_id, a.amount, v, a.message)
    s2 = replace(s, my_voucher=v, outgoing=(*s.outgoing, out))
    # ActionPay checked the id, amount and message; the voucher was just made.
    return s2, [Send(Pay._trusted(s.channel_id, a.payment_id, v, a.amount, a.message))]


def _receive_pay(s: ChannelState, r: ReceivePay, now: int,
                 key: Identity) -> tuple[ChannelState, Effects]:
    m = r.msg
    if r.known_result is not None:
        return s, [Send(r.known_result)]
    for pid, amount in s.serving:
        if pid == m.payment_id:  # the handler may have died with the process: run it again
            return s, [CallHandler(pid, amount, m.message)]
    if m.channel_id != s.channel_id:
        return s, _refuse_pay(s, m, Conflict("pay is for another channel"), True)
    if s.phase is Phase.AWAITING_FUNDING:
        return _postpone(s, m, "the channel is not funded yet")
    if s.phase is not Phase.OPEN or s.mutual is not None:
        return s, [*_refuse_pay(s, m, NotAllowedAtState(f"the channel is {s.phase.value}"),
                                False), *_fraud_evidence(s, m.voucher)]
    v = m.voucher
    why = _check_peer_voucher(s, v)
    if why is not None:
        return s, _refuse_pay(s, m, why, not isinstance(why, Conflict) or v.period == s.period)
    newer = _newer(s, v)
    if newer and _overdraws(s, v):
        return _postpone(s, m, "the voucher overdraws the deposits we know of")
    held = v if newer else s.peer_voucher
    assert held is not None
    if m.amount > held.sent - s.credit_used:
        return s, _refuse_pay(s, m, InsufficientBalance(
            f"amount {m.amount} is not covered: credit is {held.sent - s.credit_used}"), True)
    s2 = replace(s, peer_voucher=held, credit_used=s.credit_used + m.amount,
                 serving=(*s.serving, (m.payment_id, m.amount)))
    return s2, [CallHandler(m.payment_id, m.amount, m.message)]


def _postpone(s: ChannelState, m: Pay, why: str) -> tuple[ChannelState, Effects]:
    if any(p.payment_id == m.payment_id for p in s.postponed):
        return s, []
    if len(s.postponed) >= MAX_POSTPONED:
        # Dropped, not refused: a refusal would end the payer's wait while its voucher still
        # counts. Unanswered, the payer's sync resends it once we can take it.
        return s, []
    return replace(s, postponed=(*s.postponed, m)), []


def _retry_postponed(s: ChannelState, now: int, key: Identity) -> tuple[ChannelState, Effects]:
    pending, s = s.postponed, replace(s, postponed=())
    effects: Effects = []
    for m in pending:
        s, eff = _receive_pay(s, ReceivePay(m), now, key)
        effects += eff
    return s, effects


def _handler_done(s: ChannelState, a: ActionHandlerDone, now: int,
                  key: Identity) -> tuple[ChannelState, Effects]:
    amount = next((amt for pid, amt in s.serving if pid == a.payment_id), None)
    if amount is None:
        raise LocalProtocolError(f"payment {a.payment_id} is not being served")
    s = replace(s, serving=tuple(x for x in s.serving if x[0] != a.payment_id))
    if a.error is None:
        # The id is one we serve; ActionHandlerDone checked the response.
        result = PayResult._trusted(s.channel_id, a.payment_id, a.response, None, None)
        return s, [RecordResult(result), Send(result),
                   NotifyEvent("payment_received", {"payment_id": a.payment_id,
                                                    "amount": amount})]
    refund = None
    # A refund is a voucher; once a close is under way we sign none (it could prove fraud).
    if amount > 0 and s.phase is Phase.OPEN and s.mutual is None:
        refund = Voucher.create(key, s.channel_id, s.period, s.my_nonce + 1, s.my_sent + amount)
        s = replace(s, my_voucher=refund)
    result = PayResult(s.channel_id, a.payment_id, None, a.error, refund)
    return s, [RecordResult(result), Send(result)]


def _receive_pay_result(s: ChannelState, r: ReceivePayResult, now: int,
                        key: Identity) -> tuple[ChannelState, Effects]:
    m = r.msg
    op = next((o for o in s.outgoing if o.payment_id == m.payment_id), None)
    if op is None or m.channel_id != s.channel_id:
        return s, []  # a duplicate or stale result: already settled
    if (m.error is not None and m.refund is not None and _check_peer_voucher(s, m.refund) is None
            and _newer(s, m.refund) and _overdraws(s, m.refund)):
        # The refund counts on a deposit of the peer's that our watcher has not seen yet. Not
        # an answer we can take yet: the payment stays in flight, a sync re-sends it, and the
        # peer answers again from its results.
        return s, _fraud_evidence(s, m.refund)
    s = replace(s, outgoing=tuple(o for o in s.outgoing if o.payment_id != m.payment_id))
    if m.error is None:
        return s, [NotifyPayOutcome(m.payment_id, m.response, None)]
    effects: Effects = []
    refunded = False
    if m.refund is not None:
        why = _check_peer_voucher(s, m.refund)
        if why is None and _newer(s, m.refund) and _overdraws(s, m.refund):
            why = InsufficientBalance("refund voucher overdraws the peer's deposit")
        if why is None:
            held = m.refund if _newer(s, m.refund) else s.peer_voucher
            assert held is not None
            # A refund gives money back; it must not count as credit for the peer's requests.
            s = replace(s, peer_voucher=held,
                        credit_used=min(held.sent, s.credit_used + op.amount))
            refunded = True
        else:
            effects.append(InvalidInput(why))
        effects += _fraud_evidence(s, m.refund)
    effects.append(NotifyPayOutcome(m.payment_id, None, m.error, refunded))
    return s, effects


def _fraud_evidence(s: ChannelState, v: Voucher | None) -> Effects:
    """The fraud proof when `v`, a voucher of the peer, shows that its solo close on the ledger
    declared less than it signed. The watcher looks when the close appears (_ledger_close_seen),
    but the proof may also arrive later, in any message, until the period is settled."""
    c = s.ledger_close
    if (v is None or c is None or c.closer != s.peer or v.sent <= c.declared_sent_closer
            or v.channel_id != s.channel_id or v.period != s.period or not v.verify(s.peer)):
        return []
    return [SubmitFraudProof(s.period, v)]


def _take_voucher(s: ChannelState, v: Voucher | None) -> ChannelState:
    """Take the peer's voucher if it is valid and newer; otherwise keep what we hold."""
    if v is None or _check_peer_voucher(s, v) is not None or not _newer(s, v) or _overdraws(s, v):
        return s
    return replace(s, peer_voucher=v)


def _resend_outgoing(s: ChannelState) -> Effects:
    return [Send(Pay(s.channel_id, o.payment_id, o.voucher, o.amount, o.message))
            for o in s.outgoing]


def _action_sync(s: ChannelState, a: ActionSync, now: int,
                 key: Identity) -> tuple[ChannelState, Effects]:
    return s, [Send(Sync(s.channel_id, s.period, s.my_voucher, s.peer_voucher, True)),
               *_resend_outgoing(s)]


def _receive_sync(s: ChannelState, r: ReceiveSync, now: int,
                  key: Identity) -> tuple[ChannelState, Effects]:
    m = r.msg
    effects: Effects = []
    if m.channel_id == s.channel_id and m.period == s.period:
        # Our own voucher first: the peer's may be a refund of a payment we had forgotten, and
        # is checked against what we paid. (Both in one step: a duplicate changes nothing.)
        mine = m.yours
        if (mine is not None and mine.channel_id == s.channel_id and mine.period == s.period
                and (mine.nonce > s.my_nonce or mine.sent > s.my_sent) and mine.verify(s.me)):
            # We were restored from an old copy: the peer holds a voucher of ours we forgot.
            # What we declare must cover everything we ever signed.
            before = s.my_voucher
            if mine.nonce > s.my_nonce and mine.sent >= s.my_sent:
                s = replace(s, my_voucher=mine)
            elif s.phase is Phase.OPEN and s.mutual is None:
                # Since the restore we signed a lower voucher with the same nonce: supersede
                # both with a fresh one above either nonce.
                nonce, sent = max(mine.nonce, s.my_nonce), max(mine.sent, s.my_sent)
                fresh = Voucher.create(key, s.channel_id, s.period, nonce + 1, sent)
                s = replace(s, my_voucher=fresh)
                effects.append(Send(Sync(s.channel_id, s.period, fresh, s.peer_voucher, False)))
            elif mine.sent > s.my_sent:
                s = replace(s, my_voucher=mine)  # closing: sign nothing, declare the higher
            # (Closing with a voucher of ours that covers more: keep it, the higher nonce of
            # the peer's does not make it the one to declare.)
            if s.my_voucher != before:
                effects.append(NotifyEvent("own_voucher_recovered", {"nonce": mine.nonce,
                                                                      "sent": mine.sent}))
        s = _take_voucher(s, m.mine)
        effects += _fraud_evidence(s, m.mine)
    if m.reply:
        effects.append(Send(Sync(s.channel_id, s.period, s.my_voucher, s.peer_voucher, False)))
    effects += _resend_outgoing(s)
    return s, effects


def _deposit(s: ChannelState, a: ActionDeposit, now: int,
             key: Identity) -> tuple[ChannelState, Effects]:
    if s.mutual is not None or s.ledger_close is not None:
        raise NotAllowedAtState("no deposits while the channel is closing")
    return s, [SubmitDeposit(s.period, a.amount)]


def _message(s: ChannelState, a: ActionMessage, now: int,
             key: Identity) -> tuple[ChannelState, Effects]:
    return s, [Send(Message(s.channel_id, a.body))]


def _receive_message(s: ChannelState, r: ReceiveMessage, now: int,
                     key: Identity) -> tuple[ChannelState, Effects]:
    return s, [NotifyEvent("message", {"body": r.msg.body})]


def _calls_in_progress(s: ChannelState) -> str:
    """Why the figures of a mutual close could still charge for a call that is not finished:
    our payments awaiting answers, calls we serve, or credit for calls not yet arrived."""
    if s.outgoing:
        return f"{len(s.outgoing)} payments are awaiting answers"
    if s.serving:
        return f"{len(s.serving)} calls are being served"
    if s.credit:
        return f"{s.credit} paid by the peer awaits calls not yet arrived"
    return ""


def _close_mutual(s: ChannelState, a: ActionCloseMutual, now: int,
                  key: Identity) -> tuple[ChannelState, Effects]:
    if s.mutual is not None:  # asked again: propose the same figures again
        m = s.mutual
        return s, [Send(CloseProposal(s.channel_id, s.period, m.sent_initiator,
                                      m.sent_responder, m.my_sig))]
    busy = _calls_in_progress(s)
    if busy:
        raise NotAllowedAtState(f"{busy}; close when they have finished")
    si, sr = s.sent_pair(s.my_sent, s.peer_sent)
    sig = sign_close(key, s.channel_id, s.period, si, sr)
    s2 = replace(s, phase=Phase.CLOSING, mutual=MutualClose(si, sr, sig))
    return s2, [Send(CloseProposal(s.channel_id, s.period, si, sr, sig)),
                NotifyEvent("channel_closing", {"mutual": True})]


def _error_reply(s: ChannelState, err: PaychanError) -> Effects:
    return [Send(ErrorMsg(s.channel_id, err.to_wire())), InvalidInput(err)]


def _receive_close_proposal(s: ChannelState, r: ReceiveCloseProposal, now: int,
                            key: Identity) -> tuple[ChannelState, Effects]:
    m = r.msg
    if m.channel_id != s.channel_id or m.period != s.period:
        return s, _error_reply(s, Conflict("close proposal for another channel or period"))
    if not verify_close(s.peer, s.channel_id, m.period, m.sent_initiator, m.sent_responder,
                        m.sig):
        return s, _error_reply(s, BadSignature("close proposal is not signed by the peer"))
    busy = _calls_in_progress(s)
    if busy and s.mutual is None:
        # Not the peer's fault: it proposes again once the calls finish (and a sync resends).
        return s, [Send(ErrorMsg(s.channel_id, Conflict(f"not yet: {busy}").to_wire()))]
    mine, peers = ((m.sent_initiator, m.sent_responder) if s.is_initiator
                   else (m.sent_responder, m.sent_initiator))
    proposed_me = s.deposit_me - mine + peers
    proposed_peer = s.deposit_peer - peers + mine
    if proposed_me < s.my_balance or proposed_peer < 0:
        return s, _error_reply(s, Conflict(
            f"proposal pays us {proposed_me}; our balance is {s.my_balance}"))
    if s.mutual is not None and (s.mutual.sent_initiator, s.mutual.sent_responder) == (
            m.sent_initiator, m.sent_responder):
        my_sig = s.mutual.my_sig  # both proposed the same figures at once
    else:
        my_sig = sign_close(key, s.channel_id, s.period, m.sent_initiator, m.sent_responder)
    sig_i, sig_r = (my_sig, m.sig) if s.is_initiator else (m.sig, my_sig)
    s2 = replace(s, phase=Phase.CLOSING,
                 mutual=MutualClose(m.sent_initiator, m.sent_responder, my_sig))
    effects: Effects = [
        SubmitCloseMutual(s.period, m.sent_initiator, m.sent_responder, sig_i, sig_r),
        Send(CloseCoSigned(s.channel_id, s.period, m.sent_initiator, m.sent_responder, my_sig)),
    ]
    if s.mutual is None:
        # A proposal asked again (or ours, crossing it) was announced already: once per close.
        effects.append(NotifyEvent("channel_closing", {"mutual": True}))
    return s2, effects


def _receive_close_cosigned(s: ChannelState, r: ReceiveCloseCoSigned, now: int,
                            key: Identity) -> tuple[ChannelState, Effects]:
    m = r.msg
    mc = s.mutual
    if (mc is None or m.period != s.period
            or (mc.sent_initiator, mc.sent_responder) != (m.sent_initiator, m.sent_responder)):
        return s, []  # not what we proposed (or already settled): nothing to submit
    if not verify_close(s.peer, s.channel_id, m.period, m.sent_initiator, m.sent_responder,
                        m.sig):
        return s, _error_reply(s, BadSignature("co-signature is not the peer's"))
    sig_i, sig_r = (mc.my_sig, m.sig) if s.is_initiator else (m.sig, mc.my_sig)
    return s, [SubmitCloseMutual(s.period, m.sent_initiator, m.sent_responder, sig_i, sig_r)]


def _close_solo(s: ChannelState, a: ActionCloseSolo, now: int,
                key: Identity) -> tuple[ChannelState, Effects]:
    if s.ledger_close is not None:
        raise NotAllowedAtState("a close is already in progress on the ledger")
    if s.outgoing and not a.force:
        raise NotAllowedAtState(f"{len(s.outgoing)} payments await answers whose refunds would "
                                "not count after the close; wait for them or force the close")
    s2 = replace(s, phase=Phase.CLOSING)
    return s2, [SubmitCloseSolo(s.period, s.my_sent, s.peer_voucher),
                NotifyEvent("channel_closing", {"mutual": False})]


def _receive_open_propose(s: ChannelState, r: ReceiveOpenPropose, now: int,
                          key: Identity) -> tuple[ChannelState, Effects]:
    if r.msg.params != s.params:
        return s, _error_reply(s, Conflict("a different channel with this id exists"))
    return s, [Send(OpenAccept(s.channel_id))]  # the peer missed our accept


def _receive_open_accept(s: ChannelState, r: ReceiveOpenAccept, now: int,
                         key: Identity) -> tuple[ChannelState, Effects]:
    if s.phase is not Phase.AWAITING_ACCEPT:
        return s, []  # a duplicate accept
    return replace(s, phase=Phase.AWAITING_FUNDING), [SubmitCreate(s.params, s.open_deposit)]


def _receive_open_reject(s: ChannelState, r: ReceiveOpenReject, now: int,
                         key: Identity) -> tuple[ChannelState, Effects]:
    if s.phase is not Phase.AWAITING_ACCEPT:
        return s, []
    return replace(s, phase=Phase.REJECTED), [NotifyEvent("channel_rejected",
                                                          {"error": r.msg.error})]


def _receive_error(s: ChannelState, r: ReceiveError, now: int,
                   key: Identity) -> tuple[ChannelState, Effects]:
    return s, [NotifyEvent("peer_error", {"error": r.msg.error})]


def _ledger_update(s: ChannelState, u: LedgerUpdate, now: int,
                   key: Identity) -> tuple[ChannelState, Effects]:
    rec = u.record
    if rec.channel_id != s.channel_id or rec.period < s.period:
        return s, []  # another channel, or an event from a period we already left
    effects: Effects = []
    dep_me, dep_peer = rec.deposit_of(s.me), rec.deposit_of(s.peer)
    if rec.period > s.period:
        effects += _end_period(s, u)
        s = ChannelState(s.params, s.me, Phase.OPEN, rec.period, dep_me, dep_peer)
        return _ledger_close_seen(s, rec, effects)
    if s.phase in (Phase.AWAITING_ACCEPT, Phase.AWAITING_FUNDING):
        s = replace(s, phase=Phase.OPEN)
        effects.append(NotifyEvent("channel_open", {"deposit_me": dep_me,
                                                    "deposit_peer": dep_peer}))
    if (dep_me, dep_peer) != (s.deposit_me, s.deposit_peer):
        if dep_me < s.deposit_me or dep_peer < s.deposit_peer:
            raise InternalError("the ledger shows a deposit that decreased within a period")
        s = replace(s, deposit_me=dep_me, deposit_peer=dep_peer)
        effects.append(NotifyEvent("deposit_confirmed", {"deposit_me": dep_me,
                                                         "deposit_peer": dep_peer}))
    s, eff = _retry_postponed(s, now, key)
    effects += eff
    return _ledger_close_seen(s, rec, effects)


def _ledger_close_seen(s: ChannelState, rec: ChannelRecord,
                       effects: Effects) -> tuple[ChannelState, Effects]:
    """A solo close appeared on the ledger: the watcher's decision (DESIGN §5)."""
    if rec.status is not Status.CLOSING or rec.close is None or s.ledger_close is not None:
        return s, effects
    c = rec.close
    s = replace(s, phase=Phase.CLOSING, ledger_close=c)
    if c.closer == s.me:
        effects.append(SubmitConfirm(s.period, 0, c.started_at + s.params.dispute_period))
        return s, effects
    held = s.peer_voucher
    if held is not None and held.sent > c.declared_sent_closer:
        effects.append(SubmitFraudProof(s.period, held))
    else:
        # We admit what we really sent beyond the voucher the closer showed: we signed it.
        effects.append(SubmitConfirm(s.period, max(0, s.my_sent - c.peer_sent), 0))
    effects.append(NotifyEvent("channel_closing", {"mutual": False, "by_peer": True}))
    return s, effects


def _end_period(s: ChannelState, u: LedgerUpdate) -> Effects:
    """The period was settled: fail what is in flight and tell the application."""
    effects: Effects = []
    gone = NotAllowedAtState("the channel was settled before the payment finished").to_wire()
    for o in s.outgoing:
        effects.append(NotifyPayOutcome(o.payment_id, None, gone))
    for m in s.postponed:
        effects.append(Send(PayResult(s.channel_id, m.payment_id, None, gone, None)))
    payout = {("me" if who == s.me else "peer"): amt for who, amt in u.payouts}
    name = "channel_closed_with_fraud_proof" if u.event == "fraud_proof" else "channel_closed"
    effects.append(NotifyEvent(name, {"period": s.period, "payout_me": payout.get("me", 0),
                                      "payout_peer": payout.get("peer", 0)}))
    return effects


Handler = Callable[[ChannelState, Any, int, Identity], tuple[ChannelState, Effects]]
_OPEN_OR_CLOSING = (Phase.OPEN, Phase.CLOSING)

# The transition table: (phase, input type) -> handler. A missing entry is our own misuse.
TRANSITIONS: dict[tuple[Phase, type], Handler] = {}


def _on(phases: tuple[Phase, ...], kind: type, handler: Handler) -> None:
    for phase in phases:
        TRANSITIONS[(phase, kind)] = handler


_on((Phase.OPEN,), ActionPay, _pay)
_on(ALL_PHASES, ActionHandlerDone, _handler_done)
_on((Phase.OPEN,), ActionDeposit, _deposit)
_on(LIVE, ActionMessage, _message)
_on((Phase.OPEN, Phase.CLOSING), ActionCloseMutual, _close_mutual)
_on(_OPEN_OR_CLOSING, ActionCloseSolo, _close_solo)
_on(LIVE, ActionSync, _action_sync)
_on(ALL_PHASES, ReceiveOpenPropose, _receive_open_propose)
_on(ALL_PHASES, ReceiveOpenAccept, _receive_open_accept)
_on(ALL_PHASES, ReceiveOpenReject, _receive_open_reject)
_on(ALL_PHASES, ReceivePay, _receive_pay)
_on(ALL_PHASES, ReceivePayResult, _receive_pay_result)
_on(LIVE, ReceiveMessage, _receive_message)
_on(ALL_PHASES, ReceiveSync, _receive_sync)
_on(_OPEN_OR_CLOSING, ReceiveCloseProposal, _receive_close_proposal)
_on(ALL_PHASES, ReceiveCloseCoSigned, _receive_close_cosigned)
_on(ALL_PHASES, ReceiveError, _receive_error)
_on(ALL_PHASES, LedgerUpdate, _ledger_update)


def step(state: ChannelState, inp: Any, now: int, key: Identity) -> tuple[ChannelState, Effects]:
    """Apply one input. Raises (with no state change) on our misuse; peer faults are effects."""
    handler = TRANSITIONS.get((state.phase, type(inp)))
    if handler is None:
        raise LocalProtocolError(
            f"can't handle {type(inp).__name__} in phase {state.phase.name}")
    if key.public != state.me:
        raise LocalProtocolError("the signing key is not this party's")
    new, effects = handler(state, inp, now, key)
    check_invariants(new)
    return new, effects


def check_invariants(s: ChannelState) -> None:
    """Money rules that hold after every step, in production too."""
    # Runs after every step: the figures are read once rather than through the properties.
    mine, theirs = s.my_voucher, s.peer_voucher
    my_sent = mine.sent if mine is not None else 0
    peer_sent = theirs.sent if theirs is not None else 0
    my_balance = s.deposit_me - my_sent + peer_sent
    peer_balance = s.deposit_peer - peer_sent + my_sent
    cid, period = s.params.channel_id, s.period
    held_ok = ((mine is None or (mine.channel_id == cid and mine.period == period))
               and (theirs is None or (theirs.channel_id == cid and theirs.period == period)))
    my_nonce = mine.nonce if mine is not None else 0
    outgoing_ok = True
    for o in s.outgoing:
        if o.voucher.nonce > my_nonce:
            outgoing_ok = False
    if (my_balance >= 0 and peer_balance >= 0 and 0 <= s.credit_used <= peer_sent and held_ok
            and outgoing_ok):
        return
    problems = []
    if my_balance < 0:
        problems.append(f"my balance {my_balance} is negative")
    if peer_balance < 0:
        problems.append(f"peer balance {peer_balance} is negative")
    if not 0 <= s.credit_used <= peer_sent:
        problems.append(f"credit used {s.credit_used} outside [0, {peer_sent}]")
    if not held_ok:
        problems.append("a held voucher is for another channel or period")
    if not outgoing_ok:
        problems.append("an in-flight voucher is newer than our latest")
    raise InternalError("channel invariant broken: " + "; ".join(problems))


__all__ = ["ChannelState", "Phase", "initiate", "receive", "respond", "step"]
