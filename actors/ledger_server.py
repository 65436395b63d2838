"""`paychan ledger serve`: an embedded ledger in its own process, over HTTP and a WebSocket.

Bodies are msgpack (`application/msgpack`) both ways because records hold bytes. Errors are the
`PaychanError.to_wire()` object: 400 for the caller's fault (a bad body, parameter or
transaction), 404 for an unknown channel or route, 405 for a method a route lacks, 408 for a
body not sent within BODY_TIMEOUT, 413 for a body over 256 KiB, 500 for the server's own
failure. Before any route runs, aiohttp itself
answers in plain text: 400 for bytes that do not parse as HTTP (and closes the connection),
417 for an `Expect` other than `100-continue`.

The event stream (`GET /events/ws?from=H`) sends every event above H as one binary frame,
oldest first, then follows live; `{"tick": now}` frames tell followers that the clock moved.
Followers send nothing: text and binary frames are ignored, a message of 4 KiB or more closes
the stream with 1009 (message too big), a malformed frame with 1002 (protocol error) and text
that is not UTF-8 with 1007.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import msgpack
from aiohttp import WSCloseCode, WSMsgType, web

from paychan.actors.clock import VirtualClock, WallClock
from paychan.actors.ledger import EmbeddedLedger
from paychan.protocol.errors import (
    INTERNAL_ERROR,
    ActionNotAllowed,
    BrokenEncoding,
    Conflict,
    InternalError,
    InvalidParams,
    MethodNotFound,
    NotANumber,
    NotFound,
    PaychanError,
    Timeout,
)
from paychan.protocol.identity import check_amount, decode_address, decode_channel_id
from paychan.protocol.wire import MAX_ASSET_LEN, unpack

log = logging.getLogger("paychan.ledger_server")

T = TypeVar("T")

CONTENT_TYPE = "application/msgpack"
MAX_BODY = 256 * 1024  # a request body; a transaction is far smaller
MAX_INCOMING = 4096  # one WebSocket message from a follower, which has nothing to say
MAX_INFLIGHT = 64  # requests served at once; more wait, so a flood cannot grow memory
BODY_TIMEOUT = 10.0  # seconds to send a body: a stalled upload must not keep its slot for good
MAX_PAGE = 1000  # events per GET /events page
BACKLOG_PAGE = 500  # events per store read while a follower catches up
MAX_PENDING = 4096  # frames waiting for one slow follower before it re-reads the store
MAX_ADVANCE = 10 * 365 * 24 * 3600  # one /advance; a bound so a typo cannot end the world
CLOCK_FILE = "virtual_clock"  # the virtual clock's reading, so a restart never turns it back
HEARTBEAT = 20.0  # seconds between WebSocket pings; a silent follower is dropped
SHUTDOWN_TIMEOUT = 5.0  # seconds requests in progress get to finish at shutdown


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def reply(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=pack(obj), status=status, content_type=CONTENT_TYPE)


def error_reply(err: PaychanError, status: int | None = None) -> web.Response:
    if status is None:
        status = 500 if err.code == INTERNAL_ERROR else 400
    return reply(err.to_wire(), status)


class _BodyTimeout(Timeout):
    """A body that did not arrive in time: answered 408, unlike the ledger's own timeouts."""


class _Follower:
    """One WebSocket's frames not yet sent. A follower that falls too far behind drops them
    and re-reads the store, so a slow reader costs bounded memory and still misses nothing."""

    def __init__(self) -> None:
        self.frames: deque[tuple[str, Any]] = deque()
        self.wake = asyncio.Event()
        self.behind = False

    def put(self, kind: str, value: Any) -> None:
        if len(self.frames) >= MAX_PENDING:
            self.frames.clear()
            self.behind = True
        self.frames.append((kind, value))
        self.wake.set()


class LedgerServer:
    """Serves one EmbeddedLedger. Ledger calls block on the actor, so they run on a thread
    pool and the event loop only parses, answers and streams."""

    def __init__(self, ledger: EmbeddedLedger, virtual_clock: bool,
                 body_timeout: float = BODY_TIMEOUT) -> None:
        self.ledger = ledger
        self.virtual_clock = virtual_clock
        self.body_timeout = body_timeout
        self._pool = ThreadPoolExecutor(16, thread_name_prefix="paychan-ledger-http")
        self._followers: set[_Follower] = set()
        self._sockets: set[web.WebSocketResponse] = set()
        self._advance_lock = asyncio.Lock()
        self._inflight = asyncio.Semaphore(MAX_INFLIGHT)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._token: int | None = None
        self._stopping = False
        self.runner: web.AppRunner | None = None
        self.port: int | None = None

    # -- life ------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._errors])
        r = app.router
        r.add_post("/tx", self._tx)
        r.add_get("/channel/{cid}", self._channel)
        r.add_get("/balance/{address}", self._balance)
        r.add_get("/now", self._now)
        r.add_get("/height", self._height)
        r.add_get("/events", self._events)
        r.add_get("/events/ws", self._events_ws)
        r.add_get("/info", self._info)
        r.add_post("/mint", self._mint)
        r.add_post("/advance", self._advance)
        app.on_shutdown.append(self._close_sockets)
        return app

    async def start(self, host: str, port: int) -> None:
        self._loop = asyncio.get_running_loop()
        # The actor calls listeners on its own thread; hand each event to the loop at once.
        self._token = await self._call(self.ledger.subscribe, self._from_actor)
        self.ledger.on_tick(self._tick_from_clock)
        self.runner = web.AppRunner(self.app(), access_log=None,
                                    shutdown_timeout=SHUTDOWN_TIMEOUT)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port)
        await site.start()
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else port

    async def stop(self) -> None:
        self._stopping = True
        if self._token is not None:
            await self._call(self.ledger.unsubscribe, self._token)
            self._token = None
        if self.runner is not None:
            await self.runner.cleanup()
        self._pool.shutdown(wait=True)

    async def _close_sockets(self, _app: web.Application) -> None:
        closing = [ws.close(code=WSCloseCode.GOING_AWAY, message=b"ledger stopping")
                   for ws in list(self._sockets)]
        if closing:
            # A follower that never answers the close must not hold the shutdown up.
            await asyncio.wait([asyncio.ensure_future(c) for c in closing],
                               timeout=SHUTDOWN_TIMEOUT)

    def _from_actor(self, event: dict[str, Any]) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._publish, "event", event)

    def _tick_from_clock(self, now: int) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._publish, "tick", now)

    def _publish(self, kind: str, value: Any) -> None:
        for follower in self._followers:
            follower.put(kind, value)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        assert self._loop is not None
        return await self._loop.run_in_executor(self._pool, fn, *args)

    # -- errors ----------------------------------------------------------------------------
    @web.middleware
    async def _errors(self, request: web.Request,
                      handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                      ) -> web.StreamResponse:
        try:
            if request.path == "/events/ws":  # long-lived, and bounded by its own queue
                return await handler(request)
            async with self._inflight:
                return await handler(request)
        except _BodyTimeout as exc:
            return error_reply(exc, 408)
        except PaychanError as exc:
            return error_reply(exc)
        except web.HTTPRequestEntityTooLarge:
            return error_reply(BrokenEncoding(f"request body over {MAX_BODY} bytes"), 413)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            where = f"{request.method} {request.path}"
            if exc.status in (404, 405):
                return error_reply(MethodNotFound(f"{where}: {exc.reason}"), exc.status)
            # aiohttp's other refusals (a plain GET of /events/ws) are a malformed request.
            return error_reply(BrokenEncoding(f"{where}: {exc.text or exc.reason}"), exc.status)
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            return error_reply(InternalError("the ledger server failed; see its log"))

    # -- requests --------------------------------------------------------------------------
    async def _body(self, request: web.Request) -> bytes:
        if request.content_length is not None and request.content_length > MAX_BODY:
            raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY,
                                                actual_size=request.content_length)
        try:
            async with asyncio.timeout(self.body_timeout):
                body = await request.read()
        except TimeoutError:
            raise _BodyTimeout(f"the request body did not arrive within "
                               f"{self.body_timeout:g} s") from None
        except web.RequestPayloadError:
            # The body broke its own chunked framing or Content-Encoding: the caller's fault.
            raise BrokenEncoding("the request body does not decode (broken chunked framing "
                                 "or Content-Encoding)") from None
        except ConnectionResetError:
            # The caller left before sending the length it announced. Nobody reads the answer;
            # a 400 keeps it out of the log of the server's own failures.
            raise BrokenEncoding("the request body was cut short") from None
        if not body:
            raise BrokenEncoding("empty request body")
        return body

    async def _map(self, request: web.Request) -> dict[str, Any]:
        obj = unpack(await self._body(request))
        if not isinstance(obj, dict):
            raise BrokenEncoding("the request body must be a msgpack map")
        return obj

    async def _tx(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        event = await self._call(self.ledger.submit, body)
        return reply(event)

    async def _channel(self, request: web.Request) -> web.Response:
        cid = _channel_id(request.match_info["cid"])
        record = await self._call(self.ledger.channel, cid)
        if record is None:
            return error_reply(NotFound(f"no channel {cid.hex()} on this ledger"), 404)
        return reply({"record": record.to_obj()})

    async def _balance(self, request: web.Request) -> web.Response:
        address = decode_address(request.match_info["address"])
        asset = _asset(request.query.get("asset", "base"))
        return reply({"balance": await self._call(self.ledger.balance, address, asset)})

    async def _now(self, request: web.Request) -> web.Response:
        return reply({"now": self.ledger.now()})

    async def _height(self, request: web.Request) -> web.Response:
        return reply({"height": await self._call(self.ledger.height)})

    async def _events(self, request: web.Request) -> web.Response:
        start = _query_int(request, "from", 0)
        limit = _query_int(request, "limit", MAX_PAGE)
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidParams(f"limit must be between 1 and {MAX_PAGE}")
        return reply({"events": await self._call(self.ledger.events_since, start, limit)})

    async def _info(self, request: web.Request) -> web.Response:
        return reply({"network_id": self.ledger.network_id,
                      "height": await self._call(self.ledger.height),
                      "virtual_clock": self.virtual_clock, "now": self.ledger.now()})

    async def _mint(self, request: web.Request) -> web.Response:
        obj = await self._map(request)
        address = decode_address(obj.get("address"))
        amount = check_amount(obj.get("amount"), "amount")
        asset = _asset(obj.get("asset", "base"))
        return reply({"balance": await self._call(self.ledger.mint, address, amount, asset)})

    async def _advance(self, request: web.Request) -> web.Response:
        if not self.virtual_clock:
            raise ActionNotAllowed("this ledger runs on the wall clock; start it with "
                                   "--virtual-clock to advance time")
        obj = await self._map(request)
        seconds = obj.get("seconds")
        if isinstance(seconds, bool) or not isinstance(seconds, int):
            raise NotANumber("seconds must be an integer")
        if not 0 <= seconds <= MAX_ADVANCE:
            raise InvalidParams(f"seconds must be between 0 and {MAX_ADVANCE}")
        async with self._advance_lock:
            target = self.ledger.now() + seconds
            # Durable before it takes effect: a restarted ledger never reads an earlier time.
            await self._call(save_clock, self.ledger.data_dir, target)
            await self._call(self.ledger.advance, seconds)
        return reply({"now": self.ledger.now()})

    # -- the event stream ------------------------------------------------------------------
    async def _events_ws(self, request: web.Request) -> web.StreamResponse:
        height = await self._call(self.ledger.height)
        last = _query_int(request, "from", height)
        if last > height:
            # Only a wiped or different ledger is behind what a follower has already seen.
            raise Conflict(f"the ledger is at height {height}, below {last}")
        ws = web.WebSocketResponse(heartbeat=HEARTBEAT, max_msg_size=MAX_INCOMING)
        await ws.prepare(request)
        log.info("follower %s from height %d", request.remote, last)
        follower = _Follower()
        # Registered before reading the backlog: an event is in one or the other (or both,
        # and heights drop the copy), never in neither.
        self._followers.add(follower)
        self._sockets.add(ws)
        if self._stopping:  # it raced with shutdown, which closed the sockets it knew of
            self._followers.discard(follower)
            self._sockets.discard(ws)
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"ledger stopping")
            return ws
        pump = asyncio.create_task(self._pump(ws, follower, last))
        reader = asyncio.create_task(_ignore_incoming(ws))
        try:
            await asyncio.wait({pump, reader}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._followers.discard(follower)
            self._sockets.discard(ws)
            for task in (pump, reader):
                task.cancel()
            ended = await asyncio.gather(pump, reader, return_exceptions=True)
            if isinstance(ended[0], Exception):
                log.info("event stream to %s ended: %r", request.remote, ended[0])
            await ws.close()
        return ws

    async def _pump(self, ws: web.WebSocketResponse, follower: _Follower, last: int) -> None:
        last = await self._backlog(ws, last)
        await ws.send_bytes(pack({"tick": self.ledger.now()}))
        while True:
            await follower.wake.wait()
            follower.wake.clear()
            if follower.behind:
                follower.behind = False
                last = await self._backlog(ws, last)
            while follower.frames:
                kind, value = follower.frames.popleft()
                if kind == "tick":
                    await ws.send_bytes(pack({"tick": value}))
                    continue
                height = value["height"]
                if height <= last:
                    continue
                if height > last + 1:  # frames were dropped: the store has them all
                    last = await self._backlog(ws, last)
                    continue
                await ws.send_bytes(pack(value))
                last = height

    async def _backlog(self, ws: web.WebSocketResponse, last: int) -> int:
        while True:
            events = await self._call(self.ledger.events_since, last, BACKLOG_PAGE)
            if not events:
                return last
            for event in events:
                await ws.send_bytes(pack(event))
                last = event["height"]


async def _ignore_incoming(ws: web.WebSocketResponse) -> None:
    """Followers send nothing; reading is how a close or a dead peer is noticed."""
    async for msg in ws:
        if msg.type == WSMsgType.ERROR:
            return


def _query_int(request: web.Request, name: str, default: int) -> int:
    text = request.query.get(name)
    if text is None:
        return default
    if not text.isascii() or not text.isdigit() or len(text) > 19:
        raise NotANumber(f"{name} must be a non-negative integer")
    return int(text)


def _channel_id(text: str) -> bytes:
    if text.startswith("ch_"):
        return decode_channel_id(text)
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise BrokenEncoding("a channel id is 64 hex digits or ch_...") from None
    if len(raw) != 32:
        raise BrokenEncoding("a channel id is 32 bytes")
    return raw


def _asset(value: Any) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ASSET_LEN:
        raise InvalidParams(f"asset must be a string of 1 to {MAX_ASSET_LEN} characters")
    return value


# -- the virtual clock across restarts ---------------------------------------------------------
def load_clock(data_dir: str) -> int | None:
    try:
        with open(os.path.join(data_dir, CLOCK_FILE), encoding="ascii") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def save_clock(data_dir: str, now: int) -> None:
    path = os.path.join(data_dir, CLOCK_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="ascii") as f:
        f.write(str(now))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(data_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _restore_clock(ledger: EmbeddedLedger) -> None:
    """Start the virtual clock where it stood: the saved reading, or at least the time of the
    last event (in case the reading was lost)."""
    floor = load_clock(ledger.data_dir) or 0
    height = ledger.height()
    if height:
        last = ledger.events_since(height - 1, 1)
        if last:
            floor = max(floor, int(last[0]["time"]))
    if floor > ledger.now():
        ledger.advance(floor - ledger.now())


# -- the process ------------------------------------------------------------------------------
async def _serve(ledger: EmbeddedLedger, host: str, port: int, virtual_clock: bool) -> int:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    server = LedgerServer(ledger, virtual_clock)
    try:
        await server.start(host, port)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", host, port, exc)
        await server.stop()
        return 1
    print(f"ledger listening on http://{host}:{server.port}", flush=True)
    log.info("ledger %r at %s, height %d, %s clock", ledger.network_id, ledger.data_dir,
             ledger.height(), "virtual" if virtual_clock else "wall")
    await stopping.wait()
    log.info("stopping")
    await server.stop()
    return 0


def run(data_dir: str, host: str = "127.0.0.1", port: int = 7000, virtual_clock: bool = False,
        network_id: str = "paychan-dev") -> int:
    """Serve the ledger stored in `data_dir` until SIGTERM or SIGINT, then stop the actor and
    close LMDB. Returns the process exit code."""
    os.makedirs(data_dir, exist_ok=True)
    clock = VirtualClock() if virtual_clock else WallClock()
    ledger = EmbeddedLedger(data_dir, clock, network_id)
    try:
        if virtual_clock:
            _restore_clock(ledger)
        return asyncio.run(_serve(ledger, host, port, virtual_clock))
    finally:
        ledger.close()
        log.info("ledger closed")
