"""RemoteLedger: a node's LedgerClient for a ledger served by `paychan ledger serve`.

Every method blocks its caller, as the embedded ledger's do. The HTTP work runs on one private
event loop in a daemon thread with one keep-alive session; the caller waits on a future with a
timeout, and that loop never waits on anything but the network. Listeners and tick callbacks
run on a separate dispatcher thread, in ledger order, so they may block or call back in.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
import msgpack

from paychan.protocol.contract import ChannelRecord
from paychan.protocol.errors import (
    BrokenEncoding,
    InvalidParams,
    NotFound,
    PaychanError,
    Rejected,
    from_wire,
)
from paychan.protocol.identity import check_amount, encode_address

log = logging.getLogger("paychan.ledger_client")

T = TypeVar("T")
Listener = Callable[[dict[str, Any]], None]

CONTENT_TYPE = "application/msgpack"
NOW_TTL = 0.25  # seconds a virtual-clock reading holds while no stream brings its ticks
WALL_TTL = 30.0  # seconds a wall-clock reading is extrapolated before it is read again
NOW_TIMEOUT = 2.0  # a clock read on a caller's path (every channel step) waits no longer
NOW_RETRY = 1.0  # after a failed clock read, the last reading stands this long untried
MAX_FRAME = 1024 * 1024  # one event-stream frame; an event is a few hundred bytes
RECONNECT_FIRST, RECONNECT_MAX = 0.1, 2.0  # event-stream reconnect backoff, seconds
HEARTBEAT = 10.0  # WebSocket pings; a ledger that stops answering them is reconnected


class LedgerUnreachable(Rejected, ConnectionError):
    """The ledger server does not answer, or answered garbage from a proxy: transient, so
    the watcher retries. Both a PaychanError and a ConnectionError."""


class RemoteLedger:
    """The LedgerClient protocol of actors/node.py over HTTP, plus mint/advance/height/close."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise InvalidParams(f"a ledger URL is http(s)://host:port, not {url!r}")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._lock = threading.Lock()
        self._listeners: dict[int, tuple[Listener, int]] = {}  # token -> (listener, from height)
        self._ticks: list[Callable[[int], None]] = []
        self._next = 0
        self._now: tuple[int, float] | None = None  # (ledger time, monotonic when read)
        self._now_retry_at = 0.0
        self._live = False  # the stream is connected and has ticked: later ticks will come
        self._closed = False
        # Owned by the loop thread only:
        self._stream: asyncio.Task[None] | None = None
        self._last = 0  # height of the last event the stream handed to the dispatcher
        self.stream_connects = 0  # how many times the event stream (re)connected
        self._session: aiohttp.ClientSession | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="paychan-ledger-client")
        self._thread.start()
        self._queue: queue.SimpleQueue[tuple[str, Any] | None] = queue.SimpleQueue()
        self._dispatcher = threading.Thread(target=self._dispatch, daemon=True,
                                            name="paychan-ledger-events")
        self._dispatcher.start()
        try:
            self._run(self._open_session(), 10.0)
            info = self.info()
        except BaseException:
            self.close()
            raise
        self.network_id: str = info["network_id"]
        self.virtual_clock: bool = bool(info["virtual_clock"])
        self._saw_time(int(info["now"]))

    # -- plumbing --------------------------------------------------------------------------
    async def _open_session(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=64, keepalive_timeout=60),
            timeout=aiohttp.ClientTimeout(total=self.timeout, connect=10.0))

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("RemoteLedger's blocking calls cannot run on its own loop")
        if self._closed:
            coro.close()
            raise LedgerUnreachable(f"the client of {self.url} is closed")
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        limit = self.timeout + 5.0 if timeout is None else timeout
        try:
            return fut.result(limit)
        except TimeoutError:
            fut.cancel()
            raise LedgerUnreachable(f"{self.url}: no answer within {limit:.0f} s") from None

    async def _request(self, method: str, path: str, body: bytes | None = None,
                       params: dict[str, str] | None = None, retry: bool = False) -> Any:
        """One request; `retry` (idempotent requests only) tries once more when a kept-alive
        connection turns out to be dead, as after a server restart."""
        assert self._session is not None
        headers = {"Accept": CONTENT_TYPE}
        if body is not None:
            headers["Content-Type"] = CONTENT_TYPE
        for attempt in (1, 2):
            try:
                async with self._session.request(method, self.url + path, data=body,
                                                 params=params, headers=headers) as r:
                    status = r.status
                    raw = await r.read()
                break
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                if retry and attempt == 1 and not isinstance(exc, aiohttp.ClientConnectorError):
                    continue
                raise LedgerUnreachable(f"{self.url}{path}: {exc or type(exc).__name__}") \
                    from None
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                raise LedgerUnreachable(f"{self.url}{path}: {exc or type(exc).__name__}") \
                    from None
        try:
            obj = msgpack.unpackb(raw, raw=False, strict_map_key=False)
        except Exception:
            if status >= 500:
                raise LedgerUnreachable(f"{self.url}{path}: HTTP {status}") from None
            raise BrokenEncoding(f"{self.url}{path}: HTTP {status} with a body that is not "
                                 "msgpack; is this a paychan ledger?") from None
        if status >= 400:
            raise from_wire(obj)
        return obj

    def _get(self, path: str, params: dict[str, str] | None = None,
             timeout: float | None = None) -> Any:
        return self._run(self._request("GET", path, params=params, retry=True), timeout)

    def _post(self, path: str, body: bytes, idempotent: bool = False) -> Any:
        return self._run(self._request("POST", path, body, retry=idempotent))

    # -- the LedgerClient protocol ---------------------------------------------------------
    def info(self) -> dict[str, Any]:
        info: dict[str, Any] = self._get("/info")
        return info

    def now(self) -> int:
        """The ledger's clock, mostly without a round trip: every channel step asks for it.

        A virtual clock's reading holds while the event stream is connected (each /advance
        sends a tick, and our own `advance` answers with the time) and for NOW_TTL otherwise;
        a wall clock's reading is extrapolated for WALL_TTL. While the ledger does not answer,
        the last reading stands: payments are off-ledger and must go on without it, and the
        ledger transactions that need it fail and are retried on their own."""
        with self._lock:
            reading = self._now
        at = time.monotonic()
        if reading is not None:
            age = at - reading[1]
            fresh = (self._live or age < NOW_TTL) if self.virtual_clock else age < WALL_TTL
            if fresh or at < self._now_retry_at:
                return self._estimate(reading, at)
        try:
            return self._saw_time(int(self._get("/now", timeout=NOW_TIMEOUT)["now"]))
        except PaychanError:
            if reading is None:
                raise
            self._now_retry_at = time.monotonic() + NOW_RETRY
            return self._estimate(reading, time.monotonic())

    def _estimate(self, reading: tuple[int, float], at: float) -> int:
        value, read_at = reading
        return value if self.virtual_clock else value + int(at - read_at)

    def _saw_time(self, now: int) -> int:
        """Remember a clock reading. Ledger time never goes back, so an answer overtaken by
        a later tick leaves the later reading in place."""
        at = time.monotonic()
        with self._lock:
            if self._now is None or self._estimate(self._now, at) <= now:
                self._now = (now, at)
            return self._estimate(self._now, at)

    def submit(self, tx_bytes: bytes) -> dict[str, Any]:
        # Safe to resend: the ledger answers a known txid with its original event.
        event: dict[str, Any] = self._post("/tx", bytes(tx_bytes), idempotent=True)
        return event

    def channel(self, channel_id: bytes) -> ChannelRecord | None:
        try:
            reply = self._get(f"/channel/{bytes(channel_id).hex()}")
        except NotFound:
            return None
        return ChannelRecord.from_obj(reply["record"])

    def balance(self, address: bytes, asset: str = "base") -> int:
        return int(self._get(f"/balance/{encode_address(address)}", {"asset": asset})["balance"])

    def events_since(self, height: int, limit: int = 1000) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = self._get(
            "/events", {"from": str(int(height)), "limit": str(int(limit))})["events"]
        return events

    def height(self) -> int:
        return int(self._get("/height")["height"])

    def mint(self, address: bytes, amount: int, asset: str = "base") -> int:
        """Dev faucet; returns the account's new balance."""
        body = msgpack.packb({"address": encode_address(address),
                              "amount": check_amount(amount), "asset": asset})
        return int(self._post("/mint", body)["balance"])

    def advance(self, seconds: int) -> None:
        """Move the server's virtual clock (ActionNotAllowed on a wall-clock ledger)."""
        reply = self._post("/advance", msgpack.packb({"seconds": seconds}))
        self._saw_time(int(reply["now"]))

    # -- the event stream ------------------------------------------------------------------
    def subscribe(self, listener: Listener) -> int:
        """Hear every event after the ledger's current height, exactly once and in order,
        across reconnects: the stream resumes from the last height it delivered."""
        start = self.height()
        with self._lock:
            self._next += 1
            token = self._next
            self._listeners[token] = (listener, start)
        self._run(self._follow_from(start), 10.0)
        return token

    def unsubscribe(self, token: int) -> None:
        with self._lock:
            self._listeners.pop(token, None)
            idle = not self._listeners
        if idle and not self._closed:
            self._run(self._stop_following(), 10.0)

    def on_tick(self, callback: Callable[[int], None]) -> None:
        """Hear the ledger's virtual clock move. Ticks ride on the event stream, so they
        arrive while some listener is subscribed; a wall-clock ledger needs polling."""
        with self._lock:
            self._ticks.append(callback)

    async def _follow_from(self, start: int) -> None:
        if self._stream is None or self._stream.done():
            self._last = start
            self._stream = asyncio.get_running_loop().create_task(self._follow())

    async def _stop_following(self) -> None:
        if self._stream is not None:
            self._stream.cancel()
            await asyncio.gather(self._stream, return_exceptions=True)
            self._stream = None

    async def _follow(self) -> None:
        delay = RECONNECT_FIRST
        while True:
            assert self._session is not None
            try:
                async with self._session.ws_connect(
                        self.url + "/events/ws", params={"from": str(self._last)},
                        heartbeat=HEARTBEAT, max_msg_size=MAX_FRAME,
                        timeout=aiohttp.ClientWSTimeout(ws_close=5.0)) as ws:
                    self.stream_connects += 1
                    if self.stream_connects > 1:
                        log.info("event stream to %s back, from height %d", self.url,
                                 self._last)
                    delay = RECONNECT_FIRST
                    async for msg in ws:
                        if msg.type == aiohttp.WSMsgType.BINARY:
                            self._on_frame(msg.data)
                        elif msg.type == aiohttp.WSMsgType.ERROR:
                            break
                reason = "closed by the ledger"
            except asyncio.CancelledError:
                self._live = False
                raise
            except aiohttp.WSServerHandshakeError as exc:
                reason = f"refused ({exc.status})"
            except Exception as exc:  # the ledger is away: try again, never give up
                reason = f"{type(exc).__name__}: {exc}"
            self._live = False
            log.info("event stream to %s lost (%s); reconnecting in %.1f s", self.url, reason,
                     delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX)

    def _on_frame(self, data: bytes) -> None:
        try:
            frame = msgpack.unpackb(data, raw=False, strict_map_key=False)
            if "tick" in frame:
                now = self._saw_time(int(frame["tick"]))
                self._live = True  # the ledger sends one on (re)connect, then one per move
                self._queue.put(("tick", now))
                return
            height = int(frame["height"])
        except Exception as exc:
            log.warning("event stream from %s: frame refused: %r", self.url, exc)
            return
        if height <= self._last:
            return  # already delivered before a reconnect
        if height != self._last + 1:
            log.warning("event stream from %s skipped from height %d to %d", self.url,
                        self._last, height)
        self._last = height
        self._queue.put(("event", frame))

    def _dispatch(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            kind, value = item
            with self._lock:
                listeners = list(self._listeners.values())
                ticks = list(self._ticks)
            if kind == "event":
                for listener, start in listeners:
                    if value["height"] > start:
                        _call_quietly(listener, value)
            else:
                for callback in ticks:
                    _call_quietly(callback, value)

    # -- life ------------------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._lock:
            self._listeners.clear()
        if self._thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
            except Exception:
                log.exception("ledger client did not stop cleanly")
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            if not self._thread.is_alive():
                self._loop.close()
        self._queue.put(None)
        if threading.current_thread() is not self._dispatcher:
            self._dispatcher.join(timeout=10)

    async def _shutdown(self) -> None:
        await self._stop_following()
        if self._session is not None:
            await self._session.close()

    def __enter__(self) -> RemoteLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _call_quietly(fn: Callable[[Any], None], value: Any) -> None:
    try:
        fn(value)
    except Exception:  # one listener's fault must not stop the others or the stream
        log.exception("ledger listener failed")


__all__ = ["LedgerUnreachable", "RemoteLedger"]
