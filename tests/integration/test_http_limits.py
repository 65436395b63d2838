"""HttpTransport under a flood: requests served at once, bodies that stall, arrive in pieces or
stop short, and inbound sockets beyond the limit."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import msgpack
import pytest

from paychan.actors import http_transport
from paychan.actors.http_transport import MAX_INFLIGHT, MAX_WAITING, HttpTransport

WAIT = 10.0  # seconds any awaited outcome may take before the test fails
SOCKETS = 4  # the receiver's inbound socket limit: a flood of a few sockets reaches it


class Receiver:
    """An HttpTransport listening on 127.0.0.1 that takes every envelope and keeps it."""

    def __init__(self, max_sockets: int) -> None:
        self.envelopes: list[bytes] = []
        self.transport = HttpTransport("http://127.0.0.1:0", {}, max_sockets=max_sockets)
        self.transport.start(self._deliver)
        self.port = self.transport.bound_port
        self.url = f"http://127.0.0.1:{self.port}"

    def _deliver(self, envelope: bytes, route: dict[str, Any] | None) -> None:
        self.envelopes.append(envelope)  # on the transport's loop thread


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(max_sockets=SOCKETS)
    yield r
    r.transport.close()


class RawPost:
    """A POST /envelope written by hand on a connection of its own, so the test decides when
    each byte of it goes out, and whether all of them do."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, length: int, expect_continue: bool = False) -> RawPost:
        """Connect and send the headers announcing a body of `length` bytes."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        expect = b"Expect: 100-continue\r\n" if expect_continue else b""
        writer.write(b"POST /envelope HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n%s\r\n"
                     % (length, expect))
        await writer.drain()
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def status(self) -> int:
        """The status of the next response, interim ones (100 Continue) included."""
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                await self.reader.readexactly(int(value))
        return status

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):  # the server may have reset it first
            await self.writer.wait_closed()


def wait_until(predicate: Callable[[], bool], what: str) -> None:
    """Poll until `predicate` holds; fail with `what` after WAIT seconds."""
    deadline = time.monotonic() + WAIT
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {WAIT} s waiting for {what}")
        time.sleep(0.01)


# -- requests served at once -----------------------------------------------------------------
def test_posts_are_served_at_most_max_inflight_at_once(receiver: Receiver) -> None:
    body = os.urandom(1000)

    async def main() -> None:
        held: list[RawPost] = []
        try:
            for _ in range(MAX_INFLIGHT):
                post = await RawPost.open(receiver.port, len(body), expect_continue=True)
                # The server writes "100 Continue" and then, with no await between, the
                # handler asks for a slot: once it arrived this request has one, or waits in
                # line ahead of any request sent later.
                assert await asyncio.wait_for(post.status(), WAIT) == 100
                await post.send(body[:10])  # and holds the slot, waiting for the rest
                held.append(post)
            late = await RawPost.open(receiver.port, len(body))
            held.append(late)
            await late.send(body)
            answer = asyncio.create_task(late.status())
            # Something that must not happen: were the late request let in, its answer would
            # come within milliseconds.
            done, _ = await asyncio.wait({answer}, timeout=1.0)
            assert not done, "a request was served while every slot was held"
            await held[0].send(body[10:])
            assert await asyncio.wait_for(held[0].status(), WAIT) == 202
            # Its slot went to the late request (a limit under MAX_INFLIGHT would have given
            # it to a held request queued behind the first).
            assert await asyncio.wait_for(answer, WAIT) == 202
        finally:
            for post in held:
                await post.close()

    asyncio.run(main())
    assert receiver.envelopes == [body, body]
    # The other held requests were reading their bodies: cut short, each is refused.
    wait_until(lambda: receiver.transport.refused == MAX_INFLIGHT - 1, "the cut bodies refused")


def test_posts_beyond_those_waiting_are_refused_at_once(receiver: Receiver) -> None:
    body = os.urandom(1000)

    async def main() -> None:
        posts: list[RawPost] = []
        try:
            for i in range(MAX_INFLIGHT + MAX_WAITING):
                post = await RawPost.open(receiver.port, len(body), expect_continue=True)
                posts.append(post)
                # Counted from then on (see the test above), served or waiting.
                assert await asyncio.wait_for(post.status(), WAIT) == 100
                # The first take every slot, their bodies not all sent; the others wait for
                # a slot, theirs whole and buffered meanwhile.
                await post.send(body[:10] if i < MAX_INFLIGHT else body)
            extra = await RawPost.open(receiver.port, len(body))
            posts.append(extra)
            await extra.send(body)
            assert await asyncio.wait_for(extra.status(), WAIT) == 503
            for post in posts[:MAX_INFLIGHT]:
                await post.send(body[10:])
            statuses = await asyncio.wait_for(
                asyncio.gather(*(post.status() for post in posts[:-1])), WAIT)
            assert statuses == [202] * (MAX_INFLIGHT + MAX_WAITING)  # none was dropped
            again = await RawPost.open(receiver.port, len(body))  # all answered: room again
            posts.append(again)
            await again.send(body)
            assert await asyncio.wait_for(again.status(), WAIT) == 202
        finally:
            for post in posts:
                await post.close()

    asyncio.run(main())
    assert receiver.envelopes == [body] * (MAX_INFLIGHT + MAX_WAITING + 1)
    assert receiver.transport.refused == 1


def test_a_body_that_stalls_gives_its_slot_up(receiver: Receiver,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_transport, "BODY_TIMEOUT", 0.5)
    body = os.urandom(1000)

    async def main() -> None:
        stalled = [await RawPost.open(receiver.port, len(body)) for _ in range(MAX_INFLIGHT)]
        try:
            for post in stalled:
                await post.send(body[:10])
            # Otherwise these few senders would hold every slot for as long as they liked.
            statuses = await asyncio.wait_for(
                asyncio.gather(*(post.status() for post in stalled)), WAIT)
            assert statuses == [408] * MAX_INFLIGHT
            for post in stalled:
                await post.send(body[10:])  # too late: read and thrown away, never delivered
            fresh = await RawPost.open(receiver.port, len(body))
            stalled.append(fresh)
            await fresh.send(body)
            assert await asyncio.wait_for(fresh.status(), WAIT) == 202
        finally:
            for post in stalled:
                await post.close()

    asyncio.run(main())
    assert receiver.envelopes == [body]
    assert receiver.transport.refused == MAX_INFLIGHT


# -- bodies in pieces, bodies cut short -------------------------------------------------------
def test_a_body_sent_in_pieces_is_delivered_whole(receiver: Receiver) -> None:
    body = os.urandom(60_000)

    async def main() -> int:
        post = await RawPost.open(receiver.port, len(body), expect_continue=True)
        try:
            assert await asyncio.wait_for(post.status(), WAIT) == 100
            for start in range(0, len(body), 20_000):
                await post.send(body[start:start + 20_000])
                # Not needed to pass: the pause lets the server read each piece on its own,
                # as a slow link would deliver them, so a handler taking the first piece for
                # the body would be caught.
                await asyncio.sleep(0.2)
            return await asyncio.wait_for(post.status(), WAIT)
        finally:
            await post.close()

    assert asyncio.run(main()) == 202
    assert [len(e) for e in receiver.envelopes] == [len(body)]
    assert receiver.envelopes == [body]
    assert receiver.transport.refused == 0


def test_a_body_cut_short_is_never_delivered(receiver: Receiver) -> None:
    async def main() -> None:
        post = await RawPost.open(receiver.port, 5000)
        await post.send(os.urandom(100))
        await post.close()  # the sender goes away 4,900 bytes short

    asyncio.run(main())
    wait_until(lambda: receiver.transport.refused == 1, "the cut body refused")
    assert receiver.envelopes == []


# -- inbound sockets ---------------------------------------------------------------------------
def _upgrade_headers() -> dict[str, str]:
    return {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode()}


def test_sockets_beyond_the_limit_are_refused_until_some_close(
        receiver: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="paychan.http")
    url = receiver.url

    async def refused_status(s: aiohttp.ClientSession) -> int:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await s.ws_connect(url + "/ws")
        return refused.value.status

    async def connect_once_let_in(s: aiohttp.ClientSession) -> aiohttp.ClientWebSocketResponse:
        """A socket once the server has seen earlier ones close (it learns that on its own
        loop, a moment after the client's close returns)."""
        deadline = time.monotonic() + WAIT
        while True:
            try:
                return await s.ws_connect(url + "/ws")
            except aiohttp.WSServerHandshakeError as exc:
                if exc.status != 503 or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.01)

    async def main() -> None:
        async with aiohttp.ClientSession() as s:
            sockets = [await s.ws_connect(url + "/ws") for _ in range(SOCKETS)]
            try:
                assert [await refused_status(s) for _ in range(3)] == [503] * 3
                async with s.get(url + "/ws", headers=_upgrade_headers()) as r:
                    assert r.status == 503
                    assert "code" in (await r.json())["error"]  # as every other refusal
                assert receiver.transport.refused == 4
                for ws in sockets[:2]:
                    await ws.close()
                sockets[:2] = [await connect_once_let_in(s) for _ in range(2)]
                assert await refused_status(s) == 503
            finally:
                for ws in sockets:
                    await ws.close()

    asyncio.run(main())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    # One per burst of refusals, however long: the second burst began with the last one.
    assert warnings == [f"{SOCKETS} inbound sockets open: refusing more until some close"] * 2
    assert sum("accepting sockets again" in r.getMessage() for r in caplog.records) == 1


def test_connections_beyond_the_cap_are_turned_away_at_accept() -> None:
    """Idle connections and half-sent requests count too: past the cap a new connection gets
    503 and is closed at once; once some close, connections are served again."""
    cap = 12
    transport = HttpTransport("http://127.0.0.1:0", {}, max_sockets=4, max_connections=cap)
    transport.start(lambda envelope, route: None)
    port = transport.bound_port
    assert port is not None

    async def scenario() -> None:
        held = []
        for i in range(cap):  # half idle, half stuck in their headers
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            if i % 2:
                writer.write(b"POST /envelope HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                await writer.drain()
            held.append((reader, writer))
        await asyncio.sleep(0.2)  # the server has set every one of them up
        refused = transport.refused
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = await asyncio.wait_for(reader.read(), WAIT)  # answered, then closed
        assert head.startswith(b"HTTP/1.1 503 "), head
        assert transport.refused == refused + 1
        writer.close()
        for _, w in held[: cap // 2]:
            w.close()
        await asyncio.sleep(0.2)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/info",
                                   timeout=aiohttp.ClientTimeout(total=WAIT)) as answer:
                assert answer.status == 200
        for _, w in held[cap // 2:]:
            w.close()

    try:
        asyncio.run(scenario())
    finally:
        transport.close()


def test_a_socket_that_sends_no_envelope_is_closed(
        receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sockets that never say anything would hold the places under the socket limit for good,
    keeping out peers that can only be answered on a socket of their own."""
    monkeypatch.setattr(http_transport, "FIRST_ENVELOPE_TIMEOUT", 0.3)
    envelope = msgpack.packb([1, os.urandom(32), os.urandom(24), b"sealed"])

    async def main() -> None:
        async with aiohttp.ClientSession() as s:
            silent = await s.ws_connect(receiver.url + "/ws")
            talking = await s.ws_connect(receiver.url + "/ws")
            await talking.send_bytes(envelope)
            closed = await asyncio.wait_for(silent.receive(), WAIT)
            assert closed.type is aiohttp.WSMsgType.CLOSE and closed.data == 4003, closed
            await asyncio.sleep(0.5)  # past the deadline: the one that sent an envelope stays
            assert not talking.closed
            await talking.send_bytes(envelope)
            await talking.close()
        wait = time.monotonic() + WAIT
        while len(receiver.envelopes) < 2 and time.monotonic() < wait:
            await asyncio.sleep(0.01)
        assert receiver.envelopes == [envelope, envelope]

    asyncio.run(main())


def test_over_tls_connections_still_in_their_handshake_count_too(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Over TLS aiohttp sees a connection only once its handshake is done; connections that
    never start one must still count, or a flood of them would go unbounded. Abandoned, they
    stop counting after PENDING_WINDOW."""
    import ssl
    monkeypatch.setattr(http_transport, "PENDING_WINDOW", 1.0)

    import trustme
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    issued.private_key_and_cert_chain_pem.write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    client_ssl = ssl.create_default_context()
    ca.configure_trust(client_ssl)
    cap = 6
    transport = HttpTransport("https://127.0.0.1:0", {}, str(cert), str(key),
                              max_sockets=2, max_connections=cap)
    transport.start(lambda envelope, route: None)
    url = f"https://127.0.0.1:{transport.bound_port}/info"

    async def info_status(s: aiohttp.ClientSession) -> int:
        try:
            async with s.get(url, ssl=client_ssl,
                             timeout=aiohttp.ClientTimeout(total=WAIT)) as answer:
                return answer.status
        except aiohttp.ServerDisconnectedError:
            return 503  # turned away before the status line could be read

    async def main() -> None:
        silent = [await asyncio.open_connection("127.0.0.1", transport.bound_port)
                  for _ in range(cap)]  # TCP only: no ClientHello, ever
        await asyncio.sleep(0.2)
        refused = transport.refused
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as s:
            assert await info_status(s) == 503
            assert transport.refused == refused + 1
            for _, writer in silent:
                writer.close()
            await asyncio.sleep(1.2)  # past the window: nothing reports them gone
            assert await info_status(s) == 200

    try:
        asyncio.run(main())
    finally:
        transport.close()


def test_a_socket_closed_for_silence_is_not_redialled(monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer that refuses everything we send closes our socket as silent; redialling it with
    nothing accepted to say would only be closed again, every FIRST_ENVELOPE_TIMEOUT."""
    from paychan.protocol.errors import Conflict
    monkeypatch.setattr(http_transport, "FIRST_ENVELOPE_TIMEOUT", 0.2)
    refusing = HttpTransport("http://127.0.0.1:0", {})
    refusing.start(lambda envelope, route: Conflict("no channel of yours here"))
    dialer = HttpTransport("http://127.0.0.1:0", {})
    dialer.start(lambda envelope, route: None)
    try:
        peer = os.urandom(32)
        dialer.send(peer, msgpack.packb([1, os.urandom(32), os.urandom(24), b"sealed"]),
                    {"via": "http", "url": f"http://127.0.0.1:{refusing.bound_port}"})
        deadline = time.monotonic() + WAIT
        while refusing.refused < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert refusing.refused == 1
        time.sleep(1.5)  # several timeouts: each redial would open one more silent socket
        assert refusing.refused == 1
        assert len(refusing._accepted) == 0  # the silent socket was closed, none came back
    finally:
        dialer.close()
        refusing.close()
