"""Encrypted-chat transport: one WebSocket to a store-and-forward hub, and pairing codes.

The hub relays sealed envelopes (frames in `actors/hub.py`). This side keeps every envelope it
sent until the hub acknowledged storing it, and re-sends those after a reconnect; the hub keeps
every envelope for us until we acknowledged it, which we do only after the node took it.
"""
from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import aiohttp
import base58

from paychan.actors.hub import (
    HEARTBEAT,
    HUB_FRAMES,
    ID_LEN,
    LOGIN_TIMEOUT,
    MAX_FRAME_BYTES,
    SECRET_MAX,
    SECRET_MIN,
    decode_frame,
    encode_frame,
    login_fields,
    normalize_hub_url,
)
from paychan.actors.transport import Deliver, OwnLoop
from paychan.protocol.errors import BrokenEncoding, PaychanError, Unauthorized, from_wire
from paychan.protocol.identity import DOMAIN_HUB_LOGIN, Identity, decode_address, encode_address

log = logging.getLogger("paychan.chat")

MAX_PENDING = 4096  # envelopes sent but not yet stored by the hub; older ones are dropped
BACKOFF_FIRST, BACKOFF_MAX = 0.1, 3.0
RETRY_FULL = 1.0  # seconds before re-sending an envelope the hub had no room for

_CODE = re.compile(r"(ak_[1-9A-HJ-NP-Za-km-z]+)@(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})"
                   r"#([1-9A-HJ-NP-Za-km-z]+)")


# -- pairing codes --------------------------------------------------------------------------

def make_pairing_code(address: str | bytes, hub_host_port: str, secret: bytes) -> str:
    """`ak_<address>@host:port#secret`: how a peer reaches this node through its hub."""
    text = encode_address(address) if isinstance(address, bytes) else address
    decode_address(text)
    if "://" in hub_host_port:
        hub_host_port = normalize_hub_url(hub_host_port).split("://", 1)[1]
    if not isinstance(secret, bytes) or not SECRET_MIN <= len(secret) <= SECRET_MAX:
        raise BrokenEncoding(f"a pairing secret is {SECRET_MIN}..{SECRET_MAX} bytes")
    code = f"{text}@{hub_host_port}#{base58.b58encode(secret).decode('ascii')}"
    parse_pairing_code(code)  # never hand out a code we would refuse
    return code


def parse_pairing_code(code: Any) -> tuple[bytes, str, bytes]:
    """(public key, hub URL, secret) of a pairing code; BrokenEncoding for anything else."""
    if not isinstance(code, str) or len(code) > 400:
        raise BrokenEncoding("a pairing code is a string ak_...@host:port#secret")
    match = _CODE.fullmatch(code.strip())
    if match is None:
        raise BrokenEncoding("a pairing code looks like ak_...@host:port#secret")
    address, host, port, secret_text = match.groups()
    try:
        key = decode_address(address)
    except PaychanError as exc:
        raise BrokenEncoding(f"pairing code: {exc.message}") from None
    if not 0 < int(port) < 65536:
        raise BrokenEncoding(f"pairing code: port {port} is out of range")
    try:
        secret = base58.b58decode(secret_text)
        url = normalize_hub_url(f"http://{host}:{port}")
    except (ValueError, PaychanError):
        raise BrokenEncoding("pairing code: unreadable hub or secret") from None
    if not SECRET_MIN <= len(secret) <= SECRET_MAX:
        raise BrokenEncoding(f"pairing code: the secret must be {SECRET_MIN}..{SECRET_MAX} bytes")
    return key, url, secret


def new_secret() -> bytes:
    return os.urandom(SECRET_MIN)


class LoginRefused(PaychanError):
    """The hub refused our login (wrong URL, bad signature)."""


# -- the transport ----------------------------------------------------------------------------

class ChatTransport(OwnLoop):
    """A node's connection to one hub, on its own event-loop thread; `send` never blocks."""

    name = "chat"

    def __init__(self, hub_url: str, identity: Identity, secret: bytes | None = None,
                 max_pending: int = MAX_PENDING) -> None:
        self.hub_url = normalize_hub_url(hub_url)
        scheme, rest = self.hub_url.split("://", 1)
        self.ws_url = ("wss" if scheme == "https" else "ws") + "://" + rest + "/ws"
        self.identity = identity
        if secret is not None and not SECRET_MIN <= len(secret) <= SECRET_MAX:
            raise BrokenEncoding(f"a pairing secret is {SECRET_MIN}..{SECRET_MAX} bytes")
        self.secret = secret
        self.max_pending = max_pending
        self.on_reconnect: Callable[[bytes], None] | None = None
        self.connected = threading.Event()
        self.logins = 0
        self.delivered = 0
        self.refused: list[PaychanError] = []  # what the hub refused, newest last (bounded)
        self._deliver: Deliver | None = None
        self._pending: OrderedDict[bytes, tuple[bytes, bytes]] = OrderedDict()  # id -> (peer, env)
        self._introductions: dict[bytes, bytes] = {}
        self._dropped: set[bytes] = set()  # peers whose envelopes overflowed: sync repairs
        self._out: asyncio.Queue[bytes] | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="paychan-chat")
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def route(self) -> dict[str, Any]:
        """The route under which peers of this hub are learned."""
        return {"via": "hub", "hub": self.hub_url}

    @property
    def pairing_code(self) -> str:
        if self.secret is None:
            raise Unauthorized("this transport has no pairing secret")
        return make_pairing_code(self.identity.public, self.hub_url, self.secret)

    # -- life ------------------------------------------------------------------------------
    def start(self, deliver: Deliver) -> None:
        """Connect in the background: a node opens even while its hub is down."""
        self._deliver = deliver
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._begin(), self._loop).result(10)

    async def _begin(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def wait_connected(self, timeout: float = 10.0) -> bool:
        return self.connected.wait(timeout)

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        self._closing = True
        try:
            asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        except Exception:
            log.exception("chat transport did not stop cleanly")
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self.connected.clear()
        if self._pending:
            log.info("closing with %d envelopes the hub has not stored; sync resends them",
                      len(self._pending))

    async def _stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass

    # -- the Transport protocol ------------------------------------------------------------
    def can_reach(self, peer: bytes, route: dict[str, Any] | None) -> bool:
        """Our hub's routes, and any peer nobody else reaches: the chat transport comes last."""
        if route is not None and route.get("via") == "hub":
            try:
                return normalize_hub_url(route.get("hub", "")) == self.hub_url
            except PaychanError:
                return False
        return True

    def send(self, peer: bytes, envelope: bytes, route: dict[str, Any] | None) -> None:
        self._loop.call_soon_threadsafe(self._enqueue, peer, envelope)

    def introduce(self, peer: bytes, secret: bytes) -> None:
        """Present `peer`'s pairing secret with what we send it until the hub pairs us."""
        if not isinstance(secret, bytes) or not SECRET_MIN <= len(secret) <= SECRET_MAX:
            raise BrokenEncoding(f"a pairing secret is {SECRET_MIN}..{SECRET_MAX} bytes")
        self._loop.call_soon_threadsafe(self._introductions.__setitem__, peer, secret)

    # -- outgoing (loop thread) ------------------------------------------------------------
    def _enqueue(self, peer: bytes, envelope: bytes) -> None:
        id = os.urandom(ID_LEN)
        self._pending[id] = (peer, envelope)
        while len(self._pending) > self.max_pending:
            _, (lost, _env) = self._pending.popitem(last=False)
            self._dropped.add(lost)
        self._push(id)

    def _push(self, id: bytes) -> None:
        item = self._pending.get(id)
        if item is None or self._out is None:
            return  # acknowledged meanwhile, or offline: the next login sends it
        peer, envelope = item
        extra = {}
        secret = self._introductions.get(peer)
        if secret is not None:
            extra["secret"] = secret
        self._out.put_nowait(encode_frame("send", to=peer, id=id, envelope=envelope, **extra))

    async def _write(self, ws: aiohttp.ClientWebSocketResponse, out: asyncio.Queue[bytes]) -> None:
        while True:
            await ws.send_bytes(await out.get())

    # -- the connection --------------------------------------------------------------------
    async def _run(self) -> None:
        delay = BACKOFF_FIRST
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while not self._closing:
                try:
                    async with session.ws_connect(self.ws_url, max_msg_size=MAX_FRAME_BYTES,
                                                  heartbeat=HEARTBEAT, compress=0) as ws:
                        if await self._session(ws):
                            delay = BACKOFF_FIRST
                except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                    log.info("hub %s unreachable: %s", self.hub_url, exc or type(exc).__name__)
                except LoginRefused as exc:
                    log.error("hub %s refused our login: %s", self.hub_url, exc.message)
                    delay = BACKOFF_MAX
                finally:
                    self._out = None
                    self.connected.clear()
                if self._closing:
                    return
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, BACKOFF_MAX)

    async def _session(self, ws: aiohttp.ClientWebSocketResponse) -> bool:
        """Log in, then serve the socket until it closes. True when the login succeeded."""
        challenge = await self._expect(ws, "challenge")
        if challenge["hub"] != self.hub_url:
            log.info("hub %s calls itself %s", self.hub_url, challenge["hub"])
        login: dict[str, Any] = {
            "key": self.identity.public, "url": self.hub_url,
            "sig": self.identity.sign(DOMAIN_HUB_LOGIN, login_fields(
                challenge["challenge"], self.hub_url, self.secret))}
        if self.secret is not None:
            login["secret"] = self.secret
        await ws.send_bytes(encode_frame("login", **login))
        welcome = await self._expect(ws, "welcome")
        self.logins += 1
        out: asyncio.Queue[bytes] = asyncio.Queue()
        self._out = out
        for id in list(self._pending):
            self._push(id)  # everything the hub has not acknowledged, in order
        writer = asyncio.get_running_loop().create_task(self._write(ws, out))
        self.connected.set()
        log.info("logged in to hub %s (%d waiting for us, %d to send)", self.hub_url,
                 welcome["queued"], len(self._pending))
        if self.logins > 1 and self.on_reconnect is not None:
            dropped, self._dropped = self._dropped, set()
            for peer in dropped:
                self.on_reconnect(peer)
        try:
            async for msg in ws:
                if msg.type is aiohttp.WSMsgType.BINARY:
                    self._on_frame(msg.data)
                elif msg.type is aiohttp.WSMsgType.ERROR:
                    break
        finally:
            writer.cancel()
        return True

    async def _expect(self, ws: aiohttp.ClientWebSocketResponse, kind: str) -> dict[str, Any]:
        msg = await ws.receive(timeout=LOGIN_TIMEOUT)
        if msg.type is not aiohttp.WSMsgType.BINARY:
            raise aiohttp.ClientError(f"hub closed the socket before {kind} ({msg.type.name})")
        try:
            got, fields = decode_frame(msg.data, HUB_FRAMES)
        except PaychanError as exc:
            raise aiohttp.ClientError(f"hub sent junk: {exc.message}") from None
        if got == "error":
            raise LoginRefused(from_wire(fields["error"]).message)
        if got != kind:
            raise aiohttp.ClientError(f"hub sent {got} instead of {kind}")
        return fields

    def _on_frame(self, data: bytes) -> None:
        try:
            kind, f = decode_frame(data, HUB_FRAMES)
        except PaychanError as exc:
            log.warning("hub %s sent a bad frame: %s", self.hub_url, exc.message)
            return
        if kind == "deliver":
            self._on_deliver(f["from"], f["id"], f["envelope"])
        elif kind == "ack":
            item = self._pending.pop(f["id"], None)
            if item is not None:
                self._introductions.pop(item[0], None)  # paired now: the secret is spent
        elif kind == "error":
            self._on_error(from_wire(f["error"]), f.get("id"), f.get("retry", False))
        else:
            log.warning("hub %s sent an unexpected %s frame", self.hub_url, kind)

    def _on_deliver(self, sender: bytes, id: bytes, envelope: bytes) -> None:
        assert self._deliver is not None
        try:
            refused = self._deliver(envelope, self.route)
        except Exception:
            # Not acknowledged: the hub delivers it again at our next login.
            log.exception("delivering an envelope from %s failed", encode_address(sender))
            return
        if refused is not None:
            log.info("envelope from %s refused by the node: %s", encode_address(sender), refused)
        self.delivered += 1
        if self._out is not None:
            self._out.put_nowait(encode_frame("ack", id=id, **{"from": sender}))

    def _on_error(self, err: PaychanError, id: bytes | None, retry: bool) -> None:
        if id is None:
            log.warning("hub %s: %s", self.hub_url, err.message)
        elif retry:
            log.info("hub %s will take an envelope later: %s", self.hub_url, err.message)
            self._loop.call_later(RETRY_FULL, self._push, id)
            return
        else:
            item = self._pending.pop(id, None)
            log.warning("hub %s refused an envelope for %s: %s", self.hub_url,
                        encode_address(item[0]) if item else "?", err.message)
        self.refused.append(err)
        del self.refused[:-100]
