"""Stateful fuzz test of the pure protocol: one channel, two parties, a lossy network, a ledger.

The model is the oracle (STYLE, "Hypothesis stateful tests"). Parties A (initiator) and B
(responder) each run the real state machine of `paychan.protocol.channel`; each is honest or a
cheater. The harness plays everything around them:

- the network: every `Send` is encoded with the wire codec into the `messages` bundle, and rules
  deliver (consume), redeliver (duplicate), drop, tamper with or reorder (any element is drawn)
  those messages;
- the store of each party: its state written after every step (the write-ahead rule), the
  results it recorded, and its watcher's tasks; a crash restores the state from the stored bytes
  and loses only the handler calls in progress; an honest party may also come back from an old
  backup, and then syncs before it closes (DESIGN §4);
- the application: handler calls are answered later, successfully or with an error;
- the ledger: `paychan.protocol.contract` over one `ChannelRecord`, account balances, a clock;
  every `Submit*` is applied, and every change is fed to both parties as a `LedgerUpdate`.

A cheater runs the same code, and may also: submit a stale solo close (declaring less than it
signed), withhold or lowball its confirm, try fraud proofs it has no right to, forge vouchers
outside the protocol (reused, older or skipped nonces, lower sent) and propose unfair closes.
A watcher may see the peer's deposits late (payments counting on them wait, postponed).

Properties (after every step, or at every settlement of a period):
- conservation: payouts so far + the channel's deposits on the ledger == all deposits made, and
  the accounts with the channel hold what was minted;
- vouchers monotone per direction within a period (the latest signed and the latest held never
  go back), and an honest party never signs two vouchers with one nonce;
- each party's check_invariants; its store holds exactly its last state;
- duplicates change nothing (a message delivered twice in a row changes no state the second
  time); each payment is served, answered and concluded at most once;
- local commands are taken, or refused with the defined error and no state change; peer
  messages from a correct peer are never invalid; tampered bytes give a DecodeError or a
  defined answer; refused ledger transactions change nothing, and an honest party's are refused
  only because the period or the close moved on;
- no honest party is paid less than its entitlement: what it agreed (mutual close), or
  deposit - my_sent + peer_sent from what it holds (a solo closer: what it held at its close,
  see test_regressions); a stale close, whose declared figure the honest peer can beat with a
  voucher it holds, ends with the honest party taking the whole channel; an honest closer is
  never proven fraudulent; a closer cannot prove fraud against itself.

Budget: STEPS steps per example and at least MIN_EXAMPLES examples; `HYPOTHESIS_PROFILE=fuzz`
raises the examples to its 5000. About 25 s for the `ci` run on two cores.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import msgpack
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

from paychan.protocol import channel, contract, wire
from paychan.protocol.channel import (
    ActionCloseMutual,
    ActionCloseSolo,
    ActionDeposit,
    ActionHandlerDone,
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
    SubmitCloseSolo,
    SubmitConfirm,
    SubmitCreate,
    SubmitDeposit,
    SubmitFraudProof,
)
from paychan.protocol.contract import ChannelRecord, Payouts, Status
from paychan.protocol.errors import (
    Conflict,
    DecodeError,
    HandlerError,
    InsufficientBalance,
    LocalProtocolError,
    NotAllowedAtState,
    PaychanError,
    Unauthorized,
    ValueTooLow,
)
from paychan.protocol.identity import Identity
from paychan.protocol.wire import (
    ChannelParams,
    CloseCoSigned,
    CloseProposal,
    Msg,
    Pay,
    PayResult,
    Sync,
    Voucher,
)

STEPS = 200
MIN_EXAMPLES = 500  # the ci profile's 100 would leave most of the time budget unused
MINTED = 10_000  # each party's ledger account at the start: far more than it ever deposits
NAMES = ("A", "B")
SEEDS = {"A": b"\x0a" * 32, "B": b"\x0b" * 32}

# Ledger transactions of an honest party may be refused only because the world moved on:
# the period was settled meanwhile (Conflict) or a close is already under way (NotAllowedAtState).
# Any other refusal means the party's view and the contract disagree.
EXPECTED_REFUSALS: dict[type, tuple[type[PaychanError], ...]] = {
    SubmitDeposit: (Conflict, NotAllowedAtState),
    SubmitCloseSolo: (Conflict, NotAllowedAtState),
    SubmitCloseMutual: (Conflict,),
    SubmitConfirm: (Conflict,),
    SubmitFraudProof: (Conflict,),
}


def dump(state: ChannelState) -> bytes:
    """What the store writes: the state's object form as msgpack."""
    return msgpack.packb(state.to_obj(), use_bin_type=True)


def load(data: bytes) -> ChannelState:
    return ChannelState.from_obj(msgpack.unpackb(data, raw=False))


@dataclass(frozen=True)
class InFlight:
    """One message on the wire."""

    serial: int
    sender: str
    recipient: str
    data: bytes
    forged: bool = False  # made by a cheater outside the protocol
    # Sent by a party restored from an old copy and not yet synced: what it says it holds of
    # the recipient's may be as old as the recipient's own copy, so it cures no amnesia.
    from_amnesiac: bool = False

    def __repr__(self) -> str:
        kind = msgpack.unpackb(self.data, raw=False).get("type")
        forged = " forged" if self.forged else ""
        return f"InFlight(#{self.serial} {self.sender}->{self.recipient}{forged} {kind})"


@dataclass(frozen=True)
class Backup:
    """An old copy of a party's store, and what its application had logged by then."""

    store: bytes
    results: dict[str, PayResult]
    tasks: list[SubmitConfirm]
    served: set[str]
    outcomes: set[str]


@dataclass
class Party:
    name: str
    key: Identity
    honest: bool
    state: ChannelState
    store: bytes = b""  # the durable state: written after every step, before any effect leaves
    results: dict[str, PayResult] = field(default_factory=dict)  # durable: RecordResult effects
    tasks: list[SubmitConfirm] = field(default_factory=list)  # durable: the watcher's confirms
    calls: dict[str, CallHandler] = field(default_factory=dict)  # in memory: lost on a crash
    # What the model remembers about this party (never restored by a crash).
    served: set[str] = field(default_factory=set)  # payment_received, by payment_id
    outcomes: set[str] = field(default_factory=set)  # NotifyPayOutcome, by payment_id
    signed: dict[tuple[int, int], int] = field(default_factory=dict)  # (period, nonce) -> sent
    agreed: dict[tuple[int, int, int], int] = field(default_factory=dict)  # close figures -> due
    high: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # voucher high marks
    backups: list[Backup] = field(default_factory=list)  # old copies an operator may restore
    amnesiac_since: int | None = None  # restored from a backup, not yet synced after (serial)
    amnesiac_period: int = 0  # the period it was restored into; a settlement ends the amnesia
    restored_periods: set[int] = field(default_factory=set)  # may have signed colliding nonces

    @property
    def public(self) -> bytes:
        return self.key.public

    @property
    def amnesiac(self) -> bool:
        """Restored from an old copy and not yet told by an unrestored peer what it signed
        in this period (a settled period holds nothing to forget)."""
        return self.amnesiac_since is not None and self.state.period == self.amnesiac_period


def period_of(msg: Msg) -> int | None:
    """The period a peer message speaks about, when it names one."""
    if isinstance(msg, Pay):
        return msg.voucher.period
    if isinstance(msg, PayResult):
        return None if msg.refund is None else msg.refund.period
    if isinstance(msg, (Sync, CloseProposal, CloseCoSigned)):
        return msg.period
    return None


class ChannelMachine(RuleBasedStateMachine):
    messages = Bundle("messages")

    def __init__(self) -> None:
        super().__init__()
        self.now = 0
        self.parties: dict[str, Party] = {}
        self.record: ChannelRecord | None = None
        self.accounts: dict[bytes, int] = {}
        self.deposited = 0  # every deposit the ledger ever took
        self.paid_out = 0  # every payout the ledger ever made
        self.queue: deque[tuple[str, Any]] = deque()  # ledger updates not yet seen by a party
        self.outbox: list[InFlight] = []  # messages sent during the current rule
        self.serial = 0
        self.payments = 0
        self.provable_stale: dict[int, str] = {}  # period -> honest party that can prove it
        self.closer_held: dict[int, int] = {}  # period -> the closer's peer_sent at its close
        self.pays_this_period = 0
        self.behind: dict[str, list[LedgerUpdate]] = {n: [] for n in NAMES}  # not yet seen
        self.misled: set[str] = set()  # parties that took a tampered or forged message
        self.dead: set[int] = set()  # serials of messages lost with a restored party's past

    # --- opening -------------------------------------------------------------------------

    @initialize(dep_a=st.integers(0, 40), dep_b=st.integers(0, 40), a_honest=st.booleans(),
                b_honest=st.booleans(), dispute=st.integers(1, 20))
    def open_channel(self, dep_a: int, dep_b: int, a_honest: bool, b_honest: bool,
                     dispute: int) -> None:
        """The real open handshake, through the codec; B may fund its side too."""
        keys = {n: Identity(SEEDS[n]) for n in NAMES}
        params = ChannelParams(keys["A"].public, keys["B"].public, "base", dispute,
                               b"\x00" * 32, "fuzz")
        state_a, eff_a = channel.initiate(params, keys["A"].public, dep_a)
        propose = wire.decode(wire.encode(eff_a[0].msg))
        state_b, eff_b = channel.respond(propose, keys["B"].public)  # type: ignore[arg-type]
        accept = wire.decode(wire.encode(eff_b[0].msg))
        honest = {"A": a_honest, "B": b_honest}
        for n, s in (("A", state_a), ("B", state_b)):
            self.parties[n] = Party(n, keys[n], honest[n], s, dump(s))
            self.accounts[keys[n].public] = MINTED
        self._input("A", channel.receive(accept))  # -> SubmitCreate -> ledger -> both OPEN
        if dep_b:
            self._input("B", ActionDeposit(dep_b))
        assert self.record is not None and self.record.total == dep_a + dep_b
        assert all(p.state.phase is Phase.OPEN for p in self.parties.values())
        self.outbox.clear()  # the handshake sent nothing that is still needed

    # --- harness plumbing ----------------------------------------------------------------

    def _other(self, name: str) -> str:
        return "B" if name == "A" else "A"

    def _flush(self) -> Any:
        out, self.outbox = self.outbox, []
        return multiple(*out)

    def _input(self, name: str, inp: Any) -> list[Any]:
        """Step a party, then let both parties see every ledger change that followed."""
        effects = self._step(name, inp)
        self._drain()
        return effects

    def _drain(self) -> None:
        while self.queue:
            who, update = self.queue.popleft()
            self._step(who, update)

    def _step(self, name: str, inp: Any) -> list[Any]:
        p = self.parties[name]
        new, effects = channel.step(p.state, inp, self.now, p.key)
        p.state = new
        p.store = dump(new)  # write-ahead: durable before any effect leaves
        self._observe(p, effects)
        for eff in effects:
            self._dispatch(p, eff)
        return effects

    def _observe(self, p: Party, effects: list[Any]) -> None:
        """Remember what the party signed: vouchers, and close figures with what they pay it."""
        s = p.state
        v = s.my_voucher
        if v is not None and p.honest and v.period in p.restored_periods:
            # Restored from an old copy: it may sign a nonce again before its sync, and then
            # supersedes both; what it signed is what it will have to declare.
            key = (v.period, v.nonce)
            p.signed[key] = max(p.signed.get(key, 0), v.sent)
        elif v is not None and p.honest:
            old = p.signed.setdefault((v.period, v.nonce), v.sent)
            assert old == v.sent, f"{p.name} signed two vouchers with nonce {v.nonce}"
            for (period, nonce), sent in p.signed.items():
                if period == v.period:
                    assert (nonce - v.nonce) * (sent - v.sent) >= 0, (
                        f"{p.name}'s vouchers are not monotone: nonce {nonce} sent {sent}, "
                        f"nonce {v.nonce} sent {v.sent}")
        for eff in effects:
            if isinstance(eff, Send) and isinstance(eff.msg, (CloseProposal, CloseCoSigned)):
                m = eff.msg
                mine, peers = ((m.sent_initiator, m.sent_responder) if s.is_initiator
                               else (m.sent_responder, m.sent_initiator))
                due = s.deposit_me - mine + peers
                if (m.period, m.sent_initiator, m.sent_responder) not in p.agreed:
                    # Signing for the first time: never for less than what the party holds.
                    assert due >= s.my_balance, (
                        f"{p.name} signed close figures paying {due} < its balance "
                        f"{s.my_balance}")
                    p.agreed[(m.period, m.sent_initiator, m.sent_responder)] = due

    def _dispatch(self, p: Party, eff: Any) -> None:
        if isinstance(eff, Send):
            self.serial += 1
            self.outbox.append(InFlight(self.serial, p.name, self._other(p.name),
                                        wire.encode(eff.msg), from_amnesiac=p.amnesiac))
        elif isinstance(eff, CallHandler):
            p.calls[eff.payment_id] = eff
        elif isinstance(eff, RecordResult):
            pid = eff.result.payment_id
            assert pid not in p.results, f"{p.name} answered payment {pid} twice"
            p.results[pid] = eff.result
        elif isinstance(eff, SubmitConfirm):
            p.tasks.append(eff)  # the watcher lands it once not_before has passed
        elif isinstance(eff, (SubmitCreate, SubmitDeposit, SubmitCloseMutual, SubmitCloseSolo,
                              SubmitFraudProof)):
            self._submit(p.name, eff)
        elif isinstance(eff, NotifyEvent) and eff.name == "payment_received":
            pid = eff.info["payment_id"]
            assert pid not in p.served, f"{p.name} served payment {pid} twice"
            p.served.add(pid)
        elif isinstance(eff, NotifyPayOutcome):
            assert eff.payment_id not in p.outcomes, f"two outcomes for {eff.payment_id}"
            p.outcomes.add(eff.payment_id)

    # --- the ledger ----------------------------------------------------------------------

    def _apply(self, name: str, eff: Any) -> tuple[ChannelRecord, str, Payouts, int]:
        """One transaction against the record: (new record, event, payouts, debit)."""
        sender = self.parties[name].public
        rec, now = self.record, self.now
        if isinstance(eff, SubmitCreate):
            assert rec is None
            return contract.create(eff.params, sender, eff.deposit), "create", (), eff.deposit
        assert rec is not None
        if isinstance(eff, SubmitDeposit):
            if eff.period != rec.period:  # as the ledger's transaction rules do
                raise Conflict(f"channel is in period {rec.period}, not {eff.period}")
            if self.accounts[sender] < eff.amount:
                raise InsufficientBalance("the account cannot cover the deposit")
            return contract.deposit_(rec, sender, eff.amount), "deposit", (), eff.amount
        if isinstance(eff, SubmitCloseMutual):
            new, payouts = contract.close_mutual(rec, eff.period, eff.sent_initiator,
                                                 eff.sent_responder, eff.sig_initiator,
                                                 eff.sig_responder)
            return new, "close_mutual", payouts, 0
        if isinstance(eff, SubmitCloseSolo):
            new = contract.close_solo(rec, sender, eff.period, eff.declared_sent_self,
                                      eff.peer_voucher, now)
            return new, "close_solo", (), 0
        if isinstance(eff, SubmitConfirm):
            new, payouts = contract.confirm(rec, sender, eff.period, eff.additional_sent, now)
            return new, "confirm", payouts, 0
        if isinstance(eff, SubmitFraudProof):
            new, payouts = contract.fraud_proof(rec, sender, eff.period, eff.voucher)
            return new, "fraud_proof", payouts, 0
        raise AssertionError(f"not a ledger transaction: {eff!r}")

    def _submit(self, name: str, eff: Any) -> bool:
        """Apply a party's transaction; a refusal must leave the record as it was."""
        before = self.record
        try:
            new, event, payouts, debit = self._apply(name, eff)
        except PaychanError as err:
            assert self.record == before
            if self.parties[name].honest:
                allowed = EXPECTED_REFUSALS.get(type(eff), ())
                assert isinstance(err, allowed), (
                    f"honest {name}'s {type(eff).__name__} refused: {err!r}")
            return False
        self._ledger_changed(name, new, event, payouts, debit, eff)
        return True

    def _ledger_changed(self, name: str, new: ChannelRecord, event: str, payouts: Payouts,
                        debit: int, eff: Any) -> None:
        old = self.record
        if debit:
            self.accounts[self.parties[name].public] -= debit
            self.deposited += debit
        for who, amount in payouts:
            self.accounts[who] += amount
            self.paid_out += amount
        if old is not None and new.period > old.period:
            self._check_settlement(old, event, payouts, eff)
            self.pays_this_period = 0
        if event == "close_solo":
            self.closer_held[new.period] = self.parties[name].state.peer_sent
        self.record = new
        update = LedgerUpdate(new, event, payouts)
        for n in NAMES:  # both watchers follow the ledger; they see changes in order
            if event == "deposit" and n != name:
                # The peer's watcher may see a deposit late: payments that count on it wait
                # (postponed) until it does.
                self.behind[n].append(update)
                continue
            self._catch_up(n)
            self.queue.append((n, update))

    def _catch_up(self, name: str) -> None:
        self.queue.extend((name, u) for u in self.behind[name])
        self.behind[name].clear()

    def _check_settlement(self, old: ChannelRecord, event: str, payouts: Payouts,
                          eff: Any) -> None:
        """No honest party is paid less than it is entitled to by what it holds."""
        paid = dict(payouts)
        closer = old.close.closer if old.close is not None else None
        for p in self.parties.values():
            if not p.honest:
                continue
            s, got = p.state, paid.get(p.public, 0)
            assert s.period == old.period
            if event == "close_mutual":
                due = p.agreed.get((old.period, eff.sent_initiator, eff.sent_responder))
                assert due is not None, f"honest {p.name} never signed these close figures"
                assert got >= due, f"honest {p.name} agreed to {due}, was paid {got}"
            elif event == "fraud_proof":
                assert closer != p.public, f"honest {p.name} lost to a fraud proof"
                assert got == old.total
            else:
                held = s.peer_sent
                if closer == p.public:
                    # The contract takes the closer's evidence once, when it closes: a voucher
                    # that reaches the closer later (a refund, a sync) counts only if the peer
                    # admits it in its confirm, and nothing in DESIGN §5 makes it. The closer is
                    # owed what it held when it closed (test_regressions shows the gap).
                    held = self.closer_held[old.period]
                # What it sent: the most it signed (a party restored from an old copy may not
                # know all of it yet).
                sent = max([s.my_sent, *(v for (period, _), v in p.signed.items()
                                         if period == old.period)])
                due = old.deposit_of(p.public) - sent + held
                assert got >= due, f"honest {p.name} holds {due}, was paid {got}"
            # A stale close: the closer declared less than a voucher of its own that the honest
            # party held when the close appeared, or holds now that the period settles.
            stale = self.provable_stale.get(old.period) == p.name or (
                event == "confirm" and old.close is not None and closer != p.public
                and s.peer_sent > old.close.declared_sent_closer)
            if stale:
                assert event == "fraud_proof" and got == old.total, (
                    f"a stale close against honest {p.name} ended with {event}, paying {got} "
                    f"of {old.total}")

    def _due_tasks(self, honest_only: bool = False) -> list[tuple[str, SubmitConfirm]]:
        return [(p.name, t) for p in self.parties.values() for t in p.tasks
                if t.not_before <= self.now and (p.honest or not honest_only)]

    def _land(self, name: str, task: SubmitConfirm) -> None:
        self.parties[name].tasks.remove(task)
        self._submit(name, task)
        self._drain()

    # --- local commands --------------------------------------------------------------------

    def _command(self, name: str, inp: Any, refusal: type[PaychanError] | None) -> None:
        """Run a local command. When the model expects a refusal, it must be exactly that
        error, with no state change; otherwise the command must be taken."""
        p = self.parties[name]
        before = p.state
        try:
            self._step(name, inp)
        except PaychanError as err:
            assert p.state is before
            assert refusal is not None and type(err) is refusal, (
                f"{inp!r} refused with {err!r}, expected {refusal}")
            return
        assert refusal is None, f"{inp!r} should have been refused with {refusal.__name__}"
        self._drain()

    @rule(target=messages, name=st.sampled_from(NAMES), amount=st.integers(0, 15))
    def pay(self, name: str, amount: int) -> Any:
        """A new payment. Above the balance it must be refused with nothing changed."""
        p = self.parties[name]
        s = p.state
        self.payments += 1
        self.pays_this_period += 1
        inp = ActionPay(f"{name}{self.payments}", amount, f"call {self.payments}")
        refusal: type[PaychanError] | None = None
        if s.phase is not Phase.OPEN:
            refusal = LocalProtocolError
        elif s.mutual is not None:
            refusal = NotAllowedAtState
        elif amount > s.my_balance - s.credit - sum(a for _, a in s.serving):
            # Only money that can no longer be claimed back may be spent: the peer's credit
            # pays for calls that have not arrived, and calls in service may fail; both would
            # be refunded.
            refusal = InsufficientBalance
        self._command(name, inp, refusal)
        return self._flush()

    @precondition(lambda self: any(p.state.outgoing for p in self.parties.values()))
    @rule(target=messages, pick=st.integers(0, 63))
    def retry_pay(self, pick: int) -> Any:
        """The application retries a payment in flight: the same voucher goes out again."""
        inflight = [(p.name, o) for p in self.parties.values() for o in p.state.outgoing]
        name, o = inflight[pick % len(inflight)]
        s = self.parties[name].state
        inp = ActionPay(o.payment_id, o.amount, o.message)
        if s.phase is not Phase.OPEN:
            self._command(name, inp, LocalProtocolError)
        elif s.mutual is not None:
            self._command(name, inp, NotAllowedAtState)
        else:
            effects = self._input(name, inp)
            assert self.parties[name].state == s
            assert [e.msg.voucher for e in effects if isinstance(e, Send)] == [o.voucher]
        return self._flush()

    @precondition(lambda self: any(p.calls for p in self.parties.values()))
    @rule(target=messages, pick=st.integers(0, 63), ok=st.booleans())
    def answer(self, pick: int, ok: bool) -> Any:
        """The payee's application handler finishes, with a response or an error."""
        calls = [(p.name, pid) for p in self.parties.values() for pid in sorted(p.calls)]
        self._answer(*calls[pick % len(calls)], ok)
        return self._flush()

    def _answer(self, name: str, pid: str, ok: bool) -> None:
        p = self.parties[name]
        del p.calls[pid]
        error = None if ok else HandlerError("the handler failed").to_wire()
        inp = ActionHandlerDone(pid, "done" if ok else None, error)
        if any(x == pid for x, _ in p.state.serving):
            self._command(name, inp, None)
        else:  # the period was settled meanwhile: nothing is being served under this id
            self._command(name, inp, LocalProtocolError)

    @rule(name=st.sampled_from(NAMES))
    def crash(self, name: str) -> None:
        """Kill a party: it comes back from its store and loses the handler calls in progress.
        What they were serving runs again when the payer re-sends (after a sync)."""
        p = self.parties[name]
        p.calls.clear()
        restored = load(p.store)
        assert restored == p.state, "the store does not hold the last state"
        p.state = restored

    @rule(name=st.sampled_from(NAMES))
    def back_up(self, name: str) -> None:
        """An operator copies a party's store (with its application's payment log)."""
        p = self.parties[name]
        p.backups.append(Backup(p.store, dict(p.results), list(p.tasks), set(p.served),
                                set(p.outcomes)))

    @precondition(lambda self: any(p.honest and p.backups for p in self.parties.values()))
    @rule(target=messages, pick=st.integers(0, 63))
    def restore_old_backup(self, pick: int) -> Any:
        """An honest party loses its store and comes back from an old copy, after an outage
        long enough that nothing it sent since is still on the wire. On restart its watcher
        reads the ledger and it syncs; it closes nothing before the peer's answer has told it
        its own latest voucher (DESIGN §4)."""
        restorable = [p for p in self.parties.values() if p.honest and p.backups]
        p = restorable[pick % len(restorable)]
        b = p.backups[pick % len(p.backups)]
        p.state = load(b.store)
        p.store = b.store
        p.results, p.tasks = dict(b.results), list(b.tasks)
        p.served, p.outcomes = set(b.served), set(b.outcomes)
        p.calls.clear()
        p.high.clear()
        self.dead.update(m.serial for m in self._in_flight() if m.sender == p.name)
        # Colliding vouchers and replies from a forgotten past are expected now.
        self.misled.update(NAMES)
        assert self.record is not None
        self.behind[p.name].clear()
        self._input(p.name, LedgerUpdate(self.record))
        p.restored_periods.add(p.state.period)
        p.amnesiac_since = self.serial
        p.amnesiac_period = p.state.period
        self._command(p.name, ActionSync(), None)
        return self._flush()

    def _in_flight(self) -> list[InFlight]:
        return [self.names_to_values[ref.name] for ref in self.bundle("messages")]

    @rule(target=messages, name=st.sampled_from(NAMES))
    def sync(self, name: str) -> Any:
        """A (re)connect: the party tells what it holds and re-sends its unanswered payments."""
        self._command(name, ActionSync(), None)
        return self._flush()

    @rule(target=messages, name=st.sampled_from(NAMES), amount=st.integers(1, 20))
    def deposit(self, name: str, amount: int) -> Any:
        s = self.parties[name].state
        refusal: type[PaychanError] | None = None
        if s.phase is not Phase.OPEN:
            refusal = LocalProtocolError
        elif s.mutual is not None or s.ledger_close is not None:
            refusal = NotAllowedAtState
        self._command(name, ActionDeposit(amount), refusal)
        return self._flush()

    @precondition(lambda self: self.pays_this_period >= 2)
    @rule(target=messages, name=st.sampled_from(NAMES), solo=st.booleans(),
          force=st.booleans())
    def close(self, name: str, solo: bool, force: bool) -> Any:
        """A mutual close (a proposal the peer co-signs), or a solo close on the ledger. Only
        once the period has seen some business, so that most periods have something to close."""
        if solo and self.parties[name].amnesiac:
            # Restored from an old copy: it learns what it signed before it declares it alone;
            # a mutual close is safe, the peer co-signs no figures below what it holds.
            return self._flush()
        s = self.parties[name].state
        refusal: type[PaychanError] | None = None
        if s.phase not in (Phase.OPEN, Phase.CLOSING):
            refusal = LocalProtocolError
        elif solo and s.ledger_close is not None:
            refusal = NotAllowedAtState
        elif solo and s.outgoing and not force:
            refusal = NotAllowedAtState  # answers in flight may carry refunds
        elif not solo and s.mutual is None and (s.outgoing or s.serving or s.credit):
            # Figures signed now could charge for a call that has not finished.
            refusal = NotAllowedAtState
        self._command(name, ActionCloseSolo(force) if solo else ActionCloseMutual(), refusal)
        return self._flush()

    # --- time and the watchers ---------------------------------------------------------------

    @rule(target=messages, seconds=st.integers(1, 30))
    def advance_time(self, seconds: int) -> Any:
        """The clock moves on. An honest watcher is online: what it has to submit lands
        before the dispute window can close on it."""
        for p in self.parties.values():
            if p.honest:
                self._catch_up(p.name)
        self._drain()
        while due := self._due_tasks(honest_only=True):
            self._land(*due[0])
        self.now += seconds
        return self._flush()

    @precondition(lambda self: any(self.behind.values()))
    @rule(target=messages, name=st.sampled_from(NAMES))
    def watcher_catches_up(self, name: str) -> Any:
        """A lagging watcher sees the deposits it missed."""
        self._catch_up(name)
        self._drain()
        return self._flush()

    @precondition(lambda self: self._due_tasks())
    @rule(target=messages, pick=st.integers(0, 63))
    def settle(self, pick: int) -> Any:
        """A watcher's confirm lands (any party's, in any order) once not_before has passed."""
        due = self._due_tasks()
        self._land(*due[pick % len(due)])
        return self._flush()

    # --- the network -------------------------------------------------------------------------

    def _deliver(self, msg: InFlight) -> ChannelState:
        p = self.parties[msg.recipient]
        if msg.serial in self.dead:
            return p.state
        decoded = wire.decode(msg.data)
        known = p.results.get(decoded.payment_id) if isinstance(decoded, Pay) else None
        period = p.state.period
        effects = self._input(msg.recipient, channel.receive(decoded, known))
        if (isinstance(decoded, Sync) and p.amnesiac_since is not None
                and msg.serial > p.amnesiac_since and not msg.forged and not msg.from_amnesiac):
            # The peer told it what it holds of ours, after the restore, from a copy that was
            # not restored itself (README, Recovery: a peer restored too may have forgotten).
            p.amnesiac_since = None
        if msg.forged:
            self.misled.add(msg.recipient)
        elif period_of(decoded) == period and msg.recipient not in self.misled:
            # Both parties run the protocol: nothing one sends for the current period is
            # something the protocol forbids (unless the recipient was misled before).
            invalid = [e for e in effects if isinstance(e, InvalidInput)]
            assert not invalid, f"{msg!r} from a correct peer was invalid: {invalid}"
        return p.state

    @rule(target=messages, msg=consumes(messages))
    def deliver(self, msg: InFlight) -> Any:
        self._deliver(msg)
        return self._flush()

    @rule(target=messages, msg=consumes(messages), ok=st.booleans())
    def deliver_and_answer(self, msg: InFlight, ok: bool) -> Any:
        """The common case, a fast handler: deliver, and answer at once any call it starts."""
        p = self.parties[msg.recipient]
        before = set(p.calls)
        self._deliver(msg)
        for pid in sorted(set(p.calls) - before):
            self._answer(msg.recipient, pid, ok)
        return self._flush()

    @rule(target=messages, msg=messages)
    def redeliver(self, msg: InFlight) -> Any:
        """A duplicate (the original stays in flight). Twice in a row, the second changes
        nothing."""
        after = self._deliver(msg)
        assert self._deliver(msg) == after, f"a duplicate of {msg!r} changed the state"
        return self._flush()

    @rule(msg=consumes(messages))
    def drop(self, msg: InFlight) -> None:
        pass

    @rule(target=messages, msg=consumes(messages),
          flips=st.lists(st.tuples(st.integers(0, 2**16), st.integers(1, 255)), min_size=1,
                         max_size=3))
    def tamper(self, msg: InFlight, flips: list[tuple[int, int]]) -> Any:
        """Corrupted bytes: a DecodeError, or a message the recipient answers with a defined
        refusal or takes if it is still valid; never a crash or a broken state."""
        if msg.serial in self.dead:
            return self._flush()
        data = bytearray(msg.data)
        for pos, mask in flips:
            data[pos % len(data)] ^= mask
        try:
            decoded = wire.decode(bytes(data))
        except DecodeError:
            return self._flush()
        p = self.parties[msg.recipient]
        known = p.results.get(decoded.payment_id) if isinstance(decoded, Pay) else None
        # Unsigned fields (payment_id, amount) may have changed: the recipient was misled.
        self.misled.add(msg.recipient)
        self._input(msg.recipient, channel.receive(decoded, known))
        return self._flush()

    # --- cheating ------------------------------------------------------------------------------

    def _cheater_may_close(self) -> bool:
        return (self.record is not None and self.record.status is Status.OPEN
                and any(not p.honest and p.state.my_sent > 0 for p in self.parties.values()))

    @precondition(lambda self: self._cheater_may_close())
    @rule(target=messages, pick=st.integers(0, 63), cut=st.integers(0, 2**20),
          show_voucher=st.booleans())
    def cheater_stale_close(self, pick: int, cut: int, show_voucher: bool) -> Any:
        """A cheater closes alone declaring less than it signed. If the peer holds a voucher
        above the declared figure, the peer's watcher must prove fraud at once."""
        cheaters = [p for p in self.parties.values() if not p.honest and p.state.my_sent > 0]
        cheater = cheaters[pick % len(cheaters)]
        victim = self.parties[self._other(cheater.name)]
        rec = self.record
        assert rec is not None
        declared = cut % cheater.state.my_sent
        shown = cheater.state.peer_voucher if show_voucher else None
        try:
            new = contract.close_solo(rec, cheater.public, rec.period, declared, shown, self.now)
        except PaychanError:
            assert self.record == rec
            return self._flush()
        provable = victim.state.peer_sent > declared
        if victim.honest and provable:
            self.provable_stale[rec.period] = victim.name
        self._ledger_changed(cheater.name, new, "close_solo", (), 0, None)
        self._drain()
        if provable:
            assert self.record is not None and self.record.period == rec.period + 1, (
                "the stale close was not punished at once")
        return self._flush()

    def _send_forged(self, cheater: Party, msg: Msg) -> None:
        self.serial += 1
        self.outbox.append(InFlight(self.serial, cheater.name, self._other(cheater.name),
                                    wire.encode(msg), forged=True))

    @precondition(lambda self: any(not p.honest for p in self.parties.values()))
    @rule(target=messages, pick=st.integers(0, 63), nonce_step=st.integers(-1, 2),
          sent_step=st.integers(-3, 0), amount=st.integers(0, 5), in_sync=st.booleans())
    def cheater_forges_voucher(self, pick: int, nonce_step: int, sent_step: int, amount: int,
                               in_sync: bool) -> Any:
        """A cheater signs a voucher outside the protocol (a reused, older or skipped nonce;
        the same or a lower sent) and sends it in a payment or a sync. Never a higher sent:
        that only gives money away, and the cheater's own machine, which learns its vouchers
        back in a sync, would then believe it spent more than it can cover."""
        cheaters = [p for p in self.parties.values() if not p.honest]
        cheater = cheaters[pick % len(cheaters)]
        s = cheater.state
        v = Voucher.create(cheater.key, s.channel_id, s.period, max(1, s.my_nonce + nonce_step),
                           max(0, s.my_sent + sent_step))
        self.payments += 1
        self._send_forged(cheater, Sync(s.channel_id, s.period, v, s.peer_voucher, False)
                          if in_sync else Pay(s.channel_id, f"X{self.payments}", v, amount,
                                              "forged"))
        return self._flush()

    @precondition(lambda self: any(not p.honest for p in self.parties.values()))
    @rule(target=messages, pick=st.integers(0, 63), less_mine=st.integers(0, 5),
          more_peers=st.integers(0, 5))
    def cheater_proposes_unfair_close(self, pick: int, less_mine: int, more_peers: int) -> Any:
        """A cheater proposes a mutual close that under-counts what it sent or over-counts
        what it received: an honest peer must refuse what pays it less than it holds."""
        cheaters = [p for p in self.parties.values() if not p.honest]
        cheater = cheaters[pick % len(cheaters)]
        s = cheater.state
        si, sr = s.sent_pair(max(0, s.my_sent - less_mine), s.peer_sent + more_peers)
        sig = wire.sign_close(cheater.key, s.channel_id, s.period, si, sr)
        self._send_forged(cheater, CloseProposal(s.channel_id, s.period, si, sr, sig))
        return self._flush()

    @precondition(lambda self: self.record is not None and self.record.close is not None)
    @rule(as_delegate=st.booleans())
    def closer_proves_fraud_on_itself(self, as_delegate: bool) -> None:
        """The closer signs a voucher above what it declared and submits it as a fraud proof:
        only the non-closer (or its delegate) may prove fraud (Obyte's fault), so it must be
        Unauthorized, also when the closer first names itself as its own side's delegate."""
        rec = self.record
        assert rec is not None and rec.close is not None
        closer = next(p for p in self.parties.values() if p.public == rec.close.closer)
        voucher = Voucher.create(closer.key, rec.channel_id, rec.period, 2**40,
                                 rec.close.declared_sent_closer + 1)
        target = contract.set_delegate(rec, closer.public, closer.public) if as_delegate else rec
        try:
            contract.fraud_proof(target, closer.public, rec.period, voucher)
        except Unauthorized:
            assert self.record == rec
        else:
            raise AssertionError("the closer proved fraud against itself")

    def _closing_with(self, closer_honest: bool | None, non_closer_cheats: bool) -> bool:
        rec = self.record
        if rec is None or rec.close is None:
            return False
        closer = next(p for p in self.parties.values() if p.public == rec.close.closer)
        non_closer = self.parties[self._other(closer.name)]
        return (closer_honest is None or closer.honest == closer_honest) and (
            not non_closer_cheats or not non_closer.honest)

    @precondition(lambda self: self._closing_with(closer_honest=True, non_closer_cheats=True))
    @rule()
    def cheater_false_fraud_proof(self) -> None:
        """A cheating non-closer submits the best voucher of an honest closer it holds: the
        closer declared all it signed, so the proof must be refused."""
        rec = self.record
        assert rec is not None and rec.close is not None
        closer = next(p for p in self.parties.values() if p.public == rec.close.closer)
        cheater = self.parties[self._other(closer.name)]
        voucher = cheater.state.peer_voucher
        if voucher is None or voucher.period != rec.period:
            return
        try:
            contract.fraud_proof(rec, cheater.public, rec.period, voucher)
        except ValueTooLow:
            assert self.record == rec
        else:
            raise AssertionError("a false fraud proof against an honest closer landed")

    @precondition(lambda self: any(not p.honest and p.tasks for p in self.parties.values()))
    @rule(pick=st.integers(0, 63))
    def cheater_withholds(self, pick: int) -> None:
        """A cheater's watcher drops a confirm it should submit."""
        tasks = [(p, t) for p in self.parties.values() if not p.honest for t in p.tasks]
        p, task = tasks[pick % len(tasks)]
        p.tasks.remove(task)

    @precondition(lambda self: self._closing_with(closer_honest=None, non_closer_cheats=True))
    @rule(target=messages)
    def cheater_lowball_confirm(self) -> Any:
        """A cheating non-closer confirms at once without admitting what it sent beyond the
        voucher the closer showed."""
        rec = self.record
        assert rec is not None and rec.close is not None
        cheater = next(p for p in self.parties.values() if p.public != rec.close.closer)
        self._submit(cheater.name, SubmitConfirm(rec.period, 0, 0))
        self._drain()
        return self._flush()

    # --- invariants ----------------------------------------------------------------------------

    @invariant()
    def money_is_conserved(self) -> None:
        if self.record is None:
            return
        assert self.paid_out + self.record.total == self.deposited
        assert sum(self.accounts.values()) + self.record.total == MINTED * len(NAMES)

    @invariant()
    def parties_are_consistent(self) -> None:
        for p in self.parties.values():
            channel.check_invariants(p.state)
            assert load(p.store) == p.state, f"{p.name}'s store lags its state"
            if self.record is not None and not self.behind[p.name]:
                # The watcher has seen every ledger change.
                rec, s = self.record, p.state
                assert s.period == rec.period
                assert (s.deposit_me, s.deposit_peer) == (rec.deposit_of(p.public),
                                                          rec.deposit_of(s.peer))

    @invariant()
    def vouchers_never_go_back(self) -> None:
        """Within a period, the latest voucher a party signed and the latest it holds from its
        peer never decrease (nonce nor sent). A cheater's own latest is not checked: the vouchers
        it forges outside the protocol may come back to it in a sync."""
        for p in self.parties.values():
            s = p.state
            for kind, v in (("mine", s.my_voucher), ("peer", s.peer_voucher)):
                if kind == "mine" and not p.honest:
                    continue
                mark = p.high.get(kind)
                if mark is not None and mark[0] == s.period:
                    assert v is not None and v.nonce >= mark[1] and v.sent >= mark[2], (
                        f"{p.name}'s {kind} voucher went back from {mark} to {v}")
                if v is not None:
                    p.high[kind] = (v.period, v.nonce, v.sent)
                elif mark is not None and mark[0] != s.period:
                    del p.high[kind]


TestChannelFuzz = ChannelMachine.TestCase
TestChannelFuzz.settings = settings(
    stateful_step_count=STEPS,
    max_examples=max(MIN_EXAMPLES, settings.default.max_examples))  # the profile's, if higher
