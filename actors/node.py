"""The node root: owns store, supervisor, transport, ledger client and watcher; routes messages."""
from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from paychan.actors.channel_actor import (
    CHANNELS,
    Cmd,
    Start,
    load_record,
    outcome_of,
)
from paychan.actors.envelope import Sealer
from paychan.actors.loopback import LoopbackNetwork, default_network
from paychan.actors.supervisor import Supervisor
from paychan.actors.transport import LoopbackTransport, OwnLoop, Routes, Transport
from paychan.actors.watcher import Watcher
from paychan.protocol import channel as machine
from paychan.protocol.channel import ChannelState, LedgerUpdate, Phase
from paychan.protocol.contract import ChannelRecord
from paychan.protocol.errors import (
    Conflict,
    HandlerError,
    NotAllowedAtState,
    NotFound,
    PaychanError,
    Rejected,
    Unauthorized,
    from_wire,
)
from paychan.protocol.identity import Identity, encode_address, encode_channel_id
from paychan.protocol.wire import OpenPropose, decode, encode
from paychan.storage.env import Store
from paychan.storage.future import LightFuture
from paychan.storage.keys import pack, unpack
from paychan.storage.writer import Chain, Put

log = logging.getLogger("paychan.node")
payments_log = logging.getLogger("paychan.payments")

KV = "kv"
UNHEARD_KEPT = 256  # per event name, for a callback registered after the event
HANDLER_ERROR_CHARS = 2000  # of a failed handler's exception, told to the payer
FREQUENT_EVENTS = frozenset({"payment_received"})
_REPLAY: dict[str, Any] = {"event": "_replay"}  # wakes the dispatcher for a backlog
_SEED = b"identity_seed"
_HEIGHT = b"ledger_height"


class LedgerClient(Protocol):
    """What a node needs of a ledger: the embedded actor and the remote client both provide it."""

    network_id: str

    def now(self) -> int: ...
    def submit(self, tx_bytes: bytes) -> dict[str, Any]: ...
    def channel(self, channel_id: bytes) -> ChannelRecord | None: ...
    def balance(self, address: bytes, asset: str = "base") -> int: ...
    def events_since(self, height: int, limit: int = 1000) -> list[dict[str, Any]]: ...
    def subscribe(self, listener: Callable[[dict[str, Any]], None]) -> int: ...
    def unsubscribe(self, token: int) -> None: ...
    def on_tick(self, callback: Callable[[int], None]) -> None: ...


@dataclass(frozen=True)
class Payment:
    """What a payment handler receives."""

    amount: int
    asset: str
    message: Any
    peer: str
    channel_id: str
    payment_id: str


def timed_out(payment_id: str, timeout: float) -> PaychanError:
    from paychan.protocol.errors import Timeout
    return Timeout(f"no answer to payment {payment_id} within {timeout} s; retry with the same "
                   "payment_id to finish it")


def result_of(outcome: dict[str, Any]) -> Any:
    """The response of a payment's outcome, or its error raised."""
    if outcome["error"] is None:
        return outcome["response"]
    err = from_wire(outcome["error"])
    if outcome.get("refunded"):
        err = type(err)(f"{err.message} (refunded)")
    raise err


class NodeCore:
    """Wires the parts; the decisions live in the channel machine and the contract."""

    def __init__(self, data_dir: str, ledger: LedgerClient,
                 network: LoopbackNetwork | None = None, max_live_channels: int = 256,
                 idle_seconds: float = 30.0, handler_threads: int = 8,
                 transports: list[Transport | Callable[[NodeCore], Transport]] | None = None,
                 payment_handler: Callable[[Payment], Any] | None = None,
                 handler_grace: float = 5.0) -> None:
        os.makedirs(data_dir, exist_ok=True)
        self.data_dir = data_dir
        self.handler_grace = handler_grace
        self._peers: dict[bytes, bytes] = {}
        self.transports: list[Transport] = []
        self._ledger_token: int | None = None
        self._closed = False
        self.store = Store.open(data_dir)
        try:
            self._start(ledger, network, max_live_channels, idle_seconds, handler_threads,
                        transports, payment_handler)
        except BaseException:
            # E.g. a listen port in use, or no ledger: stop what did start (threads, sockets,
            # the store), so that a failed open leaves nothing behind.
            self.close()
            raise
        log.info("node %s open at %s", self.address, data_dir)

    def _start(self, ledger: LedgerClient, network: LoopbackNetwork | None,
               max_live_channels: int, idle_seconds: float, handler_threads: int,
               transports: list[Transport | Callable[[NodeCore], Transport]] | None,
               payment_handler: Callable[[Payment], Any] | None) -> None:
        self.identity = self._load_identity()
        self.ledger = ledger
        self.sealer = Sealer(self.identity)
        self.payment_handler: Callable[[Payment], Any] | None = payment_handler
        # A quick handler never blocks: it runs where the payment's commit lands (the thread
        # that wrote it, often the transport's loop), not on a handler thread, saving two
        # thread switches per call.
        self.handler_quick = False
        self._chains: dict[bytes, Chain] = {}
        self.handler_set = threading.Event()
        if payment_handler is not None:
            self.handler_set.set()
        self.callbacks: dict[str, list[Callable[[dict[str, Any]], None]]] = {}
        # Events no callback heard yet, newest kept, for the first callback registered later:
        # the recovery below emits events before the application can register for them.
        self._unheard: dict[str, deque[dict[str, Any]]] = {}
        self._replays: list[tuple[Callable[[dict[str, Any]], None], list[dict[str, Any]]]] = []
        self._callbacks_lock = threading.Lock()
        self.waiters: dict[tuple[bytes, str], Future[Any]] = {}
        self.running: set[tuple[bytes, str]] = set()
        self.changed = threading.Condition()
        self._waiting = 0
        self._lock = threading.Lock()
        self._events: queue.Queue[Any] = queue.Queue()
        self.handlers = ThreadPoolExecutor(handler_threads, thread_name_prefix="paychan-handler")
        self.supervisor = Supervisor(self, max_live_channels, idle_seconds)
        self.watcher = Watcher(self)
        self._dispatcher = threading.Thread(target=self._dispatch_events, daemon=True,
                                            name="paychan-events")
        self._dispatcher.start()
        self.routes = Routes(self.store)
        self.network = network or default_network()
        # A factory builds its transport once the identity and store are here.
        self.transports.append(LoopbackTransport(self.network, self.identity.public))
        for item in transports or []:
            self.transports.append(item(self) if callable(item) else item)
        for transport in self.transports:
            info = getattr(transport, "info", None)
            if isinstance(info, dict):
                info.update(address=self.address, network_id=ledger.network_id)
            if hasattr(transport, "on_reconnect"):
                transport.on_reconnect = self.on_peer_back
            transport.start(self.on_envelope)
            if isinstance(transport, OwnLoop) and transport.writes_on_loop:
                # The transport's own loop carries only this node's traffic: it may block for
                # a commit, and writing its commits itself saves two thread switches each.
                self.store.writer.write_on(transport.loop)
        self._ledger_token = ledger.subscribe(self.on_ledger_event)
        ledger.on_tick(self.watcher.kick)
        self._catch_up()
        self._sync_all()

    # -- identity and basics ---------------------------------------------------------------
    def _load_identity(self) -> Identity:
        seed = self.store.get(KV, _SEED)
        if seed is None:
            seed = os.urandom(32)
            self.store.writer.commit([Put(KV, _SEED, seed)])
        return Identity(bytes(seed))

    @property
    def address(self) -> str:
        return encode_address(self.identity.public)

    def chain_for(self, channel_id: bytes) -> Chain:
        """The channel's chain of commits, shared by its successive actors: a successor that
        starts from its predecessor's pending state must fail with it (see writer.Chain)."""
        with self._lock:
            chain = self._chains.get(channel_id)
            if chain is None or chain.broken is not None:
                chain = self._chains[channel_id] = Chain(encode_channel_id(channel_id))
            return chain

    def set_handler(self, handler: Callable[[Payment], Any], quick: bool = False) -> None:
        self.handler_quick = quick
        self.payment_handler = handler
        self.handler_set.set()

    def kv_secret(self, name: bytes, size: int = 16) -> bytes:
        """A random secret kept in the store, the same across restarts (e.g. for pairing)."""
        value = self.store.get(KV, name)
        if value is None:
            value = os.urandom(size)
            self.store.writer.commit([Put(KV, name, value)])
        return bytes(value)

    def ledger_now(self) -> int:
        return int(self.ledger.now())

    # -- channel records -------------------------------------------------------------------
    def state(self, channel_id: bytes) -> ChannelState:
        record = load_record(self, channel_id)
        if record is None:
            raise NotFound(f"no channel {encode_channel_id(channel_id)} on this node")
        return record[0]

    def _peer_of(self, channel_id: bytes) -> bytes | None:
        """The channel's peer (fixed for its life), from memory after the first look."""
        peer = self._peers.get(channel_id)
        if peer is None:
            record = load_record(self, channel_id)
            if record is None:
                return None
            peer = self._peers[channel_id] = record[0].peer
        return peer

    def channel_ids(self) -> list[bytes]:
        return [key for key, _ in self.store.iter_prefix(CHANNELS, b"")]

    def tell(self, channel_id: bytes, inp: Any, reply: Future[Any] | None = None,
             height: int = 0, errors_only: bool = False, fresh: bool = False) -> None:
        if self._closed:
            raise NotAllowedAtState("the node is closed")
        self.supervisor.tell(channel_id, Cmd(inp, reply, height, errors_only, fresh))

    def refuse_blocking(self) -> None:
        """Refuse a blocking call where this node's commits are written: on a transport loop
        that writes them, or on the thread writing a batch (both run quick handlers). It would
        wait for the very commits it holds up."""
        writer = self.store.writer
        if writer.writes_on(asyncio._get_running_loop()) or writer.on_writer_thread():
            raise NotAllowedAtState(
                "a blocking call where the node writes its commits (its transport loop or "
                "storage writer, e.g. in a quick handler) would wait for itself; call it from "
                "another thread (on an event loop, the asyncio twins such as "
                "asend_message_and_pay work)")

    def ask(self, channel_id: bytes, inp: Any, timeout: float = 30.0) -> ChannelState:
        self.refuse_blocking()
        fut: Future[Any] = LightFuture()
        self.tell(channel_id, inp, fut)
        result: ChannelState = fut.result(timeout)
        return result

    def start_channel(self, state: ChannelState, effects: list[Any],
                      timeout: float = 30.0) -> None:
        self.refuse_blocking()
        fut: Future[Any] = LightFuture()
        self.supervisor.start_new(state.channel_id, Start(state, effects, fut))
        fut.result(timeout)

    def wait_for(self, channel_id: bytes, predicate: Callable[[ChannelState], bool],
                 timeout: float) -> ChannelState:
        """Block until the committed state satisfies `predicate`."""
        from paychan.protocol.errors import Timeout
        self.refuse_blocking()
        deadline = time.monotonic() + timeout
        with self.changed:
            self._waiting += 1
            try:
                while True:
                    state = self.state(channel_id)
                    if predicate(state):
                        return state
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise Timeout(f"channel {encode_channel_id(channel_id)} is "
                                      f"{state.phase.value} after {timeout} s")
                    self.changed.wait(min(left, 0.5))
            finally:
                self._waiting -= 1

    # -- effects, after each commit (on the channel actor's thread) ------------------------
    def after_commit(self, cid: bytes, state: ChannelState, effects: list[Any]) -> None:
        for eff in effects:
            if isinstance(eff, machine.Send):
                self.send(state.peer, encode(eff.msg))
            elif isinstance(eff, machine.CallHandler):
                self._run_handler(state, eff)
            elif isinstance(eff, machine.NotifyPayOutcome):
                fut = self.waiters.pop((cid, eff.payment_id), None)
                if fut is not None and not fut.done():
                    fut.set_result({"response": eff.response, "error": eff.error,
                                    "refunded": eff.refunded})
            elif isinstance(eff, machine.NotifyEvent):
                self.emit_event(eff.name, cid, eff.info)
            elif isinstance(eff, machine.RecordResult):
                with self._lock:
                    self.running.discard((cid, eff.result.payment_id))
            elif isinstance(eff, machine.InvalidInput):
                log.warning("%s: peer input refused: %s", encode_channel_id(cid), eff.error)
            elif type(eff).__name__.startswith("Submit"):
                self.watcher.kick()
        if self._waiting:  # only wake waiters there are (it is per commit: keep it cheap)
            with self.changed:
                self.changed.notify_all()

    def send(self, peer: bytes, payload: bytes) -> None:
        route = self.routes.get(peer)
        for transport in self.transports:
            if transport.can_reach(peer, route):
                transport.send(peer, self.sealer.seal(peer, payload), route)
                return
        log.info("no route to %s yet; sync delivers once it is reachable", peer.hex()[:12])

    def _run_handler(self, state: ChannelState, eff: machine.CallHandler) -> None:
        key = (state.channel_id, eff.payment_id)
        with self._lock:
            if key in self.running:
                return  # already running: its result will answer the duplicate too
            self.running.add(key)
        payment = Payment(eff.amount, state.params.asset, eff.message, encode_address(state.peer),
                          encode_channel_id(state.channel_id), eff.payment_id)
        if self.handler_quick and self.handler_set.is_set():
            self._call_handler(state.channel_id, payment)
        else:
            self.handlers.submit(self._call_handler, state.channel_id, payment)

    def forget_running(self, channel_id: bytes) -> None:
        with self._lock:
            self.running = {key for key in self.running if key[0] != channel_id}

    def _call_handler(self, cid: bytes, payment: Payment) -> None:
        # Calls resumed while the node is opening may come before the application has set
        # its handler: wait a little rather than answer them with nothing.
        if not self.handler_set.is_set():
            self.handler_set.wait(self.handler_grace)
        pid = payment.payment_id
        try:
            response = None
            if self.payment_handler is not None:
                response = self.payment_handler(payment)
            # Refuses a response that cannot travel (too large, not msgpack-able).
            done = machine.ActionHandlerDone(pid, response, None)
        except Exception as exc:
            log.info("%s: handler failed for %s, refunding: %r", payment.channel_id, pid, exc)
            # Cut: the peer's decoder refuses an error over MAX_BODY.
            why = f"{type(exc).__name__}: {exc}"[:HANDLER_ERROR_CHARS]
            done = machine.ActionHandlerDone(pid, None, HandlerError(why).to_wire())
        try:
            # Still marked running until the result is committed (after_commit), so a
            # duplicate arriving meanwhile does not run the handler a second time.
            self.tell(cid, done)
        except PaychanError as exc:
            with self._lock:
                self.running.discard((cid, pid))
            log.warning("%s: cannot report a handler result: %s", payment.channel_id, exc)

    # -- events for the application --------------------------------------------------------
    def emit_event(self, name: str, cid: bytes, info: dict[str, Any]) -> None:
        # Per-payment events are many: they log at debug and are kept for a late callback
        # only if someone listens; channel life events log at info and are always kept.
        frequent = name in FREQUENT_EVENTS
        # A line per payment goes to its own logger at debug, so that an application at INFO
        # is not flooded and a daemon can turn those lines on alone (`paychan node run` does).
        logger, level = (payments_log, logging.DEBUG) if frequent else (log, logging.INFO)
        if logger.isEnabledFor(level):
            logger.log(level, "%s: %s %s", encode_channel_id(cid), name,
                       {k: _loggable(v) for k, v in info.items() if k != "body"})
        if frequent and not self.callbacks.get(name):
            return
        self._events.put({"event": name, "channel_id": encode_channel_id(cid), **info})

    def add_callback(self, event: str, callback: Callable[[dict[str, Any]], None]) -> None:
        """The first callback of an event also hears the events of that name that nobody
        heard before it was registered (at most UNHEARD_KEPT, the newest), oldest first."""
        with self._callbacks_lock:
            first = not self.callbacks.get(event)
            self.callbacks.setdefault(event, []).append(callback)
            backlog = list(self._unheard.pop(event, ())) if first else []
            if backlog:
                self._replays.append((callback, backlog))
        if backlog:
            self._events.put(_REPLAY)

    def _dispatch_events(self) -> None:
        # Application callbacks run here, never on an actor thread, so they may call the API.
        while True:
            item = self._events.get()
            if item is None:
                return
            # Backlogs are older than `item`: taken in the same locked step, they go first.
            with self._callbacks_lock:
                replays, self._replays = self._replays, []
                callbacks = [] if item is _REPLAY else list(self.callbacks.get(item["event"], ()))
                if item is not _REPLAY and not callbacks:
                    self._unheard.setdefault(item["event"], deque(maxlen=UNHEARD_KEPT)).append(
                        item)
            for callback, backlog in replays:
                for old in backlog:
                    self._call_back(callback, old)
            for callback in callbacks:
                self._call_back(callback, item)

    @staticmethod
    def _call_back(callback: Callable[[dict[str, Any]], None], item: dict[str, Any]) -> None:
        try:
            callback(item)
        except Exception:
            log.exception("event callback for %s failed", item["event"])

    # -- inbound ---------------------------------------------------------------------------
    def on_envelope(self, envelope: bytes,
                    route: dict[str, Any] | None = None) -> PaychanError | None:
        """Called on a transport's thread: decode, check the sender, hand to the actor.
        `route` says how to answer the sender; it is learned only once the envelope opened.
        Returns the reason an envelope was refused, for transports that answer their caller."""
        try:
            sender, payload = self.sealer.open(envelope)
            msg = decode(payload)
        except PaychanError as exc:
            log.warning("envelope refused: %s", exc)
            return exc
        cid = msg.channel_id
        peer = self._peer_of(cid)
        if peer is None:
            if isinstance(msg, OpenPropose) and msg.params.initiator == sender:
                if route is not None:
                    self.routes.learn(sender, route)
                return self._accept_open(msg)
            log.warning("message %s for unknown channel %s", type(msg).__name__,
                        encode_channel_id(cid))
            return NotFound(f"no channel {encode_channel_id(cid)} here")
        if peer != sender:
            log.warning("%s: message from a non-party refused", encode_channel_id(cid))
            return Unauthorized("the sender is not a party of this channel")
        if route is not None:
            self.routes.learn(sender, route)
        try:
            self.tell(cid, machine.receive(msg))
        except PaychanError as exc:
            log.warning("%s: cannot deliver: %s", encode_channel_id(cid), exc)
            return exc
        return None

    def _accept_open(self, msg: OpenPropose) -> PaychanError | None:
        if msg.params.responder != self.identity.public:
            log.warning("open proposal for another key refused")
            return Unauthorized("the proposal names another responder")
        if msg.params.network_id != self.ledger.network_id:
            log.warning("open proposal for network %r refused", msg.params.network_id)
            return Conflict(f"this node is on network {self.ledger.network_id!r}")
        state, effects = machine.respond(msg, self.identity.public)
        # Not waited for: this runs on a transport's thread, which must not block.
        self.supervisor.start_new(state.channel_id, Start(state, effects, None))
        return None

    # -- ledger ----------------------------------------------------------------------------
    def on_ledger_event(self, event: dict[str, Any]) -> None:
        """From the ledger's stream. Snapshots are idempotent; the actor drops old heights."""
        cid = event["channel_id"]
        if self.store.get(CHANNELS, cid) is None:
            return
        record = ChannelRecord.from_obj(event["record"])
        payouts = tuple((bytes(w), int(a)) for w, a in event.get("payouts", ()))
        try:
            self.tell(cid, LedgerUpdate(record, event["event"], payouts), height=event["height"])
        except PaychanError as exc:
            log.warning("%s: ledger event not delivered: %s", encode_channel_id(cid), exc)
        self.store.writer.submit([Put(KV, _HEIGHT, pack(event["height"]))])

    def _catch_up(self) -> None:
        """Replay the ledger events missed while stopped, then reconcile with current records."""
        height = int(unpack(self.store.get(KV, _HEIGHT) or pack(0)))
        while True:
            events = self.ledger.events_since(height, 1000)
            if not events:
                break
            for event in events:
                self.on_ledger_event(event)
                height = event["height"]
        # An event dispatched just before a crash may not have been committed by its actor:
        # compare every live channel with the ledger's record and feed the difference.
        for cid in self.channel_ids():
            record = load_record(self, cid)
            if record is None or record[0].phase is Phase.REJECTED:
                continue
            state = record[0]
            rec = self.ledger.channel(cid)
            if rec is None:
                continue
            if (rec.period != state.period or rec.deposit_of(state.me) != state.deposit_me
                    or rec.deposit_of(state.peer) != state.deposit_peer
                    or (rec.close is not None) != (state.ledger_close is not None)
                    or state.phase in (Phase.AWAITING_FUNDING, Phase.AWAITING_ACCEPT)):
                self.tell(cid, LedgerUpdate(rec, "reconcile"))

    def _sync_all(self) -> None:
        """On (re)start, exchange sync with every peer: in-flight payments resolve, and the peer
        resends what it sent us while we were down (it may not know we are back)."""
        for cid in self.channel_ids():
            record = load_record(self, cid)
            if record is None:
                continue
            state = record[0]
            if state.phase in (Phase.OPEN, Phase.CLOSING, Phase.AWAITING_FUNDING):
                self.tell(cid, machine.ActionSync())
            elif state.phase is Phase.AWAITING_ACCEPT:
                self.resend_open(cid)

    def resend_open(self, channel_id: bytes) -> None:
        state = self.state(channel_id)
        self.send(state.peer, encode(OpenPropose(channel_id, state.params, state.open_deposit)))

    def sync(self, channel_id: bytes) -> None:
        self.tell(channel_id, machine.ActionSync())

    def on_peer_back(self, peer: bytes) -> None:
        """A transport reached a peer again after a gap: sync every live channel with it."""
        if self._closed:
            return
        try:
            cids = self.channel_ids()
        except PaychanError:
            return  # closed meanwhile
        for cid in cids:
            record = load_record(self, cid)
            if record is not None and record[0].peer == peer and record[0].phase in (
                    Phase.OPEN, Phase.CLOSING, Phase.AWAITING_FUNDING):
                try:
                    self.tell(cid, machine.ActionSync())
                except PaychanError as exc:
                    log.warning("%s: sync not started: %s", encode_channel_id(cid), exc)

    def transport(self, name: str) -> Transport | None:
        return next((t for t in self.transports if t.name == name), None)

    # -- payments --------------------------------------------------------------------------
    def pay_future(self, channel_id: bytes, payment_id: str, amount: int,
                   message: Any, fresh: bool = False) -> Future[Any]:
        """A future of the payment's outcome (see `result_of`); a payment_id already answered
        gets its stored outcome. A refusal of the pay fails the future."""
        fut: Future[Any]
        action = machine.ActionPay(payment_id, amount, message)  # bad input fails here first
        # A payment_id just made up cannot have an outcome yet: no need to look.
        outcome = None if fresh else outcome_of(self, channel_id, payment_id)
        if outcome is not None:
            fut = LightFuture()
            fut.set_result(outcome)
            return fut
        key = (channel_id, payment_id)
        with self._lock:
            fut = self.waiters.get(key) or self.waiters.setdefault(key, LightFuture())
        try:
            self.tell(channel_id, action, fut, errors_only=True, fresh=fresh)
        except PaychanError:
            self.waiters.pop(key, None)
            raise
        fut.add_done_callback(
            lambda f: (f.cancelled() or f.exception() is not None) and self.waiters.pop(key, None))
        return fut

    def pay(self, channel_id: bytes, payment_id: str, amount: int, message: Any,
            timeout: float, fresh: bool = False) -> Any:
        """Pay and wait for the peer's response; a known payment_id returns its stored outcome."""
        self.refuse_blocking()
        fut = self.pay_future(channel_id, payment_id, amount, message, fresh)
        try:
            return result_of(fut.result(timeout))
        except TimeoutError:
            raise timed_out(payment_id, timeout) from None

    # -- shutdown --------------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for transport in reversed(self.transports):
            try:
                transport.close()
            except Exception:
                log.exception("closing transport %s", transport.name)
            self.store.writer.wake()  # its loop, stopped, may have left commits to write
        if self._ledger_token is not None:
            try:
                self.ledger.unsubscribe(self._ledger_token)
            except Exception:
                log.debug("ledger already gone at close")
        # The parts below exist unless opening failed before they were made.
        if hasattr(self, "watcher"):
            self.watcher.stop()
        if hasattr(self, "handlers"):
            # A handler still running is not waited for: its result finds the node closed and
            # the payer's retry (or sync) asks again after a restart.
            self.handlers.shutdown(wait=False, cancel_futures=True)
        if hasattr(self, "supervisor"):
            self.supervisor.stop_all()
        if hasattr(self, "_dispatcher"):
            self._events.put(None)
            self._dispatcher.join(timeout=5)
        for fut in list(getattr(self, "waiters", {}).values()):  # a failed one leaves the dict
            if not fut.done():
                fut.set_exception(Rejected("node closed"))
        self.store.close()
        log.info("node at %s closed", self.data_dir)


LOGGED_VALUE_CHARS = 200


def _loggable(value: Any) -> Any:
    """A value as an event's log line shows it: a peer chooses some of them (an error's text
    may be 64 KiB), so a long one is cut; the event itself keeps it whole."""
    text = value if isinstance(value, str) else None
    if text is None and isinstance(value, (bytes, dict, list, tuple)):
        text = repr(value)
    if text is None or len(text) <= LOGGED_VALUE_CHARS:
        return value
    return f"{text[:LOGGED_VALUE_CHARS]}... ({len(text)} chars)"
