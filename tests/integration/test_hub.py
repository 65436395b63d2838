"""The chat hub as a real process: relay both ways, offline delivery, kill -9 and Ctrl-C,
hostile logins and frames."""
import asyncio
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import lmdb
import msgpack
import pytest

import paychan
from paychan.actors.chat import ChatTransport, make_pairing_code, parse_pairing_code
from paychan.actors.envelope import Sealer
from paychan.actors.hub import (
    HUB_FRAMES,
    MAX_FRAME_BYTES,
    HubStore,
    QueueFull,
    decode_frame,
    encode_frame,
    login_fields,
)
from paychan.actors.loopback import LoopbackNetwork
from paychan.actors.node import NodeCore
from paychan.protocol.errors import (
    BadSignature,
    BrokenEncoding,
    PaychanError,
    Unauthorized,
    from_wire,
)
from paychan.protocol.identity import DOMAIN_HUB_LOGIN, Identity, encode_address
from paychan.storage.env import Store
from paychan.storage.writer import Put

MARKER = b"PLAINTEXT-MARKER-7f3a"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout=15.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class HubProcess:
    """`paychan hub serve` in a subprocess, restartable on the same port and data dir."""

    def __init__(self, data: Path, port: int) -> None:
        self.data, self.port = data, port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self):
        self.starts += 1
        log = open(self.data.parent / f"hub-{self.starts}.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "paychan.cli", "hub", "serve", "--data", str(self.data),
             "--port", str(self.port)], stdout=subprocess.PIPE, stderr=log, text=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if ready:
                line = self.proc.stdout.readline()
                assert line.strip() == f"hub listening on {self.url}", line
                return self
            assert self.proc.poll() is None, "the hub exited at start"
        raise AssertionError("the hub did not start")

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        """SIGTERM or SIGINT (Ctrl-C): a clean shutdown exits 0."""
        self.proc.send_signal(sig)
        code = self.proc.wait(10)
        self.proc.stdout.close()
        return code

    def snapshot(self):
        """Every key and value the hub stores, read from another process."""
        env = lmdb.open(str(self.data), readonly=True, max_dbs=32, lock=True)
        try:
            db = env.open_db(b"kv", create=False)
            with env.begin() as txn:
                return dict(txn.cursor(db=db))
        finally:
            env.close()

    def files_contain(self, needle: bytes) -> bool:
        return any(needle in p.read_bytes() for p in self.data.iterdir() if p.is_file())


@pytest.fixture
def hub(tmp_path):
    h = HubProcess(tmp_path / "hub", free_port()).start()
    yield h
    if h.proc.poll() is None:
        assert h.stop() == 0


class Peer:
    """A ChatTransport with a real identity that opens what it receives."""

    def __init__(self, hub_url, seed=None, secret=None):
        self.identity = Identity(seed or os.urandom(32))
        self.sealer = Sealer(self.identity)
        self.secret = secret if secret is not None else os.urandom(16)
        self.got: list[tuple[bytes, bytes, dict]] = []
        self.envelopes: list[bytes] = []  # every delivery, even one that does not open
        self.chat = ChatTransport(hub_url, self.identity, self.secret)
        self.chat.start(self._deliver)
        assert self.chat.wait_connected(10)

    def _deliver(self, envelope, route):
        self.envelopes.append(envelope)
        sender, payload = self.sealer.open(envelope)
        self.got.append((sender, payload, route))

    @property
    def key(self):
        return self.identity.public

    def send(self, other_key, payload):
        self.chat.send(other_key, self.sealer.seal(other_key, payload), None)

    def payloads(self):
        return [p for _, p, _ in self.got]

    def stored(self):
        """Everything sent so far has been acknowledged (durable) or refused by the hub."""
        return not self.chat._pending

    def close(self):
        self.chat.close()


@pytest.fixture
def peers(hub):
    made = []

    def make(**kw):
        p = Peer(hub.url, **kw)
        made.append(p)
        return p
    yield make
    for p in made:
        p.close()


def paired(a, b):
    a.chat.introduce(b.key, b.secret)


def test_envelopes_both_ways_sealed_end_to_end(hub, peers):
    a, b = peers(), peers()
    paired(a, b)
    for i in range(40):
        a.send(b.key, b"to b %d" % i)
    wait_until(lambda: len(b.got) == 40, what="a's envelopes at b")
    # The pair is remembered: b answers without any secret, in the other direction.
    for i in range(40):
        b.send(a.key, b"to a %d" % i)
    wait_until(lambda: len(a.got) == 40, what="b's envelopes at a")
    assert sorted(b.payloads()) == sorted(b"to b %d" % i for i in range(40))
    assert sorted(a.payloads()) == sorted(b"to a %d" % i for i in range(40))
    assert {s for s, _, _ in b.got} == {a.key} and {s for s, _, _ in a.got} == {b.key}
    assert b.got[0][2] == {"via": "hub", "hub": hub.url}
    wait_until(lambda: a.stored() and b.stored(), what="acks")
    assert a.chat.refused == [] and b.chat.refused == []
    assert a.chat.can_reach(b.key, {"via": "hub", "hub": hub.url})
    assert not a.chat.can_reach(b.key, {"via": "hub", "hub": "http://127.0.0.1:1"})
    assert a.chat.can_reach(b.key, None)  # last resort for peers nobody else reaches


def test_offline_recipient_gets_its_envelopes_at_login(hub, peers):
    a, b = peers(), peers()
    seed, secret = b.identity.seed, b.secret
    b.close()  # registered its secret, now offline
    paired(a, b)
    for i in range(5):
        a.send(b.key, b"while you were away %d" % i)
    wait_until(a.stored, what="the hub to store")
    assert a.chat.refused == []
    later = peers(seed=seed, secret=secret)
    wait_until(lambda: len(later.got) == 5, what="queued envelopes")
    assert later.payloads() == [b"while you were away %d" % i for i in range(5)]
    # Acknowledged envelopes are deleted: a third login gets nothing again.
    time.sleep(0.3)
    later.close()
    again = peers(seed=seed, secret=secret)
    time.sleep(0.5)
    assert again.got == []


def test_kill_9_loses_nothing_queued_and_stores_no_plaintext(hub, peers):
    a, b = peers(), peers()
    seed, secret = b.identity.seed, b.secret
    b.close()
    paired(a, b)
    for i in range(20):
        a.send(b.key, MARKER + b" %d" % i)
    wait_until(a.stored, what="the hub to store")  # acknowledged, hence durable
    hub.kill()
    assert not hub.files_contain(MARKER)
    assert not hub.files_contain(secret)  # only a hash of the pairing secret is kept
    # While the hub is down the sender keeps what it sends, and re-sends it once it is back.
    a.send(b.key, MARKER + b" while the hub was down")
    time.sleep(0.3)
    assert not a.stored()
    hub.start()
    wait_until(lambda: a.chat.logins == 2 and a.stored(), what="a to reconnect and resend")
    later = peers(seed=seed, secret=secret)
    wait_until(lambda: len(later.got) == 21, what="everything queued before the kill")
    assert set(later.payloads()) == ({MARKER + b" %d" % i for i in range(20)}
                                     | {MARKER + b" while the hub was down"})
    assert not hub.files_contain(MARKER)
    # SIGTERM with nodes connected: every socket is closed and the hub exits cleanly.
    started = time.monotonic()
    assert hub.stop() == 0
    assert time.monotonic() - started < 5
    assert "hub stopped" in (hub.data.parent / "hub-2.log").read_text()
    wait_until(lambda: not a.chat.connected.is_set(), what="a to see the hub go")


def test_ctrl_c_stops_the_hub_cleanly_and_keeps_the_queue(
        hub: HubProcess, peers: Callable[..., Peer]) -> None:
    # The README tells users to stop the hub with Ctrl-C: SIGINT must be as clean as SIGTERM,
    # and a restart must still hold what was acknowledged before it.
    a, b = peers(), peers()
    seed, secret = b.identity.seed, b.secret
    b.close()
    paired(a, b)
    a.send(b.key, b"queued before Ctrl-C")
    wait_until(a.stored, what="the hub to store")
    started = time.monotonic()
    assert hub.stop(signal.SIGINT) == 0  # with a still connected
    assert time.monotonic() - started < 5
    log = (hub.data.parent / "hub-1.log").read_text()
    assert "hub stopped" in log
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log
    hub.start()
    later = peers(seed=seed, secret=secret)
    wait_until(lambda: later.payloads() == [b"queued before Ctrl-C"], what="the queued envelope")
    assert a.chat.refused == []


def test_first_contact_needs_the_pairing_secret(hub, peers):
    a, b, c = peers(), peers(), peers()
    a.send(b.key, b"no secret")
    a.chat.introduce(b.key, os.urandom(16))
    a.send(b.key, b"wrong secret")
    wait_until(lambda: len(a.chat.refused) == 2, what="refusals")
    assert all(isinstance(e, Unauthorized) for e in a.chat.refused)
    assert b.got == []
    paired(a, b)
    a.send(b.key, b"right secret")
    wait_until(lambda: b.payloads() == [b"right secret"], what="the paired envelope")
    b.send(a.key, b"both ways now")
    wait_until(lambda: a.payloads() == [b"both ways now"], what="the answer")
    # Pairing a with b lets nobody else in.
    c.send(b.key, b"me too?")
    wait_until(lambda: len(c.chat.refused) == 1, what="c's refusal")
    time.sleep(0.2)
    assert b.payloads() == [b"right secret"]


# -- hostile sockets ------------------------------------------------------------------------

async def _exchange(url, frames, after_login=None):
    """Open a socket, send `frames(challenge)`, collect what the hub answers until it closes
    or goes quiet. With `after_login` (an Identity), log in first."""
    replies = []
    async with aiohttp.ClientSession() as s, s.ws_connect(url + "/ws") as ws:
        _, challenge = decode_frame(await ws.receive_bytes(timeout=5), HUB_FRAMES)
        if after_login is not None:
            await ws.send_bytes(login_frame(after_login, challenge["challenge"], url))
            kind, _ = decode_frame(await ws.receive_bytes(timeout=5), HUB_FRAMES)
            assert kind == "welcome"
        for frame in frames(challenge["challenge"]):
            if isinstance(frame, str):
                await ws.send_str(frame)
            else:
                await ws.send_bytes(frame)
        while True:
            try:
                msg = await ws.receive(timeout=1.0)
            except TimeoutError:
                break
            if msg.type is not aiohttp.WSMsgType.BINARY:
                break
            replies.append(decode_frame(msg.data, HUB_FRAMES))
        return replies, ws.close_code if ws.closed else None


def login_frame(identity, challenge, url, secret=None, signer=None):
    sig = (signer or identity).sign(DOMAIN_HUB_LOGIN, login_fields(challenge, url, secret))
    extra = {"secret": secret} if secret is not None else {}
    return encode_frame("login", key=identity.public, sig=sig, url=url, **extra)


def _errors(replies):
    return [from_wire(f["error"]) for kind, f in replies if kind == "error"]


def test_bad_logins_are_refused_and_change_nothing(hub, peers):
    a, b = peers(), peers()
    paired(a, b)
    a.send(b.key, b"state before")
    wait_until(lambda: len(b.got) == 1, what="a first envelope")
    time.sleep(0.3)  # b's ack committed
    before = hub.snapshot()
    stranger, url = Identity(os.urandom(32)), hub.url

    # A valid answer recorded from one connection...
    recorded = {}

    def record(challenge):
        recorded["frame"] = login_frame(stranger, challenge, url)
        return [recorded["frame"]]
    replies, _ = asyncio.run(_exchange(url, record))
    assert [k for k, _ in replies] == ["welcome"]

    big = encode_frame("login", key=bytes(32), sig=bytes(64), url="x" * 10,
                       secret=b"y" * (MAX_FRAME_BYTES + 1))
    huge = b"\x00" * (5 * MAX_FRAME_BYTES)
    cases = {
        "wrong signature": lambda ch: [login_frame(b.identity, ch, url, b.secret,
                                                   signer=stranger)],
        "signed for another hub": lambda ch: [login_frame(stranger, ch, "http://10.0.0.9:80")],
        "replayed answer": lambda ch: [recorded["frame"]],
        "missing fields": lambda ch: [encode_frame("login", key=stranger.public, url=url)],
        "extra field": lambda ch: [encode_frame("login", key=stranger.public, url=url,
                                                sig=bytes(64), admin=True)],
        "garbage bytes": lambda ch: [b"\xc1\xff\x00garbage"],
        "not a map": lambda ch: [msgpack.packb([1, 2, 3])],
        "text frame": lambda ch: ["hello"],
        "send before login": lambda ch: [encode_frame("send", to=b.key, id=bytes(16),
                                                     envelope=b"x")],
        "oversized frame": lambda ch: [big],
    }
    for name, frames in cases.items():
        replies, closed = asyncio.run(_exchange(url, frames))
        assert closed == 4001, (name, closed)
        errors = _errors(replies)
        assert len(errors) == 1 and [k for k, _ in replies] == ["error"], (name, replies)
        if name in ("wrong signature", "replayed answer"):
            assert isinstance(errors[0], BadSignature), name
        else:
            assert isinstance(errors[0], Unauthorized | BrokenEncoding), (name, errors)
    # A message far over the limit is not even read: the WebSocket layer closes with 1009.
    replies, closed = asyncio.run(_exchange(url, lambda ch: [huge]))
    assert closed == 1009 and replies == []
    assert hub.snapshot() == before
    # The hub is unharmed and the wrongly signed login did not replace b's secret.
    a.send(b.key, b"still fine")
    wait_until(lambda: b.payloads()[-1:] == [b"still fine"], what="relay after the junk")


def test_junk_after_login_gets_an_error_and_changes_nothing(hub, peers):
    a, b = peers(), peers()
    paired(a, b)
    a.send(b.key, b"hi")
    wait_until(lambda: len(b.got) == 1, what="pairing")
    time.sleep(0.3)
    before = hub.snapshot()
    raw = Identity(os.urandom(32))
    forged = Sealer(a.identity).seal(b.key, b"claims to be a")  # raw is not a
    frames = lambda ch: [  # noqa: E731
        b"\x00junk",
        "text",
        encode_frame("send", to=b.key, id=os.urandom(16), envelope=b"x" * MAX_FRAME_BYTES),
        encode_frame("send", to=b.key, id=os.urandom(16), envelope=b"not sealed"),
        encode_frame("send", to=b.key, id=os.urandom(16), envelope=forged),
        encode_frame("send", to=b.key, id=b"short", envelope=forged),
        encode_frame("ack", **{"from": a.key, "id": os.urandom(16)}),  # unknown: ignored
        encode_frame("login", key=raw.public, sig=bytes(64), url=hub.url),
    ]
    replies, closed = asyncio.run(_exchange(hub.url, frames, after_login=raw))
    assert closed is None
    errors = _errors(replies)
    assert len(errors) == 7, replies
    assert all(isinstance(e, Unauthorized | BrokenEncoding) for e in errors)
    assert hub.snapshot() == before
    # Duplicates: the same sender id is stored and delivered once, and acknowledged each time.
    sealed = Sealer(raw).seal(a.key, b"dup")
    same = os.urandom(16)
    a_seed = a.identity.seed
    a.close()
    pair_secret = {"secret": a.secret}
    replies, _ = asyncio.run(_exchange(hub.url, lambda ch: [
        encode_frame("send", to=a.key, id=same, envelope=sealed, **pair_secret),
        encode_frame("send", to=a.key, id=same, envelope=sealed, **pair_secret)],
        after_login=raw))
    assert [k for k, _ in replies] == ["ack", "ack"]
    back = peers(seed=a_seed, secret=a.secret)
    wait_until(lambda: back.got, what="the duplicate")
    time.sleep(0.5)
    assert back.payloads() == [b"dup"]


def test_envelope_sealed_for_another_key_than_its_to_is_refused(
        hub: HubProcess, peers: Callable[..., Peer]) -> None:
    a, b, c = peers(), peers(), peers()
    paired(a, b)
    paired(a, c)
    before = hub.snapshot()
    raw = Identity(os.urandom(32))
    for_b = Sealer(raw).seal(b.key, b"sealed for b")
    for_c = Sealer(raw).seal(c.key, b"sealed for c")
    ids = [os.urandom(16), os.urandom(16)]
    # Each frame carries the pairing secret of its `to`: only the recipient check refuses it.
    replies, closed = asyncio.run(_exchange(hub.url, lambda ch: [
        encode_frame("send", to=b.key, id=ids[0], envelope=for_c, secret=b.secret),
        encode_frame("send", to=c.key, id=ids[1], envelope=for_b, secret=c.secret)],
        after_login=raw))
    assert closed is None
    assert [k for k, _ in replies] == ["error", "error"], replies
    assert sorted(f["id"] for _, f in replies) == sorted(ids)
    assert not any(f.get("retry") for _, f in replies)  # final: resending cannot help
    assert all(type(e) is Unauthorized for e in _errors(replies))
    assert hub.snapshot() == before
    # One queue per recipient, delivered in order: had either been queued, it would arrive
    # before what a sends now.
    a.send(b.key, b"after")
    a.send(c.key, b"after")
    wait_until(lambda: b.payloads() == [b"after"] == c.payloads(), what="a's envelopes")
    assert len(b.envelopes) == 1 and len(c.envelopes) == 1
    # The same envelope and secret with the right `to` is taken: the mismatch alone was refused.
    replies, _ = asyncio.run(_exchange(hub.url, lambda ch: [
        encode_frame("send", to=b.key, id=os.urandom(16), envelope=for_b, secret=b.secret)],
        after_login=raw))
    assert [k for k, _ in replies] == ["ack"]
    wait_until(lambda: b.payloads() == [b"after", b"sealed for b"], what="the right envelope")


# Ways to cut off a valid frame, or to claim more than a frame holds; each list is sent as
# separate WebSocket messages.
CUTS: dict[str, Callable[[bytes], list[bytes]]] = {
    "cut in half": lambda whole: [whole[:len(whole) // 2]],
    # The rest as the next message must not complete it: a message is one whole frame.
    "split over two messages": lambda whole: [whole[:len(whole) // 2], whole[len(whole) // 2:]],
    "last byte missing": lambda whole: [whole[:-1]],
    "first byte only": lambda whole: [whole[:1]],
    # encode_frame writes a fixmap (0x80 + fields): claim one field more than follows.
    "map claims one field more": lambda whole: [bytes([whole[0] + 1]) + whole[1:]],
    # Headers claiming 4 GiB or 4 G items in a few bytes: refused, nothing allocated.
    "bin32 claims 4 GiB": lambda whole: [b"\x82\xa1t\xa4send\xa2to\xc6\xff\xff\xff\xff"
                                         + bytes(8)],
    "array32 claims 4 G items": lambda whole: [b"\xdd\xff\xff\xff\xff" + bytes(8)],
}


def _malformed(err: PaychanError) -> bool:
    return type(err) is BrokenEncoding and "malformed msgpack" in err.message


def test_cut_off_frames_before_login_are_refused_and_change_nothing(
        hub: HubProcess, peers: Callable[..., Peer]) -> None:
    a, b = peers(), peers()
    paired(a, b)
    before = hub.snapshot()
    stranger = Identity(os.urandom(32))
    for name, cut in CUTS.items():
        # A login that would succeed if the hub read it whole.
        replies, closed = asyncio.run(_exchange(
            hub.url, lambda ch, cut=cut: cut(login_frame(stranger, ch, hub.url))))
        assert closed == 4001, (name, closed)
        assert [k for k, _ in replies] == ["error"], (name, replies)
        assert _malformed(_errors(replies)[0]), (name, _errors(replies))
    assert hub.snapshot() == before
    a.send(b.key, b"still served")
    wait_until(lambda: b.payloads() == [b"still served"], what="relay after the cut frames")


def test_cut_off_frames_after_login_get_an_error_each_and_change_nothing(
        hub: HubProcess, peers: Callable[..., Peer]) -> None:
    a, b = peers(), peers()
    paired(a, b)
    before = hub.snapshot()
    raw = Identity(os.urandom(32))
    # A send the hub would store (b's secret, a sealed envelope), cut in every way.
    sealed = Sealer(raw).seal(b.key, b"never whole")
    whole = encode_frame("send", to=b.key, id=os.urandom(16), secret=b.secret, envelope=sealed)
    cut = [m for how in CUTS.values() for m in how(whole)]
    cut.append(whole[:-10])  # the envelope, the last field, claims 10 bytes more
    # A whole frame after the cut ones is still read as itself (no secret: refused, so nothing
    # is stored, but it answers with its own id).
    probe = os.urandom(16)
    last = encode_frame("send", to=b.key, id=probe, envelope=sealed)
    replies, closed = asyncio.run(_exchange(hub.url, lambda ch: [*cut, last], after_login=raw))
    assert closed is None
    errors = _errors(replies)
    assert [k for k, _ in replies] == ["error"] * (len(cut) + 1), replies
    assert all(_malformed(e) and "id" not in f
               for e, (_, f) in zip(errors[:-1], replies[:-1], strict=True)), errors
    assert type(errors[-1]) is Unauthorized and replies[-1][1]["id"] == probe
    assert hub.snapshot() == before
    a.send(b.key, b"still served")
    wait_until(lambda: b.payloads() == [b"still served"], what="relay after the cut frames")
    assert len(b.envelopes) == 1


def test_queue_bound_dedup_window_and_pruning(tmp_path):
    """The hub's tables in-process: a full queue refuses, acknowledged ids expire."""
    store = Store.open(tmp_path / "hub")
    db = HubStore(store, max_queue=3)
    a, b = os.urandom(32), os.urandom(32)
    secret = os.urandom(16)

    async def run():
        await db.register_secret(b, secret)
        ids = [os.urandom(16) for _ in range(4)]
        assert await db.accept(a, b, ids[0], b"e0", secret)
        assert not await db.accept(a, b, ids[0], b"e0", None)  # duplicate, stored once
        assert await db.accept(a, b, ids[1], b"e1", None)  # paired now
        assert await db.accept(a, b, ids[2], b"e2", None)
        with pytest.raises(QueueFull):
            await db.accept(a, b, ids[3], b"e3", None)
        assert [e for _, _, _, e in db.queued(b, 0, 10)] == [b"e0", b"e1", b"e2"]
        assert not await db.delivered(a, a, ids[0])  # only the recipient may acknowledge
        assert await db.delivered(b, a, ids[0])
        assert not await db.delivered(b, a, ids[0])
        assert db.count(b) == 2
        assert await db.accept(a, b, ids[3], b"e3", None)  # room again
        assert not await db.accept(a, b, ids[0], b"e0", None)  # still remembered
        assert await db.delivered(b, a, ids[1])
        assert await db.prune(int(time.time()) + 1) == 2
        assert await db.accept(a, b, ids[0], b"e0", None)  # forgotten after the window
    try:
        asyncio.run(run())
    finally:
        store.close()


# -- pairing codes --------------------------------------------------------------------------

def test_pairing_codes_round_trip_and_refuse_junk():
    key, secret = Identity(b"k" * 32).public, b"s" * 16
    code = make_pairing_code(encode_address(key), "127.0.0.1:9000", secret)
    assert code.startswith(encode_address(key) + "@127.0.0.1:9000#")
    assert parse_pairing_code(code) == (key, "http://127.0.0.1:9000", secret)
    assert parse_pairing_code(make_pairing_code(key, "http://Hub.Example:80", secret))[1] == \
        "http://hub.example:80"
    bad = [None, 42, "", code.replace("@", "#"), code.split("#")[0], code + "!",
           code.replace(":9000", ":99999"), code.replace(":9000", ""),
           "ak_1111@127.0.0.1:9000#abc", code[:-3] + "0OI", code.replace("ak_", "ch_"),
           code.split("#")[0] + "#" + "2" * 5, "x" * 1000]
    for junk in bad:
        with pytest.raises(BrokenEncoding):
            parse_pairing_code(junk)


# -- two nodes, a channel and payments, only through the hub -------------------------------

def seeded_identity(data_dir):
    """The identity a NodeCore at `data_dir` will load: its transports need it first."""
    seed = os.urandom(32)
    store = Store.open(data_dir)
    try:
        existing = store.get("kv", b"identity_seed")
        if existing is not None:
            return Identity(bytes(existing))
        store.writer.commit([Put("kv", b"identity_seed", seed)])
        return Identity(seed)
    finally:
        store.close()


def chat_node(path, hub_url, ledger):
    identity = seeded_identity(str(path))
    chat = ChatTransport(hub_url, identity, os.urandom(16))
    # A private loopback network each: the only way between these nodes is the hub.
    core = NodeCore(str(path), ledger.client, network=LoopbackNetwork(), transports=[chat])
    assert core.identity == identity
    assert chat.wait_connected(10)
    return paychan.Node(core), chat


def test_channel_and_payments_through_the_hub(tmp_path, hub):
    ledger = paychan.Ledger.embedded(clock=paychan.VirtualClock())
    a, chat_a = chat_node(tmp_path / "a", hub.url, ledger)
    b, chat_b = chat_node(tmp_path / "b", hub.url, ledger)
    try:
        ledger.mint(a.address, 5_000)
        ledger.mint(b.address, 5_000)
        a.on_payment_received(lambda p: ["a", p.message])
        b.on_payment_received(lambda p: ["b", p.message])
        key, hub_url, secret = parse_pairing_code(chat_b.pairing_code)
        a._core.routes.learn(key, {"via": "hub", "hub": hub_url})
        chat_a.introduce(key, secret)
        ch = a.create_channel(encode_address(key), 1_000)
        b.deposit(ch, 300)
        for i in range(10):
            assert a.send_message_and_pay(ch, i, 7) == ["b", i]
        for i in range(5):
            assert b.send_message_and_pay(ch, i, 2) == ["a", i]
        assert a.balances(ch)["sent_by_me"] == 70 == b.balances(ch)["sent_by_peer"]
        assert b.balances(ch)["sent_by_me"] == 10 == a.balances(ch)["sent_by_peer"]
        a.close(ch)
        assert ledger.balance(a.address) == 5_000 - 70 + 10
        assert ledger.balance(b.address) == 5_000 + 70 - 10
    finally:
        a.stop()
        b.stop()
        ledger.close()
