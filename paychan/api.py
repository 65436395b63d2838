"""The public Python API of DESIGN §7: Ledger, Node and their asyncio twins."""
from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from paychan.actors.chat import ChatTransport, parse_pairing_code
from paychan.actors.clock import VirtualClock, WallClock
from paychan.actors.http_transport import HttpTransport
from paychan.actors.hub import normalize_hub_url
from paychan.actors.ledger import EmbeddedLedger
from paychan.actors.loopcall import LoopCalls
from paychan.actors.node import NodeCore, Payment, result_of, timed_out
from paychan.protocol import channel as machine
from paychan.protocol import errors
from paychan.protocol.channel import Phase
from paychan.protocol.errors import (
    InsufficientBalance,
    InvalidParams,
    NotAllowedAtState,
    PaychanError,
)
from paychan.protocol.identity import (
    check_amount,
    decode_address,
    decode_channel_id,
    encode_address,
    encode_channel_id,
)
from paychan.protocol.wire import ChannelParams

log = logging.getLogger("paychan.node")

EVENTS = ("channel_created_by_peer", "payment_received", "channel_open", "deposit_confirmed",
          "channel_closing", "channel_closed", "channel_closed_with_fraud_proof", "message",
          "channel_quarantined", "channel_rejected", "peer_error", "own_voucher_recovered")


class Ledger:
    """A settlement ledger: embedded in this process, or (later) a remote `paychan ledger serve`."""

    def __init__(self, client: EmbeddedLedger) -> None:
        self.client = client

    @classmethod
    def embedded(cls, data_dir: str | None = None,
                 clock: VirtualClock | WallClock | None = None) -> Ledger:
        """An in-process ledger in LMDB at `data_dir` (a temporary one when None)."""
        return cls(EmbeddedLedger(data_dir, clock))

    @classmethod
    def connect(cls, url: str) -> Ledger:
        """A ledger served by `paychan ledger serve` at `url` (http://host:port); the same
        methods, over HTTP. Raises LedgerUnreachable when nothing answers there."""
        from paychan.actors.ledger_client import RemoteLedger
        return cls(RemoteLedger(url))  # type: ignore[arg-type]  # same methods, duck-typed

    def mint(self, address: str, amount: int, asset: str = "base") -> int:
        """Dev faucet: create `amount` of `asset` in `address`'s ledger account."""
        return self.client.mint(decode_address(address), check_amount(amount), asset)

    def balance(self, address: str, asset: str = "base") -> int:
        return self.client.balance(decode_address(address), asset)

    def advance(self, seconds: int) -> None:
        """Move a VirtualClock forward (watchers wake at once)."""
        self.client.advance(seconds)

    def now(self) -> int:
        return self.client.now()

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _cid(ch: str) -> bytes:
    return decode_channel_id(ch)


class Node:
    """One party: its channels, its payment handler and its events."""

    def __init__(self, core: NodeCore) -> None:
        self._core = core
        self._owned_ledger: Ledger | None = None

    @classmethod
    def open(cls, data_dir: str, ledger: Ledger | str, listen: str | None = None,
             hub: str | None = None, max_live_channels: int = 256,
             idle_seconds: float = 30.0, tls_cert: str | None = None,
             tls_key: str | None = None, tls_ca: str | None = None,
             on_payment_received: Callable[[Payment], Any] | None = None) -> Node:
        """Open (or create) the node stored in `data_dir`. `listen` ("http(s)://host:port")
        accepts peers directly (https needs `tls_cert` and `tls_key`); `tls_ca` is the CA file
        that peers' certificates must chain to (default: the system's trust store).
        `on_payment_received` sets the handler before recovery resumes any call; set later,
        resumed calls wait up to 5 s for it."""
        # A ledger named by URL is the node's own: it is closed with the node.
        owned = Ledger.connect(ledger) if isinstance(ledger, str) else None
        if owned is not None:
            ledger = owned
        assert isinstance(ledger, Ledger)
        http = HttpTransport(listen, {}, tls_cert, tls_key, tls_ca)
        transports: list[Any] = [http]
        if hub is not None:
            # Last: the hub carries what no direct route can.
            transports.append(lambda core: ChatTransport(
                hub, core.identity, core.kv_secret(b"pairing_secret")))
        try:
            core = NodeCore(os.fspath(data_dir), ledger.client,
                            max_live_channels=max_live_channels, idle_seconds=idle_seconds,
                            transports=transports, payment_handler=on_payment_received)
        except BaseException:
            http.close()  # when the node failed before starting it (a started one it closed)
            if owned is not None:
                owned.close()
            raise
        node = cls(core)
        node._owned_ledger = owned
        return node

    # -- identity ---------------------------------------------------------------------------
    @property
    def address(self) -> str:
        return self._core.address

    @property
    def pairing_code(self) -> str:
        """`ak_...@host:port#secret`: how a peer opens a channel to us through our hub."""
        chat = self._core.transport("chat")
        if not isinstance(chat, ChatTransport):
            raise NotAllowedAtState("this node has no hub: open it with hub=URL")
        return chat.pairing_code

    # -- application hooks ------------------------------------------------------------------
    def on_payment_received(self, handler: Callable[[Payment], Any], quick: bool = False) -> None:
        """`handler(p)`'s return value is the response; an exception refunds the payer.

        Handlers run on a pool of 8 threads, so a slow one holds only its own call. With
        `quick=True` the handler promises never to block (no I/O, no waiting, well under a
        millisecond) and runs right where the payment becomes durable instead (often the
        transport's event loop), which saves a thread hand-over per call; a quick handler that
        blocks stalls the node's storage and network. A blocking call of this API made there
        is refused with NotAllowedAtState (it would wait for the loop it blocks)."""
        self._core.set_handler(handler, quick)

    def on(self, event: str, callback: Callable[[dict[str, Any]], None]) -> None:
        """`callback(event_dict)` on the node's event thread. The first callback of an event
        also hears what happened before it was registered, such as what the recovery in
        `Node.open` found (a fraud proof, a close) while the node was down."""
        if event not in EVENTS:
            raise InvalidParams(f"unknown event {event!r}; known: {', '.join(EVENTS)}")
        self._core.add_callback(event, callback)

    # -- channels ---------------------------------------------------------------------------
    def create_channel(self, peer: Node | str, amount: int, asset: str = "base",
                       dispute_period: int = 600, salt: bytes | None = None,
                       timeout: float = 30.0) -> str:
        """Open a channel funded with `amount` of ours; returns its `ch_...` id once OPEN."""
        check_amount(amount, "amount")
        peer_key = self._peer_key(peer)
        if peer_key == self._core.identity.public:
            raise InvalidParams("a channel needs two different parties")
        have = self._core.ledger.balance(self._core.identity.public, asset)
        if have < amount:
            raise InsufficientBalance(f"the ledger account holds {have} {asset}, not {amount}")
        params = ChannelParams(self._core.identity.public, peer_key, asset, dispute_period,
                               salt if salt is not None else os.urandom(32),
                               self._core.ledger.network_id)
        state, effects = machine.initiate(params, self._core.identity.public, amount)
        self._core.start_channel(state, effects)
        cid = params.channel_id
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._core.wait_for(cid, lambda s: s.phase not in (
                    Phase.AWAITING_ACCEPT, Phase.AWAITING_FUNDING),
                    max(0.0, min(1.0, deadline - time.monotonic())))
                break
            except errors.Timeout:
                if time.monotonic() >= deadline:
                    raise
                if self._core.state(cid).phase is Phase.AWAITING_ACCEPT:
                    self._core.resend_open(cid)  # the proposal or its answer may be lost
        st = self._core.state(cid)
        if st.phase is Phase.REJECTED:
            raise NotAllowedAtState("the peer rejected the channel")
        return encode_channel_id(params.channel_id)

    def _peer_key(self, peer: Node | str) -> bytes:
        if isinstance(peer, Node):
            return peer._core.identity.public
        if isinstance(peer, str) and peer.startswith("ak_") and "@" not in peer:
            return decode_address(peer)
        if isinstance(peer, str) and peer.startswith("ak_"):
            key, hub_url, secret = parse_pairing_code(peer)
            chat = self._core.transport("chat")
            if not isinstance(chat, ChatTransport):
                raise NotAllowedAtState("a pairing code needs this node to use a hub too")
            if normalize_hub_url(hub_url) != normalize_hub_url(chat.hub_url):
                raise NotAllowedAtState(f"the peer is on hub {hub_url}; this node uses "
                                        f"{chat.hub_url}")
            self._core.routes.learn(key, chat.route)
            chat.introduce(key, secret)
            return key
        if isinstance(peer, str) and peer.startswith(("http://", "https://")):
            http = self._core.transport("http")
            assert isinstance(http, HttpTransport)
            info = http.fetch_info(peer)
            key = decode_address(info.get("address"))
            self._core.routes.learn(key, {"via": "http", "url": peer.rstrip("/")})
            return key
        raise InvalidParams("peer must be a Node in this process, an ak_ address or an "
                            "http(s):// URL")

    def send_message_and_pay(self, ch: str, message: Any, amount: int, timeout: float = 10.0,
                             payment_id: str | None = None) -> Any:
        """Pay `amount` with `message`; returns the peer's response. Retrying with the same
        `payment_id` never pays twice."""
        pid = payment_id or os.urandom(16).hex()
        return self._core.pay(_cid(ch), pid, amount, message, timeout, fresh=payment_id is None)

    def send_message(self, ch: str, message: Any) -> None:
        """A free message to the peer (its `message` event)."""
        self._core.ask(_cid(ch), machine.ActionMessage(message))

    def deposit(self, ch: str, amount: int, wait: bool = True, timeout: float = 30.0) -> None:
        check_amount(amount, "amount")
        cid = _cid(ch)
        before = self._core.state(cid)
        have = self._core.ledger.balance(self._core.identity.public, before.params.asset)
        if have < amount:
            raise InsufficientBalance(f"the ledger account holds {have}, not {amount}")
        self._core.ask(cid, machine.ActionDeposit(amount))
        if wait and amount:
            self._core.wait_for(cid, lambda s: s.period != before.period
                                or s.deposit_me >= before.deposit_me + amount, timeout)

    def balances(self, ch: str) -> dict[str, Any]:
        s = self._core.state(_cid(ch))
        return {"status": s.phase.value, "period": s.period, "deposited_by_me": s.deposit_me,
                "deposited_by_peer": s.deposit_peer, "sent_by_me": s.my_sent,
                "sent_by_peer": s.peer_sent, "my_balance": s.my_balance,
                "peer_balance": s.peer_balance}

    def channels(self, peer: Node | str | None = None) -> list[str]:
        want = None if peer is None else self._peer_key(peer)
        out = []
        for cid in self._core.channel_ids():
            if want is None or self._core.state(cid).peer == want:
                out.append(encode_channel_id(cid))
        return out

    def close(self, ch: str, mutual: bool = True, wait: bool = True,
              timeout: float | None = None, mutual_timeout: float = 5.0) -> dict[str, Any]:
        """Close mutually when the peer answers in `mutual_timeout`, else solo (the watcher then
        confirms after the dispute window). With `wait`, returns once the ledger paid out."""
        cid = _cid(ch)
        start = self._core.state(cid)
        settled = lambda s: s.period > start.period  # noqa: E731
        if mutual and start.ledger_close is None:
            deadline = time.monotonic() + mutual_timeout
            reason: PaychanError | None = None
            while time.monotonic() < deadline:
                try:
                    # Refused while calls are in progress on our side; the peer likewise
                    # answers "not yet". Asking again re-sends the proposal.
                    self._core.ask(cid, machine.ActionCloseMutual())
                    self._core.wait_for(cid, settled, min(1.0, deadline - time.monotonic()))
                    return {"period": start.period, "mutual": True}
                except errors.Timeout as exc:
                    reason = exc
                except NotAllowedAtState as exc:
                    reason = exc
                    self._core.sync(cid)  # resend what the peer may lack, then ask again
                    time.sleep(0.1)
            log.info(f"mutual close did not finish ({reason}); closing solo")
        now = self._core.state(cid)
        if now.ledger_close is None and now.period == start.period:
            # Answers still on their way may carry refunds that only count before our close.
            try:
                self._core.wait_for(cid, lambda s: not s.outgoing, mutual_timeout)
            except errors.Timeout:
                log.info("payments still await answers; closing solo without them")
            self._core.ask(cid, machine.ActionCloseSolo(force=True))
        if wait:
            limit = timeout if timeout is not None else start.params.dispute_period + 60.0
            self._core.wait_for(cid, settled, limit)
        return {"period": start.period, "mutual": False}

    def sync(self, ch: str) -> None:
        self._core.sync(_cid(ch))

    # -- lifetime ---------------------------------------------------------------------------
    def stop(self) -> None:
        try:
            self._core.close()
        finally:
            if self._owned_ledger is not None:
                self._owned_ledger.close()

    def __enter__(self) -> Node:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- asyncio twins ----------------------------------------------------------------------
    async def _run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, functools.partial(fn, *args, **kwargs))

    async def acreate_channel(self, *args: Any, **kwargs: Any) -> str:
        return str(await self._run(self.create_channel, *args, **kwargs))

    async def asend_message_and_pay(self, ch: str, message: Any, amount: int,
                                    timeout: float = 10.0, payment_id: str | None = None) -> Any:
        """Like send_message_and_pay, awaiting the answer without holding a thread."""
        pid = payment_id or os.urandom(16).hex()
        fut = self._core.pay_future(_cid(ch), pid, amount, message, fresh=payment_id is None)
        loop = asyncio.get_running_loop()
        waiting: asyncio.Future[Any] = loop.create_future()
        calls = LoopCalls.of(loop)
        # Not asyncio.wrap_future: a timeout or a cancel here must not cancel the shared
        # outcome future, and many outcomes landing together wake the loop once.

        def hand_back(done: Future[Any]) -> None:
            try:
                calls.call(_settle, done, waiting)
            except RuntimeError:
                pass  # the caller's loop is gone (it timed out); a retry finds the outcome

        fut.add_done_callback(hand_back)
        timer = loop.call_later(timeout, _expire, waiting, pid, timeout)
        try:
            outcome = await waiting
        finally:
            timer.cancel()
        return result_of(outcome)

    async def asend_message(self, *args: Any, **kwargs: Any) -> None:
        await self._run(self.send_message, *args, **kwargs)

    async def adeposit(self, *args: Any, **kwargs: Any) -> None:
        await self._run(self.deposit, *args, **kwargs)

    async def aclose(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        result: dict[str, Any] = await self._run(self.close, *args, **kwargs)
        return result

    async def astop(self) -> None:
        await self._run(self.stop)


def _settle(done: Future[Any], waiting: asyncio.Future[Any]) -> None:
    if waiting.done():
        return  # timed out or cancelled meanwhile
    exc = done.exception() if not done.cancelled() else None
    if done.cancelled():
        waiting.cancel()
    elif exc is not None:
        waiting.set_exception(exc)
    else:
        waiting.set_result(done.result())


def _expire(waiting: asyncio.Future[Any], pid: str, timeout: float) -> None:
    if not waiting.done():
        waiting.set_exception(timed_out(pid, timeout))


__all__ = ["EVENTS", "Ledger", "Node", "Payment", "encode_address"]
