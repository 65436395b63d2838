"""The channel actor: sole owner of one channel's state; steps the machine, commits, then acts."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from paychan.actors.inline import InlineActor
from paychan.protocol import channel as machine
from paychan.protocol.channel import ChannelState, LedgerUpdate, ReceivePay
from paychan.protocol.errors import InternalError, NotFound, PaychanError
from paychan.protocol.identity import encode_channel_id
from paychan.protocol.wire import PayResult, decode, encode
from paychan.storage.errors import ChainBroken
from paychan.storage.keys import pack, unpack
from paychan.storage.writer import Chain, Delete, Put

if TYPE_CHECKING:
    from paychan.actors.node import NodeCore

CHANNELS, RESULTS, OUTCOMES, TASKS = "channels", "results", "outcomes", "tasks"


def answer(reply: Future[Any] | None, error: BaseException) -> None:
    """Fail a caller's future unless it was answered meanwhile (by another thread)."""
    if reply is not None:
        with contextlib.suppress(InvalidStateError):
            if not reply.done():
                reply.set_exception(error)


def resolve(reply: Future[Any] | None, value: Any) -> None:
    """Answer a caller's future unless it was answered meanwhile (by another thread)."""
    if reply is not None:
        with contextlib.suppress(InvalidStateError):
            if not reply.done():
                reply.set_result(value)


@dataclass
class Cmd:
    """One input for a channel actor, with an optional future for whoever waits on it."""

    inp: Any
    reply: Future[Any] | None = None
    height: int = 0  # for a LedgerUpdate: the ledger height it comes from
    errors_only: bool = False  # the reply future waits for something else; only fail it
    fresh: bool = False  # a pay whose payment_id was just made up: it has no stored outcome

    def fail(self, exc: BaseException) -> None:
        answer(self.reply, exc)

    def succeed(self, value: Any) -> None:
        if not self.errors_only:
            resolve(self.reply, value)


@dataclass
class Start:
    """A new channel: its first state and the effects of creating it."""

    state: ChannelState
    effects: list[Any]
    reply: Future[Any] | None = None


def payment_key(channel_id: bytes, payment_id: str) -> bytes:
    return channel_id + payment_id.encode("utf-8")


def load_record(core: NodeCore, channel_id: bytes,
                latest: bool = False) -> tuple[ChannelState, int] | None:
    """(state, ledger height applied) as committed, or None for an unknown channel. With
    `latest`, as the channel's actor last decided it, even if not yet durable."""
    raw = (core.store.get_latest(CHANNELS, channel_id) if latest
           else core.store.get(CHANNELS, channel_id))
    if raw is None:
        return None
    obj = unpack(raw)
    return ChannelState.from_obj(obj[0]), int(obj[1])


_SUBMITS = (machine.SubmitCreate, machine.SubmitDeposit, machine.SubmitCloseMutual,
            machine.SubmitCloseSolo, machine.SubmitConfirm, machine.SubmitFraudProof)


def task_ops(channel_id: bytes, effects: list[Any]) -> list[Any]:
    """Watcher tasks for Submit* effects, written in the same commit as the state."""
    ops = []
    for eff in effects:
        if not isinstance(eff, _SUBMITS):
            continue
        tx = submit_tx(channel_id, eff)
        if tx is not None:
            kind, body, not_before = tx
            txid = os.urandom(16)  # the ledger dedupes by txid, so a retried task is harmless
            key = channel_id + txid
            ops.append(Put(TASKS, key, pack({"kind": kind, "body": body, "txid": txid,
                                             "not_before": not_before, "period": body.get(
                                                 "period", 1), "channel_id": channel_id})))
    return ops


def submit_tx(cid: bytes, eff: Any) -> tuple[str, dict[str, Any], int] | None:
    """(transaction kind, body, not_before) for a Submit* effect."""
    if isinstance(eff, machine.SubmitCreate):
        return "create", {"params": eff.params.to_obj(), "deposit": eff.deposit}, 0
    if isinstance(eff, machine.SubmitDeposit):
        return "deposit", {"channel_id": cid, "period": eff.period, "amount": eff.amount}, 0
    if isinstance(eff, machine.SubmitCloseMutual):
        return "close_mutual", {"channel_id": cid, "period": eff.period,
                                "sent_initiator": eff.sent_initiator,
                                "sent_responder": eff.sent_responder,
                                "sig_initiator": eff.sig_initiator,
                                "sig_responder": eff.sig_responder}, 0
    if isinstance(eff, machine.SubmitCloseSolo):
        return "close_solo", {"channel_id": cid, "period": eff.period,
                              "declared_sent_self": eff.declared_sent_self,
                              "peer_voucher": None if eff.peer_voucher is None
                              else eff.peer_voucher.to_obj()}, 0
    if isinstance(eff, machine.SubmitConfirm):
        return "confirm", {"channel_id": cid, "period": eff.period,
                           "additional_sent": eff.additional_sent}, eff.not_before
    if isinstance(eff, machine.SubmitFraudProof):
        return "fraud_proof", {"channel_id": cid, "period": eff.period,
                               "voucher": eff.voucher.to_obj()}, 0
    return None


class ChannelLog(logging.LoggerAdapter):
    """Every line names its channel, whatever the handler's format."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        assert self.extra is not None
        return f"{self.extra['channel']}: {msg}", kwargs


class _CommitFailed(Exception):
    """Told to the actor when one of its commits failed: its memory is ahead of the store."""


class ChannelActor(InlineActor):
    """Runs the pure machine for one channel. Write-ahead: commit, then emit effects.

    The actor does not wait for its commits: it goes on with its next message while the
    writer makes the last one durable, and the effects of each step (sends, answers to
    callers, handler calls) are emitted only once its commit is durable, in order. Its
    commits form one `Chain`: if one fails, none after it lands, and the actor restarts from
    the store."""

    def __init__(self, core: NodeCore, channel_id: bytes) -> None:
        super().__init__()
        self.core = core
        self.channel_id = channel_id
        name = encode_channel_id(channel_id)
        self.log = ChannelLog(logging.getLogger("paychan.channel"), {"channel": name})
        self.state: ChannelState | None = None
        self.height = 0
        self._current: Cmd | Start | None = None  # the message being handled
        self._chain: Chain = core.chain_for(channel_id)
        # Commits land in order; their effects are emitted in order too. `_last` is this
        # actor's latest commit, `_settled` the latest whose effects were emitted (or that
        # failed), `_followers` what waits for a commit to settle, `_broken` the first failure.
        self._emit_lock = threading.Lock()
        self._last: Future[Any] | None = None
        self._settled: Future[Any] | None = None
        self._followers: list[tuple[Future[Any], Callable[[], None], Cmd | Start | None]] = []
        self._broken: BaseException | None = None

    def on_start(self) -> None:
        # A (re)start always rebuilds from storage, never from another actor's memory: what
        # a predecessor decided is in the store or about to be (Store.get_latest), and
        # nothing is emitted before that is durable too.
        record = load_record(self.core, self.channel_id, latest=True)
        if record is not None:
            self.state, self.height = record
        # The predecessor's chain, unless it broke: a write built on its pending state must
        # not land if that state does not.
        barrier = self.core.store.writer.submit([], chain=self._chain)
        self._last = barrier
        barrier.add_done_callback(lambda f: self._landed(f, None, [], None, None))

    def on_stop(self) -> None:
        # Asked to stop (idle, evicted, node stopping): what queued behind the stop goes to a
        # successor, in order, before anything sent later.
        self.core.supervisor.handover(self.channel_id, self.actor_ref, self._drain())

    def on_dead_letter(self, message: Any) -> None:
        # Told after this actor stopped (e.g. by the idle reaper): its successor takes it.
        if isinstance(message, (Cmd, Start)):
            try:
                self.core.supervisor.tell(self.channel_id, message)
            except PaychanError as exc:
                answer(message.reply, exc)

    def on_failure(self, exception_type: Any, exception_value: Any, traceback: Any) -> None:
        # The supervisor counts the failure and forgets this actor before the caller hears of
        # it, so the caller's next command already goes to a successor rebuilt from storage.
        queued = self._drain()
        current = self._current
        if isinstance(exception_value, ChainBroken) and current is not None:
            # Refused before it changed anything, only because an earlier commit failed: the
            # successor, rebuilt from the store, takes it like the ones queued behind it.
            queued.insert(0, current)
            current = None
        self.core.supervisor.failed(self.channel_id, self.actor_ref, exception_value, queued)
        reply = current.reply if current is not None else None
        answer(reply, exception_value if isinstance(exception_value, PaychanError) else (
            InternalError(f"channel actor failed: {exception_value!r}; it restarts from "
                          "storage")))

    def _drain(self) -> list[Cmd | Start]:
        """What is still queued here. pykka would drop it with the failed actor (told messages
        get no error), losing a caller's command, a peer's message or a ledger event."""
        left: list[Cmd | Start] = []
        others: list[Any] = []
        while not self.actor_inbox.empty():  # this thread is the inbox's only reader
            envelope = self.actor_inbox.get()
            if isinstance(envelope.message, (Cmd, Start)):
                left.append(envelope.message)
            else:
                others.append(envelope)
        for envelope in others:  # a stop request: pykka answers it when the actor is gone
            self.actor_inbox.put(envelope)
        return left

    def _handle_receive(self, message: Any) -> Any:
        # Commands are nearly every message: skip pykka's look for proxy calls and stops.
        if type(message) is Cmd:
            return self.on_receive(message)
        return super()._handle_receive(message)

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, _CommitFailed):
            raise message
        if isinstance(message, (Start, Cmd)):
            # Kept only while it is handled: on_failure answers this one, not one whose commit
            # is still landing (that one is answered by its commit).
            self._current = message
            if isinstance(message, Start):
                self._start(message)
            else:
                self._handle(message)
            self._current = None
        return None

    def _start(self, msg: Start) -> None:
        if self.state is not None:
            answer(msg.reply, PaychanError("channel already exists"))
            return
        self._commit_and_emit(None, msg.state, msg.effects, self.height, msg, msg.state)

    def _handle(self, cmd: Cmd) -> None:
        state = self.state
        if state is None:
            cmd.fail(NotFound("no such channel"))
            return
        inp = cmd.inp
        height = self.height
        if isinstance(inp, LedgerUpdate):
            event_height = cmd.height
            if event_height and event_height <= self.height:
                self._when_durable(lambda: cmd.succeed(state), cmd)
                return  # replayed event we already applied
            height = max(height, event_height)
        if isinstance(inp, machine.ActionPay) and not cmd.fresh:
            done = outcome_of(self.core, self.channel_id, inp.payment_id, latest=True)
            if done is not None:
                # A retry whose answer was committed after the caller looked for it: the machine
                # no longer lists the payment as outgoing and would sign it again.
                notify = [machine.NotifyPayOutcome(inp.payment_id, done["response"],
                                                   done["error"], bool(done.get("refunded")))]
                self._when_durable(lambda: self._emit(state, notify, cmd, state), cmd)
                return
        if isinstance(inp, ReceivePay) and inp.known_result is None:
            raw = self.core.store.get_latest(RESULTS,
                                             payment_key(self.channel_id, inp.msg.payment_id))
            if raw is not None:
                known = decode(raw)
                assert isinstance(known, PayResult)
                inp = ReceivePay(inp.msg, known)
        try:
            new, effects = machine.step(state, inp, self.core.ledger_now(), self.core.identity)
        except PaychanError as exc:
            self.log.debug("refused %s: %s", type(inp).__name__, exc)
            cmd.fail(exc)
            return
        # Any other exception is a bug: the actor dies, on_failure answers the caller and the
        # supervisor restarts the channel from storage.
        self._commit_and_emit(state, new, effects, height, cmd, new)

    def _commit_and_emit(self, old: ChannelState | None, new: ChannelState, effects: list[Any],
                         height: int, msg: Cmd | Start, value: Any) -> None:
        cid = self.channel_id
        ops: list[Any] = []
        # The machine returns the very same state when nothing changed (comparing whole
        # states would cost more than the write it saves).
        if new is not old or height != self.height:
            ops.append(Put(CHANNELS, cid, pack([new.to_obj(), height])))
        for eff in effects:
            if isinstance(eff, machine.RecordResult):
                ops.append(Put(RESULTS, payment_key(cid, eff.result.payment_id),
                               encode(eff.result)))
            elif isinstance(eff, machine.NotifyPayOutcome):
                ops.append(Put(OUTCOMES, payment_key(cid, eff.payment_id),
                               pack({"response": eff.response, "error": eff.error,
                                     "refunded": eff.refunded})))
        ops += task_ops(cid, effects)
        if not ops:
            self.state, self.height = new, height
            self._when_durable(lambda: self._emit(new, effects, msg, value), msg)
            return
        writer = self.core.store.writer
        loop = asyncio._get_running_loop()
        # On one of the node's transport loops the commits are written by that loop at the end
        # of its turn (see Writer.submit); on an application's loop, by the writer thread.
        fut = writer.submit(ops, chain=self._chain, loop=loop, helping=loop is None)
        try:
            self.state, self.height = new, height
            with self._emit_lock:
                self._last = fut
            # Durable before anything leaves the process: effects wait for the commit.
            fut.add_done_callback(lambda f: self._landed(f, new, effects, msg, value))
        finally:
            if loop is None:
                writer.help()  # not on an event loop: this thread may write the batch itself

    def _when_durable(self, fn: Callable[[], None], msg: Cmd | Start | None) -> None:
        """Run `fn` once every commit this actor made so far is durable and its effects were
        emitted (a done future is not enough: its callbacks may still be running)."""
        with self._emit_lock:
            last = self._last
            if last is not None and last is not self._settled:
                self._followers.append((last, fn, msg))
                return
            broken = self._broken
        if broken is None:
            fn()
        else:
            self._refused(msg, broken)

    def _landed(self, fut: Future[Any], state: ChannelState | None, effects: list[Any],
                msg: Cmd | Start | None, value: Any) -> None:
        """A commit of ours is durable, or failed: emit its effects, or restart. On whichever
        thread wrote it; commits land, and so come here, in the order they were made."""
        exc = fut.exception()
        if exc is None:
            if state is not None:
                self._emit(state, effects, msg, value)
        else:
            with self._emit_lock:
                first, self._broken = self._broken is None, self._broken or exc
            if first:
                self.log.error("commit failed, restarting from the store: %r", exc)
                try:
                    # Ahead of what _refused passes on, so that it reaches the successor.
                    self.actor_ref.tell(_CommitFailed(repr(exc)))
                except Exception:
                    pass  # already stopped: its successor reads the store
            self._refused(msg, exc)
        while True:
            # Settled only once nothing waits for it any more: a step that arrives while the
            # waiting ones run waits too, and so keeps its place after them.
            with self._emit_lock:
                ready = [f for f in self._followers if f[0] is fut]
                if not ready:
                    self._settled = fut
                    return
                self._followers = [f for f in self._followers if f[0] is not fut]
            for _, fn, waiting in ready:
                if exc is None:
                    fn()
                else:
                    self._refused(waiting, exc)

    def _refused(self, msg: Cmd | Start | None, exc: BaseException) -> None:
        """`msg` was handled, but its commit (or an earlier one) failed. One refused only
        because an earlier commit failed, or one nobody waits for (a peer's message, a ledger
        event), goes to the successor rebuilt from the store; a caller hears of the failure."""
        if msg is None:
            return
        if isinstance(exc, ChainBroken) or msg.reply is None:
            try:
                self.core.supervisor.tell(self.channel_id, msg)
                return
            except PaychanError as err:
                exc = err
        answer(msg.reply, exc)

    def _emit(self, state: ChannelState, effects: list[Any], msg: Cmd | Start | None,
              value: Any) -> None:
        reply = msg.reply if msg is not None else None
        try:
            self.core.after_commit(self.channel_id, state, effects)
        except Exception as exc:
            self.log.exception("emitting effects failed")
            answer(reply, InternalError(f"effects failed: {exc!r}"))
            return
        if not (isinstance(msg, Cmd) and msg.errors_only):
            resolve(reply, value)


def outcome_of(core: NodeCore, channel_id: bytes, payment_id: str,
               latest: bool = False) -> dict[str, Any] | None:
    key = payment_key(channel_id, payment_id)
    raw = core.store.get_latest(OUTCOMES, key) if latest else core.store.get(OUTCOMES, key)
    return None if raw is None else unpack(raw)


def delete_task(key: bytes) -> Delete:
    return Delete(TASKS, key)
