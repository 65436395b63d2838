"""HttpTransport writing into an open socket at once: order, flow-control pauses, refused writes."""
from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import aiohttp
import msgpack
import pytest
from aiohttp import web

from paychan.actors.http_transport import MAX_BODY, HttpTransport, _resume
from paychan.protocol.errors import BrokenEncoding

T = TypeVar("T")

WAIT = 5.0
SENDER = b"S" * 32
PEER = b"R" * 32  # the receiving side's public key: frames to it are addressed by it
# The ciphertext size that makes a frame MAX_BODY - 1 bytes, the most a peer's socket takes
# (aiohttp refuses a message as long as max_msg_size itself).
LARGE = MAX_BODY - 1 - (len(msgpack.packb(["pc1", SENDER, PEER, bytes(1 << 16)])) - (1 << 16))
MOST_FRAMES = 400  # backpressure must set in well before this many large frames
BEHIND = 8  # frames sent while a paused send is being finished


# -- helpers ---------------------------------------------------------------------------------
def envelope(seq: int, size: int = 0) -> bytes:
    """A frame as on the wire: msgpack [tag, sender, recipient, ciphertext]; the "ciphertext"
    starts with `seq` and is padded to `size`, so any frame can be rebuilt from its number."""
    body = seq.to_bytes(4, "big") + bytes([seq % 251]) * max(0, size - 4)
    frame: bytes = msgpack.packb(["pc1", SENDER, PEER, body])
    assert len(frame) <= MAX_BODY
    return frame


def seq_of(frame: bytes) -> int:
    return int.from_bytes(msgpack.unpackb(frame)[3][:4], "big")


def arrived(frames: list[bytes], count: int) -> bool:
    return len(frames) >= count


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Poll until `predicate` holds; fail with `what` at the deadline."""
    deadline = time.monotonic() + timeout
    pause = 0.002
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


def on_loop(transport: HttpTransport, fn: Callable[[], T]) -> T:
    """Run `fn` on the transport's loop thread, where its state may be read and changed."""
    async def call() -> T:
        return fn()
    return asyncio.run_coroutine_threadsafe(call(), transport.loop).result(WAIT)


def spy(monkeypatch: pytest.MonkeyPatch, obj: Any, name: str) -> list[tuple[Any, ...]]:
    """Record the arguments of every call to the method `name` of `obj`, then make it."""
    calls: list[tuple[Any, ...]] = []
    original = getattr(obj, name)

    def recording(*args: Any) -> Any:
        calls.append(args)
        return original(*args)

    monkeypatch.setattr(obj, name, recording)
    return calls


class Receiver:
    """An HttpTransport listening on 127.0.0.1 that records every frame delivered to it."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.transport = HttpTransport("http://127.0.0.1:0", {})
        self.transport.start(self._deliver)
        self.url = f"http://127.0.0.1:{self.transport.bound_port}"

    def _deliver(self, envelope: bytes, route: dict[str, Any] | None) -> None:
        self.frames.append(envelope)  # on its loop thread; list.append is atomic


class WsServer:
    """A bare aiohttp WebSocket server on 127.0.0.1, on a loop thread of its own; subclasses say
    what `_on_ws` does with a socket."""

    def __init__(self, name: str) -> None:
        self.frames: list[bytes] = []
        self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name=name)
        self._thread.start()
        self._runner: web.AppRunner | None = None
        self.url: str = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(WAIT)

    async def _start(self) -> str:
        app = web.Application()
        app.router.add_get("/ws", self._on_ws)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        return f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def _on_ws(self, request: web.Request) -> web.WebSocketResponse:
        raise NotImplementedError

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(WAIT)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(WAIT)
        self._loop.close()


class StalledServer(WsServer):
    """Accepts a socket, then reads nothing until `resume()`: aiohttp stops reading the TCP
    socket once its message queue is full, so the kernel buffers fill and the sender's writer
    is paused."""

    def __init__(self) -> None:
        self._reading = asyncio.Event()  # bound to the server's loop on its first wait
        super().__init__("stalled-server")

    async def _on_ws(self, request: web.Request) -> web.WebSocketResponse:
        # No compression: a large frame then only waits on flow control, never on a deflater.
        ws = web.WebSocketResponse(max_msg_size=MAX_BODY, compress=False)
        await ws.prepare(request)
        self.connections += 1
        await self._reading.wait()
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.BINARY:
                self.frames.append(msg.data)
        return ws

    def resume(self) -> None:
        self._loop.call_soon_threadsafe(self._reading.set)

    def stop(self) -> None:
        self.resume()
        super().stop()


def _ignore(envelope: bytes, route: dict[str, Any] | None) -> None:
    return None


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.transport.close()


@pytest.fixture
def sender() -> Iterator[HttpTransport]:
    """A transport with no listener: it only dials out. Tests ask for it after the peer, so it
    closes first, while the peer still answers its socket's close."""
    t = HttpTransport(None, {})
    t.start(_ignore)
    yield t
    t.close()


@pytest.fixture
def stalled() -> Iterator[StalledServer]:
    s = StalledServer()
    yield s
    s.stop()


# -- _resume, with no network ----------------------------------------------------------------
async def _awaiting(coro: Any, awaited: Any) -> Any:
    """What _finish_then_drain does: finish, inside this task, a coroutine stepped by hand."""
    return await _resume(coro, awaited)


def test_resume_finishes_a_coroutine_stepped_by_hand_and_returns_its_value() -> None:
    async def main() -> int:
        loop = asyncio.get_running_loop()
        first, second = loop.create_future(), loop.create_future()

        async def work() -> int:
            a: int = await first
            b: int = await second  # a second suspension: _resume keeps stepping
            return a * b

        coro = work()
        awaited = coro.send(None)  # the first step taken by hand, as _send_now does
        assert awaited is first
        task = asyncio.create_task(_awaiting(coro, awaited))
        await asyncio.sleep(0)
        assert not task.done()  # the task now waits on the future the coroutine yielded
        first.set_result(6)
        await asyncio.sleep(0)
        assert not task.done()
        second.set_result(7)
        return await asyncio.wait_for(task, WAIT)

    assert asyncio.run(main()) == 42


def test_resume_propagates_an_exception_raised_after_resuming() -> None:
    async def main() -> None:
        fut = asyncio.get_running_loop().create_future()

        async def work() -> None:
            await fut
            raise ValueError("after resuming")

        coro = work()
        task = asyncio.create_task(_awaiting(coro, coro.send(None)))
        await asyncio.sleep(0)
        fut.set_result(None)
        with pytest.raises(ValueError, match="after resuming"):
            await asyncio.wait_for(task, WAIT)

    asyncio.run(main())


def test_cancelling_the_awaiting_task_throws_cancelled_error_into_the_coroutine() -> None:
    seen: list[Any] = []

    async def main() -> asyncio.Task[Any]:
        fut = asyncio.get_running_loop().create_future()

        async def work() -> None:
            try:
                await fut
            except BaseException as exc:
                seen.append(type(exc))
                raise
            finally:
                seen.append("finally")

        coro = work()
        task = asyncio.create_task(_awaiting(coro, coro.send(None)))
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.wait({task}, timeout=WAIT)
        return task

    task = asyncio.run(main())
    # Thrown in (not closed with GeneratorExit): the coroutine saw the cancellation itself.
    assert seen == [asyncio.CancelledError, "finally"]
    assert task.cancelled()


def test_a_coroutine_that_absorbs_the_cancellation_decides_the_result() -> None:
    async def main() -> Any:
        fut = asyncio.get_running_loop().create_future()

        async def work() -> str:
            try:
                await fut
            except asyncio.CancelledError:
                return "finished anyway"
            return "not cancelled"

        coro = work()
        task = asyncio.create_task(_awaiting(coro, coro.send(None)))
        await asyncio.sleep(0)
        task.cancel()
        return await asyncio.wait_for(task, WAIT)

    assert asyncio.run(main()) == "finished anyway"


def test_a_future_failing_raises_inside_the_coroutine_which_may_recover() -> None:
    async def main() -> Any:
        fut = asyncio.get_running_loop().create_future()

        async def work() -> str:
            try:
                await fut
            except KeyError as exc:
                return f"recovered from {exc.args[0]}"
            return "no error"

        coro = work()
        task = asyncio.create_task(_awaiting(coro, coro.send(None)))
        await asyncio.sleep(0)
        fut.set_exception(KeyError("lost"))
        return await asyncio.wait_for(task, WAIT)

    assert asyncio.run(main()) == "recovered from lost"


# -- real sockets on 127.0.0.1 ---------------------------------------------------------------
def test_frames_to_an_open_socket_are_written_at_once_in_order(
        receiver: Receiver, sender: HttpTransport, monkeypatch: pytest.MonkeyPatch) -> None:
    drains = spy(monkeypatch, sender, "_drain")
    suspended = spy(monkeypatch, sender, "_finish_then_drain")
    route = {"via": "http", "url": receiver.url}
    # No socket yet: the first frames queue while one worker dials, then it sends them.
    for seq in range(50):
        sender.send(PEER, envelope(seq, 100 + seq * 7), route)
    wait_until(lambda: len(receiver.frames) >= 50, "the frames sent while dialing")
    wait_until(lambda: on_loop(sender, lambda: sender._workers[PEER].done()),
               "the dialing worker to finish")
    assert len(drains) == 1
    # The socket is open and nothing is queued: every frame is written by _enqueue itself, so
    # no further worker is started (without the direct path each burst would start one).
    # Bursts of about 100 KB: too little to fill the kernel's buffers and pause the writer.
    for end in range(150, 1051, 100):
        for seq in range(end - 100, end):
            sender.send(PEER, envelope(seq, 100 + seq % 900), route)
        wait_until(functools.partial(arrived, receiver.frames, end), f"frames up to {end}")
    assert [seq_of(f) for f in receiver.frames] == list(range(1050))
    assert receiver.frames == [envelope(s, 100 + (s * 7 if s < 50 else s % 900))
                               for s in range(1050)]
    assert len(drains) == 1
    assert suspended == []
    assert on_loop(sender, lambda: not sender._queues[PEER])


def test_a_paused_writer_finishes_the_frame_in_a_worker_and_later_frames_queue_behind(
        stalled: StalledServer, sender: HttpTransport, monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        _send_into_a_stalled_peer(stalled, sender, monkeypatch)
    finally:
        stalled.resume()  # else closing the sender would wait on a peer that never reads


def _send_into_a_stalled_peer(stalled: StalledServer, sender: HttpTransport,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    suspended = spy(monkeypatch, sender, "_finish_then_drain")
    direct = spy(monkeypatch, sender, "_send_now")
    # For each frame handed over while a worker was finishing a paused send: was it written
    # into the socket at once anyway (it must wait in the queue behind the paused one)?
    written_past_pause: list[bool] = []
    enqueue = sender._enqueue

    def recording_enqueue(peer: bytes, url: str | None, frame: bytes) -> None:
        worker = sender._workers.get(peer)
        finishing = (worker is not None and not worker.done()
                     and worker.get_coro().__qualname__ == "HttpTransport._finish_then_drain")
        tried = len(direct)
        enqueue(peer, url, frame)
        if finishing:
            written_past_pause.append(len(direct) > tried)

    monkeypatch.setattr(sender, "_enqueue", recording_enqueue)
    route = {"via": "http", "url": stalled.url}
    sender.send(PEER, envelope(0, LARGE), route)
    wait_until(lambda: on_loop(sender, lambda: sender._open_socket(PEER) is not None
                               and sender._workers[PEER].done()), "the socket to be dialed")
    # The server reads nothing: large frames fill its queue, then the kernel's buffers, then
    # the sender's transport buffer, and aiohttp pauses the writer mid-send (for good once the
    # kernel takes no more; under load it may also pause for a moment before that).
    sent = 1
    while len(written_past_pause) < BEHIND:
        assert sent < MOST_FRAMES, f"{BEHIND} frames were not sent behind a paused one"
        sender.send(PEER, envelope(sent, LARGE), route)
        sent += 1
        on_loop(sender, lambda: None)  # let the loop write it before the next one
    assert suspended and all(args[0] == PEER for args in suspended)
    assert not any(written_past_pause)
    stalled.resume()
    wait_until(lambda: len(stalled.frames) >= sent, f"all {sent} frames once reading resumed")
    wait_until(lambda: on_loop(sender, lambda: sender._workers[PEER].done()),
               "the worker to finish")
    assert on_loop(sender, lambda: not sender._queues[PEER] and PEER not in sender._gone)
    # One more frame, written at once again; once it is in, nothing sent before can follow.
    tried = len(direct)
    sender.send(PEER, envelope(sent, LARGE), route)
    wait_until(lambda: len(stalled.frames) >= sent + 1, "the last frame")
    assert [seq_of(f) for f in stalled.frames] == list(range(sent + 1))
    assert all(f == envelope(seq_of(f), LARGE) for f in stalled.frames)
    assert len(direct) == tried + 1 and stalled.connections == 1


@pytest.mark.parametrize("same_turn", [False, True],
                         ids=["after-connection-lost", "before-connection-lost"])
def test_a_socket_refusing_the_write_sends_the_frame_through_the_queue_after_a_redial(
        receiver: Receiver, sender: HttpTransport, monkeypatch: pytest.MonkeyPatch,
        same_turn: bool) -> None:
    route = {"via": "http", "url": receiver.url}
    sender.send(PEER, envelope(0, 200), route)
    wait_until(lambda: len(receiver.frames) >= 1, "the first frame")
    wait_until(lambda: on_loop(sender, lambda: sender._workers[PEER].done()),
               "the dialing worker to finish")
    old = on_loop(sender, lambda: sender._outbound[PEER])
    drains = spy(monkeypatch, sender, "_drain")
    direct: list[bool] = []
    send_now = sender._send_now

    def recording_send_now(peer: bytes, ws: Any, frame: bytes) -> bool:
        direct.append(send_now(peer, ws, frame))
        return direct[-1]

    monkeypatch.setattr(sender, "_send_now", recording_send_now)
    sent: concurrent.futures.Future[tuple[bool, int]] = concurrent.futures.Future()

    def send_into_the_dead_socket() -> None:
        # The connection is gone but the socket's reader has not run yet: the socket still
        # looks open, and aiohttp refuses the write because its transport is closing.
        try:
            looked_open = not old.closed
            for seq in range(1, 6):
                sender._enqueue(PEER, receiver.url, envelope(seq, 200))
            sent.set_result((looked_open, len(sender._queues[PEER])))
        except BaseException as exc:
            sent.set_exception(exc)

    def drop_the_connection() -> None:
        # As when the peer resets the connection: the transport closes at once, and
        # connection_lost runs on the next loop turn and wakes the socket's reader. Frames sent
        # in the same turn reach the worker while the socket still looks open, so the worker's
        # own write is refused too: the frame must stay queued for the redial, not be dropped.
        try:
            old._writer.transport.abort()  # aiohttp offers no public handle on the transport
            if same_turn:
                send_into_the_dead_socket()
            else:
                sender.loop.call_soon(send_into_the_dead_socket)
        except BaseException as exc:
            sent.set_exception(exc)

    sender.loop.call_soon_threadsafe(drop_the_connection)
    looked_open, queued = sent.result(WAIT)
    assert looked_open
    assert direct == [False]  # refused; the four after it queued behind it without trying
    assert queued == 5 and len(drains) == 1
    wait_until(lambda: len(receiver.frames) >= 6, "the refused frame and those behind it")
    assert [seq_of(f) for f in receiver.frames] == list(range(6))
    new = on_loop(sender, lambda: sender._open_socket(PEER))
    assert old.closed and new is not None and new is not old  # redialed
    wait_until(lambda: on_loop(sender, lambda: sender._workers[PEER].done()),
               "the redialing worker to finish")
    # On the new socket, frames are written at once again.
    sender.send(PEER, envelope(6, 200), route)
    wait_until(lambda: len(receiver.frames) >= 7, "a frame after the redial")
    # Read on the loop: _send_now's result is recorded only after the frame is on its way.
    assert on_loop(sender, lambda: direct[-1]) is True and len(drains) == 1
    assert [seq_of(f) for f in receiver.frames] == list(range(7))


def test_a_frame_of_the_largest_size_passes_and_a_larger_one_closes_the_socket_quietly(
        receiver: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    # For the whole test: the receiver logs on its own loop thread, maybe after talk() ends.
    caplog.set_level("INFO", logger="paychan.http")
    largest = b"\x00" * MAX_BODY  # junk to the node, but a size its sockets must carry

    async def talk() -> tuple[bool, int | None]:
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(receiver.url + "/ws") as ws:
                await ws.send_bytes(largest)
                await ws.send_bytes(b"\x01")  # still open: it arrives too
                for _ in range(100):
                    if len(receiver.frames) >= 2:
                        break
                    await asyncio.sleep(0.01)
                await ws.send_bytes(b"\x00" * (MAX_BODY + 2))
                while (await ws.receive()).type not in (aiohttp.WSMsgType.CLOSE,
                                                        aiohttp.WSMsgType.CLOSED):
                    pass
                return ws.closed, ws.close_code

    closed, code = asyncio.run(asyncio.wait_for(talk(), WAIT))
    assert receiver.frames == [largest, b"\x01"]
    assert closed and code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
    wait_until(lambda: any("failed" in r.getMessage() for r in caplog.records
                           if r.name == "paychan.http"), "the failed socket to be logged")
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text


class Answering(WsServer):
    """Records binary frames and answers the first frame of its first connection with two
    junk frames (which the dialing side refuses)."""

    def __init__(self) -> None:
        super().__init__("answering-server")

    async def _on_ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.connections += 1
        first = self.connections == 1
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.BINARY:
                self.frames.append(msg.data)
                if first and len(self.frames) == 1:
                    await ws.send_bytes(b"junk-1")
                    await ws.send_bytes(b"junk-2")
        return ws


def test_a_reader_that_cannot_answer_junk_closes_its_socket_and_the_peer_is_redialed() -> None:
    """The connection resets while the transport refuses a frame: its error frame cannot be
    sent and the reader stops. The socket must not stay open-looking, else sends would go into
    it (and the redial would reuse it) until the heartbeat failed, 30 s later."""
    peer = Answering()
    sender = HttpTransport(None, {})
    refused: list[bytes] = []
    reset: list[Any] = []

    def deliver(frame: bytes, route: dict[str, Any] | None) -> BrokenEncoding:
        refused.append(frame)
        if frame == b"junk-1":  # on the sender's loop: the reset comes as it refuses
            reset.append(sender._outbound[PEER])
            reset[0]._writer.transport.abort()  # aiohttp offers no public handle on it
        return BrokenEncoding("junk")

    sender.start(deliver)
    try:
        route = {"via": "http", "url": peer.url}
        sender.send(PEER, envelope(0, 50), route)
        wait_until(lambda: bool(reset) and reset[0].closed, "the reset socket to be closed")
        assert refused[:1] == [b"junk-1"]
        for seq in range(1, 4):
            sender.send(PEER, envelope(seq, 50), route)
        wait_until(lambda: len(peer.frames) >= 4, "the frames sent after the reset", 3.0)
        assert [seq_of(f) for f in peer.frames] == [0, 1, 2, 3]
        assert peer.connections == 2  # redialed
    finally:
        sender.close()
        peer.stop()
