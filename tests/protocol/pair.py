"""ChannelPair: two channel machines joined by a fake link and a fake ledger, for tests.

Party A (the initiator) and party B (the responder) each run `paychan.protocol.channel.step`.
Every message one sends is encoded with `wire.encode` and waits in the other party's `inbox`
until a test delivers it (`deliver`, `flush`), so tests control order, loss, duplication and
tampering at the byte level. `Submit*` effects are applied at once to one `ChannelRecord` by the
pure contract rules; each accepted transaction is fed back to both parties as a `LedgerUpdate`
(a party with `follow_ledger = False` keeps them in `held` until `release_ledger`).
`CallHandler` effects are answered by the `handler` function; `RecordResult` effects are stored
in `results` and passed as `known_result` when the same payment id is delivered again, which is
what a node's store does.

    pair = ChannelPair(deposit_a=100, deposit_b=50).open()
    pair.act(pair.a, ActionPay("p1", 10, "hello"))
    pair.flush()
    assert pair.a.notified_outcomes()["p1"].response == ["served", "hello"]

API (everything else is private):
    ChannelPair(deposit_a, deposit_b, dispute_period, handler, now)
    .a, .b, .record, .now, .ledger_errors, .deposited, .paid, .events
    .propose(), .open(), .act(party, input), .deliver(party, index), .flush(), .advance(seconds),
    .release_ledger(party), .peer_of(party), .party_of(public_key)
    Party: .name, .key, .state, .inbox, .results, .effects, .follow_ledger, .held,
           .calls, .of_type(cls), .notified_outcomes()
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from paychan.protocol import contract
from paychan.protocol.channel import (
    ActionDeposit,
    ActionHandlerDone,
    CallHandler,
    ChannelState,
    LedgerUpdate,
    NotifyPayOutcome,
    Phase,
    RecordResult,
    Send,
    SubmitCloseMutual,
    SubmitCloseSolo,
    SubmitConfirm,
    SubmitCreate,
    SubmitDeposit,
    SubmitFraudProof,
    initiate,
    receive,
    respond,
    step,
)
from paychan.protocol.contract import ChannelRecord, Payouts
from paychan.protocol.errors import Conflict, HandlerError, PaychanError
from paychan.protocol.identity import Identity
from paychan.protocol.wire import ChannelParams, OpenPropose, PayResult, decode, encode

T = TypeVar("T")

#: Returned by a handler to leave the call unanswered; finish it later with
#: `pair.act(party, ActionHandlerDone(payment_id, response))`.
DEFER = object()

Handler = Callable[["Party", CallHandler], Any]


def echo_handler(party: Party, call: CallHandler) -> Any:
    """The default handler: answers every paid call with ["served", message]."""
    return ["served", call.message]


@dataclass(eq=False)
class Party:
    """One side of the pair: its key, its machine state and what happened to it."""

    name: str
    key: Identity
    state: ChannelState | None = None
    inbox: list[bytes] = field(default_factory=list)  # encoded messages in flight to this party
    results: dict[str, PayResult] = field(default_factory=dict)  # from RecordResult effects
    effects: list[Any] = field(default_factory=list)  # every effect this party emitted
    follow_ledger: bool = True
    held: list[LedgerUpdate] = field(default_factory=list)  # updates kept while not following
    calls: list[CallHandler] = field(default_factory=list)  # every handler call made

    @property
    def public(self) -> bytes:
        return self.key.public

    def of_type(self, cls: type[T]) -> list[T]:
        """Every effect of type `cls` this party emitted, in order."""
        return [e for e in self.effects if isinstance(e, cls)]

    def notified_outcomes(self) -> dict[str, NotifyPayOutcome]:
        """The last NotifyPayOutcome per payment id."""
        return {e.payment_id: e for e in self.of_type(NotifyPayOutcome)}


class ChannelPair:
    """Parties `a` (initiator) and `b` (responder), a byte-level link and an instant ledger."""

    def __init__(self, deposit_a: int = 100, deposit_b: int = 0, dispute_period: int = 600,
                 handler: Handler = echo_handler, now: int = 1_000,
                 salt: bytes = bytes([7]) * 32) -> None:
        self.a = Party("A", Identity(bytes([0xA1]) * 32))
        self.b = Party("B", Identity(bytes([0xB2]) * 32))
        self.params = ChannelParams(self.a.public, self.b.public, "base", dispute_period, salt,
                                    "testnet")
        self.deposit_a, self.deposit_b = deposit_a, deposit_b
        self.handler = handler
        self.now = now
        self.record: ChannelRecord | None = None
        self.ledger_errors: list[tuple[str, Any, PaychanError]] = []  # (party, effect, error)
        self.deposited: dict[bytes, int] = {self.a.public: 0, self.b.public: 0}
        self.paid: dict[bytes, int] = {self.a.public: 0, self.b.public: 0}
        self.events: list[str] = []  # ledger events, in order
        self._scheduled: list[tuple[Party, SubmitConfirm]] = []

    # --- driving -----------------------------------------------------------------------------

    def propose(self) -> ChannelPair:
        """A proposes the channel; the proposal waits in B's inbox."""
        state, effects = initiate(self.params, self.a.public, self.deposit_a)
        self.a.state = state
        self._carry_out(self.a, effects)
        return self

    def open(self) -> ChannelPair:
        """Propose, accept, create on the ledger; B deposits `deposit_b` when it is positive."""
        self.propose().flush()
        if self.deposit_b:
            self.act(self.b, ActionDeposit(self.deposit_b))
        assert self.a.state is not None and self.b.state is not None
        assert self.a.state.phase is Phase.OPEN, self.a.state.phase
        assert self.b.state.phase is Phase.OPEN, self.b.state.phase
        return self

    def act(self, party: Party, inp: Any) -> list[Any]:
        """Step `party` with `inp`, carry out the effects and everything they cause locally
        (handler calls, ledger transactions and updates). Returns the effects of `inp` itself.
        Messages sent are queued in the peer's inbox, not delivered."""
        if party.state is None:
            raise AssertionError(f"party {party.name} has no channel state")
        party.state, effects = step(party.state, inp, self.now, party.key)
        self._carry_out(party, effects)
        return effects

    def deliver(self, party: Party, index: int = 0) -> list[Any]:
        """Decode and hand `party` the `index`-th message waiting in its inbox."""
        msg = decode(party.inbox.pop(index))
        if party.state is None:
            assert isinstance(msg, OpenPropose), f"{party.name} has no channel for {msg!r}"
            party.state, effects = respond(msg, party.public)
            self._carry_out(party, effects)
            return effects
        known = party.results.get(getattr(msg, "payment_id", ""))
        return self.act(party, receive(msg, known if msg.TYPE == "pay" else None))

    def flush(self, limit: int = 10_000) -> None:
        """Deliver every message in flight, oldest first (A's inbox, then B's), until none is
        left."""
        for _ in range(limit):
            if self.a.inbox:
                self.deliver(self.a)
            elif self.b.inbox:
                self.deliver(self.b)
            else:
                return
        raise AssertionError(f"the parties keep talking: more than {limit} messages")

    def advance(self, seconds: int) -> None:
        """Move ledger time on and submit every scheduled confirm that has become due."""
        self.now += seconds
        due = [(p, e) for p, e in self._scheduled if e.not_before <= self.now]
        self._scheduled = [(p, e) for p, e in self._scheduled if e.not_before > self.now]
        for party, effect in due:
            self._run_local(self._submit(party, effect))

    def release_ledger(self, party: Party) -> None:
        """Hand `party` the ledger updates it was held from, and follow the ledger again."""
        party.follow_ledger = True
        held, party.held = party.held, []
        self._run_local([(party, u) for u in held])

    def peer_of(self, party: Party) -> Party:
        return self.b if party is self.a else self.a

    def party_of(self, public: bytes) -> Party:
        return self.a if public == self.a.public else self.b

    # --- effects -----------------------------------------------------------------------------

    def _carry_out(self, party: Party, effects: list[Any]) -> None:
        party.effects.extend(effects)
        work: list[tuple[Party, Any]] = []
        for e in effects:
            work += self._effect(party, e)
        self._run_local(work)

    def _run_local(self, work: list[tuple[Party, Any]]) -> None:
        """Run inputs caused by effects (handler results, ledger updates), first come first."""
        queue = deque(work)
        while queue:
            party, inp = queue.popleft()
            assert party.state is not None
            party.state, effects = step(party.state, inp, self.now, party.key)
            party.effects.extend(effects)
            for e in effects:
                queue.extend(self._effect(party, e))

    def _effect(self, party: Party, e: Any) -> list[tuple[Party, Any]]:
        if isinstance(e, Send):
            self.peer_of(party).inbox.append(encode(e.msg))
        elif isinstance(e, RecordResult):
            party.results[e.result.payment_id] = e.result
        elif isinstance(e, CallHandler):
            party.calls.append(e)
            return self._call_handler(party, e)
        elif isinstance(e, SubmitConfirm) and e.not_before > self.now:
            self._scheduled.append((party, e))
        elif isinstance(e, (SubmitCreate, SubmitDeposit, SubmitCloseMutual, SubmitCloseSolo,
                            SubmitConfirm, SubmitFraudProof)):
            return self._submit(party, e)
        return []

    def _call_handler(self, party: Party, call: CallHandler) -> list[tuple[Party, Any]]:
        try:
            response = self.handler(party, call)
        except PaychanError as exc:
            return [(party, ActionHandlerDone(call.payment_id, None, exc.to_wire()))]
        except Exception as exc:  # an application bug: an error and a refund, like a node
            err = HandlerError(f"{type(exc).__name__}: {exc}").to_wire()
            return [(party, ActionHandlerDone(call.payment_id, None, err))]
        if response is DEFER:
            return []
        return [(party, ActionHandlerDone(call.payment_id, response, None))]

    # --- the ledger --------------------------------------------------------------------------

    def _submit(self, party: Party, e: Any) -> list[tuple[Party, Any]]:
        """Apply one Submit* effect as `party`'s transaction; refusals go to ledger_errors."""
        sender, rec = party.public, self.record
        try:
            debit, payouts = 0, ()
            if isinstance(e, SubmitCreate):
                if rec is not None:
                    raise Conflict("the channel already exists")
                new = contract.create(e.params, sender, e.deposit)
                event, debit = "create", e.deposit
            else:
                rec = contract.require(rec, self.params.channel_id)
                new, event, debit, payouts = self._apply(rec, sender, e)
        except PaychanError as exc:
            self.ledger_errors.append((party.name, e, exc))
            return []
        self.record = new
        self.events.append(event)
        self.deposited[sender] += debit
        for who, amount in payouts:
            self.paid[who] += amount
        update = LedgerUpdate(new, event, payouts)
        work: list[tuple[Party, Any]] = []
        for p in (self.a, self.b):
            if p.state is None:
                continue
            if p.follow_ledger:
                work.append((p, update))
            else:
                p.held.append(update)
        return work

    def _apply(self, rec: ChannelRecord, sender: bytes,
               e: Any) -> tuple[ChannelRecord, str, int, Payouts]:
        if isinstance(e, SubmitDeposit):
            if e.period != rec.period:
                raise Conflict(f"channel is in period {rec.period}, not {e.period}")
            return contract.deposit_(rec, sender, e.amount), "deposit", e.amount, ()
        if isinstance(e, SubmitCloseMutual):
            new, payouts = contract.close_mutual(rec, e.period, e.sent_initiator,
                                                 e.sent_responder, e.sig_initiator,
                                                 e.sig_responder)
            return new, "close_mutual", 0, payouts
        if isinstance(e, SubmitCloseSolo):
            new = contract.close_solo(rec, sender, e.period, e.declared_sent_self,
                                      e.peer_voucher, self.now)
            return new, "close_solo", 0, ()
        if isinstance(e, SubmitConfirm):
            new, payouts = contract.confirm(rec, sender, e.period, e.additional_sent, self.now)
            return new, "confirm", 0, payouts
        if isinstance(e, SubmitFraudProof):
            new, payouts = contract.fraud_proof(rec, sender, e.period, e.voucher)
            return new, "fraud_proof", 0, payouts
        raise AssertionError(f"not a ledger transaction: {e!r}")
