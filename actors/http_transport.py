"""HTTP(S) peer transport on aiohttp: every node is both server and client, envelopes are Boxes."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import threading
import time
import types
from collections import deque
from collections.abc import Callable, Generator
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import msgpack
from aiohttp import web

from paychan.actors.loopcall import LoopCalls
from paychan.actors.transport import Deliver, OwnLoop
from paychan.protocol.errors import BrokenEncoding, PaychanError, Rejected, Timeout, Unauthorized
from paychan.protocol.wire import MAX_FRAME

log = logging.getLogger("paychan.http")

MAX_BODY = MAX_FRAME + 2048  # an envelope: the frame plus the Box's overhead
MAX_INFLIGHT = 64  # requests served at once; more wait for a slot
# Requests waiting for one; more are refused (503): aiohttp buffers up to a whole body for each
# request it hands us, so this bounds that memory too (128 bodies of MAX_BODY, about 18 MB).
MAX_WAITING = 64
BODY_TIMEOUT = 30.0  # seconds a request holding one of those slots may take to send its body
# Inbound sockets open at once. A peer keeps one, so only a flood gets near it.
MAX_SOCKETS = 512
# Inbound connections of any kind (sockets, requests, idle or half-sent ones) are counted at
# accept, as aiohttp bounds none of them and each holds a file descriptor: at most the sockets,
# the requests served and waiting, and these spare ones (704 by default; with the client's 256
# outbound connections the node stays under the usual limit of 1,024 open files).
SPARE_CONNECTIONS = 64
# Seconds a connection counts before it is set up. Only a TLS handshake takes that long (a
# real one takes milliseconds); one abandoned half-way is never reported, so it stops counting
# then, lest a burst of them keep everyone out after it ended.
PENDING_WINDOW = 10.0
# Seconds an inbound socket may stay open without one accepted envelope: a peer dials when it
# has something to send, so a socket that says nothing only holds a place under MAX_SOCKETS.
FIRST_ENVELOPE_TIMEOUT = 30.0
SILENT = 4003  # the close code for it
MAX_QUEUED = 4096  # outgoing envelopes per peer waiting for it to come back
MAX_STRIKES = 16  # refused frames before a socket is closed
REDIAL_FOR = 300.0  # seconds a peer whose socket broke is redialed with nothing to send
REPLY_TO = "X-Paychan-Reply-To"

Socket = aiohttp.ClientWebSocketResponse | web.WebSocketResponse


class PeerUnreachable(Rejected):
    """The peer's URL does not answer, or its certificate is not trusted."""


def client_ssl(ca_file: str | None) -> ssl.SSLContext:
    """Verify peers against `ca_file` (a test CA) or the system's trust store."""
    ctx = ssl.create_default_context(cafile=ca_file)
    return ctx


class HttpTransport(OwnLoop):
    """Owns one event-loop thread; the node's threads hand it work with call_soon_threadsafe."""

    name = "http"

    def __init__(self, listen: str | None, info: dict[str, Any], cert_file: str | None = None,
                 key_file: str | None = None, ca_file: str | None = None,
                 max_sockets: int = MAX_SOCKETS, max_connections: int | None = None) -> None:
        self.listen = listen.rstrip("/") if listen else None
        self.info = info
        self.max_sockets = max_sockets
        self.max_connections = (max_connections if max_connections is not None else
                                max_sockets + MAX_INFLIGHT + MAX_WAITING + SPARE_CONNECTIONS)
        self.cert_file, self.key_file, self.ca_file = cert_file, key_file, ca_file
        self.on_reconnect: Callable[[bytes], None] | None = None
        self._deliver: Deliver | None = None
        self._loop = asyncio.new_event_loop()
        self._calls = LoopCalls.of(self._loop)
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="paychan-http")
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._queues: dict[bytes, deque[bytes]] = {}
        self._workers: dict[bytes, asyncio.Task[None]] = {}
        self._urls: dict[bytes, str] = {}
        self._outbound: dict[bytes, Socket] = {}
        self._inbound: dict[bytes, Socket] = {}
        self._gone: set[bytes] = set()
        self._sockets: set[Socket] = set()  # every open socket, the peer known or not yet
        self._accepted: set[web.WebSocketResponse] = set()  # the inbound ones, up to max_sockets
        self._turned_away = 0  # upgrades refused since the last one accepted
        self._last_turned_away = -1e9  # when a connection was last turned away
        self._closing = False
        self._limit: asyncio.Semaphore | None = None
        self._posts = 0  # requests served or waiting for a slot
        self.refused = 0
        self.bound_port: int | None = None

    # -- life ------------------------------------------------------------------------------
    def start(self, deliver: Deliver) -> None:
        self._deliver = deliver
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)

    async def _start(self) -> None:
        self._limit = asyncio.Semaphore(MAX_INFLIGHT)
        ssl_ctx = client_ssl(self.ca_file)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256, ssl=ssl_ctx, keepalive_timeout=60),
            timeout=aiohttp.ClientTimeout(total=15))
        if self.listen is None:
            return
        url = urlsplit(self.listen)
        server_ssl = None
        if url.scheme == "https":
            if not (self.cert_file and self.key_file):
                raise Unauthorized("an https:// listen URL needs a certificate and a key")
            server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            server_ssl.load_cert_chain(self.cert_file, self.key_file)
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_post("/envelope", self._on_post)
        app.router.add_get("/ws", self._on_ws)
        app.router.add_get("/info", self._on_info)
        self._runner = _CappedRunner(app, self.max_connections, self._connection_refused,
                                     access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, url.hostname or "127.0.0.1", url.port or 0,
                           ssl_context=server_ssl)
        await site.start()
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        if sockets:
            self.bound_port = sockets[0].getsockname()[1]
        log.info("listening on %s", self.listen)

    def close(self) -> None:
        if not self._thread.is_alive():
            if self._thread.ident is None and not self._loop.is_closed():
                self._loop.close()  # never started (its node failed to open): its sockets
            return
        try:
            asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        except Exception:
            log.exception("http transport did not stop cleanly")
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()  # its selector and wake-up sockets, not left to the collector

    async def _stop(self) -> None:
        self._closing = True
        for task in self._workers.values():
            task.cancel()
        for ws in list(self._sockets):
            await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    # -- server ----------------------------------------------------------------------------
    async def _on_info(self, request: web.Request) -> web.Response:
        return web.json_response(self.info)

    def _connection_refused(self) -> None:
        self.refused += 1
        now = time.monotonic()
        if now - self._last_turned_away > 10.0:  # a line per flood, not per connection
            log.warning("over %d connections open; turning new ones away",
                        self.max_connections)
        self._last_turned_away = now

    async def _on_ws(self, request: web.Request) -> web.StreamResponse:
        if len(self._accepted) >= self.max_sockets:
            # Each open socket holds buffers and a file descriptor: a flood of upgrades would
            # grow memory and could leave no descriptor for the ledger or the store.
            self.refused += 1
            self._turned_away += 1
            if self._turned_away == 1:  # once per burst; its size is logged when it ends
                log.warning("%d inbound sockets open: refusing more until some close",
                            len(self._accepted))
            return _error(503, Rejected(f"over {self.max_sockets} sockets open; retry later"))
        if self._turned_away:
            log.info("accepting sockets again; %d were refused meanwhile", self._turned_away)
            self._turned_away = 0
        ws = web.WebSocketResponse(max_msg_size=MAX_BODY + 1, heartbeat=30)
        self._accepted.add(ws)  # before the first await, so a burst cannot overshoot the cap
        try:
            await ws.prepare(request)
            if self._closing:  # a peer redialing us as we stop: the runner would wait for it
                await ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"node stopping")
                return ws
            self._sockets.add(ws)
            quiet = self._loop.call_later(FIRST_ENVELOPE_TIMEOUT, self._close_silent, ws)
            try:
                await self._read(ws, None, _route(request.headers.get(REPLY_TO)), quiet)
            finally:
                quiet.cancel()
        finally:
            self._accepted.discard(ws)
        return ws

    def _close_silent(self, ws: web.WebSocketResponse) -> None:
        if ws.closed:
            return
        log.info("closing a socket that sent no envelope in %g s", FIRST_ENVELOPE_TIMEOUT)
        self._loop.create_task(ws.close(code=SILENT, message=b"no envelope in time"))

    async def _on_post(self, request: web.Request) -> web.Response:
        if request.content_length is not None and request.content_length > MAX_BODY:
            self.refused += 1  # refused from its headers: it needs no slot
            return _error(413, BrokenEncoding(f"body over {MAX_BODY} bytes"))
        if self._posts >= MAX_INFLIGHT + MAX_WAITING:
            self.refused += 1
            return _error(503, Rejected("too many requests at once; retry later"))
        self._posts += 1
        try:
            return await self._serve_post(request)
        finally:
            self._posts -= 1

    async def _serve_post(self, request: web.Request) -> web.Response:
        assert self._limit is not None
        async with self._limit:
            try:
                # The whole body: a read returns what has arrived so far, a body sent in
                # pieces would be cut. A body that stalls gives its slot up, else a few
                # slow senders would hold every slot.
                async with asyncio.timeout(BODY_TIMEOUT):
                    body = await request.read()  # over client_max_size (MAX_BODY): raises
            except web.HTTPRequestEntityTooLarge:
                self.refused += 1
                return _error(413, BrokenEncoding(f"body over {MAX_BODY} bytes"))
            except TimeoutError:
                self.refused += 1
                return _error(408, Timeout(f"body not received within {BODY_TIMEOUT:g} s"))
            except Exception:  # the sender went away mid-body
                self.refused += 1
                return _error(400, BrokenEncoding("truncated body"))
            if not body:
                self.refused += 1
                return _error(400, BrokenEncoding("empty body"))
            assert self._deliver is not None
            refused = self._deliver(body, _route(request.headers.get(REPLY_TO)))
            if refused is not None:
                self.refused += 1
                return _error(401 if refused.code == 1 else 400, refused)
            return web.Response(status=202)

    # -- client ----------------------------------------------------------------------------
    def can_reach(self, peer: bytes, route: dict[str, Any] | None) -> bool:
        return route is not None and route.get("via") == "http"

    def send(self, peer: bytes, envelope: bytes, route: dict[str, Any] | None) -> None:
        url = route.get("url") if route else None
        self._calls.call(self._enqueue, peer, url, envelope)

    def _enqueue(self, peer: bytes, url: str | None, envelope: bytes) -> None:
        if self._closing:
            return  # stopping: no worker would be left to send it (sync resends what matters)
        if url:
            self._urls[peer] = url
        queue = self._queues.get(peer)
        if not queue and peer not in self._gone:
            worker = self._workers.get(peer)
            if worker is None or worker.done():
                ws = self._open_socket(peer)
                if ws is not None and self._send_now(peer, ws, envelope):
                    return
        if queue is None:
            queue = self._queues[peer] = deque()
        if len(queue) >= MAX_QUEUED:
            queue.popleft()  # the oldest goes; sync resends whatever still matters
        queue.append(envelope)
        self._wake(peer)

    def _wake(self, peer: bytes) -> None:
        worker = self._workers.get(peer)
        if worker is None or worker.done():
            self._workers[peer] = self._loop.create_task(self._drain(peer))

    def _send_now(self, peer: bytes, ws: Socket, envelope: bytes) -> bool:
        """Write a frame at once, with no task and no loop turn (a peer with nothing queued and
        an open socket). False if the socket refused it: the caller queues it instead."""
        coro = ws.send_bytes(envelope)
        try:
            awaited = coro.send(None)
        except StopIteration:
            return True
        except (aiohttp.ClientError, OSError, RuntimeError):
            return False
        # Suspended (flow control, or a compressed socket): the rest of the send finishes in a
        # task that then drains the queue, so later frames wait behind it.
        self._workers[peer] = self._loop.create_task(self._finish_then_drain(peer, coro, awaited))
        return True

    async def _finish_then_drain(self, peer: bytes, coro: Any, awaited: Any) -> None:
        try:
            await _resume(coro, awaited)
        except (TimeoutError, aiohttp.ClientError, OSError, RuntimeError) as exc:
            log.info("send to %s failed (%s)", peer.hex()[:12], exc or type(exc).__name__)
            self._gone.add(peer)  # as in _drain: redialed, and sync resends what mattered
        await self._drain(peer)

    async def _drain(self, peer: bytes) -> None:
        """Stream a peer's queue in order over one WebSocket; while the peer is away, retry
        with backoff, and once it is back let the node sync what may have been lost.

        A peer whose socket broke is redialed even with nothing to send: the frames written
        into that socket may be lost (a payment, or its answer, to a process that was killed),
        and when neither side has anything new to say only the sync on return finds them.
        With nothing queued we give up after REDIAL_FOR; the next send dials again."""
        queue = self._queues.setdefault(peer, deque())
        delay, since = 0.1, self._loop.time()
        while queue or peer in self._gone:
            try:
                ws = await self._socket(peer)
                while queue:
                    # Taken off only once written: a write the socket refuses is retried
                    # after the redial (a copy the peer got anyway is recognised there).
                    envelope = queue[0]
                    await ws.send_bytes(envelope)
                    if queue and queue[0] is envelope:  # not dropped meanwhile as the oldest
                        queue.popleft()
                delay, since = 0.1, self._loop.time()
            except (TimeoutError, aiohttp.ClientError, OSError, RuntimeError) as exc:
                self._gone.add(peer)
                if not queue and self._loop.time() - since > REDIAL_FOR:
                    log.info("peer %s at %s still unreachable; redial stops until the next "
                             "send", peer.hex()[:12], self._urls.get(peer))
                    return
                log.info("peer %s at %s unreachable (%s); retry in %.1f s", peer.hex()[:12],
                         self._urls.get(peer), exc or type(exc).__name__, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            if peer in self._gone:
                self._gone.discard(peer)
                if self.on_reconnect is not None:
                    self.on_reconnect(peer)  # back after a gap: sync resends what was missed

    async def _socket(self, peer: bytes) -> Socket:
        """An open socket to `peer`: ours to its URL, else the one it opened to us."""
        ws = self._open_socket(peer)
        if ws is not None:
            return ws
        url = self._urls.get(peer)
        if url is None:
            raise aiohttp.ClientError("no URL for this peer and no socket from it")
        assert self._session is not None
        headers = {REPLY_TO: self.listen} if self.listen else {}
        ws_out = await self._session.ws_connect(url + "/ws", headers=headers, heartbeat=30,
                                                max_msg_size=MAX_BODY + 1)
        self._outbound[peer] = ws_out
        self._sockets.add(ws_out)
        self._loop.create_task(self._read(ws_out, peer, None))
        return ws_out

    def _open_socket(self, peer: bytes) -> Socket | None:
        for ws in (self._outbound.get(peer), self._inbound.get(peer)):
            if ws is not None and not ws.closed:
                return ws
        return None

    async def _read(self, ws: Socket, peer: bytes | None, route: dict[str, Any] | None,
                    quiet: asyncio.TimerHandle | None = None) -> None:
        """Hand every frame from a socket to the node; answer junk with an error frame. The
        first accepted envelope cancels `quiet`, the timer closing a silent inbound socket."""
        assert self._deliver is not None
        strikes = 0
        try:
            async for frame in ws:
                if frame.type is aiohttp.WSMsgType.ERROR:  # e.g. an oversized frame
                    log.info("socket from %s failed: %s",
                             peer.hex()[:12] if peer else "a peer", frame.data)
                    break
                if frame.type is aiohttp.WSMsgType.TEXT and _is_error(frame.data):
                    # The peer refused a frame of ours. Never answered: two nodes would
                    # answer each other's error frames until the socket closed.
                    log.info("%s refused a frame: %s",
                             peer.hex()[:12] if peer else "a peer", frame.data[:300])
                    strikes += 1  # still bounded: a junk sender could send only these
                    if strikes >= MAX_STRIKES:
                        await ws.close(code=4002, message=b"too many refused frames")
                        break
                    continue
                if frame.type != aiohttp.WSMsgType.BINARY or len(frame.data) > MAX_BODY:
                    refused: PaychanError | None = BrokenEncoding("frames are binary envelopes")
                else:
                    refused = self._deliver(frame.data, route)
                if refused is None:
                    if quiet is not None:
                        quiet.cancel()
                        quiet = None
                    if peer is None:
                        peer = _sender(frame.data)
                        if peer is not None:
                            self._inbound[peer] = ws  # the node opened it: the sender is real
                    continue
                self.refused += 1
                strikes += 1
                try:
                    await ws.send_str(json.dumps({"error": refused.to_wire()}))
                except (ConnectionError, RuntimeError, aiohttp.ClientError):
                    break  # the connection is gone: nobody to tell
                if strikes >= MAX_STRIKES:
                    await ws.close(code=4002, message=b"too many refused frames")
                    break
        finally:
            self._sockets.discard(ws)
            if not ws.closed:
                # A socket nobody reads must not look open: sends would go into it, and the
                # redial below would take it back, until its heartbeat failed (30 s).
                with contextlib.suppress(Exception):
                    await ws.close()
            if peer is not None:
                self._gone.add(peer)
                # Redial it: frames in the broken socket may be lost. Not when the peer closed
                # it for saying nothing: it would be as silent again, every FIRST_ENVELOPE_TIMEOUT.
                if not self._closing and peer in self._urls and ws.close_code != SILENT:
                    self._wake(peer)

    def fetch_info(self, url: str, timeout: float = 10.0) -> dict[str, Any]:
        """GET url/info from a caller's thread; clear errors for refused or untrusted peers."""
        async def get() -> dict[str, Any]:
            assert self._session is not None
            async with self._session.get(url.rstrip("/") + "/info") as r:
                r.raise_for_status()
                info: dict[str, Any] = await r.json()
                return info
        try:
            return asyncio.run_coroutine_threadsafe(get(), self._loop).result(timeout)
        except aiohttp.ClientConnectorCertificateError as exc:
            raise PeerUnreachable(f"{url}: certificate not trusted ({exc.certificate_error})") \
                from None
        except aiohttp.ClientSSLError as exc:
            raise PeerUnreachable(f"{url}: TLS failed ({exc})") from None
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise PeerUnreachable(f"{url}: {exc or type(exc).__name__}") from None


@types.coroutine
def _resume(coro: Any, awaited: Any) -> Generator[Any, Any, Any]:
    """Run `coro` on from its first suspension, on `awaited`, inside the awaiting task: what
    `await coro` would have done had the task started it."""
    while True:
        try:
            value = yield awaited
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:  # e.g. the task cancelled: the coroutine decides
            try:
                awaited = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
            continue
        try:
            awaited = coro.send(value)
        except StopIteration as stop:
            return stop.value


def _route(reply_to: str | None) -> dict[str, Any]:
    """How to answer a caller: its URL when it gave a sane one, else the socket it opened."""
    if reply_to and reply_to.startswith(("http://", "https://")) and len(reply_to) < 300:
        return {"via": "http", "url": reply_to.rstrip("/")}
    return {"via": "http"}


def _is_error(text: str) -> bool:
    """Whether a text frame is an error frame, as `_read` answers a refused frame."""
    try:
        obj = json.loads(text)
    except ValueError:
        return False
    return isinstance(obj, dict) and isinstance(obj.get("error"), dict)


def _sender(envelope: bytes) -> bytes | None:
    try:
        obj = msgpack.unpackb(envelope, raw=False)
        return bytes(obj[1]) if isinstance(obj, list) and len(obj) == 4 else None
    except Exception:
        return None


def _error(status: int, err: PaychanError) -> web.Response:
    return web.json_response({"error": err.to_wire()}, status=status)


class _CappedRunner(web.AppRunner):
    """An AppRunner whose server turns connections beyond `cap` away as they are accepted."""

    def __init__(self, app: web.Application, cap: int, on_refused: Callable[[], None],
                 **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._cap = cap
        self._on_refused = on_refused

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # The server aiohttp built, made a _CappedServer: it is its own connections' manager,
        # so it hears each connection set up and lost.
        server.__class__ = _CappedServer
        assert isinstance(server, _CappedServer)
        server.cap, server.on_refused, server.pending = self._cap, self._on_refused, {}
        return server


class _CappedServer(web.Server):
    """Counts a connection from the moment it is accepted, when the listening socket asks for
    its protocol: aiohttp counts it only once set up, which over TLS is after the handshake,
    so connections that never finish one would go uncounted."""

    cap: int
    on_refused: Callable[[], None]
    pending: dict[Any, float]  # accepted, not yet set up: handler -> when

    def __call__(self) -> Any:
        now = time.monotonic()
        for handler in [h for h, t in self.pending.items() if now - t > PENDING_WINDOW]:
            del self.pending[handler]
        if len(self.connections) + len(self.pending) >= self.cap:
            self.on_refused()
            return _TurnAway()
        handler = super().__call__()
        self.pending[handler] = now
        return handler

    def connection_made(self, handler: Any, transport: asyncio.Transport) -> None:
        self.pending.pop(handler, None)
        super().connection_made(handler, transport)


class _TurnAway(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                        b"Connection: close\r\n\r\n")
        transport.close()
