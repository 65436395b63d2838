"""The chat hub: a WebSocket store-and-forward relay of sealed envelopes between logged-in nodes.

Frames are msgpack maps with a type `t`, one per binary WebSocket message:

    hub  -> node   challenge {challenge: 32 bytes, hub: the hub's URL}
    node -> hub    login     {key: 32 bytes, sig: 64 bytes, url: str, secret?: bytes}
    hub  -> node   welcome   {queued: int}
    node -> hub    send      {to: 32 bytes, id: 16 bytes, envelope: bytes, secret?: bytes}
    hub  -> node   ack       {id}                 the envelope is durable at the hub
    hub  -> node   deliver   {from, id, envelope}
    node -> hub    ack       {from, id}           the recipient has it: the hub deletes it
    hub  -> node   error     {error: JSON-RPC error object, id?: 16 bytes, retry?: bool}

`sig` signs DOMAIN_HUB_LOGIN over [challenge, url, secret or b""], where `url` is the hub URL
the node dialed and must be one of the hub's own: a login answer is good for one connection to
one hub. The hub only ever sees NaCl Box envelopes (`actors/envelope.py`); it checks their outer
sender and recipient fields against the login and the `to` field, never their contents.

Everything lives in the `kv` database of the hub's own store, under `hub/` prefixes.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import lmdb
import msgpack
from aiohttp import WSMsgType, web

from paychan.protocol.errors import (
    BadSignature,
    BrokenEncoding,
    DecodeError,
    InternalError,
    InvalidParams,
    PaychanError,
    Rejected,
    Unauthorized,
)
from paychan.protocol.identity import (
    DOMAIN_HUB_LOGIN,
    KEY_LEN,
    SIG_LEN,
    encode_address,
    verify,
)
from paychan.protocol.wire import MAX_FRAME, unpack
from paychan.storage.env import Store
from paychan.storage.keys import from_u64, pack, prefix_end, u64
from paychan.storage.keys import unpack as unpack_value

log = logging.getLogger("paychan.hub")

MAX_FRAME_BYTES = 256 * 1024  # one frame, either way; a bigger one is answered with an error
MAX_MESSAGE = 4 * MAX_FRAME_BYTES  # a bigger WebSocket message closes the socket (1009)
MAX_ENVELOPE = MAX_FRAME + 1024  # what Sealer.open accepts
MAX_QUEUE = 1024  # envelopes kept for one recipient
MAX_URL = 300
ID_LEN = 16
CHALLENGE_LEN = 32
SECRET_MIN, SECRET_MAX = 16, 64
LOGIN_TIMEOUT = 10.0
HEARTBEAT = 20.0
WINDOW = 64  # deliveries awaiting the recipient's ack, and sends awaiting a commit, per socket
MAX_BAD_FRAMES = 16  # junk frames tolerated on one socket after login
DEDUP_SECONDS = 24 * 3600  # how long an acknowledged id still counts as a duplicate
PRUNE_EVERY = 60.0

KV = "kv"
_QUEUE = b"hub/q/"  # + recipient + u64(seq) -> [sender, id, envelope]
_SEEN = b"hub/d/"  # + sender + id -> [recipient, seq, acked_at (0 while queued)]
_ACKED = b"hub/t/"  # + u64(acked_at) + sender + id -> b"": prunes old _SEEN entries
_PAIR = b"hub/p/"  # + a + b -> b"": a may send to b (both orders are written)
_SECRET = b"hub/s/"  # + node -> blake2b of its pairing secret
_COUNT = b"hub/c/"  # + recipient -> u64 queued
_NEXT = b"hub/next"  # u64: the next queue sequence number

FrameSpec = dict[str, tuple[type, int, int]]

# (required fields, optional fields) per frame type; the bounds are lengths for bytes and str
# and values for int. A frame with any other field, type or size is refused.
NODE_FRAMES: dict[str, tuple[FrameSpec, FrameSpec]] = {
    "login": ({"key": (bytes, KEY_LEN, KEY_LEN), "sig": (bytes, SIG_LEN, SIG_LEN),
               "url": (str, 1, MAX_URL)}, {"secret": (bytes, SECRET_MIN, SECRET_MAX)}),
    "send": ({"to": (bytes, KEY_LEN, KEY_LEN), "id": (bytes, ID_LEN, ID_LEN),
              "envelope": (bytes, 1, MAX_ENVELOPE)}, {"secret": (bytes, SECRET_MIN, SECRET_MAX)}),
    "ack": ({"from": (bytes, KEY_LEN, KEY_LEN), "id": (bytes, ID_LEN, ID_LEN)}, {}),
}
HUB_FRAMES: dict[str, tuple[FrameSpec, FrameSpec]] = {
    "challenge": ({"challenge": (bytes, CHALLENGE_LEN, CHALLENGE_LEN),
                   "hub": (str, 1, MAX_URL)}, {}),
    "welcome": ({"queued": (int, 0, 2**32)}, {}),
    "ack": ({"id": (bytes, ID_LEN, ID_LEN)}, {}),
    "deliver": ({"from": (bytes, KEY_LEN, KEY_LEN), "id": (bytes, ID_LEN, ID_LEN),
                 "envelope": (bytes, 1, MAX_ENVELOPE)}, {}),
    "error": ({"error": (dict, 0, 16)}, {"id": (bytes, ID_LEN, ID_LEN), "retry": (bool, 0, 1)}),
}


class QueueFull(Rejected):
    """The recipient already has MAX_QUEUE envelopes waiting: send again later."""


# -- frames -------------------------------------------------------------------------------

def encode_frame(kind: str, **fields: Any) -> bytes:
    return msgpack.packb({"t": kind, **fields}, use_bin_type=True)


def decode_frame(data: Any, table: dict[str, tuple[FrameSpec, FrameSpec]]
                 ) -> tuple[str, dict[str, Any]]:
    """(type, fields) of a frame that matches `table` exactly; DecodeError otherwise."""
    obj = unpack(data, MAX_FRAME_BYTES)
    if not isinstance(obj, dict) or not isinstance(obj.get("t"), str):
        raise DecodeError("a frame is a map with a string `t`")
    kind = obj.pop("t")
    if kind not in table:
        raise DecodeError(f"unknown frame type {kind[:32]!r}")
    required, optional = table[kind]
    for name in obj:
        if name not in required and name not in optional:
            raise DecodeError(f"{kind} frame: unexpected field {str(name)[:32]!r}")
    for name, spec in required.items():
        if name not in obj:
            raise DecodeError(f"{kind} frame: missing field {name!r}")
        _check_field(kind, name, obj[name], spec)
    for name, spec in optional.items():
        if name in obj:
            _check_field(kind, name, obj[name], spec)
    return kind, obj


def _check_field(kind: str, name: str, value: Any, spec: tuple[type, int, int]) -> None:
    typ, lo, hi = spec
    if typ is bool:
        ok = isinstance(value, bool)
    elif typ is int:
        ok = isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi
    else:
        ok = (isinstance(value, bytes | str | dict) and isinstance(value, typ)
              and lo <= len(value) <= hi)
    if not ok:
        raise DecodeError(f"{kind} frame: field {name!r} must be {typ.__name__} ({lo}..{hi})")


def error_frame(err: PaychanError, id: bytes | None = None, retry: bool = False) -> bytes:
    extra: dict[str, Any] = {}
    if id is not None:
        extra["id"] = id
    if retry:
        extra["retry"] = True
    return encode_frame("error", error=err.to_wire(), **extra)


def normalize_hub_url(url: str) -> str:
    """`http(s)://host:port` for any spelling of a hub's address (ws://, a trailing /ws, ...)."""
    if not isinstance(url, str) or len(url) > MAX_URL:
        raise InvalidParams("a hub URL is a string like http://host:port")
    parts = urlsplit(url.strip())
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme.lower(), parts.scheme.lower())
    try:
        port = parts.port
    except ValueError:
        port = None
    if scheme not in ("http", "https") or not parts.hostname or port is None:
        raise InvalidParams(f"{url!r} is not a hub URL like http://host:port")
    if parts.path not in ("", "/", "/ws") or parts.query or parts.fragment:
        raise InvalidParams(f"{url!r}: a hub URL has no path besides /ws")
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


def login_fields(challenge: bytes, url: str, secret: bytes | None) -> list[Any]:
    """What a node signs under DOMAIN_HUB_LOGIN to log in."""
    return [challenge, url, secret or b""]


def secret_digest(secret: bytes) -> bytes:
    return hashlib.blake2b(secret, digest_size=32, person=b"paychan-hub-pair").digest()


def check_envelope(envelope: bytes, sender: bytes, recipient: bytes) -> None:
    """The outer fields of a Sealer envelope must name the logged-in sender and the recipient;
    the ciphertext is none of the hub's business."""
    try:
        obj = unpack(envelope, MAX_ENVELOPE)
    except DecodeError:
        raise BrokenEncoding("the envelope is not a sealed paychan envelope") from None
    if not (isinstance(obj, list) and len(obj) == 4 and obj[0] == "pc1"
            and isinstance(obj[3], bytes)):
        raise BrokenEncoding("the envelope is not a sealed paychan envelope")
    if obj[1] != sender or obj[2] != recipient:
        raise Unauthorized("the envelope names another sender or recipient")


# -- storage ------------------------------------------------------------------------------

class HubStore:
    """The hub's queues, pairs and secrets. Every write goes through the store's writer (sync);
    reads come straight from LMDB snapshots."""

    def __init__(self, store: Store, max_queue: int = MAX_QUEUE) -> None:
        self.store = store
        self.max_queue = max_queue

    def _fn(self, fn: Callable[[lmdb.Transaction, Store], Any]) -> asyncio.Future[Any]:
        return asyncio.wrap_future(self.store.writer.submit_fn(fn))

    def register_secret(self, node: bytes, secret: bytes) -> asyncio.Future[Any]:
        digest = secret_digest(secret)

        def put(txn: lmdb.Transaction, store: Store) -> None:
            db = store.db(KV)
            if txn.get(_SECRET + node, db=db) != digest:
                txn.put(_SECRET + node, digest, db=db)
        return self._fn(put)

    def accept(self, sender: bytes, to: bytes, id: bytes, envelope: bytes,
               secret: bytes | None) -> asyncio.Future[Any]:
        """Queue an envelope durably. True when stored, False for a duplicate of `id`;
        Unauthorized for a first contact without the right secret, QueueFull when full."""
        def put(txn: lmdb.Transaction, store: Store) -> bool:
            db = store.db(KV)
            if txn.get(_SEEN + sender + id, db=db) is not None:
                return False
            if txn.get(_PAIR + sender + to, db=db) is None:
                known = txn.get(_SECRET + to, db=db)
                if secret is None or known is None or not hmac.compare_digest(
                        bytes(known), secret_digest(secret)):
                    raise Unauthorized("first contact with this node needs its pairing secret")
                txn.put(_PAIR + sender + to, b"", db=db)
                txn.put(_PAIR + to + sender, b"", db=db)
            count = _u64_at(txn, _COUNT + to, db, 0)
            if count >= self.max_queue:
                raise QueueFull(f"the recipient has {count} envelopes waiting; send later")
            seq = _u64_at(txn, _NEXT, db, 1)
            txn.put(_QUEUE + to + u64(seq), pack([sender, id, envelope]), db=db)
            txn.put(_SEEN + sender + id, pack([to, seq, 0]), db=db)
            txn.put(_COUNT + to, u64(count + 1), db=db)
            txn.put(_NEXT, u64(seq + 1), db=db)
            return True
        return self._fn(put)

    def delivered(self, recipient: bytes, sender: bytes, id: bytes) -> asyncio.Future[Any]:
        """The recipient acknowledged (sender, id): delete it; remember the id for dedup."""
        now = int(time.time())

        def put(txn: lmdb.Transaction, store: Store) -> bool:
            db = store.db(KV)
            raw = txn.get(_SEEN + sender + id, db=db)
            if raw is None:
                return False
            to, seq, acked = unpack_value(raw)
            if to != recipient or acked:
                return False
            txn.delete(_QUEUE + to + u64(seq), db=db)
            count = _u64_at(txn, _COUNT + to, db, 1)
            if count <= 1:
                txn.delete(_COUNT + to, db=db)
            else:
                txn.put(_COUNT + to, u64(count - 1), db=db)
            txn.put(_SEEN + sender + id, pack([to, seq, now]), db=db)
            txn.put(_ACKED + u64(now) + sender + id, b"", db=db)
            return True
        return self._fn(put)

    def prune(self, before: int, limit: int = 10_000) -> asyncio.Future[Any]:
        """Forget acknowledged ids older than `before` (seconds): they no longer deduplicate."""
        def put(txn: lmdb.Transaction, store: Store) -> int:
            db = store.db(KV)
            done = 0
            with txn.cursor(db=db) as cur:
                ok = cur.set_range(_ACKED)
                while ok and done < limit:
                    key = bytes(cur.key())
                    at = key[len(_ACKED):len(_ACKED) + 8]
                    if not key.startswith(_ACKED) or from_u64(at) >= before:
                        break
                    txn.delete(_SEEN + key[len(_ACKED) + 8:], db=db)
                    ok = cur.delete()
                    done += 1
            return done
        return self._fn(put)

    def queued(self, recipient: bytes, after: int, limit: int
               ) -> list[tuple[int, bytes, bytes, bytes]]:
        """Up to `limit` of (seq, sender, id, envelope) waiting for `recipient`, seq > after."""
        prefix = _QUEUE + recipient
        out = []
        for key, value in self.store.iter_from(KV, prefix + u64(after + 1), prefix_end(prefix)):
            sender, id, envelope = unpack_value(value)
            out.append((from_u64(key[len(prefix):]), sender, id, envelope))
            if len(out) >= limit:
                break
        return out

    def count(self, recipient: bytes) -> int:
        raw = self.store.get(KV, _COUNT + recipient)
        return from_u64(raw) if raw is not None else 0


def _u64_at(txn: lmdb.Transaction, key: bytes, db: Any, default: int) -> int:
    raw = txn.get(key, db=db)
    return default if raw is None else from_u64(bytes(raw))


# -- the server -----------------------------------------------------------------------------

@dataclass(eq=False)
class _Conn:
    ws: web.WebSocketResponse
    key: bytes
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    inflight: set[tuple[bytes, bytes]] = field(default_factory=set)
    last_seq: int = 0
    sends: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(WINDOW))
    bad: int = 0


class Hub:
    """The relay. Runs on one asyncio loop; LMDB commits run on the store's writer thread."""

    def __init__(self, store: Store, urls: list[str], max_queue: int = MAX_QUEUE) -> None:
        self.db = HubStore(store, max_queue)
        # The URLs a login may be signed for; the first is the hub's own.
        self.urls = list(dict.fromkeys(normalize_hub_url(u) for u in urls))
        self.online: dict[bytes, _Conn] = {}
        self.refused = 0
        self._tasks: set[asyncio.Task[Any]] = set()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/ws", self._on_ws)
        app.router.add_get("/", self._on_root)
        return app

    async def _on_root(self, request: web.Request) -> web.Response:
        return web.Response(text=f"paychan hub {self.urls[0]}\n")

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        for conn in list(self.online.values()):
            await conn.ws.close(code=1001, message=b"hub shutting down")
        for task in list(self._tasks):
            task.cancel()

    async def prune_forever(self) -> None:
        while True:
            try:
                n = await self.db.prune(int(time.time()) - DEDUP_SECONDS)
                if n:
                    log.info("forgot %d acknowledged ids", n)
            except PaychanError as exc:
                log.warning("prune failed: %s", exc)
            await asyncio.sleep(PRUNE_EVERY)

    # -- one socket ----------------------------------------------------------------------
    async def _on_ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE, heartbeat=HEARTBEAT,
                                   compress=False)
        await ws.prepare(request)
        challenge = os.urandom(CHALLENGE_LEN)
        try:
            await ws.send_bytes(encode_frame("challenge", challenge=challenge, hub=self.urls[0]))
            key = await asyncio.wait_for(self._login(ws, challenge), LOGIN_TIMEOUT)
        except TimeoutError:
            await self._refuse(ws, Unauthorized("no login within "
                                                f"{LOGIN_TIMEOUT:.0f} s"))
            return ws
        except (ConnectionError, RuntimeError):
            return ws
        if key is None:
            return ws
        conn = _Conn(ws, key)
        old = self.online.get(key)
        self.online[key] = conn
        if old is not None:
            await old.ws.close(code=4000, message=b"logged in again elsewhere")
        pump = self.spawn(self._pump(conn))
        log.info("%s logged in (%d queued)", _who(key), self.db.count(key))
        try:
            await self._serve(conn)
        finally:
            pump.cancel()
            if self.online.get(key) is conn:
                del self.online[key]
            log.info("%s left", _who(key))
        return ws

    async def _refuse(self, ws: web.WebSocketResponse, err: PaychanError) -> None:
        self.refused += 1
        log.info("login refused: %s", err.message)
        try:
            await ws.send_bytes(error_frame(err))
            await ws.close(code=4001, message=b"login refused")
        except (ConnectionError, RuntimeError):
            pass

    async def _login(self, ws: web.WebSocketResponse, challenge: bytes) -> bytes | None:
        msg = await ws.receive()
        if msg.type is not WSMsgType.BINARY:
            if msg.type in (WSMsgType.ERROR, WSMsgType.TEXT):
                await self._refuse(ws, _msg_error(msg))
            return None
        try:
            kind, f = decode_frame(msg.data, NODE_FRAMES)
            if kind != "login":
                raise Unauthorized(f"log in first (got a {kind} frame)")
            url = normalize_hub_url(f["url"])
            if url not in self.urls:
                raise Unauthorized(f"signed for {url}, but this hub is {', '.join(self.urls)}")
            secret = f.get("secret")
            if not verify(f["key"], DOMAIN_HUB_LOGIN, login_fields(challenge, f["url"], secret),
                          f["sig"]):
                raise BadSignature("the login signature does not verify for this challenge")
        except PaychanError as exc:
            await self._refuse(ws, exc)
            return None
        key: bytes = f["key"]
        if secret is not None:
            try:
                await self.db.register_secret(key, secret)
            except PaychanError as exc:
                await self._refuse(ws, exc)
                return None
        await ws.send_bytes(encode_frame("welcome", queued=self.db.count(key)))
        return key

    async def _serve(self, conn: _Conn) -> None:
        ws = conn.ws
        async for msg in ws:
            if msg.type is not WSMsgType.BINARY:
                if await self._junk(conn, _msg_error(msg), msg.type is WSMsgType.ERROR):
                    return
                continue
            try:
                kind, f = decode_frame(msg.data, NODE_FRAMES)
                if kind == "login":
                    raise Unauthorized("already logged in")
            except PaychanError as exc:
                if await self._junk(conn, exc):
                    return
                continue
            if kind == "send":
                await conn.sends.acquire()
                self.spawn(self._send(conn, f))
            else:
                self.spawn(self._ack(conn, f["from"], f["id"]))
        if ws.exception() is not None:
            log.info("%s: socket error: %s", _who(conn.key), ws.exception())

    async def _junk(self, conn: _Conn, err: PaychanError, fatal: bool = False) -> bool:
        """Answer a bad frame; True when the socket is closed for it."""
        conn.bad += 1
        self.refused += 1
        log.info("%s: bad frame: %s", _who(conn.key), err.message)
        try:
            if not conn.ws.closed:
                await conn.ws.send_bytes(error_frame(err))
            if fatal or conn.bad >= MAX_BAD_FRAMES:
                await conn.ws.close(code=1008, message=b"too many bad frames")
                return True
        except (ConnectionError, RuntimeError):
            return True
        return False

    async def _send(self, conn: _Conn, f: dict[str, Any]) -> None:
        to, id, envelope = f["to"], f["id"], f["envelope"]
        try:
            check_envelope(envelope, conn.key, to)
            stored = await self.db.accept(conn.key, to, id, envelope, f.get("secret"))
            reply = encode_frame("ack", id=id)
        except QueueFull as exc:
            stored, reply = False, error_frame(exc, id, retry=True)
        except (Unauthorized, BrokenEncoding) as exc:
            self.refused += 1
            log.info("%s: envelope refused: %s", _who(conn.key), exc.message)
            stored, reply = False, error_frame(exc, id)
        except Exception as exc:  # the store failed: nothing was kept, the sender retries
            log.exception("%s: envelope not stored", _who(conn.key))
            stored, reply = False, error_frame(InternalError(f"not stored: {exc}"), id,
                                               retry=True)
        finally:
            conn.sends.release()
        # Durable before acknowledged: the commit above has finished.
        if stored:
            peer = self.online.get(to)
            if peer is not None:
                peer.wake.set()
        try:
            await conn.ws.send_bytes(reply)
        except (ConnectionError, RuntimeError):
            pass  # the sender resends after reconnecting; the id deduplicates

    async def _ack(self, conn: _Conn, sender: bytes, id: bytes) -> None:
        try:
            await self.db.delivered(conn.key, sender, id)
        except PaychanError as exc:
            log.warning("%s: ack not recorded: %s", _who(conn.key), exc)
            return
        conn.inflight.discard((sender, id))
        conn.wake.set()

    async def _pump(self, conn: _Conn) -> None:
        """Deliver the recipient's queue in order, at most WINDOW unacknowledged at once."""
        try:
            while not conn.ws.closed:
                conn.wake.clear()  # before reading, so a commit during the read wakes us
                room = WINDOW - len(conn.inflight)
                entries = self.db.queued(conn.key, conn.last_seq, room) if room > 0 else []
                for seq, sender, id, envelope in entries:
                    conn.last_seq = seq
                    conn.inflight.add((sender, id))
                    await conn.ws.send_bytes(encode_frame("deliver", envelope=envelope,
                                                          id=id, **{"from": sender}))
                if not entries:
                    await conn.wake.wait()
        except (ConnectionError, RuntimeError):
            return


def _who(key: bytes) -> str:
    return encode_address(key)


def _msg_error(msg: Any) -> PaychanError:
    if msg.type is WSMsgType.ERROR:
        return BrokenEncoding(f"bad WebSocket message: {msg.data}")
    if msg.type is WSMsgType.TEXT:
        return BrokenEncoding("frames are binary msgpack, not text")
    return BrokenEncoding(f"unexpected {msg.type.name} message")


async def serve(data_dir: str, host: str = "127.0.0.1", port: int = 0,
                urls: list[str] | None = None, max_queue: int = MAX_QUEUE,
                ready: Callable[[str], None] | None = None) -> None:
    """Run a hub until SIGTERM or SIGINT; then close every socket and drain the store.
    `urls` are further names nodes may dial it by (behind a proxy, a DNS name)."""
    # Bound before serving, so the hub knows its own URL before the first challenge.
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    own = f"http://{_url_host(host)}:{sock.getsockname()[1]}"
    names = [own, *(urls or [])]
    if host in ("127.0.0.1", "::1"):
        names.append(f"http://localhost:{sock.getsockname()[1]}")
    store = Store.open(data_dir)
    runner: web.AppRunner | None = None
    try:
        hub = Hub(store, names, max_queue)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        runner = web.AppRunner(hub.app(), access_log=None, handler_cancellation=True)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        pruner = hub.spawn(hub.prune_forever())
        log.info("hub at %s answers to %s", data_dir, ", ".join(hub.urls))
        (ready or (lambda u: print(f"hub listening on {u}", flush=True)))(own)
        await stop.wait()
        log.info("stopping")
        pruner.cancel()
        await hub.close()
    finally:
        if runner is not None:
            await runner.cleanup()
        sock.close()
        store.close()
    log.info("hub stopped")


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
