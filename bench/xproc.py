#!/usr/bin/env python3
"""The cross-process side of the bench: processes it starts, and the payer and bare-payee
programs it runs in them. bench/run.py is the entry point; this file is also the program of
the child processes:

    python bench/xproc.py paychan-payer --data DIR --ledger URL --listen URL --peer URL
                                        --channels C --deposit N
    python bench/xproc.py bare-payer    --data DIR --peer URL --channels C [--grouped]
    python bench/xproc.py bare-payee    --data DIR --port P [--grouped]

A payer is driven by JSON lines on its stdin and answers each with one JSON line on its stdout
(everything else it prints goes to stderr):

    {"op": "run", "counts": [n0, n1, ...]}  -> payments on channel c: n_c, one after another,
        every channel at once; the answer carries the latencies (s), acknowledged payments,
        wall seconds and errors. Payment numbers continue from the previous run.
    {"op": "stats"}  -> durable write transactions and the commits they carried (this process),
        and what the payer's committed state says it sent
    {"op": "quit"}   -> stop cleanly, answer {"bye": true} and exit

The first line a payer prints is {"ready": ...} once its channels are open; a bare payee prints
{"ready": true, "public": HEX} once it listens, and serves until SIGTERM.

The paychan payer is `paychan.Node.open(dir, ledger=URL, listen=URL)` paying the payee daemon
`paychan node run` (whose quick handler echoes: {"echo": message, "amount": amount}) over HTTP:
one channel from a thread with `send_message_and_pay`, many as asyncio tasks with
`asend_message_and_pay`. The bare pair does the same work per payment with asyncio, one aiohttp
WebSocket, LMDB with sync=True and PyNaCl, nothing else: the payer signs a voucher, commits
durably, seals the `pay` and sends it; the payee opens, decodes, verifies, commits durably,
echoes, commits the result durably, seals the reply and sends it; the payer opens, decodes and
commits the outcome durably. With one channel every commit is its own write transaction; with
`--grouped` the commits requested while a batch is being written share the next write
transaction (written on a helper thread, so the event loop keeps going meanwhile).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any

AMOUNT = 1
PAY_TIMEOUT = 30.0  # one payment in a payer process
CHANNELS_DB, RESULTS_DB, OUTCOMES_DB = "channels", "results", "outcomes"
HERE = os.path.dirname(os.path.abspath(__file__))


def message_for(i: int) -> dict[str, Any]:
    return {"i": i, "q": "weather"}


def echo(message: Any, amount: int) -> dict[str, Any]:
    """What `paychan node run` answers, and so what the bare payee answers too."""
    return {"echo": message, "amount": amount}


def expected(i: int) -> dict[str, Any]:
    return echo(message_for(i), AMOUNT)


# --- the parent's side: processes --------------------------------------------------------------

def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the child binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_PR_SET_PDEATHSIG = 1
_prctl: Any
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux: children then end only by stop()
    _prctl = None


def _die_with_parent() -> None:
    # In the child between fork and exec: SIGKILL when the thread that started us goes away,
    # so a bench killed outright leaves no server behind. (Children are started from the
    # main thread only.)
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class ChildFailed(RuntimeError):
    pass


class Proc:
    """A child process: its stdout lines on a queue, its stderr in a log file. stop() ends it
    (SIGTERM, then SIGKILL), and every Proc still running at the end is stopped."""

    def __init__(self, name: str, argv: list[str], log_path: str, driven: bool = False) -> None:
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.lines: queue.Queue[str | None] = queue.Queue()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        try:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE if driven else subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=self._log, env=env, cwd=HERE,
                # Its own session: a Ctrl-C reaches the bench alone, which then stops its
                # children in order.
                start_new_session=True, preexec_fn=_die_with_parent, text=True, bufsize=1)
        except BaseException:
            self._log.close()
            raise
        self._reader = threading.Thread(target=self._read, daemon=True, name=f"out-{name}")
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, chars: int = 1500) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - chars))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def _fail(self, why: str) -> ChildFailed:
        return ChildFailed(f"{self.name} (pid {self.pid}): {why}; its log ends with:\n"
                           f"{self.log_tail()}")

    def expect(self, prefix: str, timeout: float) -> str:
        """The next stdout line starting with `prefix` (earlier lines are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._fail(f"no line starting with {prefix!r} within {timeout:.0f} s")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                try:
                    code: int | str = self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    code = "its stdout closed"
                raise self._fail(f"exited ({code}) before printing {prefix!r}")
            if line.startswith(prefix):
                return line

    def request(self, obj: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send one JSON line to a driven child and return its JSON answer."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(obj) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise self._fail("its stdin is closed") from None
        answer: dict[str, Any] = json.loads(self.expect("{", timeout))
        if "error" in answer:
            raise self._fail(f"refused {obj.get('op')}: {answer['error']}")
        return answer

    def cpu_seconds(self) -> float:
        """CPU time (user + system, every thread) the process used so far; 0 once it is gone."""
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return 0.0

    def context_switches(self) -> int:
        """Context switches (voluntary and not) of the process's live threads so far."""
        total = 0
        try:
            tasks = os.listdir(f"/proc/{self.pid}/task")
        except OSError:
            return 0
        for tid in tasks:
            try:
                with open(f"/proc/{self.pid}/task/{tid}/status") as f:
                    for line in f:
                        if "ctxt_switches:" in line:
                            total += int(line.split()[1])
            except (OSError, ValueError, IndexError):
                continue
        return total

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (or `quit` for a driven child), then SIGKILL after `timeout`; the exit code."""
        try:
            if self.alive():
                if self.proc.stdin is not None:
                    with contextlib.suppress(OSError, ValueError):
                        self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                        self.proc.stdin.flush()
                        self.proc.stdin.close()
                else:
                    self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    if self.proc.stdin is not None:  # a payer that did not quit: ask harder
                        self.proc.send_signal(signal.SIGTERM)
                        try:
                            self.proc.wait(5)
                        except subprocess.TimeoutExpired:
                            pass
                    if self.alive():
                        self.proc.kill()
                    self.proc.wait(10)
            return self.proc.returncode
        finally:
            self._reader.join(timeout=5)
            if self.proc.stdout is not None:
                with contextlib.suppress(OSError):
                    self.proc.stdout.close()
            if self.proc.stdin is not None:
                with contextlib.suppress(OSError, BrokenPipeError):
                    self.proc.stdin.close()
            self._log.close()


def python_argv(*args: str) -> list[str]:
    return [sys.executable, *args]


def start_ledger(folder: str, logs: str) -> tuple[Proc, str]:
    port = free_port()
    proc = Proc("ledger", python_argv("-m", "paychan.cli", "ledger", "serve", "--data",
                                      os.path.join(folder, "ledger"), "--port", str(port),
                                      "--virtual-clock"),
                os.path.join(logs, "ledger.log"))
    return proc, f"http://127.0.0.1:{port}"


def start_payee_node(folder: str, logs: str, ledger_url: str) -> tuple[Proc, str]:
    url = f"http://127.0.0.1:{free_port()}"
    # No log line per payment: the bare payee writes none either, and the figures compare
    # the payment work (channel events are still logged).
    proc = Proc("payee node", python_argv("-m", "paychan.cli", "node", "run", "--data",
                                          os.path.join(folder, "payee"), "--ledger", ledger_url,
                                          "--listen", url, "--no-payment-log"),
                os.path.join(logs, "payee.log"))
    return proc, url


def start_paychan_payer(folder: str, logs: str, ledger_url: str, peer_url: str, channels: int,
                        deposit: int) -> Proc:
    return Proc("paychan payer", python_argv(
        os.path.join(HERE, "xproc.py"), "paychan-payer", "--data", os.path.join(folder, "payer"),
        "--ledger", ledger_url, "--listen", f"http://127.0.0.1:{free_port()}", "--peer",
        peer_url, "--channels", str(channels), "--deposit", str(deposit)),
        os.path.join(logs, "payer.log"), driven=True)


def start_bare_payee(folder: str, logs: str, grouped: bool) -> tuple[Proc, str]:
    port = free_port()
    proc = Proc("bare payee", python_argv(
        os.path.join(HERE, "xproc.py"), "bare-payee", "--data", os.path.join(folder, "payee"),
        "--port", str(port), *(["--grouped"] if grouped else [])),
        os.path.join(logs, "payee.log"))
    return proc, f"http://127.0.0.1:{port}"


def start_bare_payer(folder: str, logs: str, peer_url: str, peer_key: str, channels: int,
                     grouped: bool) -> Proc:
    return Proc("bare payer", python_argv(
        os.path.join(HERE, "xproc.py"), "bare-payer", "--data", os.path.join(folder, "payer"),
        "--peer", peer_url, "--peer-key", peer_key, "--channels", str(channels),
        *(["--grouped"] if grouped else [])),
        os.path.join(logs, "payer.log"), driven=True)


def paychan_payee_state(path: str) -> dict[str, int]:
    """What a stopped paychan payee committed: credit received over its channels, and the
    payments it served (one stored result each)."""
    from paychan.protocol.channel import ChannelState
    from paychan.storage.env import Store
    from paychan.storage.keys import unpack
    store = Store.open(path)
    try:
        received = sum(ChannelState.from_obj(unpack(raw)[0]).peer_sent
                       for _, raw in store.iter_prefix(CHANNELS_DB, b""))
        return {"received": received, "served": store.count(RESULTS_DB)}
    finally:
        store.close()


def bare_payee_state(path: str) -> dict[str, int]:
    """The same for a stopped bare payee."""
    from paychan.protocol.wire import Voucher
    from paychan.storage.env import Store
    from paychan.storage.keys import unpack
    store = Store.open(path)
    try:
        received = 0
        for _, raw in store.iter_prefix(CHANNELS_DB, b""):
            held = unpack(raw)[0]
            received += Voucher.from_obj(held).sent if held is not None else 0
        return {"received": received, "served": store.count(RESULTS_DB)}
    finally:
        store.close()


# --- the children ------------------------------------------------------------------------------

def protocol_out() -> IO[str]:
    """This process's answers go to the original stdout; anything else printed goes to stderr."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return out


def answer(out: IO[str], obj: dict[str, Any]) -> None:
    out.write(json.dumps(obj) + "\n")
    out.flush()


def serve_requests(out: IO[str], handle: Any) -> None:
    """Answer the parent's requests until `quit` or the end of stdin."""
    for line in sys.stdin:
        try:
            req = json.loads(line)
            if req.get("op") == "quit":
                return
            answer(out, handle(req))
        except Exception as exc:  # the parent reports it and stops everything
            answer(out, {"error": f"{type(exc).__name__}: {exc}"})


def phase_reply(lat: list[float], acked: int, seconds: float, errors: list[str]) -> dict[str, Any]:
    return {"latencies": [round(x, 7) for x in lat], "acknowledged": acked, "seconds": seconds,
            "errors": errors}


def paychan_payer(args: argparse.Namespace) -> int:
    out = protocol_out()
    import run as bench  # the shared measurement loop (threads released together)

    import paychan

    t0 = time.perf_counter()
    channels = args.channels
    node = paychan.Node.open(args.data, ledger=args.ledger, listen=args.listen,
                             max_live_channels=max(256, channels + 16), idle_seconds=3600)
    try:
        ledger = paychan.Ledger.connect(args.ledger)
        try:
            ledger.mint(node.address, args.deposit * channels)
        finally:
            ledger.close()
        ids = [""] * channels

        def create(c: int) -> None:
            ids[c] = node.create_channel(args.peer, args.deposit)

        bench.run_threads(create, channels, min(channels, 16))
        paychan.tune_gc()  # as `paychan node run` does; the bare programs too
        answer(out, {"ready": True, "address": node.address,
                     "setup_s": round(time.perf_counter() - t0, 3)})
        firsts = [0] * channels

        def pay(c: int, i: int) -> Any:
            return node.send_message_and_pay(ids[c], message_for(i), AMOUNT, timeout=PAY_TIMEOUT)

        def apay(c: int, i: int) -> Any:
            return node.asend_message_and_pay(ids[c], message_for(i), AMOUNT, timeout=PAY_TIMEOUT)

        def handle(req: dict[str, Any]) -> dict[str, Any]:
            if req["op"] == "run":
                # Many channels: asyncio tasks like the bare payer, not a thread per caller.
                phase = (bench.run_phase_async(apay, req["counts"], firsts, want=expected)
                         if channels > 1 else
                         bench.run_phase(pay, req["counts"], firsts, want=expected))
                return phase_reply(phase.latencies, phase.acknowledged, phase.seconds,
                                   phase.errors)
            if req["op"] == "stats":
                stats = node._core.store.writer.stats
                return {**stats, "sent": sum(node.balances(ch)["sent_by_me"] for ch in ids)}
            raise ValueError(f"unknown op {req['op']!r}")

        serve_requests(out, handle)
    except Exception as exc:
        answer(out, {"error": f"{type(exc).__name__}: {exc}"})
        raise
    finally:
        node.stop()
    answer(out, {"bye": True})
    return 0


# --- the bare pair -----------------------------------------------------------------------------

class Committer:
    """Durable LMDB commits (the store is opened with sync=True). Direct: one write transaction
    per commit, on the caller's (the event loop's) thread. Grouped: commits requested while a
    batch is being written wait for the next batch, one write transaction, written on a helper
    thread so the loop carries on meanwhile."""

    def __init__(self, store: Any, grouped: bool) -> None:
        self.store = store
        self.grouped = grouped
        self.batches = 0
        self.requests = 0
        self._pending: list[tuple[list[Any], asyncio.Future[None]]] = []
        self._flushing = False
        self._flusher: asyncio.Task[None] | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="commit") if grouped else None

    async def commit(self, ops: list[Any]) -> None:
        if not self.grouped:
            self._write([ops])
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._pending.append((ops, fut))
        if not self._flushing:
            # Runs on the loop's next turn: every task ready in this turn joins the batch.
            self._flushing = True
            self._flusher = loop.create_task(self._flush())
        await fut

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    await loop.run_in_executor(self._pool, self._write, [ops for ops, _ in batch])
                except Exception as exc:
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                for _, fut in batch:
                    if not fut.done():
                        fut.set_result(None)
        finally:
            self._flushing = False

    def _write(self, batch: list[list[Any]]) -> None:
        from paychan.storage.writer import apply
        with self.store.env.begin(write=True) as txn:
            for ops in batch:
                apply(txn, self.store, ops)
        self.batches += 1
        self.requests += len(batch)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


@dataclass
class BareChannel:
    """One side's figures for one channel (the payer and the payee each keep their own)."""

    cid: bytes
    peer: bytes = b""
    my_voucher: Any = None  # payer side
    outgoing: dict[str, list[Any]] = field(default_factory=dict)
    peer_voucher: Any = None  # payee side
    credit_used: int = 0
    serving: dict[str, int] = field(default_factory=dict)


def _v(v: Any) -> Any:
    return None if v is None else v.to_obj()


class BareParty:
    def __init__(self, path: str, grouped: bool) -> None:
        from paychan.actors.envelope import Sealer
        from paychan.protocol.identity import Identity
        from paychan.storage.env import Store
        self.identity = Identity(os.urandom(32))
        self.public = self.identity.public
        self.sealer = Sealer(self.identity)
        self.store = Store.open(path)
        self.committer = Committer(self.store, grouped)

    def close(self) -> None:
        self.committer.close()
        self.store.close()


def bare_payee(args: argparse.Namespace) -> int:
    out = protocol_out()
    import run as bench  # the bare payee's checks, shared with the in-process bare loop
    from aiohttp import WSMsgType, web

    from paychan.protocol.wire import Pay, PayResult, decode, encode
    from paychan.service import tune_gc
    from paychan.storage.keys import pack
    from paychan.storage.writer import Put

    party = BareParty(args.data, args.grouped)
    chans: dict[bytes, BareChannel] = {}
    tasks: set[asyncio.Task[None]] = set()

    async def serve(ws: web.WebSocketResponse, frame: bytes) -> None:
        sender, payload = party.sealer.open(frame)
        msg = decode(payload)
        if not isinstance(msg, Pay):
            raise RuntimeError("not a pay")
        cid = msg.channel_id
        ch = chans.get(cid)
        if ch is None:
            ch = chans[cid] = BareChannel(cid, peer=sender)
        if sender != ch.peer:
            raise RuntimeError("not from the channel's payer")
        key = cid + msg.payment_id.encode()
        bench.bare_take_pay(ch, msg, sender, cid, party.store.get(RESULTS_DB, key) is not None)
        await party.committer.commit([Put(CHANNELS_DB, cid, pack(
            [_v(ch.peer_voucher), ch.credit_used, list(ch.serving.items())]))])
        response = echo(msg.message, msg.amount)
        del ch.serving[msg.payment_id]
        result = PayResult(cid, msg.payment_id, response, None, None)
        await party.committer.commit([
            Put(CHANNELS_DB, cid, pack([_v(ch.peer_voucher), ch.credit_used,
                                        list(ch.serving.items())])),
            Put(RESULTS_DB, key, encode(result))])
        await ws.send_bytes(party.sealer.seal(sender, encode(result)))

    async def guarded(ws: web.WebSocketResponse, frame: bytes) -> None:
        try:
            await serve(ws, frame)
        except Exception as exc:  # unanswered: the payer's wait ends in an error
            print(f"payment refused: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)

    async def on_ws(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=1 << 20)
        await ws.prepare(request)
        async for frame in ws:
            if frame.type != WSMsgType.BINARY:
                continue
            if args.grouped:  # every channel at once; each one is sequential anyway
                task = asyncio.get_running_loop().create_task(guarded(ws, frame.data))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            else:
                await guarded(ws, frame.data)
        return ws

    async def main() -> None:
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        app = web.Application()
        app.router.add_get("/ws", on_ws)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", args.port).start()
        tune_gc()
        answer(out, {"ready": True, "public": party.public.hex()})
        await stopping.wait()
        await runner.cleanup()

    try:
        asyncio.run(main())
    finally:
        party.close()
    return 0


def bare_payer(args: argparse.Namespace) -> int:
    out = protocol_out()
    import aiohttp

    from paychan.protocol.wire import Pay, PayResult, Voucher, decode, encode
    from paychan.service import tune_gc
    from paychan.storage.keys import pack
    from paychan.storage.writer import Put

    party = BareParty(args.data, args.grouped)
    peer = bytes.fromhex(args.peer_key)
    chans = [BareChannel(os.urandom(32), peer=peer) for _ in range(args.channels)]
    firsts = [0] * args.channels
    waiting: dict[str, asyncio.Future[tuple[bytes, Any]]] = {}

    async def read(ws: aiohttp.ClientWebSocketResponse) -> None:
        async for frame in ws:
            if frame.type != aiohttp.WSMsgType.BINARY:
                continue
            try:
                sender, payload = party.sealer.open(frame.data)
                res = decode(payload)
            except Exception as exc:
                print(f"reply refused: {exc}", file=sys.stderr, flush=True)
                continue
            fut = waiting.pop(getattr(res, "payment_id", ""), None)
            if fut is not None and not fut.done():
                fut.set_result((sender, res))
        for fut in waiting.values():
            if not fut.done():
                fut.set_exception(ConnectionError("the payee's socket closed"))

    def expire(fut: asyncio.Future[Any]) -> None:
        if not fut.done():
            fut.set_exception(TimeoutError(f"no answer within {PAY_TIMEOUT} s"))

    async def pay(ws: aiohttp.ClientWebSocketResponse, c: int, i: int) -> Any:
        loop = asyncio.get_running_loop()
        ch, pid, message = chans[c], uuid.uuid4().hex, message_for(i)
        cid = ch.cid
        key = cid + pid.encode()
        mine = ch.my_voucher
        v = Voucher.create(party.identity, cid, 1, (mine.nonce if mine else 0) + 1,
                           (mine.sent if mine else 0) + AMOUNT)
        ch.my_voucher = v
        ch.outgoing[pid] = [pid, AMOUNT, v.to_obj(), message]
        await party.committer.commit([Put(CHANNELS_DB, cid,
                                          pack([_v(v), list(ch.outgoing.values())]))])
        fut: asyncio.Future[tuple[bytes, Any]] = loop.create_future()
        waiting[pid] = fut
        timer = loop.call_later(PAY_TIMEOUT, expire, fut)
        try:
            await ws.send_bytes(party.sealer.seal(peer, encode(Pay(cid, pid, v, AMOUNT,
                                                                   message))))
            sender, res = await fut
        finally:
            timer.cancel()
            waiting.pop(pid, None)
        if not isinstance(res, PayResult) or sender != peer or res.channel_id != cid:
            raise RuntimeError("not the result of this payment")
        del ch.outgoing[pid]
        await party.committer.commit([
            Put(CHANNELS_DB, cid, pack([_v(ch.my_voucher), list(ch.outgoing.values())])),
            Put(OUTCOMES_DB, key, pack({"response": res.response, "error": res.error,
                                        "refunded": False}))])
        return res.response

    async def run_phase(ws: aiohttp.ClientWebSocketResponse, counts: list[int]) -> dict[str, Any]:
        lat: list[float] = []
        errors: list[str] = []
        acked = 0

        async def worker(c: int) -> None:
            nonlocal acked
            for i in range(firsts[c], firsts[c] + counts[c]):
                t0 = time.perf_counter()
                try:
                    reply = await pay(ws, c, i)
                except Exception as exc:
                    errors.append(f"channel {c} payment {i}: {type(exc).__name__}: {exc}")
                    continue
                lat.append(time.perf_counter() - t0)
                if reply == expected(i):
                    acked += 1
                else:
                    errors.append(f"channel {c} payment {i}: unexpected reply {reply!r}")

        gc.collect()
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(c) for c in range(len(counts))))
        seconds = time.perf_counter() - t0
        for c, n in enumerate(counts):
            firsts[c] += n
        return phase_reply(lat, acked, seconds, errors)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(args.peer.rstrip("/") + "/ws", max_msg_size=1 << 20)
            reader = loop.create_task(read(ws))
            tune_gc()
            answer(out, {"ready": True, "setup_s": round(time.perf_counter() - t0, 3)})
            while True:
                line = await loop.run_in_executor(None, sys.stdin.readline)
                if not line:
                    break
                try:
                    req = json.loads(line)
                    if req.get("op") == "quit":
                        break
                    if req["op"] == "run":
                        answer(out, await run_phase(ws, req["counts"]))
                    elif req["op"] == "stats":
                        c = party.committer
                        answer(out, {"batches": c.batches, "requests": c.requests,
                                     "sent": sum(ch.my_voucher.sent for ch in chans
                                                 if ch.my_voucher)})
                    else:
                        raise ValueError(f"unknown op {req['op']!r}")
                except Exception as exc:
                    answer(out, {"error": f"{type(exc).__name__}: {exc}"})
            await ws.close()
            await reader

    try:
        asyncio.run(main())
    finally:
        party.close()
    answer(out, {"bye": True})
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="role", required=True)
    p = sub.add_parser("paychan-payer")
    for name in ("--data", "--ledger", "--listen", "--peer"):
        p.add_argument(name, required=True)
    p.add_argument("--channels", type=int, required=True)
    p.add_argument("--deposit", type=int, required=True)
    p = sub.add_parser("bare-payer")
    for name in ("--data", "--peer", "--peer-key"):
        p.add_argument(name, required=True)
    p.add_argument("--channels", type=int, required=True)
    p.add_argument("--grouped", action="store_true")
    p = sub.add_parser("bare-payee")
    p.add_argument("--data", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--grouped", action="store_true")
    args = ap.parse_args(argv)
    role = {"paychan-payer": paychan_payer, "bare-payer": bare_payer, "bare-payee": bare_payee}
    return role[args.role](args)


if __name__ == "__main__":
    sys.exit(main())
