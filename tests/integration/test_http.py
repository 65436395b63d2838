"""HTTP(S) transport between nodes: both directions, TLS trust, and junk on the socket."""
import asyncio
import concurrent.futures
import gc
import logging
import socket
import ssl
import time
import tracemalloc
from collections import Counter
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
import trustme

import paychan
from paychan.actors.http_transport import MAX_BODY, MAX_SOCKETS, HttpTransport, PeerUnreachable
from paychan.actors.loopback import LoopbackNetwork
from paychan.actors.node import NodeCore
from paychan.protocol import errors
from paychan.protocol.identity import Identity
from paychan.protocol.wire import Pay, Voucher, encode


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_node(path, ledger, scheme="http", cert=None, key=None, ca=None,
              max_sockets=MAX_SOCKETS):
    url = f"{scheme}://127.0.0.1:{free_port()}"
    # A private loopback network: the only way between these nodes is HTTP.
    core = NodeCore(str(path), ledger.client, network=LoopbackNetwork(),
                    transports=[HttpTransport(url, {}, cert, key, ca, max_sockets)])
    return paychan.Node(core), url


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll until `predicate` holds; fail with `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def ledger():
    led = paychan.Ledger.embedded(clock=paychan.VirtualClock())
    yield led
    led.close()


@pytest.fixture
def pair(tmp_path, ledger):
    a, url_a = http_node(tmp_path / "a", ledger)
    b, url_b = http_node(tmp_path / "b", ledger)
    ledger.mint(a.address, 10_000)
    ledger.mint(b.address, 10_000)
    a.on_payment_received(lambda p: ["a", p.message])
    b.on_payment_received(lambda p: ["b", p.message])
    yield a, b, url_a, url_b
    a.stop()
    b.stop()


def test_both_directions_at_once_then_close(pair, ledger):
    a, b, _, url_b = pair
    ch = a.create_channel(url_b, 1_000)
    b.deposit(ch, 500)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        fa = [pool.submit(a.send_message_and_pay, ch, i, 2) for i in range(60)]
        fb = [pool.submit(b.send_message_and_pay, ch, i, 3) for i in range(40)]
        assert [f.result() for f in fa] == [["b", i] for i in range(60)]
        assert [f.result() for f in fb] == [["a", i] for i in range(40)]
    assert a.balances(ch)["sent_by_me"] == 120 == b.balances(ch)["sent_by_peer"]
    assert b.balances(ch)["sent_by_me"] == 120 == a.balances(ch)["sent_by_peer"]
    before = ledger.balance(a.address) + ledger.balance(b.address)
    a.close(ch)
    after = ledger.balance(a.address) + ledger.balance(b.address)
    assert after - before == 1_500  # both deposits came back, nothing more
    assert ledger.balance(a.address) == 10_000 - 1_000 + 1_000  # a sent 120 and got 120


def test_peer_coming_back_gets_resent_payments(tmp_path, ledger):
    a, _url_a = http_node(tmp_path / "a", ledger)
    b, url_b = http_node(tmp_path / "b", ledger)
    ledger.mint(a.address, 1_000)
    b.on_payment_received(lambda p: p.message)
    ch = a.create_channel(url_b, 500)
    assert a.send_message_and_pay(ch, "first", 1) == "first"
    port = int(url_b.rsplit(":", 1)[1])
    b.stop()
    with pytest.raises(errors.Timeout):
        a.send_message_and_pay(ch, "while away", 2, timeout=1.0, payment_id="away-1")
    core = NodeCore(str(tmp_path / "b"), ledger.client, network=LoopbackNetwork(),
                    transports=[HttpTransport(f"http://127.0.0.1:{port}", {})])
    b = paychan.Node(core)
    b.on_payment_received(lambda p: p.message)
    try:
        # The retry finishes the payment in flight; it is charged once.
        assert a.send_message_and_pay(ch, "while away", 2, timeout=20.0,
                                      payment_id="away-1") == "while away"
        assert a.balances(ch)["sent_by_me"] == 3
        assert b.balances(ch)["sent_by_peer"] == 3
    finally:
        a.stop()
        b.stop()


def test_untrusted_certificate_is_refused_clearly(tmp_path, ledger):
    ca, other_ca = trustme.CA(), trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    server_cert.private_key_and_cert_chain_pem.write_to_path(str(cert))
    server_cert.private_key_pem.write_to_path(str(key))
    good_ca, bad_ca = tmp_path / "ca.pem", tmp_path / "other.pem"
    ca.cert_pem.write_to_path(str(good_ca))
    other_ca.cert_pem.write_to_path(str(bad_ca))
    b, url_b = http_node(tmp_path / "b", ledger, "https", str(cert), str(key), str(good_ca))
    a, _ = http_node(tmp_path / "a", ledger, "http", ca=str(bad_ca))
    trusting, _ = http_node(tmp_path / "c", ledger, "http", ca=str(good_ca))
    try:
        ledger.mint(a.address, 100)
        ledger.mint(trusting.address, 100)
        with pytest.raises(PeerUnreachable, match="certificate not trusted"):
            a.create_channel(url_b, 50)
        assert a.channels() == []
        assert ledger.balance(a.address) == 100
        b.on_payment_received(lambda p: "over tls")
        ch = trusting.create_channel(url_b, 50)
        assert trusting.send_message_and_pay(ch, "x", 1) == "over tls"
    finally:
        for n in (a, b, trusting):
            n.stop()


async def _post(url, body, headers=None):
    async with aiohttp.ClientSession() as s, s.post(url + "/envelope", data=body,
                                                    headers=headers or {}) as r:
        return r.status, await r.text()


def test_junk_on_the_socket_is_refused_and_changes_nothing(pair, ledger):
    a, b, _url_a, url_b = pair
    ch = a.create_channel(url_b, 1_000)
    assert a.send_message_and_pay(ch, "ok", 5, payment_id="p-1") == ["b", "ok"]
    before = (a.balances(ch), b.balances(ch))
    core_a, core_b = a._core, b._core

    stranger = Identity(b"s" * 32)
    from paychan.actors.envelope import Sealer
    for_other_key = Sealer(stranger).seal(Identity(b"o" * 32).public, b"hello")
    from_stranger = Sealer(stranger).seal(core_b.identity.public, b"not msgpack")
    # A real Pay with its voucher's signature replaced, sealed by the real payer.
    v = core_a.state(core_a.channel_ids()[0]).my_voucher
    forged = Voucher(v.channel_id, v.period, v.nonce + 1, v.sent + 500, bytes(64))
    tampered = core_a.sealer.seal(core_b.identity.public, encode(
        Pay(v.channel_id, "p-forged", forged, 500, "free lunch")))
    cases = {
        "garbage": b"\x00\xffgarbage",
        "empty": b"",
        "oversized": b"x" * (1 << 20),
        "for another key": for_other_key,
        "stranger's junk": from_stranger,
    }
    for name, body in cases.items():
        status, text = asyncio.run(_post(url_b, body))
        assert status in (400, 401, 413), (name, status, text)
    # Tampered voucher: the envelope opens (right sender), the payee refuses the voucher.
    status, _ = asyncio.run(_post(url_b, tampered))
    assert status == 202
    # Replay of an answered payment: served from the stored result, not charged again.
    pay = Pay(v.channel_id, "p-1", v, 5, "ok")
    status, _ = asyncio.run(_post(url_b, core_a.sealer.seal(core_b.identity.public,
                                                               encode(pay))))
    assert status == 202
    core_b.wait_for(v.channel_id, lambda s: True, 1)
    assert (a.balances(ch), b.balances(ch)) == before
    assert a.send_message_and_pay(ch, "still fine", 1) == ["b", "still fine"]


async def _cut_short(url: str, body: bytes, length: int) -> None:
    """POST `body` under a Content-Length of `length`, more than it is, then close: a sender
    gone mid-body. Raw, since an HTTP client would not send a body shorter than it says."""
    host, port = url.removeprefix("http://").split(":")
    _, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /envelope HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n"
                 % (host.encode(), length) + body)
    await writer.drain()
    writer.close()
    await writer.wait_closed()


def test_a_payment_cut_short_is_refused_and_pays_nothing(pair, monkeypatch):
    a, b, _, url_b = pair
    ch = a.create_channel(url_b, 1_000)
    assert a.send_message_and_pay(ch, "ok", 5) == ["b", "ok"]
    before = b.balances(ch)
    http_a, http_b = a._core.transport("http"), b._core.transport("http")
    # a's next envelopes to b are kept here, so the test carries its payment itself.
    held: list[bytes] = []
    monkeypatch.setattr(http_a, "send", lambda peer, envelope, route: held.append(envelope))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        paying = pool.submit(a.send_message_and_pay, ch, "cut", 7, timeout=20)
        wait_until(lambda: bool(held), "a's payment envelope")
        pay = held[0]
        refused = http_b.refused
        asyncio.run(_cut_short(url_b, pay[:100], len(pay)))
        wait_until(lambda: http_b.refused > refused, "b to refuse the cut body")
        assert http_b.refused == refused + 1
        assert b.balances(ch) == before
        # The same envelope whole is a real payment: what was cut off is what would have paid.
        status, text = asyncio.run(_post(url_b, pay))
        assert status == 202, text
        assert paying.result(20) == ["b", "cut"]
    assert b.balances(ch)["sent_by_peer"] == before["sent_by_peer"] + 7


class Sockets:
    """WebSockets opened from the test to a node's /ws, on a loop of the test's own that runs
    only during a call: the sockets stay open in between, while the test uses the nodes."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.open: list[aiohttp.ClientWebSocketResponse] = []
        self._loop = asyncio.new_event_loop()
        self._session = self._loop.run_until_complete(self._new_session())

    @staticmethod
    async def _new_session() -> aiohttp.ClientSession:
        return aiohttp.ClientSession()

    def add(self) -> None:
        """One more socket; raises WSServerHandshakeError if the node refuses it."""
        self.open.append(self._loop.run_until_complete(self._session.ws_connect(self.url + "/ws")))

    def close(self, n: int) -> None:
        """Close the n oldest, each until the node answered its close."""
        for _ in range(n):
            self._loop.run_until_complete(self.open.pop(0).close())

    def stop(self) -> None:
        self.close(len(self.open))
        self._loop.run_until_complete(self._session.close())
        self._loop.close()


def test_a_flood_of_sockets_keeps_out_strangers_not_peers(tmp_path, ledger):
    """At the inbound socket limit a peer already connected still pays, and a new one is let in
    as soon as sockets close: its dial, refused meanwhile, is retried with backoff."""
    b, url_b = http_node(tmp_path / "b", ledger, max_sockets=3)
    a, _ = http_node(tmp_path / "a", ledger)
    c, _ = http_node(tmp_path / "c", ledger)
    flood = Sockets(url_b)
    try:
        for n in (a, c):
            ledger.mint(n.address, 1_000)
        b.on_payment_received(lambda p: p.message)
        http_b = b._core.transport("http")
        ch_a = a.create_channel(url_b, 100)
        assert a.send_message_and_pay(ch_a, "before", 1) == "before"  # a's socket: 1 of 3
        flood.add()
        flood.add()
        refused = http_b.refused
        with pytest.raises(aiohttp.WSServerHandshakeError) as turned_away:
            flood.add()
        assert turned_away.value.status == 503
        assert http_b.refused == refused + 1
        assert a.send_message_and_pay(ch_a, "during", 1) == "during"
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            opening = pool.submit(c.create_channel, url_b, 100)
            wait_until(lambda: http_b.refused > refused + 1, "c's socket to be refused")
            assert not opening.done()
            flood.close(2)
            ch_c = opening.result(30)
        assert c.send_message_and_pay(ch_c, "after", 1) == "after"
        assert b.balances(ch_a)["sent_by_peer"] == 2
    finally:
        flood.stop()
        for n in (a, b, c):
            n.stop()


FLOOD = 4000  # requests; over 60 MB of junk bodies read in all
MAX_GROWTH = 3 << 20  # bytes: less than keeping even 1 KiB per request would add (4 MB)


def junk(i: int) -> bytes | AsyncIterator[bytes]:
    """Request `i` of a flood: mostly junk bodies of 8-24 KB, which the node reads in full and
    refuses; one in 50 over MAX_BODY by its Content-Length, one in 50 over it while streamed
    without one (chunked), so the transport reads MAX_BODY of it before refusing it."""
    if i % 50 == 0:
        return b"o" * (MAX_BODY + 1)

    async def streamed() -> AsyncIterator[bytes]:
        for _ in range(MAX_BODY // 4096 + 2):
            yield b"s" * 4096

    if i % 50 == 1:
        return streamed()
    return bytes([i % 251]) * (8000 + i * 7919 % 16000)


async def flood(url: str, n: int) -> Counter[int]:
    """POST n junk requests, 32 at a time, over one client session; count the statuses."""
    statuses: Counter[int] = Counter()
    async with aiohttp.ClientSession() as s:
        async def worker(first: int) -> None:
            for i in range(first, n, 32):
                async with s.post(url + "/envelope", data=junk(i)) as r:
                    statuses[r.status] += 1
        await asyncio.gather(*(worker(k) for k in range(32)))
    return statuses


def test_junk_flood_does_not_grow_memory(pair, caplog):
    _, b, _, url_b = pair
    http = b._core.transport("http")
    # pytest keeps every log record of a test: a warning per refused envelope would itself be
    # memory that grows with the flood.
    caplog.set_level(logging.ERROR, logger="paychan")
    tracemalloc.start()
    try:
        warm_up = asyncio.run(flood(url_b, 500))  # aiohttp's and the node's first use
        assert set(warm_up) == {400, 413}
        refused_before = http.refused
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        statuses = asyncio.run(flood(url_b, FLOOD))
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert statuses == {400: FLOOD * 48 // 50, 413: FLOOD * 2 // 50}
    assert http.refused - refused_before == FLOOD
    # Traced memory in use now, not a peak: whatever a request leaves behind stays in it.
    assert after - before < MAX_GROWTH, f"{(after - before) >> 10} KiB kept after the flood"


def test_tls_context_verifies_by_default():
    from paychan.actors.http_transport import client_ssl
    ctx = client_ssl(None)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname


async def _ws_junk(url, frames):
    answers = []
    async with aiohttp.ClientSession() as s, s.ws_connect(url + "/ws") as ws:
        for frame in frames:
            if isinstance(frame, str):
                await ws.send_str(frame)
            else:
                await ws.send_bytes(frame)
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                answers.append(msg.data)
        return answers, ws.close_code


def test_junk_frames_on_the_stream_get_errors_then_the_socket_closes(pair):
    a, b, _, url_b = pair
    ch = a.create_channel(url_b, 100)
    from paychan.protocol.channel import Phase
    from paychan.protocol.identity import decode_channel_id
    b._core.wait_for(decode_channel_id(ch), lambda s: s.phase is Phase.OPEN, 10)
    before = b.balances(ch)
    frames = ["text is not an envelope", b"\x00garbage", b"", *[b"junk %d" % i for i in range(20)]]
    answers, code = asyncio.run(_ws_junk(url_b, frames))
    assert len(answers) == 16  # one error frame per refused frame, then the socket is closed
    assert all('"code"' in answer for answer in answers)
    assert code == 4002
    assert b.balances(ch) == before
    assert a.send_message_and_pay(ch, "after junk", 1) == ["b", "after junk"]


def test_a_quick_handler_writes_on_the_transport_loop_and_may_not_block_there(pair):
    a, b, _, url_b = pair
    seen = []

    def quick(p):
        seen.append(asyncio._get_running_loop())
        if p.message == "pay back":
            # A blocking call here would wait for this very loop: refused, so it fails fast
            # (and the payer is refunded) instead of stalling the node.
            b.send_message_and_pay(ch, "nested", 1, timeout=5)
        return ["quick", p.message]

    b.on_payment_received(quick, quick=True)
    ch = a.create_channel(url_b, 1_000)
    b.deposit(ch, 100)
    http = b._core.transport("http")
    # A payment's commit is written by b's transport loop, where the handler then runs, unless
    # a batch of b's was being written at that moment (e.g. the ledger height after the
    # deposit): then the writer thread writes it. One of a few calls finds the writer idle.
    for _ in range(5):
        assert a.send_message_and_pay(ch, "hello", 2, timeout=10) == ["quick", "hello"]
        if seen[-1] is http.loop:
            break
    assert seen[-1] is http.loop
    paid = 2 * len(seen)
    with pytest.raises(errors.HandlerError, match="transport loop"):
        a.send_message_and_pay(ch, "pay back", 3, timeout=10)
    assert a.balances(ch)["my_balance"] == 1_000 - paid  # the refused call was refunded
    assert b.balances(ch)["sent_by_me"] == 3  # the refund; nothing was paid from the handler
    assert a.send_message_and_pay(ch, "after", 1, timeout=10) == ["quick", "after"]


def test_a_node_that_cannot_listen_fails_to_open_and_leaves_nothing(tmp_path, ledger):
    import threading
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    threads = set(threading.enumerate())
    try:
        with pytest.raises(OSError):
            paychan.Node.open(str(tmp_path / "a"), ledger=ledger,
                              listen=f"http://127.0.0.1:{port}")
    finally:
        taken.close()
    # Its transport threads, actors and event dispatcher stopped, its store closed: the same
    # folder opens again at once, and no thread of the failed node is left.
    # (The in-process loopback network is shared by every node of the process: it stays.)
    left = lambda: {t for t in set(threading.enumerate()) - threads  # noqa: E731
                    if t.name != "paychan-loopback"}
    wait_until(lambda: not left(), "the failed node's threads end")
    node = paychan.Node.open(str(tmp_path / "a"), ledger=ledger,
                             listen=f"http://127.0.0.1:{free_port()}")
    node.stop()


def test_a_node_whose_folder_cannot_be_made_leaves_no_descriptor_open(tmp_path, ledger):
    import os
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    ledger.client.height()  # the ledger's own files are open before the count
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError) as failed:
        paychan.Node.open(str(blocker), ledger=ledger, listen=f"http://127.0.0.1:{free_port()}")
    # The failure (and so the transport it built, through its traceback) is still referenced:
    # its event loop's descriptors are closed because the open closed it, not the collector.
    assert failed.value is not None
    assert len(os.listdir("/proc/self/fd")) == before
