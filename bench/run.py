#!/usr/bin/env python3
"""paychan against a bare loop doing the same work, measured in one run (DESIGN §9).

Four cases in this process, each on fresh LMDB stores in a temporary folder on a real disk:

  paychan, 1 channel    `send_message_and_pay` in a loop (small message, small response)
  bare,    1 channel    the same work per payment in a plain loop, no actors and no threads
  paychan, C channels   C channels in one process, a thread per channel, each sequential
  bare,    C channels   the bare work in C threads sharing one group-commit writer per party

"The same work" per payment: the payer signs a voucher, encodes the `pay` message and seals it
in a NaCl Box, and commits its state durably; the payee opens, decodes, verifies the signature,
commits durably, calls the handler, commits the result durably and seals the reply; the payer
opens it, decodes and commits the outcome durably. That is four LMDB commits with sync=True,
two Box seals and opens, one signature and one verification, exactly what paychan does for a
payment. The ratios paychan/bare are what to compare across machines.

Four cases across OS processes (bench/xproc.py has their processes and programs):

  paychan-xproc, 1 channel    `paychan ledger serve`, a payee daemon `paychan node run
                              --no-payment-log` (echo handler; the bare payee logs nothing per
                              payment either) and a payer process (`paychan.Node.open(dir,
                              ledger=URL, listen=URL)`, a channel to the payee's URL) paying
                              over HTTP
  paychan-xproc, C channels   the same with C channels paid at once (asyncio tasks calling
                              `asend_message_and_pay`)
  bare-xproc,    1 channel    two plain asyncio processes, one aiohttp WebSocket between them,
                              the same work per payment, every commit its own write transaction
  bare-xproc,    C channels   the same with C asyncio tasks, commits grouped per event-loop batch

The payer processes report payments/s and latencies; CPU time and context switches are read
from /proc for every process of a case. The targets this project was given for them are printed
next to the figures (met or not), never asserted.

    python bench/run.py [--json] [--payments N] [--channels 100] [--quick] [--dir DIR]
                        [--cases all|in-process|xproc]

`--payments N` is the number of measured payments in each case (with C channels, N in total,
spread evenly); warm-up payments come on top and are not measured. Each pair (paychan, bare)
is measured in alternating rounds (A B, B A, ...) so that a machine whose speed drifts touches
both sides of a ratio alike; the load averages at the start, at the end and at the start of each
pair are printed, as the machine may be shared. The stores live in a temporary folder on a
real disk (never tmpfs, where fsync costs nothing), removed at the end, after every process
started for a case has been stopped (SIGTERM, then SIGKILL), even when a case fails.
"""
from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import lmdb
import xproc  # bench/xproc.py, beside this file

import paychan
from paychan.actors.envelope import Sealer
from paychan.protocol.identity import Identity, encode_address, encode_channel_id
from paychan.protocol.wire import Pay, PayResult, Voucher, decode, encode
from paychan.storage.env import Store
from paychan.storage.keys import pack
from paychan.storage.writer import Op, Put, apply

AMOUNT = 1
CHANNELS_DB, RESULTS_DB, OUTCOMES_DB = "channels", "results", "outcomes"
# Measured payments per case: (1-channel cases, C-channel cases); warm-up: (1-channel
# payments, payments per channel); rounds: in how many alternating rounds each pair is measured
# (short rounds cancel the drift of a shared disk best). The xproc_ fields are the same for the
# cases across processes, whose rounds cost a request to the payer process each.
@dataclass(frozen=True)
class Mode:
    payments: tuple[int, int]
    warmup: tuple[int, int]
    rounds: tuple[int, int]
    xproc_payments: tuple[int, int]
    xproc_warmup: tuple[int, int]
    xproc_rounds: tuple[int, int]
    probe: int  # lone commits timed to gauge the disk


MODES = {
    "full": Mode(payments=(2000, 12000), warmup=(50, 3), rounds=(100, 12),
                 xproc_payments=(3000, 12000), xproc_warmup=(100, 3), xproc_rounds=(30, 8),
                 probe=40),
    "quick": Mode(payments=(120, 600), warmup=(10, 1), rounds=(12, 3),
                  xproc_payments=(300, 1000), xproc_warmup=(20, 1), xproc_rounds=(4, 2),
                  probe=20),
}
PAY_TIMEOUT = 120.0
SETUP_TIMEOUT = 60.0  # one process of a cross-process case to be ready (plus 1 s a channel)
ROUND_TIMEOUT = 60.0  # one round of a payer process (plus 50 ms a payment)


def message_for(i: int) -> dict[str, Any]:
    return {"i": i, "q": "weather"}


def handler(p: Any) -> dict[str, Any]:
    """The payee's handler in every case: a small response echoing the request number."""
    return {"ok": p.message["i"], "paid": p.amount}


def expected(i: int) -> dict[str, Any]:
    return {"ok": i, "paid": AMOUNT}


# --- measurement ------------------------------------------------------------------------------

@dataclass
class Phase:
    """What timed payments produced: latencies, acknowledged payments, wall time, errors."""

    latencies: list[float] = field(default_factory=list)
    acknowledged: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # of the whole process (all threads) while the phase ran
    errors: list[str] = field(default_factory=list)
    rounds: list[float] = field(default_factory=list)  # payments/s of each round
    cpu_by_process: dict[str, float] = field(default_factory=dict)  # across processes
    switches_by_process: dict[str, int] = field(default_factory=dict)  # context switches

    def add(self, other: Phase) -> None:
        self.latencies += other.latencies
        self.acknowledged += other.acknowledged
        self.seconds += other.seconds
        self.cpu_seconds += other.cpu_seconds
        self.errors += other.errors
        for name, cpu in other.cpu_by_process.items():
            self.cpu_by_process[name] = self.cpu_by_process.get(name, 0.0) + cpu
        for name, n in other.switches_by_process.items():
            self.switches_by_process[name] = self.switches_by_process.get(name, 0) + n
        if other.seconds:
            self.rounds.append(round(other.acknowledged / other.seconds, 1))


def bare_take_pay(ch: Any, msg: Any, sender: bytes, cid: bytes, answered: bool) -> None:
    """The bare payee's checks of a Pay (paychan's, minus the machine): raise or take it."""
    if answered:
        raise RuntimeError("a duplicate payment")
    held, pv = ch.peer_voucher, msg.voucher
    if not pv.verify(sender) or pv.channel_id != cid or (held and pv.nonce <= held.nonce):
        raise RuntimeError("a bad voucher")
    if msg.amount > pv.sent - ch.credit_used:
        raise RuntimeError("not covered")
    ch.peer_voucher, ch.credit_used = pv, ch.credit_used + msg.amount
    ch.serving[msg.payment_id] = msg.amount


def run_phase_async(pay: Callable[[int, int], Any], counts: list[int], firsts: list[int],
                    want: Callable[[int], Any] = expected) -> Phase:
    """As run_phase, with one asyncio task per channel on one loop; `pay(c, i)` is a coroutine
    function (paychan's `asend_message_and_pay`), so no thread is held per caller."""
    import asyncio
    out = Phase()

    async def worker(c: int) -> None:
        for i in range(firsts[c], firsts[c] + counts[c]):
            t0 = time.perf_counter()
            try:
                reply = await pay(c, i)
            except Exception as exc:
                out.errors.append(f"channel {c} payment {i}: {type(exc).__name__}: {exc}")
                continue
            out.latencies.append(time.perf_counter() - t0)
            if reply == want(i):
                out.acknowledged += 1
            else:
                out.errors.append(f"channel {c} payment {i}: unexpected reply {reply!r}")

    async def main() -> None:
        await asyncio.gather(*(worker(c) for c in range(len(counts))))

    gc.collect()
    cpu0, t0 = time.process_time(), time.perf_counter()
    asyncio.run(main())
    out.seconds = time.perf_counter() - t0
    out.cpu_seconds = time.process_time() - cpu0
    for c, n in enumerate(counts):
        firsts[c] += n
    return out


def run_phase(pay: Callable[[int, int], Any], counts: list[int], firsts: list[int],
              want: Callable[[int], Any] = expected) -> Phase:
    """Payments firsts[c] .. firsts[c] + counts[c] - 1 on channel c, one thread per channel, all
    released together; `pay(c, i)` makes payment i on channel c and returns the response, which
    must equal `want(i)`."""
    out = Phase()
    lock = threading.Lock()
    start_at: list[float] = []
    barrier = threading.Barrier(len(counts), action=lambda: start_at.append(time.perf_counter()))

    def worker(c: int) -> None:
        lat: list[float] = []
        acked = 0
        errors: list[str] = []
        barrier.wait()
        for i in range(firsts[c], firsts[c] + counts[c]):
            t0 = time.perf_counter()
            try:
                reply = pay(c, i)
            except Exception as exc:
                errors.append(f"channel {c} payment {i}: {type(exc).__name__}: {exc}")
                continue
            lat.append(time.perf_counter() - t0)
            if reply == want(i):
                acked += 1
            else:
                errors.append(f"channel {c} payment {i}: unexpected reply {reply!r}")
        with lock:
            out.latencies += lat
            out.acknowledged += acked
            out.errors += errors

    threads = [threading.Thread(target=worker, args=(c,), name=f"bench-{c}", daemon=True)
               for c in range(len(counts))]
    gc.collect()
    cpu0 = time.process_time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.seconds = time.perf_counter() - start_at[0]
    out.cpu_seconds = time.process_time() - cpu0
    for c, n in enumerate(counts):
        firsts[c] += n
    return out


def split(total: int, parts: int) -> list[int]:
    """`total` spread over `parts` as evenly as possible (the first ones take the remainder)."""
    q, r = divmod(total, parts)
    return [q + (1 if k < r else 0) for k in range(parts)]


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile of already sorted values (q in 0..100)."""
    if not sorted_values:
        return 0.0
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


class Case:
    """One side of a comparison: channels that pay, and the stores' commit counters."""

    kind = ""

    def __init__(self, channels: int) -> None:
        self.channels = channels
        self.setup_s = 0.0

    @property
    def name(self) -> str:
        return f"{self.kind} {plural(self.channels)}"

    def pay(self, c: int, i: int) -> Any:
        raise NotImplementedError

    def phase(self, counts: list[int], firsts: list[int]) -> Phase:
        """counts[c] payments on channel c, every channel at once (see run_phase)."""
        return run_phase(self.pay, counts, firsts)

    def commit_stats(self) -> dict[str, int]:
        """Durable LMDB write transactions so far ("batches") and the commits they carried."""
        raise NotImplementedError

    def checks(self, want_sent: int) -> dict[str, Any]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


def compare(cases: list[Case], payments: int, warm_per_channel: int,
            rounds: int) -> list[dict[str, Any]]:
    """Warm every case up, then measure them in alternating rounds (A B, B A, ...) so that a
    machine whose speed drifts during the run touches both sides of the ratio alike."""
    channels = cases[0].channels
    firsts = {id(case): [0] * channels for case in cases}
    warm = {}
    for case in cases:
        warm[id(case)] = case.phase([warm_per_channel] * channels, firsts[id(case)])
    before = {id(case): case.commit_stats() for case in cases}
    measured = {id(case): Phase() for case in cases}
    for r, n in enumerate(split(payments, rounds)):
        for case in (cases if r % 2 == 0 else cases[::-1]):
            measured[id(case)].add(case.phase(split(n, channels), firsts[id(case)]))
    out = []
    for case in cases:
        phase = measured[id(case)]
        after = case.commit_stats()
        txns = after["batches"] - before[id(case)]["batches"]
        reqs = after["requests"] - before[id(case)]["requests"]
        want = (warm_per_channel * channels + payments) * AMOUNT
        lat = sorted(phase.latencies)
        ms = 1000.0
        out.append({
            "name": case.name,
            "kind": case.kind,
            "channels": channels,
            "payments": payments,
            "acknowledged": phase.acknowledged,
            "errors": len(phase.errors),
            "first_errors": phase.errors[:5],
            "seconds": round(phase.seconds, 4),
            "payments_per_s": round(phase.acknowledged / phase.seconds, 2)
            if phase.seconds else 0.0,
            "round_payments_per_s": phase.rounds,
            # CPU time of the whole process (every thread) per measured payment; across
            # processes, of all the case's processes, and of each one.
            "cpu_ms_per_payment": round(phase.cpu_seconds / phase.acknowledged * 1000, 3)
            if phase.acknowledged else 0.0,
            **({"cpu_ms_per_payment_by_process": {
                name: round(cpu / phase.acknowledged * 1000, 3)
                for name, cpu in phase.cpu_by_process.items()},
                "context_switches_per_payment_by_process": {
                name: round(n / phase.acknowledged, 1)
                for name, n in phase.switches_by_process.items()}}
               if phase.cpu_by_process and phase.acknowledged else {}),
            "latency_ms": {
                "p50": round(percentile(lat, 50) * ms, 3),
                "p90": round(percentile(lat, 90) * ms, 3),
                "p99": round(percentile(lat, 99) * ms, 3),
                "mean": round(sum(lat) / len(lat) * ms, 3) if lat else 0.0,
                "max": round(lat[-1] * ms, 3) if lat else 0.0,
            },
            # How many commit requests shared one durable LMDB write transaction.
            "commits": {"transactions": txns, "requests": reqs,
                        "requests_per_transaction": round(reqs / txns, 2) if txns else 0.0},
            "warmup_payments": warm_per_channel * channels,
            "warmup_errors": warm[id(case)].errors[:5],
            "setup_s": round(case.setup_s, 2),
            **case.checks(want),
        })
    return out


def plural(channels: int) -> str:
    return "1 channel" if channels == 1 else f"{channels} channels"


# --- paychan ----------------------------------------------------------------------------------

class PaychanCase(Case):
    """Two nodes in this process (their own LMDB stores) on the embedded ledger."""

    kind = "paychan"

    def __init__(self, base: str, channels: int, deposit: int) -> None:
        super().__init__(channels)
        t0 = time.perf_counter()
        os.makedirs(base)
        self.ledger = paychan.Ledger.embedded(data_dir=os.path.join(base, "ledger"),
                                              clock=paychan.VirtualClock())
        live = max(256, channels + 16)
        self.nodes: list[paychan.Node] = []
        try:
            for name in ("a", "b"):
                self.nodes.append(paychan.Node.open(
                    os.path.join(base, name), ledger=self.ledger, max_live_channels=live,
                    idle_seconds=3600))
            self.a, self.b = self.nodes
            self.served = 0
            self._lock = threading.Lock()
            self.b.on_payment_received(self._payee)
            self.ledger.mint(self.a.address, deposit * channels)
            self.ids = [""] * channels

            def create(c: int) -> None:
                self.ids[c] = self.a.create_channel(self.b, deposit)

            run_threads(create, channels, min(channels, 16))
        except BaseException:
            self.close()
            raise
        self.setup_s = time.perf_counter() - t0

    def _payee(self, p: Any) -> Any:
        with self._lock:
            self.served += 1
        return handler(p)

    def pay(self, c: int, i: int) -> Any:
        return self.a.send_message_and_pay(self.ids[c], message_for(i), AMOUNT,
                                           timeout=PAY_TIMEOUT)

    def commit_stats(self) -> dict[str, int]:
        stats = [node._core.store.writer.stats for node in (self.a, self.b)]
        return {k: sum(s[k] for s in stats) for k in ("batches", "requests")}

    def checks(self, want_sent: int) -> dict[str, Any]:
        # Cross-check with the committed state: what the payer signed and the payee served.
        sent = sum(self.a.balances(ch)["sent_by_me"] for ch in self.ids)
        received = sum(self.b.balances(ch)["sent_by_peer"] for ch in self.ids)
        return {"sent_by_payer": sent, "received_by_payee": received,
                "served_by_payee": self.served, "expected_sent": want_sent,
                "state_consistent": sent == received == want_sent
                and self.served == want_sent // AMOUNT}

    def close(self) -> None:
        for node in self.nodes:
            node.stop()
        self.ledger.close()


def run_threads(fn: Callable[[int], None], n: int, width: int) -> None:
    """fn(0..n-1) on `width` threads; raises if any call failed."""
    errors: list[str] = []
    lock = threading.Lock()
    todo = iter(range(n))

    def loop() -> None:
        while True:
            with lock:
                k = next(todo, None)
            if k is None:
                return
            try:
                fn(k)
            except Exception as exc:
                with lock:
                    errors.append(f"{k}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(width)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"setup failed: {errors[:3]}")


# --- bare -------------------------------------------------------------------------------------

class Party:
    """One side of the bare loop: a key, a Sealer (cached Box per peer) and its own store."""

    def __init__(self, path: str) -> None:
        self.identity = Identity(os.urandom(32))
        self.public = self.identity.public
        self.sealer = Sealer(self.identity)
        self.store = Store.open(path)


@dataclass
class BareChannel:
    """Both sides' figures for one channel (each side only touches its own)."""

    cid: bytes
    # payer side
    my_voucher: Voucher | None = None
    outgoing: dict[str, list[Any]] = field(default_factory=dict)
    # payee side
    peer_voucher: Voucher | None = None
    credit_used: int = 0
    serving: dict[str, int] = field(default_factory=dict)


def _v(v: Voucher | None) -> list[Any] | None:
    return None if v is None else v.to_obj()


class BareCase(Case):
    """The same work per payment as paychan, written as a plain function; with one channel it
    commits directly (one LMDB write transaction per commit), with several it shares each
    party's group-commit writer between the channel threads, as paychan's actors do."""

    kind = "bare"

    def __init__(self, base: str, channels: int) -> None:
        super().__init__(channels)
        os.makedirs(base)
        self.payer, self.payee = Party(os.path.join(base, "a")), Party(os.path.join(base, "b"))
        self.chans = [BareChannel(os.urandom(32)) for _ in range(channels)]
        self.grouped = channels > 1
        self.direct = 0
        self.served = 0
        self._lock = threading.Lock()

    def commit(self, store: Store, ops: list[Op]) -> None:
        """Durable when it returns (the store is opened with sync=True)."""
        if self.grouped:
            store.writer.commit(ops)
            return
        with store.env.begin(write=True) as txn:
            apply(txn, store, ops)
        self.direct += 1

    def commit_stats(self) -> dict[str, int]:
        if not self.grouped:
            return {"batches": self.direct, "requests": self.direct}
        stats = [party.store.writer.stats for party in (self.payer, self.payee)]
        return {k: sum(s[k] for s in stats) for k in ("batches", "requests")}

    def pay(self, c: int, i: int) -> Any:
        """One payment, start to finish, with paychan's crypto, commits and round trip."""
        payer, payee, ch = self.payer, self.payee, self.chans[c]
        cid, pid, message = ch.cid, uuid.uuid4().hex, message_for(i)
        key = cid + pid.encode()

        # payer: sign, commit, seal
        mine = ch.my_voucher
        v = Voucher.create(payer.identity, cid, 1, (mine.nonce if mine else 0) + 1,
                           (mine.sent if mine else 0) + AMOUNT)
        ch.my_voucher = v
        ch.outgoing[pid] = [pid, AMOUNT, v.to_obj(), message]
        self.commit(payer.store, [Put(CHANNELS_DB, cid,
                                      pack([_v(v), list(ch.outgoing.values())]))])
        envelope = payer.sealer.seal(payee.public, encode(Pay(cid, pid, v, AMOUNT, message)))

        # payee: open, decode, check, verify, commit, handle, commit the result, seal a reply
        sender, payload = payee.sealer.open(envelope)
        msg = decode(payload)
        if not isinstance(msg, Pay) or sender != payer.public or msg.channel_id != cid:
            raise RuntimeError("not a pay for this channel")
        bare_take_pay(ch, msg, sender, cid, payee.store.get(RESULTS_DB, key) is not None)
        self.commit(payee.store, [Put(CHANNELS_DB, cid, pack(
            [_v(ch.peer_voucher), ch.credit_used, list(ch.serving.items())]))])
        with self._lock:  # as paychan's payee counts what it served
            self.served += 1
        response = handler(paychan.Payment(msg.amount, "base", msg.message,
                                           encode_address(sender), encode_channel_id(cid),
                                           msg.payment_id))
        del ch.serving[msg.payment_id]
        result = PayResult(cid, msg.payment_id, response, None, None)
        self.commit(payee.store, [
            Put(CHANNELS_DB, cid, pack([_v(ch.peer_voucher), ch.credit_used,
                                        list(ch.serving.items())])),
            Put(RESULTS_DB, key, encode(result))])
        reply = payee.sealer.seal(sender, encode(result))

        # payer: open, decode, commit the outcome
        sender, payload = payer.sealer.open(reply)
        res = decode(payload)
        if (not isinstance(res, PayResult) or sender != payee.public
                or res.payment_id not in ch.outgoing):
            raise RuntimeError("not the result of an outgoing payment")
        del ch.outgoing[res.payment_id]
        self.commit(payer.store, [
            Put(CHANNELS_DB, cid, pack([_v(ch.my_voucher), list(ch.outgoing.values())])),
            Put(OUTCOMES_DB, key, pack({"response": res.response, "error": res.error,
                                        "refunded": False}))])
        return res.response

    def checks(self, want_sent: int) -> dict[str, Any]:
        sent = sum(ch.my_voucher.sent for ch in self.chans if ch.my_voucher)
        received = sum(ch.peer_voucher.sent for ch in self.chans if ch.peer_voucher)
        return {"sent_by_payer": sent, "received_by_payee": received,
                "served_by_payee": self.served, "expected_sent": want_sent,
                "state_consistent": sent == received == want_sent
                and self.served == want_sent // AMOUNT,
                "commit_mode": "group-commit writer per party" if self.grouped
                else "one LMDB write transaction per commit"}

    def close(self) -> None:
        self.payer.store.close()
        self.payee.store.close()


# --- across processes -------------------------------------------------------------------------

class XprocCase(Case):
    """A payer in a child process, driven over its stdin, paying a payee in another process.
    Its figures come from the payer (latencies, acknowledged payments, its commits); CPU time
    is that of all the case's processes, read from /proc around each round."""

    def __init__(self, base: str, channels: int) -> None:
        super().__init__(channels)
        self.base = base
        self.logs = os.path.join(base, "logs")
        os.makedirs(self.logs)
        self.procs: list[xproc.Proc] = []
        self.payer: xproc.Proc | None = None
        self._started = 0.0
        self._stopped: dict[str, int | None] | None = None

    @property
    def name(self) -> str:
        return f"{self.kind} {plural(self.channels)}"

    def spawn(self, proc: xproc.Proc) -> xproc.Proc:
        self.procs.append(proc)
        return proc

    def setup_steps(self) -> Iterator[None]:
        """Start the processes; yields whenever it started one that takes a while to be ready,
        so that the cases of a pair start side by side."""
        raise NotImplementedError

    def wait_ready(self) -> None:
        assert self.payer is not None
        ready = json.loads(self.payer.expect("{", SETUP_TIMEOUT + self.channels))
        if "error" in ready:
            raise xproc.ChildFailed(f"{self.payer.name}: {ready['error']}\n"
                                    f"{self.payer.log_tail()}")
        self.setup_s = time.perf_counter() - self._started

    def _cpu(self) -> dict[str, float]:
        return {p.name: p.cpu_seconds() for p in self.procs}

    def _switches(self) -> dict[str, int]:
        return {p.name: p.context_switches() for p in self.procs}

    def phase(self, counts: list[int], firsts: list[int]) -> Phase:
        assert self.payer is not None
        cpu0, sw0 = self._cpu(), self._switches()
        reply = self.payer.request({"op": "run", "counts": counts},
                                   ROUND_TIMEOUT + sum(counts) * 0.05)
        cpu = {name: used - cpu0[name] for name, used in self._cpu().items()}
        switches = {name: max(0, n - sw0[name]) for name, n in self._switches().items()}
        for c, n in enumerate(counts):
            firsts[c] += n
        return Phase(latencies=reply["latencies"], acknowledged=reply["acknowledged"],
                     seconds=reply["seconds"], cpu_seconds=sum(cpu.values()),
                     errors=reply["errors"], cpu_by_process=cpu, switches_by_process=switches)

    def commit_stats(self) -> dict[str, int]:
        assert self.payer is not None
        stats = self.payer.request({"op": "stats"}, 60)
        return {k: stats[k] for k in ("batches", "requests")}

    def payee_state(self) -> dict[str, int]:
        raise NotImplementedError

    def checks(self, want_sent: int) -> dict[str, Any]:
        # What the payer committed, then (every process stopped cleanly) what the payee did.
        assert self.payer is not None
        sent = self.payer.request({"op": "stats"}, 60)["sent"]
        exits = self.stop()
        payee = self.payee_state()
        return {"sent_by_payer": sent, "received_by_payee": payee["received"],
                "served_by_payee": payee["served"], "expected_sent": want_sent,
                "state_consistent": sent == payee["received"] == want_sent
                and payee["served"] == want_sent // AMOUNT,
                "commits_counted_in": "the payer process", "exit_codes": exits,
                "processes": [p.name for p in self.procs]}

    def stop(self) -> dict[str, int | None]:
        """Stop every process, the payer first; their exit codes."""
        if self._stopped is None:
            self._stopped = {}
            for proc in sorted(self.procs, key=lambda p: p is not self.payer):
                try:
                    self._stopped[proc.name] = proc.stop()
                except Exception as exc:  # keep stopping the others
                    print(f"stopping {proc.name}: {exc!r}", file=sys.stderr)
                    self._stopped[proc.name] = None
        return self._stopped

    def close(self) -> None:
        self.stop()


class PaychanXprocCase(XprocCase):
    """`paychan ledger serve`, the payee daemon `paychan node run` (echo handler) and a payer
    process with `paychan.Node.open(dir, ledger=URL, listen=URL)`: paychan over HTTP."""

    kind = "paychan-xproc"

    def __init__(self, base: str, channels: int, deposit: int) -> None:
        super().__init__(base, channels)
        self.deposit = deposit

    def setup_steps(self) -> Iterator[None]:
        self._started = time.perf_counter()
        ledger, ledger_url = xproc.start_ledger(self.base, self.logs)
        self.spawn(ledger)
        yield
        ledger.expect("ledger listening on", SETUP_TIMEOUT)
        payee, payee_url = xproc.start_payee_node(self.base, self.logs, ledger_url)
        self.spawn(payee)
        yield
        payee.expect("node ", SETUP_TIMEOUT)
        self.payer = self.spawn(xproc.start_paychan_payer(
            self.base, self.logs, ledger_url, payee_url, self.channels, self.deposit))

    def payee_state(self) -> dict[str, int]:
        return xproc.paychan_payee_state(os.path.join(self.base, "payee"))


class BareXprocCase(XprocCase):
    """Two plain asyncio processes, one aiohttp WebSocket between them, LMDB and PyNaCl."""

    kind = "bare-xproc"

    def setup_steps(self) -> Iterator[None]:
        self._started = time.perf_counter()
        grouped = self.channels > 1
        payee, url = xproc.start_bare_payee(self.base, self.logs, grouped)
        self.spawn(payee)
        yield
        ready = json.loads(payee.expect("{", SETUP_TIMEOUT))
        self.payer = self.spawn(xproc.start_bare_payer(
            self.base, self.logs, url, ready["public"], self.channels, grouped))

    def payee_state(self) -> dict[str, int]:
        return xproc.bare_payee_state(os.path.join(self.base, "payee"))

    def checks(self, want_sent: int) -> dict[str, Any]:
        return {**super().checks(want_sent),
                "commit_mode": "one LMDB write transaction per event-loop batch"
                if self.channels > 1 else "one LMDB write transaction per commit"}


def start_side_by_side(cases: list[XprocCase]) -> None:
    """Run the cases' setup steps interleaved, then wait until every payer is ready."""
    steps = [case.setup_steps() for case in cases]
    while steps:
        for gen in list(steps):
            if next(gen, StopIteration) is StopIteration:
                steps.remove(gen)
    for case in cases:
        case.wait_ready()


# --- machine and folders ----------------------------------------------------------------------

def fs_type(path: str) -> str:
    """The file system type holding `path` (from /proc/self/mounts), or "unknown"."""
    real = os.path.realpath(path)
    best, kind = "", "unknown"
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mount = parts[1].replace("\\040", " ")
                inside = real == mount or real.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best):
                    best, kind = mount, parts[2]
    except OSError:
        pass
    return kind


MEMORY_FS = {"tmpfs", "ramfs", "devtmpfs"}


def pick_dir(wanted: str | None) -> str:
    """A folder on a real disk: fsync on tmpfs costs nothing and would flatter both sides."""
    if wanted:
        return wanted
    here = os.path.dirname(os.path.abspath(__file__))
    for cand in (tempfile.gettempdir(), "/var/tmp", here):
        if os.path.isdir(cand) and os.access(cand, os.W_OK) and fs_type(cand) not in MEMORY_FS:
            return cand
    return here


def lone_commit_ms(path: str, n: int = 40) -> float:
    """Median time of one small LMDB write transaction with sync=True: the disk's fsync cost
    (after as many unmeasured ones, which grow the fresh file)."""
    env = lmdb.open(path, map_size=1 << 24, sync=True, metasync=True)
    try:
        times = []
        for k in range(-n, n):
            t0 = time.perf_counter()
            with env.begin(write=True) as txn:
                txn.put(b"k", os.urandom(256))
            if k >= 0:
                times.append(time.perf_counter() - t0)
    finally:
        env.close()
    return round(percentile(sorted(times), 50) * 1000, 3)


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def revision() -> str:
    """The paychan checkout measured (`git describe --always --dirty`), when there is one."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "-C", repo, "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def machine_info(folder: str, commit_ms: dict[str, float]) -> dict[str, Any]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "bench_dir": folder,
        "bench_dir_fs": fs_type(folder),
        "lone_sync_commit_ms": commit_ms,
        "versions": {d: version(d) for d in ("paychan", "pykka", "lmdb", "PyNaCl", "msgpack")},
        "paychan_revision": revision(),
    }


# --- report -----------------------------------------------------------------------------------

def ratio(x: float, y: float) -> float:
    return round(x / y, 3) if y else 0.0


def ratios(pc: dict[str, Any], bare: dict[str, Any]) -> dict[str, float]:
    """paychan / bare: throughput (higher is better) and latency (lower is better)."""
    return {
        "throughput": ratio(pc["payments_per_s"], bare["payments_per_s"]),
        "latency_p50": ratio(pc["latency_ms"]["p50"], bare["latency_ms"]["p50"]),
        "latency_p99": ratio(pc["latency_ms"]["p99"], bare["latency_ms"]["p99"]),
    }


def spread(values: list[float]) -> str:
    """min / median / max of the per-round figures."""
    if not values:
        return "-"
    v = sorted(values)
    return f"{v[0]:.0f} / {percentile(v, 50):.0f} / {v[-1]:.0f}"


# What this project was asked for on a 2-core machine, across processes: payments/s of paychan,
# and paychan's throughput as a share of the bare baseline measured in the same run.
TARGETS = {"1": {"payments_per_s": 600.0, "ratio_to_bare": 0.70},
           "many": {"payments_per_s": 2000.0, "ratio_to_bare": 0.70}}


def targets(by_key: dict[str, Any], ratio_of: dict[str, Any], many: int) -> dict[str, Any]:
    """Each target next to the measured figure, met or not (printed, never asserted)."""
    out = {}
    for key, want in (("1", TARGETS["1"]), (str(many), TARGETS["many"])):
        case = by_key.get(f"paychan-xproc_{key}")
        r = ratio_of.get(f"xproc_{key}")
        if case is None or r is None:
            continue
        rate, share = case["payments_per_s"], r["throughput"]
        out[f"xproc_{key}"] = {
            "payments_per_s": {"target": want["payments_per_s"], "measured": rate,
                               "met": rate >= want["payments_per_s"]},
            "ratio_to_bare": {"target": want["ratio_to_bare"], "measured": share,
                              "met": share >= want["ratio_to_bare"]},
            "bare_payments_per_s": by_key[f"bare-xproc_{key}"]["payments_per_s"],
            "all_met": rate >= want["payments_per_s"] and share >= want["ratio_to_bare"],
        }
    return out


def ratio_label(key: str) -> str:
    if key.startswith("xproc_"):
        return f"xproc {plural(int(key[6:]))}"
    return plural(int(key))


def loads(values: list[float]) -> str:
    return " / ".join(f"{v:.2f}" for v in values)


def table(result: dict[str, Any]) -> str:
    m, cfg = result["machine"], result["config"]
    load, probe = m["load_average"], m["lone_sync_commit_ms"]
    many = cfg["channels"]
    rounds = [f"{cfg[f'rounds_{k}']} with {label}"
              for k, label in (("1_channel", "1 channel"), (f"{many}_channels", f"{many} channels"),
                               ("xproc_1_channel", "1 channel across processes"),
                               (f"xproc_{many}_channels", f"{many} channels across processes"))
              if cfg.get(f"rounds_{k}")]
    width = 28
    lines = [
        f"paychan bench ({m['paychan_revision']}): {m['cpu_count']} CPUs ({m['cpus_usable']} "
        f"usable), Python {m['python']}, {m['platform']}",
        f"stores in {m['bench_dir']} ({m['bench_dir_fs']}); a lone LMDB sync commit took "
        f"{probe['start']} ms at the start, {probe['end']} ms at the end",
        f"load average (1 / 5 / 15 min): {loads(load['start'])} at the start, "
        f"{loads(load['end'])} at the end",
        f"each pair warmed up, then measured in alternating rounds (A B, B A, ...): "
        f"{', '.join(rounds)}",
        "",
        f"{'case':<{width}}{'payments':>9}{'seconds':>9}{'payments/s':>12}{'p50 ms':>9}"
        f"{'p99 ms':>9}{'CPU ms/pay':>11}{'commits/txn':>12}  {'ok':<4}"
        "rounds: min / median / max payments/s   load at start",
    ]
    for case in result["cases"].values():
        lat = case["latency_ms"]
        ok = "yes" if case["acknowledged"] == case["payments"] and case["state_consistent"] \
            else f"NO ({case['acknowledged']} acknowledged, {case['errors']} errors)"
        lines.append(
            f"{case['name']:<{width}}{case['payments']:>9}{case['seconds']:>9.2f}"
            f"{case['payments_per_s']:>12.1f}{lat['p50']:>9.2f}{lat['p99']:>9.2f}"
            f"{case['cpu_ms_per_payment']:>11.3f}"
            f"{case['commits']['requests_per_transaction']:>12.2f}  {ok:<4}"
            f"{spread(case['round_payments_per_s']):<39}{case['load_average_at_start'][0]:.2f}")
    by_process = [case for case in result["cases"].values()
                  if "cpu_ms_per_payment_by_process" in case]
    if by_process:
        lines += ["", "per payment in each process of the cases across processes: CPU ms, "
                  "context switches"]
        for case in by_process:
            switches = case["context_switches_per_payment_by_process"]
            lines.append(f"  {case['name']:<{width}}" + ", ".join(
                f"{proc} {ms:.3f} ms {switches.get(proc, 0):.1f} cs"
                for proc, ms in case["cpu_ms_per_payment_by_process"].items()))
    lines += ["", f"{'paychan / bare':<{width}}{'throughput':>12}{'p50 latency':>13}"
              f"{'p99 latency':>13}"]
    for key, r in result["ratios"].items():
        lines.append(f"{ratio_label(key):<{width}}{r['throughput']:>12.3f}"
                     f"{r['latency_p50']:>13.3f}{r['latency_p99']:>13.3f}")
    if result["targets"]:
        lines += ["", "targets across processes (for a 2-core machine; paychan throughput within "
                  "70 % of bare: paychan/bare >= 0.70)",
                  f"{'':<{width}}{'paychan/s':>10}{'target':>9}{'':>10}"
                  f"{'paychan/bare':>14}{'target':>9}{'':>10}{'bare/s':>10}"]
        for key, t in result["targets"].items():
            rate, share = t["payments_per_s"], t["ratio_to_bare"]
            lines.append(
                f"{ratio_label(key):<{width}}{rate['measured']:>10.1f}"
                f"{'>= ' + format(rate['target'], '.0f'):>9}"
                f"{'met' if rate['met'] else 'not met':>10}{share['measured']:>14.3f}"
                f"{'>= ' + format(share['target'], '.2f'):>9}"
                f"{'met' if share['met'] else 'not met':>10}{t['bare_payments_per_s']:>10.1f}")
    lines += ["", "A throughput ratio above 1 or a latency ratio below 1 favours paychan. "
              "CPU ms/pay: CPU time per payment of",
              "the whole process (in-process cases) or of all the case's processes (xproc). "
              "commits/txn: commit requests per",
              "durable LMDB write transaction (group commit); across processes, counted in the "
              "payer process.",
              "xproc: paychan = `paychan ledger serve` + payee `paychan node run "
              "--no-payment-log` + a payer process (paychan.Node) over HTTP;",
              "bare = two asyncio processes, one aiohttp WebSocket, LMDB (sync=True) and PyNaCl, "
              "the same work per payment.",
              f"Total run time {result['elapsed_s']:.1f} s."]
    return "\n".join(lines)


def run_pair(cases: list[Any], n: int, warm: int, rounds: int) -> list[dict[str, Any]]:
    load = [round(x, 2) for x in os.getloadavg()]
    out = compare(cases, n, warm, rounds)
    for r in out:
        r["load_average_at_start"] = load
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ap.add_argument("--payments", type=int, default=None,
                    help="measured payments per case, spread over the channels (default 2000 "
                         "with 1 channel and 12000 with C channels, 3000 and 12000 across "
                         "processes; --quick: 120 and 600, 300 and 1000)")
    ap.add_argument("--channels", type=int, default=100, help="channels of the concurrent cases")
    ap.add_argument("--quick", action="store_true", help="a short run (about 20 s)")
    ap.add_argument("--cases", choices=("all", "in-process", "xproc"), default="all",
                    help="which pairs to run (default all)")
    ap.add_argument("--dir", default=None,
                    help="where the temporary stores go (default: the system's temporary folder "
                         "unless it is in memory); it must be a real disk to mean anything")
    args = ap.parse_args(argv)
    if args.channels < 2:
        ap.error("--channels must be at least 2")
    if args.payments is not None and args.payments < 1:
        ap.error("--payments must be positive")
    mode = MODES["quick" if args.quick else "full"]
    single_n, multi_n = mode.payments if args.payments is None else (args.payments,) * 2
    x_single_n, x_multi_n = mode.xproc_payments if args.payments is None \
        else (args.payments,) * 2
    warm_single, warm_multi = mode.warmup
    x_warm_single, x_warm_multi = mode.xproc_warmup
    c = args.channels
    in_process, across = args.cases in ("all", "in-process"), args.cases in ("all", "xproc")

    # A SIGTERM unwinds like an exception, so child processes and stores are still removed.
    signal.signal(signal.SIGTERM, _terminated)
    started = time.perf_counter()
    load_before = os.getloadavg()
    root = tempfile.mkdtemp(prefix="paychan-bench-", dir=pick_dir(args.dir))
    results: list[dict[str, Any]] = []
    try:
        probe_start = lone_commit_ms(os.path.join(root, "probe0"), mode.probe)
        pairs = ((1, single_n, warm_single, mode.rounds[0]),
                 (c, multi_n, warm_multi, mode.rounds[1])) if in_process else ()
        for channels, n, warm, rounds in pairs:
            deposit = (warm + n) * AMOUNT * 2 + 1000
            cases: list[Case] = []
            try:
                cases.append(PaychanCase(os.path.join(root, f"paychan{channels}"), channels,
                                         deposit))
                cases.append(BareCase(os.path.join(root, f"bare{channels}"), channels))
                results += run_pair(cases, n, warm, rounds)
            finally:
                for case in cases:
                    case.close()
        xpairs = ((1, x_single_n, x_warm_single, mode.xproc_rounds[0]),
                  (c, x_multi_n, x_warm_multi, mode.xproc_rounds[1])) if across else ()
        for channels, n, warm, rounds in xpairs:
            deposit = (warm + -(-n // channels)) * AMOUNT * 2 + 1000
            xcases: list[XprocCase] = []
            try:
                xcases.append(PaychanXprocCase(os.path.join(root, f"xpaychan{channels}"),
                                               channels, deposit))
                xcases.append(BareXprocCase(os.path.join(root, f"xbare{channels}"), channels))
                start_side_by_side(xcases)
                results += run_pair(xcases, n, warm, rounds)
            finally:
                for xcase in xcases:
                    xcase.close()
        probe_end = lone_commit_ms(os.path.join(root, "probe1"), mode.probe)
        machine = machine_info(root, {"start": probe_start, "end": probe_end})
    finally:
        shutil.rmtree(root, ignore_errors=True)
    load_after = os.getloadavg()
    machine["load_average"] = {"start": [round(x, 2) for x in load_before],
                               "end": [round(x, 2) for x in load_after]}
    machine["load_average_1min"] = {"start": round(load_before[0], 2),
                                    "end": round(load_after[0], 2)}
    by_key = {f"{r['kind']}_{r['channels']}": r for r in results}
    ratio_of = {}
    for prefix, label in (("", ""), ("-xproc", "xproc_")):
        for k in (1, c):
            if f"paychan{prefix}_{k}" in by_key:
                ratio_of[f"{label}{k}"] = ratios(by_key[f"paychan{prefix}_{k}"],
                                                 by_key[f"bare{prefix}_{k}"])
    result = {
        "machine": machine,
        "config": {"channels": c, "payments_1_channel": single_n,
                   f"payments_{c}_channels": multi_n, "amount": AMOUNT,
                   "warmup_1_channel": warm_single, "warmup_per_channel": warm_multi,
                   "rounds_1_channel": mode.rounds[0] if in_process else 0,
                   f"rounds_{c}_channels": mode.rounds[1] if in_process else 0,
                   "xproc_payments_1_channel": x_single_n,
                   f"xproc_payments_{c}_channels": x_multi_n,
                   "xproc_warmup_1_channel": x_warm_single,
                   "xproc_warmup_per_channel": x_warm_multi,
                   "rounds_xproc_1_channel": mode.xproc_rounds[0] if across else 0,
                   f"rounds_xproc_{c}_channels": mode.xproc_rounds[1] if across else 0,
                   "cases": args.cases, "quick": args.quick},
        "cases": by_key,
        "ratios": ratio_of,
        "targets": targets(by_key, ratio_of, c),
        "elapsed_s": round(time.perf_counter() - started, 2),
    }
    print(json.dumps(result, indent=2) if args.json else table(result))
    complete = all(r["acknowledged"] == r["payments"] and r["state_consistent"]
                   for r in results)
    return 0 if complete else 1


def _terminated(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())
