"""`paychan ledger serve` in its own process: nodes over HTTP, restarts, and hostile input."""
import asyncio
import http.client
import os
import select
import signal
import socket
import subprocess
import sys
import time

import aiohttp
import msgpack
import pytest

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


def test_two_nodes_pay_close_mutually_and_solo(tmp_path, server, connect):
    admin = connect()
    a = open_node(tmp_path / "a", connect())
    b = open_node(tmp_path / "b", connect())
    try:
        admin.mint(a.address, 5_000)
        admin.mint(b.address, 5_000)
        ch = a.create_channel(b, 1_000, dispute_period=100)
        b.deposit(ch, 200)
        for i in range(20):
            assert a.send_message_and_pay(ch, i, 7) == {"echo": i}
        assert b.send_message_and_pay(ch, "back", 40) == {"echo": "back"}
        assert a.close(ch)["mutual"] is True
        assert admin.balance(a.address) == 5_000 - 140 + 40
        assert admin.balance(b.address) == 5_000 + 140 - 40

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
    refused(404, -32601, "GET", "/nothing/here")
    refused(405, -32601, "GET", "/tx")

    # Not HTTP at all, and a body cut short: the connection is dropped, the server lives.
    for junk in (os.urandom(2000), b"POST /tx HTTP/1.1\r\nContent-Length: 500\r\n\r\nshort"):
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            s.sendall(junk)
            s.shutdown(socket.SHUT_WR)
            s.recv(4096)

    assert ledger.info() == info
    assert ledger.balance(key.public) == 90
    with pytest.raises(errors.BadSignature):
        ledger.submit(msgpack.packb(forged, use_bin_type=True))
    with pytest.raises(errors.BrokenEncoding):
        ledger.submit(b"junk")
    assert ledger.channel(b"\1" * 32) is None
    assert server.proc.poll() is None


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
