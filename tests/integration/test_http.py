"""HTTP(S) transport between nodes: both directions, TLS trust, and junk on the socket."""
import asyncio
import concurrent.futures
import resource
import socket
import ssl

import aiohttp
import pytest
import trustme

import paychan
from paychan.actors.http_transport import HttpTransport, PeerUnreachable
from paychan.actors.loopback import LoopbackNetwork
from paychan.actors.node import NodeCore
from paychan.protocol import errors
from paychan.protocol.identity import Identity
from paychan.protocol.wire import Pay, Voucher, decode, encode


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_node(path, ledger, scheme="http", cert=None, key=None, ca=None):
    url = f"{scheme}://127.0.0.1:{free_port()}"
    # A private loopback network: the only way between these nodes is HTTP.
    core = NodeCore(str(path), ledger.client, network=LoopbackNetwork(),
                    transports=[HttpTransport(url, {}, cert, key, ca)])
    return paychan.Node(core), url


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
    assert decode(encode(pay)) == pay
    core_b.wait_for(v.channel_id, lambda s: True, 1)
    assert (a.balances(ch), b.balances(ch)) == before
    assert a.send_message_and_pay(ch, "still fine", 1) == ["b", "still fine"]


def test_junk_flood_does_not_grow_memory(pair):
    _, b, _, url_b = pair

    async def flood(n):
        async with aiohttp.ClientSession() as s:
            async def one(i):
                async with s.post(url_b + "/envelope", data=b"j" * (1000 + i % 7)) as r:
                    return r.status
            return await asyncio.gather(*(one(i) for i in range(n)))

    asyncio.run(flood(500))  # warm up allocator pools
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    statuses = asyncio.run(flood(3000))
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert set(statuses) == {400}
    assert b._core.transport("http").refused >= 3500
    assert rss_after - rss_before < 64 * 1024  # KiB: junk is not kept


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
