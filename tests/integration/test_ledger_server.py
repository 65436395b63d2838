"""`paychan ledger serve` in its own process: nodes over HTTP, restarts, and hostile input."""
import asyncio
import base64
import http.client
import os
import random
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import aiohttp
import msgpack
import pytest
from relay import Relay

import paychan
from paychan.actors.ledger_client import LedgerUnreachable, RemoteLedger
from paychan.protocol import errors
from paychan.protocol.identity import Identity, decode_channel_id
from paychan.protocol.tx import make_tx
from paychan.protocol.wire import ChannelParams


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout=15.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class LedgerProcess:
    """One `paychan ledger serve` subprocess; restartable on the same data dir and port."""

    def __init__(self, data, virtual_clock=True):
        self.data, self.port, self.virtual_clock = data, free_port(), virtual_clock
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None
        self.starts = 0

    def start(self):
        self.starts += 1
        log = open(f"{self.data}-{self.starts}.log", "wb")
        cmd = [sys.executable, "-m", "paychan.cli", "ledger", "serve", "--data", str(self.data),
               "--port", str(self.port)] + (["--virtual-clock"] if self.virtual_clock else [])
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log)
        log.close()
        ready, _, _ = select.select([self.proc.stdout], [], [], 20)
        line = self.proc.stdout.readline().decode().strip() if ready else ""
        assert line == f"ledger listening on {self.url}", (line, self.log())
        return self

    def log(self):
        with open(f"{self.data}-{self.starts}.log", encoding="utf-8", errors="replace") as f:
            return f.read()

    def kill(self):
        self.proc.kill()
        self.proc.wait(10)

    def signal(self, sig):
        self.proc.send_signal(sig)
        return self.proc.wait(15)

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class RawWebSocket:
    """A WebSocket follower written by hand, to send the frames no client library would."""

    def __init__(self, port: int, start: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((
            f"GET /events/ws?from={start} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 "), head

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise AssertionError("the server closed the connection without a close frame")
        self.buf += chunk

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def send(self, opcode: int, payload: bytes = b"", fin: bool = True,
             length: int | None = None) -> None:
        """One frame; `length` may announce more than `payload` holds. Its mask is zero, which
        leaves the payload as it is."""
        n = len(payload) if length is None else length
        if n < 126:
            size = bytes([0x80 | n])
        elif n < 1 << 16:
            size = bytes([0x80 | 126]) + n.to_bytes(2, "big")
        else:
            size = bytes([0x80 | 127]) + n.to_bytes(8, "big")
        self.sock.sendall(bytes([(0x80 if fin else 0) | opcode]) + size + bytes(4) + payload)

    def receive(self) -> tuple[int, bytes]:
        """The server's next frame: (opcode, payload)."""
        first, second = self._take(2)
        n = second & 0x7F
        if n == 126:
            n = int.from_bytes(self._take(2), "big")
        elif n == 127:
            n = int.from_bytes(self._take(8), "big")
        return first & 0x0F, self._take(n)

    def close_code(self) -> int:
        """The code of the server's next frame, which must be its close."""
        opcode, payload = self.receive()
        assert opcode == 0x8, (opcode, payload[:100])
        return int.from_bytes(payload[:2], "big")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def server(tmp_path):
    proc = LedgerProcess(tmp_path / "ledger").start()
    yield proc
    proc.close()


@pytest.fixture
def connect(server):
    opened = []

    def make():
        opened.append(paychan.Ledger.connect(server.url))
        return opened[-1]

    yield make
    for ledger in opened:
        ledger.close()


def open_node(path, ledger):
    node = paychan.Node.open(str(path), ledger=ledger)
    node.on_payment_received(lambda p: {"echo": p.message})
    return node


def settled(node, ch, period):
    return lambda: node.balances(ch)["period"] > period


def create_tx(key, peer, ledger, deposit=10):
    params = ChannelParams(key.public, peer, "base", 60, os.urandom(32), ledger.network_id)
    return make_tx(key, "create", {"params": params.to_obj(), "deposit": deposit},
                   os.urandom(16)).to_bytes()


def raw(url, method, path, body=None, headers=None):
    """A request by hand: (status, decoded body). An iterable body is sent chunked."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        chunked = body is not None and not isinstance(body, bytes)
        conn.request(method, path, body=body, headers=headers or {}, encode_chunked=chunked)
        r = conn.getresponse()
        data = r.read()
        return r.status, msgpack.unpackb(data, raw=False)
    finally:
        conn.close()


def exchange(port: int, data: bytes, half_close: bool = False) -> bytes:
    """Bytes sent by hand; what the server answers until it closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def snapshot(ledger: RemoteLedger, key: Identity) -> tuple[Any, ...]:
    """What no follower's frame may change: height and clock, an account, every event."""
    return ledger.info(), ledger.balance(key.public), ledger.events_since(0)


def pay_both_ways(a: paychan.Node, b: paychan.Node, ch: str, lanes: int, rounds: int) -> bool:
    """`a` pays 7 and `b` pays 2, `lanes * rounds` times each, both directions at once, every
    answer checked. Returns whether payments of both directions were ever in flight together."""
    inflight = {a: 0, b: 0}
    overlapped = False

    async def lane(payer: paychan.Node, payee: paychan.Node, amount: int, tag: str) -> None:
        nonlocal overlapped
        for i in range(rounds):
            inflight[payer] += 1
            overlapped = overlapped or inflight[payee] > 0
            try:
                answer = await payer.asend_message_and_pay(ch, f"{tag}{i}", amount)
            finally:
                inflight[payer] -= 1
            assert answer == {"echo": f"{tag}{i}"}

    async def both() -> None:
        await asyncio.gather(*(lane(a, b, 7, f"a{n}-") for n in range(lanes)),
                             *(lane(b, a, 2, f"b{n}-") for n in range(lanes)))

    asyncio.run(both())
    return overlapped


def test_two_nodes_pay_close_mutually_and_solo(tmp_path, server, connect):
    admin = connect()
    a = open_node(tmp_path / "a", connect())
    b = open_node(tmp_path / "b", connect())
    try:
        admin.mint(a.address, 5_000)
        admin.mint(b.address, 5_000)
        ch = a.create_channel(b, 1_000, dispute_period=100)
        b.deposit(ch, 200)
        # Vouchers cross on the wire: each side pays while the other's payments are in flight.
        assert pay_both_ways(a, b, ch, lanes=2, rounds=10)
        assert (a.balances(ch)["sent_by_me"], a.balances(ch)["sent_by_peer"]) == (140, 40)
        assert (b.balances(ch)["sent_by_me"], b.balances(ch)["sent_by_peer"]) == (40, 140)
        assert a.balances(ch)["my_balance"] + b.balances(ch)["my_balance"] == 1_000 + 200
        assert a.close(ch)["mutual"] is True
        assert admin.balance(a.address) == 5_000 - 140 + 40
        assert admin.balance(b.address) == 5_000 + 140 - 40
        assert admin.balance(a.address) + admin.balance(b.address) == 10_000

        ch2 = b.create_channel(a, 500, dispute_period=100)
        assert b.send_message_and_pay(ch2, "x", 50) == {"echo": "x"}
        a.stop()  # the peer is away: only a solo close and the window remain
        b.close(ch2, mutual=False, wait=False)
        record = lambda: admin.client.channel(decode_channel_id(ch2))  # noqa: E731
        wait_until(lambda: record().close is not None, what="the solo close to land")
        time.sleep(0.6)  # the watcher looked and found the window still open
        assert b.balances(ch2)["period"] == 1
        admin.advance(100)
        wait_until(settled(b, ch2, 1), what="the closer's watcher to confirm")
        assert admin.balance(b.address) == 5_000 + 100 - 50
        assert admin.balance(a.address) == 5_000 - 100 + 50
        a = open_node(tmp_path / "a", connect())  # catches up with what it missed
        wait_until(settled(a, ch2, 1), what="the returning peer to see the settlement")
    finally:
        a.stop()
        b.stop()


def test_nodes_resume_the_stream_after_the_ledger_is_killed(tmp_path, server, connect):
    admin = connect()
    a = open_node(tmp_path / "a", connect())
    b = open_node(tmp_path / "b", connect())
    try:
        admin.mint(a.address, 2_000)
        admin.mint(b.address, 2_000)
        ch = a.create_channel(b, 1_000, dispute_period=300)
        ch_live = b.create_channel(a, 300, dispute_period=300)
        assert a.send_message_and_pay(ch, "before", 10) == {"echo": "before"}
        admin.advance(50)
        before = admin.now()
        connects = a._core.ledger.stream_connects, b._core.ledger.stream_connects

        server.kill()
        with pytest.raises(LedgerUnreachable):
            admin.balance(a.address)
        time.sleep(0.3)  # past the reading's time to live: the clock is asked for and is away
        assert a._core.ledger.now() == before  # the last reading stands in
        # Payments are off the ledger: they go on while it is away.
        assert a.send_message_and_pay(ch, "during", 20) == {"echo": "during"}
        assert b.send_message_and_pay(ch_live, "during", 5) == {"echo": "during"}
        server.start()

        assert admin.now() == before  # the virtual clock did not turn back
        wait_until(lambda: a._core.ledger.stream_connects > connects[0]
                   and b._core.ledger.stream_connects > connects[1],
                   what="both nodes to reconnect their event streams")
        # The peer is online: it hears the solo close on its resumed stream and confirms.
        a.close(ch_live, mutual=False, timeout=15)
        wait_until(settled(b, ch_live, 1), what="the online peer to see the settlement")
        # The peer is away: the closer's watcher confirms once the window has passed.
        b.stop()
        a.close(ch, mutual=False, wait=False)
        record = lambda: admin.client.channel(decode_channel_id(ch))  # noqa: E731
        wait_until(lambda: record().close is not None, what="the solo close to land")
        admin.advance(300)
        wait_until(settled(a, ch, 1), what="the watcher to confirm after the window")
        assert admin.balance(a.address) == 2_000 - 30 + 5
        assert admin.balance(b.address) == 2_000 + 30 - 5
    finally:
        a.stop()
        b.stop()


def test_a_cut_off_node_resumes_its_stream_from_its_last_height(tmp_path, server, connect):
    admin = connect()
    relay = Relay(server.port)
    # Opened with a URL, through the relay: only this node loses the ledger.
    a = open_node(tmp_path / "a", relay.url)
    b = open_node(tmp_path / "b", server.url)
    heard: list[dict[str, Any]] = []
    for name in ("deposit_confirmed", "channel_closing", "channel_closed"):
        a.on(name, heard.append)
    stream = a._core.ledger
    try:
        admin.mint(a.address, 1_000)
        admin.mint(b.address, 1_000)
        ch = a.create_channel(b, 500, dispute_period=100)
        assert a.send_message_and_pay(ch, "before", 10) == {"echo": "before"}
        connects, before = stream.stream_connects, len(heard)

        relay.cut(refuse_new=True)
        # The ledger is up and the peer reaches it: a deposit and a solo close land meanwhile.
        b.deposit(ch, 200)
        b.close(ch, mutual=False, wait=False)
        record = lambda: admin.client.channel(decode_channel_id(ch))  # noqa: E731
        wait_until(lambda: record().close is not None, what="the solo close to land")
        time.sleep(0.5)  # time for anything that got past the cut to arrive
        assert a.balances(ch)["deposited_by_peer"] == 0  # nothing reached the cut-off node
        assert (a.balances(ch)["status"], a.balances(ch)["period"]) == ("open", 1)
        assert stream.stream_connects == connects

        relay.restore()
        wait_until(lambda: stream.stream_connects > connects, what="the stream to reconnect")
        # Only a stream resumed from the last height it delivered brings both events: the
        # clock is not advanced, so the channel settles only if this node confirms the close.
        wait_until(settled(a, ch, 1), what="the cut-off node to confirm the close it missed")
        missed = lambda: heard[before:]  # noqa: E731
        wait_until(lambda: len(missed()) == 3, what="the node events of what it missed")
        assert [e["event"] for e in missed()] == [
            "deposit_confirmed", "channel_closing", "channel_closed"], missed()
        assert missed()[0]["deposit_peer"] == 200 and missed()[1]["by_peer"] is True
        assert admin.balance(a.address) == 1_000 - 10
        assert admin.balance(b.address) == 1_000 + 10
    finally:
        for node in (a, b):
            node.stop()
        relay.close()
    # Node.open made each client from its URL, so stop closed it: its threads are gone.
    for node in (a, b):
        client = node._core.ledger
        assert client._closed and not client._thread.is_alive()
        assert not client._dispatcher.is_alive()


def test_events_are_delivered_exactly_once_across_a_restart(server, connect):
    admin = connect().client
    follower = connect().client
    keys = [Identity(os.urandom(32)) for _ in range(2)]
    admin.mint(keys[0].public, 1_000)
    heights, ticks = [], []
    follower.on_tick(ticks.append)
    token = follower.subscribe(lambda e: heights.append(e["height"]))
    start = admin.height()
    txs = [create_tx(keys[0], keys[1].public, admin) for _ in range(5)]
    first = [admin.submit(tx) for tx in txs]
    wait_until(lambda: len(heights) == 5, what="five live events")

    server.kill()
    server.start()
    later = [admin.submit(create_tx(keys[0], keys[1].public, admin)) for _ in range(5)]
    # A txid seen before the kill: its original event comes back, with no second effect.
    again = admin.submit(txs[2])
    assert again == {**first[2], "duplicate": True}
    wait_until(lambda: len(heights) == 10, what="the events after the restart")
    admin.advance(7)
    wait_until(lambda: ticks and ticks[-1] == admin.now(), what="the tick after /advance")
    time.sleep(0.3)
    assert heights == list(range(start + 1, start + 11))
    assert [e["height"] for e in first + later] == heights
    assert follower.stream_connects >= 2
    assert admin.balance(keys[0].public) == 1_000 - 10 * 10
    follower.unsubscribe(token)


def test_stream_replays_from_a_height_then_follows_live(server, connect):
    ledger = connect().client
    key, peer = Identity(os.urandom(32)), Identity(os.urandom(32))
    ledger.mint(key.public, 1_000)
    events = [ledger.submit(create_tx(key, peer.public, ledger)) for _ in range(6)]

    async def follow():
        async with aiohttp.ClientSession() as session, session.ws_connect(
                f"{server.url}/events/ws", params={"from": str(events[1]["height"])}) as ws:
            frames = [msgpack.unpackb(await ws.receive_bytes(timeout=10)) for _ in range(5)]
            await asyncio.to_thread(ledger.submit, create_tx(key, peer.public, ledger))
            await asyncio.to_thread(ledger.advance, 3)
            frames += [msgpack.unpackb(await ws.receive_bytes(timeout=10)) for _ in range(2)]
            return frames

    frames = asyncio.run(follow())
    assert [f["height"] for f in frames[:4]] == [e["height"] for e in events[2:]]
    assert frames[:4] == events[2:]
    assert frames[4] == {"tick": ledger.now() - 3}  # caught up: here is the time
    assert frames[5]["height"] == events[-1]["height"] + 1  # then live
    assert frames[6] == {"tick": ledger.now()}


def test_stream_ignores_what_a_follower_sends(server, connect):
    ledger = connect().client
    key, peer = Identity(os.urandom(32)), Identity(os.urandom(32))
    ledger.mint(key.public, 1_000)
    first = ledger.submit(create_tx(key, peer.public, ledger))
    unsent = create_tx(key, peer.public, ledger)  # valid, signed, and never to be applied
    before, now = snapshot(ledger, key), ledger.now()

    async def follow() -> tuple[Any, ...]:
        async with aiohttp.ClientSession() as session, session.ws_connect(
                f"{server.url}/events/ws", params={"from": str(first["height"] - 1)},
                autoping=False) as ws:
            assert msgpack.unpackb(await ws.receive_bytes(timeout=10)) == first
            assert msgpack.unpackb(await ws.receive_bytes(timeout=10)) == {"tick": now}
            for text in ("hello", "\x00" * 100, '{"from": 0}', "é" * 1000):
                await ws.send_str(text)
            for data in (b"", b"\xc1", msgpack.packb({"from": 0}), unsent, os.urandom(4000)):
                await ws.send_bytes(data)
            # Frames are read in order: the pong says the server has read all of the above.
            await ws.ping(b"after the junk")
            pong = await ws.receive(timeout=10)
            assert (pong.type, pong.data) == (aiohttp.WSMsgType.PONG, b"after the junk")
            after = await asyncio.to_thread(snapshot, ledger, key)
            event = await asyncio.to_thread(ledger.submit, create_tx(key, peer.public, ledger))
            live = msgpack.unpackb(await ws.receive_bytes(timeout=10))
            return after, event, live

    after, event, live = asyncio.run(follow())
    assert after == before
    assert live == event and event["height"] == first["height"] + 1
    assert "duplicate" not in ledger.submit(unsent)  # the frame carrying it applied nothing


def test_stream_closes_on_an_oversized_or_malformed_frame(server, connect):
    ledger = connect().client
    key, peer = Identity(os.urandom(32)), Identity(os.urandom(32))
    ledger.mint(key.public, 1_000)
    for _ in range(3):
        ledger.submit(create_tx(key, peer.public, ledger))
    before = snapshot(ledger, key)
    height = ledger.height()
    # (opcode, payload, fin, announced length) frames, and the close code they must earn.
    cases: dict[str, tuple[int, list[tuple[int, bytes, bool, int | None]]]] = {
        "a 64 KiB message": (1009, [(0x2, b"x" * 65536, True, None)]),
        # Refused on its header: the server does not wait for, or buffer, a terabyte.
        "a frame announcing 2**40 bytes": (1009, [(0x2, b"", True, 1 << 40)]),
        "fragments adding up past 4 KiB": (1009, [(0x2, b"x" * 1500, False, None),
                                                  (0x0, b"x" * 1500, False, None),
                                                  (0x0, b"x" * 1500, True, None)]),
        "a reserved opcode": (1002, [(0x3, b"??", True, None)]),
        "reserved bits": (1002, [(0x70 | 0x2, b"??", True, None)]),
        "a control frame over 125 bytes": (1002, [(0x9, b"p" * 126, True, None)]),
        "text that is not UTF-8": (1007, [(0x1, b"\xff\xfe", True, None)]),
    }
    for name, (code, frames) in cases.items():
        ws = RawWebSocket(server.port, height)
        try:
            opcode, payload = ws.receive()
            assert (opcode, msgpack.unpackb(payload)) == (0x2, {"tick": ledger.now()}), name
            for opcode, payload, fin, length in frames:
                ws.send(opcode, payload, fin, length)
            assert ws.close_code() == code, name
        finally:
            ws.close()

    assert snapshot(ledger, key) == before
    ws = RawWebSocket(server.port, 0)  # the server lives and streams as before
    try:
        replay = [msgpack.unpackb(ws.receive()[1]) for _ in range(height + 1)]
    finally:
        ws.close()
    assert replay == before[2] + [{"tick": ledger.now()}]


def test_bad_input_gets_defined_errors_and_changes_nothing(server, connect):
    ledger = connect().client
    key, peer = Identity(os.urandom(32)), Identity(os.urandom(32))
    ledger.mint(key.public, 100)
    tx = create_tx(key, peer.public, ledger)
    ledger.submit(tx)
    info = ledger.info()

    def refused(status, detail, *request):
        got_status, err = raw(server.url, *request)
        assert got_status == status, (request[:2], got_status, err)
        if detail is None:
            assert "data" not in err, err
        elif isinstance(detail, int) and detail > 0:
            assert err["code"] == 3 and err["data"][0]["code"] == detail, err
        else:
            assert err["code"] == detail, err

    refused(400, 1005, "POST", "/tx", b"\xc1 not msgpack")
    refused(400, 1005, "POST", "/tx", b"")
    refused(400, 1005, "POST", "/tx", b"\x91" * 50_000)  # nested far past any limit
    refused(400, 1005, "POST", "/tx", msgpack.packb(["create", 1, 2, 3, 4]))
    refused(413, 1005, "POST", "/tx", os.urandom(300 * 1024))
    # A body that announces no length is still bounded while it is read.
    refused(413, 1005, "POST", "/tx", iter([b"x" * 65536] * 5))
    forged = msgpack.unpackb(tx, raw=False)
    forged[4] = bytes([forged[4][0] ^ 1]) + forged[4][1:]
    refused(400, 1017, "POST", "/tx", msgpack.packb(forged, use_bin_type=True))
    forged = msgpack.unpackb(tx, raw=False)
    forged[1] = peer.public  # someone else's account as the sender
    refused(400, 1017, "POST", "/tx", msgpack.packb(forged, use_bin_type=True))
    refused(400, 1001, "POST", "/tx", create_tx(key, peer.public, ledger, deposit=10_000))
    deposit = make_tx(key, "deposit", {"channel_id": b"\1" * 32, "amount": 1}, os.urandom(16))
    refused(400, 100, "POST", "/tx", deposit.to_bytes())
    cid = ledger.events_since(0, 1)[0]["channel_id"]
    for body in ({"channel_id": cid, "period": "one"}, {"channel_id": cid, "period": [1]},
                 {"channel_id": cid, "period": 1, "additional_sent": "x"}):
        weird = make_tx(key, "confirm", body, os.urandom(16))
        status, err = raw(server.url, "POST", "/tx", weird.to_bytes())
        assert status == 400 and err["code"] == 3, err

    refused(400, 1005, "POST", "/mint", b"\x01\x02")
    refused(400, 1005, "POST", "/mint", msgpack.packb([1, 2]))
    refused(400, 1002, "POST", "/mint", msgpack.packb({"address": key.address, "amount": -5}))
    refused(400, 1008, "POST", "/mint", msgpack.packb({"address": key.address, "amount": 2**63}))
    refused(400, 1005, "POST", "/mint", msgpack.packb({"address": "ak_nope", "amount": 5}))
    refused(400, -32602, "POST", "/mint",
            msgpack.packb({"address": key.address, "amount": 5, "asset": "x" * 100}))
    refused(400, -32602, "POST", "/advance", msgpack.packb({"seconds": -1}))
    refused(400, 1008, "POST", "/advance", msgpack.packb({"seconds": "soon"}))
    refused(400, 1005, "GET", "/channel/xyz")
    refused(404, 100, "GET", f"/channel/{'ab' * 32}")
    refused(400, 1005, "GET", "/balance/ak_notanaddress")
    refused(400, 1008, "GET", "/events?from=minus")
    refused(400, -32602, "GET", "/events?limit=100000")
    refused(400, 107, "GET", f"/events/ws?from={info['height'] + 5}")
    refused(400, 1005, "GET", "/events/ws")  # not an upgrade
    refused(404, -32601, "GET", "/nothing/here")
    refused(405, -32601, "GET", "/tx")
    refused(405, -32601, "POST", "/events/ws")
    refused(400, 1005, "POST", "/tx", b"0123456789", {"Content-Encoding": "gzip"})

    # Not HTTP at all: no route runs, so aiohttp's parser answers, in plain text, and closes.
    answer = exchange(server.port, random.Random(7).randbytes(2000))
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0].split(b" ")[1] == b"400", answer[:200]
    assert b"content-type: text/plain" in head.lower() and body, answer[:200]

    # A body cut short, then the client leaves: a whole transaction but one announced byte,
    # or its start. The server gets EOF, drops the connection without an answer (nobody is
    # there to read one) and applies nothing.
    unsent = create_tx(key, peer.public, ledger)
    for length, sent in ((len(unsent) + 1, unsent), (len(unsent), unsent[:40])):
        request = (f"POST /tx HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
                   f"Content-Type: application/msgpack\r\nContent-Length: {length}\r\n\r\n")
        assert exchange(server.port, request.encode() + sent, half_close=True) == b""

    assert ledger.info() == info
    assert ledger.balance(key.public) == 90
    with pytest.raises(errors.BadSignature):
        ledger.submit(msgpack.packb(forged, use_bin_type=True))
    with pytest.raises(errors.BrokenEncoding):
        ledger.submit(b"junk")
    assert ledger.channel(b"\1" * 32) is None
    assert server.proc.poll() is None
    # The caller's faults, not the server's: none is logged as a failure.
    assert "POST /tx failed" not in server.log()
    assert "Error handling request" not in server.log()
    assert "duplicate" not in ledger.submit(unsent)  # neither cut-short body applied it


def test_wall_clock_server_refuses_advance_and_stops_on_signals(tmp_path):
    server = LedgerProcess(tmp_path / "wall", virtual_clock=False).start()
    try:
        with paychan.Ledger.connect(server.url) as ledger:
            key = Identity(os.urandom(32))
            assert ledger.client.virtual_clock is False
            assert abs(ledger.now() - time.time()) < 5
            with pytest.raises(errors.ActionNotAllowed) as exc:
                ledger.advance(5)
            assert exc.value.to_wire()["code"] == 2
            ledger.mint(key.address, 42)
            ledger.client.subscribe(lambda e: None)  # a follower does not hold the server up
            assert server.signal(signal.SIGTERM) == 0
            assert "ledger closed" in server.log()
            with pytest.raises(LedgerUnreachable) as down:
                ledger.balance(key.address)
            assert isinstance(down.value, ConnectionError)
            server.start()
            assert ledger.balance(key.address) == 42  # durable across the restart
            assert server.signal(signal.SIGINT) == 0
            assert "ledger closed" in server.log()
        with pytest.raises(LedgerUnreachable):
            RemoteLedger(server.url)
    finally:
        server.close()


def test_stalled_uploads_give_their_slots_up() -> None:
    """Requests that announce a body and stop sending hold every request slot; each gets 408
    after the body timeout, and the server answers others again (they used to wait forever)."""
    from paychan.actors.ledger_server import MAX_INFLIGHT, LedgerServer
    ledger = paychan.Ledger.embedded(data_dir=None, clock=paychan.VirtualClock())
    server = LedgerServer(ledger.client, virtual_clock=True, body_timeout=0.5)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    stalled: list[socket.socket] = []
    try:
        asyncio.run_coroutine_threadsafe(server.start("127.0.0.1", 0), loop).result(10)
        assert server.port is not None
        for _ in range(MAX_INFLIGHT):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            sock.sendall(b"POST /tx HTTP/1.1\r\nHost: ledger\r\nContent-Length: 500\r\n\r\nabc")
            stalled.append(sock)
        time.sleep(0.1)  # let the server take them in, so that they hold every slot
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("GET", "/height")
        answer = conn.getresponse()
        assert answer.status == 200 and msgpack.unpackb(answer.read()) == {"height": 0}
        conn.close()
        for sock in stalled:
            head = sock.recv(4096)
            assert head.startswith(b"HTTP/1.1 408 "), head[:200]
            assert b"did not arrive within 0.5 s" in head or b"did not arrive" in sock.recv(4096)
        assert ledger.client.height() == 0  # nothing was submitted
    finally:
        for sock in stalled:
            sock.close()
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)

        async def finish_the_rest() -> None:  # handlers of sockets the server saw close
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in rest:
                task.cancel()
            await asyncio.gather(*rest, return_exceptions=True)
        asyncio.run_coroutine_threadsafe(finish_the_rest(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        ledger.close()
