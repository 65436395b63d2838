"""Nodes, the ledger server and the chat hub as separate OS processes on loopback (DESIGN §9).

Every node is mp_node.py, driven by lines on its stdin; the ledger is `paychan ledger serve
--virtual-clock` and the hub `paychan hub serve`. Processes are SIGKILLed at random moments of
a payment storm and restarted on the same data folder and port, or the connections between
two nodes are cut through a relay (relay.py); at the end every acknowledged payment must be
counted exactly once by both sides and the ledger must pay out the deposits.
PAYCHAN_MP_SEED replays a run's kill moments (the seed is printed); PAYCHAN_MP_LOG=INFO makes
the nodes log more (their logs are next to their data folders).

A storm's payer retries a payment only after STORM_TIMEOUT, and every storm must move again
within RESUME_WITHIN of a restart: so a payment in flight at a kill is resolved by the sync
between the two nodes, not by the payer's retry.
"""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
from relay import Relay

import paychan
from paychan.protocol.identity import decode_channel_id

ROOT = Path(__file__).resolve().parents[2]
NODE = Path(__file__).with_name("mp_node.py")
MINT = 1_000_000
READY_TIMEOUT = 30.0
P = TypeVar("P", bound="Proc")
STORM_TIMEOUT = 30.0  # seconds a storm's call waits before it retries the same payment id
RESUME_WITHIN = 15.0  # seconds after a restart by which a storm must have moved again
STOP_WITHIN = 5.0  # seconds a node takes to stop cleanly, though its peer redials it at once


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting until {what}")
        time.sleep(0.02)


@pytest.fixture
def rng() -> random.Random:
    seed = int(os.environ.get("PAYCHAN_MP_SEED") or random.SystemRandom().randrange(2**32))
    print(f"kill seed {seed} (PAYCHAN_MP_SEED={seed} replays the kill moments)")
    return random.Random(seed)


class Proc:
    """One child program, restartable with the same arguments. The complete stdout lines of
    every run are kept in order, so ACKs printed before a kill still count."""

    def __init__(self, name: str, argv: list[str], logs: Path, ready: str) -> None:
        self.name, self.argv, self.logs, self.ready = name, argv, logs, ready
        self.proc: subprocess.Popen[bytes] | None = None
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.starts = 0
        self._reader: threading.Thread | None = None
        self._eof = True

    @property
    def log_path(self) -> Path:
        return self.logs / f"{self.name}-{self.starts}.log"

    def start(self) -> str:
        """Start a run and return its ready line."""
        assert not self.alive(), f"{self.name} is already running"
        self.starts += 1
        at = self.mark()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=log, cwd=ROOT)
        with self.changed:
            self._eof = False
        self._reader = threading.Thread(target=self._read, args=(self.proc,), daemon=True)
        self._reader.start()
        return self.wait_line(self.ready, at, READY_TIMEOUT, this_run=True)

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            if raw.endswith(b"\n"):  # a line cut by a kill was never acknowledged
                with self.changed:
                    self.lines.append(raw.decode().rstrip("\n"))
                    self.changed.notify_all()
        with self.changed:
            self._eof = True
            self.changed.notify_all()

    def mark(self) -> int:
        with self.changed:
            return len(self.lines)

    def wait_line(self, prefix: str, after: int, timeout: float, fail: str | None = None,
                  this_run: bool = False) -> str:
        """The first line from index `after` on that starts with `prefix`; a line starting
        with `fail` instead raises, as does the end of the run (with `this_run`) or time."""
        deadline = time.monotonic() + timeout
        with self.changed:
            i = after
            while True:
                while i < len(self.lines):
                    line = self.lines[i]
                    i += 1
                    if line.startswith(prefix):
                        return line
                    if fail is not None and line.startswith(fail):
                        raise AssertionError(f"{self.name}: {line}{self.tail()}")
                left = deadline - time.monotonic()
                if this_run and self._eof:
                    raise AssertionError(f"{self.name} exited before {prefix!r}{self.tail()}")
                if left <= 0:
                    raise AssertionError(f"{self.name}: no {prefix!r} line in {timeout} s"
                                         f"{self.tail()}")
                self.changed.wait(min(left, 0.5))

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, then collect what the run flushed before it died."""
        assert self.proc is not None
        if self.alive():
            os.kill(self.proc.pid, signal.SIGKILL)
        self._reap()
        assert self.proc.returncode == -signal.SIGKILL, \
            f"{self.name} had exited by itself ({self.proc.returncode}){self.tail()}"

    def _reap(self, timeout: float = 15.0) -> None:
        assert self.proc is not None
        self.proc.wait(timeout)
        if self._reader is not None:
            self._reader.join(timeout)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()

    def tail(self, n: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()[-n:]
        except OSError:
            return ""
        return f"\n--- {self.log_path.name} ---\n" + "\n".join(text) if text else ""


class NodeProc(Proc):
    """mp_node.py on a data folder, with its listen URL and hub; commands go to its stdin."""

    def __init__(self, name: str, root: Path, ledger: str, listen: bool = True,
                 hub: str | None = None) -> None:
        self.url = f"http://127.0.0.1:{free_port()}" if listen else None
        argv = [sys.executable, str(NODE), "--data", str(root / name), "--ledger", ledger,
                "--log-level", os.environ.get("PAYCHAN_MP_LOG", "WARNING")]
        if self.url:
            argv += ["--listen", self.url]
        if hub:
            argv += ["--hub", hub]
        super().__init__(name, argv, root, "READY ")
        self.address = self.pairing = ""

    def start(self) -> str:
        line = super().start()
        _, self.address, self.pairing = line.split()
        return line

    def send(self, command: str) -> int:
        """Write a command; returns the mark from which its answer will appear."""
        at = self.mark()
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()
        return at

    def cmd(self, command: str, answer: str, timeout: float = 60.0) -> str:
        at = self.send(command)
        return self.wait_line(answer, at, timeout, fail=f"ERR {command.split()[0]} ",
                              this_run=True)

    def balances(self, ch: str) -> dict:
        return json.loads(self.cmd(f"balances {ch}", f"BALANCES {ch} ", 30).split(" ", 2)[2])

    def quit(self, timeout: float = 30.0) -> None:
        """Stop cleanly (Node.stop), promptly, with exit code 0."""
        started = time.monotonic()
        self.send("quit")
        assert self.proc is not None
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.name} did not stop in {timeout} s{self.tail()}") \
                from None
        took = time.monotonic() - started
        self._reap()
        assert self.proc.returncode == 0, f"{self.name} exited {self.proc.returncode}" + \
            self.tail()
        assert took < STOP_WITHIN, f"{self.name} took {took:.1f} s to stop{self.tail()}"

    # -- what its storms printed, across all its runs --------------------------------------
    def count(self, prefix: str) -> int:
        with self.changed:
            return sum(1 for line in self.lines if line.startswith(prefix))

    def acks(self, prefix: str) -> dict[int, int]:
        """index -> amount of every acknowledged payment `prefix-<index>`; each once."""
        out: dict[int, int] = {}
        with self.changed:
            lines = list(self.lines)
        for line in lines:
            if line.startswith(f"ACK {prefix}-"):
                _, pid, amount = line.split()
                i = int(pid.rsplit("-", 1)[1])
                assert i not in out, f"{pid} acknowledged twice"
                out[i] = int(amount)
        return out

    def problems(self) -> list[str]:
        with self.changed:
            return [x for x in self.lines if x.startswith(("PAYERR", "BADREPLY", "ERR"))]


class World:
    """The processes of one test; every one still alive is killed at teardown."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[Proc] = []
        self.admin: paychan.Ledger | None = None
        self.ledger: Proc | None = None
        self.hub: Proc | None = None
        self.proxies: list[Relay] = []

    def start_ledger(self) -> str:
        port = free_port()
        self.ledger_url = f"http://127.0.0.1:{port}"
        self.ledger = self._add(Proc("ledger", [
            sys.executable, "-m", "paychan.cli", "ledger", "serve", "--data",
            str(self.root / "ledger"), "--port", str(port), "--virtual-clock"],
            self.root, f"ledger listening on {self.ledger_url}"))
        self.ledger.start()
        self.admin = paychan.Ledger.connect(self.ledger_url)
        return self.ledger_url

    def start_hub(self) -> str:
        port = free_port()
        self.hub_url = f"http://127.0.0.1:{port}"
        self.hub = self._add(Proc("hub", [
            sys.executable, "-m", "paychan.cli", "hub", "serve", "--data",
            str(self.root / "hub"), "--port", str(port)],
            self.root, f"hub listening on {self.hub_url}"))
        self.hub.start()
        return self.hub_url

    def node(self, name: str, listen: bool = True, hub: bool = False) -> NodeProc:
        node = self._add(NodeProc(name, self.root, self.ledger_url, listen,
                                  self.hub_url if hub else None))
        node.start()
        assert self.admin is not None
        self.admin.mint(node.address, MINT)
        return node

    def _add(self, proc: P) -> P:
        self.procs.append(proc)
        return proc

    def balance(self, node: NodeProc) -> int:
        assert self.admin is not None
        return self.admin.balance(node.address)

    def proxy(self, node: NodeProc) -> Relay:
        assert node.url is not None
        proxy = Relay(int(node.url.rsplit(":", 1)[1]))
        self.proxies.append(proxy)
        return proxy

    def teardown(self) -> None:
        for proxy in self.proxies:
            proxy.close()
        for proc in reversed(self.procs):
            if proc.alive():
                proc.kill()
        if self.admin is not None:
            self.admin.close()


@pytest.fixture
def world(tmp_path: Path):
    w = World(tmp_path)
    yield w
    w.teardown()


# -- building blocks --------------------------------------------------------------------------

def open_channel(payer: NodeProc, payee: NodeProc, deposit: int, peer_deposit: int,
                 dispute: int = 600, via: str | None = None) -> str:
    """`payer` opens a channel to `payee` (by URL, `via` another URL, or by pairing code
    through the hub); the payee deposits too; returns once the payer has seen that deposit."""
    peer = via or payee.url or payee.pairing
    ch = payer.cmd(f"open {peer} {deposit} {dispute}", "OPENED ").split()[1]
    if peer_deposit:
        payee.cmd(f"deposit {ch} {peer_deposit}", f"DEPOSITED {ch}")
        wait_until(lambda: payer.balances(ch)["deposited_by_peer"] == peer_deposit, 30,
                   "the payer sees the payee's deposit")
    return ch


def agree(a: NodeProc, b: NodeProc, ch: str, timeout: float = 45.0) -> tuple[dict, dict]:
    """Sync both sides until nothing is in flight and each holds the other's latest voucher."""
    deadline = time.monotonic() + timeout
    while True:
        a.cmd(f"sync {ch}", f"SYNCED {ch}")
        b.cmd(f"sync {ch}", f"SYNCED {ch}")
        round_ends = time.monotonic() + 2.0
        while time.monotonic() < round_ends:
            sa, sb = a.balances(ch), b.balances(ch)
            if (sa["sent_by_me"] == sb["sent_by_peer"] and sb["sent_by_me"] == sa["sent_by_peer"]
                    and not any(s[k] for s in (sa, sb)
                                for k in ("in_flight", "serving", "postponed"))):
                return sa, sb
            time.sleep(0.05)
        if time.monotonic() > deadline:
            raise AssertionError(f"the nodes do not agree: {sa} / {sb}")


def storm(payer: NodeProc, ch: str, prefix: str, amount: int, start: int = 0,
          n: int = 1_000_000) -> None:
    payer.send(f"storm {ch} {n} {amount} {prefix} {start} {STORM_TIMEOUT}")


def halt(payer: NodeProc, prefix: str, timeout: float = 60.0) -> int:
    """Stop a storm after its payment in flight; returns the index it stopped before."""
    line = payer.cmd(f"halt {prefix}", f"HALTED {prefix} ", timeout)
    return int(line.split()[2])


def wait_progress(payer: NodeProc, prefix: str, more: int, timeout: float = 45.0) -> None:
    """Until the storm `prefix` has `more` acknowledgements beyond what it has now."""
    target = payer.count(f"ACK {prefix}-") + more
    wait_until(lambda: payer.count(f"ACK {prefix}-") >= target, timeout,
               f"{payer.name}'s storm {prefix} makes {more} more payments")


def resumed(payer: NodeProc, prefix: str) -> float:
    """Seconds until the storm `prefix` acknowledges a payment again, after a fault (a kill
    and restart, a cut connection). Its payment in flight may have been lost with it; the
    retry comes only after STORM_TIMEOUT, so within RESUME_WITHIN only a sync can resolve it."""
    started = time.monotonic()
    pid = f"{prefix}-{len(payer.acks(prefix))}"
    try:
        wait_progress(payer, prefix, 1, RESUME_WITHIN)
    except AssertionError:
        raise AssertionError(f"payment {pid}, in flight at the fault, was not resolved by sync "
                             f"within {RESUME_WITHIN} s after it") from None
    return time.monotonic() - started


def check_storm(payer: NodeProc, prefix: str, stopped_at: int) -> int:
    """Every id below `stopped_at` was acknowledged exactly once; returns their sum."""
    acked = payer.acks(prefix)
    assert sorted(acked) == list(range(stopped_at)), (prefix, stopped_at, sorted(acked)[-5:])
    return sum(acked.values())


def close_and_check(world: World, closer: NodeProc, other: NodeProc, ch: str,
                    how: str = "mutual") -> None:
    """Close `ch`; the ledger pays each side its channel balance, and the two payouts are the
    period's deposits."""
    sc, so = closer.balances(ch), other.balances(ch)
    before = world.balance(closer), world.balance(other)
    closer.cmd(f"close {ch} {how}", f"CLOSED {ch} ", 150)
    paid = world.balance(closer) - before[0], world.balance(other) - before[1]
    assert paid == (sc["my_balance"], so["my_balance"]), (paid, sc, so)
    assert sum(paid) == sc["deposited_by_me"] + sc["deposited_by_peer"], (paid, sc)
    wait_until(lambda: other.balances(ch)["period"] == sc["period"] + 1, 30,
               f"{other.name} sees the settlement")


def conserved(world: World, *nodes: NodeProc) -> None:
    """Everything minted is back in the nodes' accounts: no channel holds anything."""
    assert sum(world.balance(n) for n in nodes) == MINT * len(nodes)


def no_problems(*nodes: NodeProc) -> None:
    for node in nodes:
        assert node.problems() == [], (node.name, node.problems()[:10])


def finish_both_ways(world: World, a: NodeProc, b: NodeProc, ch: str
                     ) -> tuple[int, int, dict, dict]:
    """Halt the storms "a" (a's) and "b" (b's); each acknowledged payment is counted once on
    both sides; close mutually and check the payouts. Returns how many payments each storm
    made and both sides' balances before the close."""
    stopped_a, stopped_b = halt(a, "a"), halt(b, "b")
    sa, sb = agree(a, b, ch)
    assert sa["sent_by_me"] == check_storm(a, "a", stopped_a) == sb["sent_by_peer"]
    assert sb["sent_by_me"] == check_storm(b, "b", stopped_b) == sa["sent_by_peer"]
    close_and_check(world, a, b, ch)
    conserved(world, a, b)
    no_problems(a, b)
    return stopped_a, stopped_b, sa, sb


# -- the tests --------------------------------------------------------------------------------

def test_three_processes_pay_both_ways_then_close_mutually_and_solo(world):
    started = time.monotonic()
    world.start_ledger()
    a, b = world.node("a"), world.node("b")
    ch = open_channel(a, b, 10_000, 8_000, dispute=100)

    storm(a, ch, "a1", 3, n=150)  # both directions at once, each in its own process
    storm(b, ch, "b1", 2, n=120)
    a.wait_line("STORMED a1", 0, 90, fail="ERR")
    b.wait_line("STORMED b1", 0, 90, fail="ERR")
    sa, sb = agree(a, b, ch)
    assert sa["sent_by_me"] == check_storm(a, "a1", 150) == 450 == sb["sent_by_peer"]
    assert sb["sent_by_me"] == check_storm(b, "b1", 120) == 240 == sa["sent_by_peer"]
    assert sa["my_balance"] == 10_000 - 450 + 240 and sb["my_balance"] == 8_000 + 450 - 240
    close_and_check(world, a, b, ch)
    assert world.balance(a) == MINT - 450 + 240 and world.balance(b) == MINT + 450 - 240

    # A second channel, the other way round, closed solo while its peer is away.
    ch2 = open_channel(b, a, 5_000, 1_000, dispute=100)
    storm(b, ch2, "b2", 5, n=20)
    storm(a, ch2, "a2", 1, n=10)
    b.wait_line("STORMED b2", 0, 60, fail="ERR")
    a.wait_line("STORMED a2", 0, 60, fail="ERR")
    sb, sa = agree(b, a, ch2)
    assert (sb["sent_by_me"], sa["sent_by_me"]) == (100, 10)
    a.quit()
    before = world.balance(a), world.balance(b)
    at = b.send(f"close {ch2} solo")
    assert world.admin is not None
    record = lambda: world.admin.client.channel(decode_channel_id(ch2))  # noqa: E731
    wait_until(lambda: record().close is not None, 30, "the solo close lands")
    time.sleep(1.0)  # the closer's watcher looks and finds the window still open
    assert record().period == 1 and (world.balance(a), world.balance(b)) == before
    world.admin.advance(101)
    b.wait_line(f"CLOSED {ch2} ", at, 60, fail="ERR close")
    paid = world.balance(a) - before[0], world.balance(b) - before[1]
    assert paid == (sa["my_balance"], sb["my_balance"]) == (1_000 - 10 + 100, 5_000 - 100 + 10)
    a.start()  # back: it catches up with the settlement it missed
    wait_until(lambda: a.balances(ch2)["period"] == 2, 30, "a sees the solo settlement")
    conserved(world, a, b)
    no_problems(a, b)
    print(f"two channels, 300 payments both ways, mutual and solo closes: "
          f"{time.monotonic() - started:.1f} s")


def test_three_node_processes_pay_around_a_triangle_then_close(world):
    """Three node processes and the ledger: a channel between every two of them, all six
    directions paying at once, so every node pays on one channel while it serves on another;
    then one close of each kind."""
    started = time.monotonic()
    world.start_ledger()
    a, b, c = world.node("a"), world.node("b"), world.node("c")
    channels = {(a, b): open_channel(a, b, 6_000, 4_000, dispute=100),
                (b, c): open_channel(b, c, 6_000, 4_000, dispute=100),
                (c, a): open_channel(c, a, 6_000, 4_000, dispute=100)}
    counts = {}
    for k, ((x, y), ch) in enumerate(channels.items()):
        counts[x.name + "x"], counts[y.name + "y"] = 60 + 10 * k, 40 + 10 * k
        storm(x, ch, x.name + "x", 3, n=counts[x.name + "x"])
        storm(y, ch, y.name + "y", 2, n=counts[y.name + "y"])
    for (x, y) in channels:
        x.wait_line(f"STORMED {x.name}x", 0, 120, fail="ERR")
        y.wait_line(f"STORMED {y.name}y", 0, 120, fail="ERR")
    for (x, y), ch in channels.items():
        sx, sy = agree(x, y, ch)
        sent_x, sent_y = 3 * counts[x.name + "x"], 2 * counts[y.name + "y"]
        assert sx["sent_by_me"] == check_storm(x, x.name + "x", counts[x.name + "x"]) == sent_x
        assert sy["sent_by_me"] == check_storm(y, y.name + "y", counts[y.name + "y"]) == sent_y
        assert (sx["sent_by_peer"], sy["sent_by_peer"]) == (sent_y, sent_x)
        assert sx["my_balance"] == 6_000 - sent_x + sent_y
        assert sy["my_balance"] == 4_000 + sent_x - sent_y
    # Mutual; solo by the opener (the peer's watcher confirms at once); solo by the other side.
    close_and_check(world, a, b, channels[(a, b)])
    close_and_check(world, b, c, channels[(b, c)], how="solo")
    close_and_check(world, a, c, channels[(c, a)], how="solo")
    # What each node ends with: its net flow over its two channels.
    net = {n: 0 for n in "abc"}
    for (x, y) in channels:
        flow = 3 * counts[x.name + "x"] - 2 * counts[y.name + "y"]
        net[x.name] -= flow
        net[y.name] += flow
    assert {n.name: world.balance(n) - MINT for n in (a, b, c)} == net
    conserved(world, a, b, c)
    no_problems(a, b, c)
    print(f"three node processes, {sum(counts.values())} payments around a triangle, "
          f"three closes: {time.monotonic() - started:.1f} s")


def kill_node_mid_storm(world: World, rng: random.Random, victim_is_payer: bool,
                        kills: int, hub: bool = False) -> None:
    started = time.monotonic()
    world.start_ledger()
    if hub:
        world.start_hub()
    a, b = (world.node(n, listen=not hub, hub=hub) for n in ("a", "b"))
    ch = open_channel(a, b, 200_000, 1_000)
    victim = a if victim_is_payer else b
    storm(a, ch, "a", 3)
    waits = []
    for _ in range(kills):
        wait_progress(a, "a", 3)
        time.sleep(rng.uniform(0.0, 0.3))
        victim.kill()
        time.sleep(rng.uniform(0.0, 0.3))
        victim.start()
        if victim_is_payer:
            # Resume with the first id not acknowledged: it may be in flight, answered while
            # the ACK line was lost, or never signed; in every case it must be paid once.
            storm(a, ch, "a", 3, start=len(a.acks("a")))
        waits.append(resumed(a, "a"))
    stopped = halt(a, "a")
    sa, sb = agree(a, b, ch)
    acked = check_storm(a, "a", stopped)
    # Every acknowledged payment counts, once, on both sides; nothing else was paid.
    assert sa["sent_by_me"] == acked == sb["sent_by_peer"], (acked, sa, sb)
    assert sb["sent_by_me"] == 0 == sa["sent_by_peer"]
    assert a.count("RETRY ") == 0  # every payment cut short was resolved by sync
    close_and_check(world, a, b, ch)
    conserved(world, a, b)
    no_problems(a, b)
    print(f"{kills} kills of the {'payer' if victim_is_payer else 'payee'}"
          f"{' (through the hub)' if hub else ''}: {stopped} payments ({acked}), the storm "
          f"moved again {max(waits):.2f} s at most after a restart, "
          f"{time.monotonic() - started:.1f} s")


def test_payee_killed_mid_storm(world, rng):
    kill_node_mid_storm(world, rng, victim_is_payer=False, kills=10)


def test_payer_killed_mid_storm(world, rng):
    kill_node_mid_storm(world, rng, victim_is_payer=True, kills=10)


def test_payee_killed_mid_storm_through_the_hub(world, rng):
    kill_node_mid_storm(world, rng, victim_is_payer=False, kills=10, hub=True)


def test_connections_cut_mid_storm(world, rng):
    """The network fails, not a process: the connections between the nodes are cut at random
    moments of storms both ways, and what was in flight is lost. Each payment cut short is
    resolved by the sync once the nodes reconnect, though neither has anything new to send."""
    started = time.monotonic()
    world.start_ledger()
    # a does not listen: it dials b through the relay, and b answers over that connection,
    # so everything between them passes the relay (with a URL of its own, a would be dialed
    # back directly).
    a, b = world.node("a", listen=False), world.node("b")
    proxy = world.proxy(b)
    ch = open_channel(a, b, 200_000, 100_000, via=proxy.url)
    storm(a, ch, "a", 3)
    storm(b, ch, "b", 2)
    cuts, waits = 10, []
    for _ in range(cuts):
        wait_progress(a, "a", 3)
        wait_progress(b, "b", 3)
        time.sleep(rng.uniform(0.0, 0.3))
        proxy.cut(swallow_for=rng.uniform(0.05, 0.3))
        waits.append(max(resumed(a, "a"), resumed(b, "b")))
    stopped_a, stopped_b, _, _ = finish_both_ways(world, a, b, ch)
    assert a.count("RETRY ") == 0 == b.count("RETRY ")
    print(f"{cuts} cuts of the connections: {stopped_a} + {stopped_b} payments, the storms "
          f"moved again {max(waits):.2f} s at most after a cut, "
          f"{time.monotonic() - started:.1f} s")


def test_ledger_killed_while_nodes_pay(world, rng):
    started = time.monotonic()
    world.start_ledger()
    a, b = world.node("a"), world.node("b")
    ch = open_channel(a, b, 50_000, 20_000)
    storm(a, ch, "a", 2)
    storm(b, ch, "b", 1)
    assert world.ledger is not None
    kills, while_down, deposited = 10, 0, 0  # as many kills as each node gets
    for k in range(kills):
        wait_progress(a, "a", 3)
        wait_progress(b, "b", 3)
        deposit_at = None
        if k in (1, 4, 7):  # a deposit whose ledger transaction meets the kill
            deposit_at = b.send(f"deposit {ch} 500")
            b.wait_line(f"DEPOSITING {ch}", deposit_at, 30, fail="ERR deposit")
            time.sleep(rng.uniform(0.0, 0.05))
        else:
            time.sleep(rng.uniform(0.0, 0.3))
        world.ledger.kill()
        acks_at_kill = a.count("ACK ") + b.count("ACK ")
        time.sleep(rng.uniform(0.3, 1.0))
        while_down += a.count("ACK ") + b.count("ACK ") - acks_at_kill
        world.ledger.start()
        if deposit_at is not None:  # the watcher's retries land it after the restart
            b.wait_line(f"DEPOSITED {ch}", deposit_at, 60, fail="ERR deposit")
            deposited += 500
    wait_progress(a, "a", 3)
    wait_progress(b, "b", 3)
    # Payments are off the ledger: they went on while it was away.
    assert while_down > 0
    stopped_a, stopped_b, sa, sb = finish_both_ways(world, a, b, ch)
    assert sa["deposited_by_peer"] == 20_000 + deposited == sb["deposited_by_me"]
    print(f"{kills} kills of the ledger: {stopped_a} + {stopped_b} payments, {while_down} "
          f"while it was down, {deposited} deposited across kills, "
          f"{time.monotonic() - started:.1f} s")


def test_hub_killed_mid_storm(world, rng):
    started = time.monotonic()
    world.start_ledger()
    world.start_hub()
    a, b = world.node("a", listen=False, hub=True), world.node("b", listen=False, hub=True)
    ch = open_channel(a, b, 50_000, 20_000)
    storm(a, ch, "a", 2)
    storm(b, ch, "b", 1)
    assert world.hub is not None
    kills, waits = 10, []  # as many kills as each node gets
    for k in range(kills):
        wait_progress(a, "a", 3)
        wait_progress(b, "b", 3)
        # A free message is never resent by sync: only the hub's queue can deliver it.
        a.cmd(f"message {ch} m{k}", f"SENT {ch}")
        time.sleep(rng.uniform(0.0, 0.3))
        world.hub.kill()
        time.sleep(rng.uniform(0.0, 0.5))
        world.hub.start()
        waits.append(max(resumed(a, "a"), resumed(b, "b")))
    stopped_a, stopped_b, _, _ = finish_both_ways(world, a, b, ch)
    assert a.count("RETRY ") == 0 == b.count("RETRY ")
    wait_until(lambda: all(b.count(f'MSG {ch} "m{k}"') for k in range(kills)), 30,
               "every message reaches b")
    print(f"{kills} kills of the hub: {stopped_a} + {stopped_b} payments, the storms moved "
          f"again {max(waits):.2f} s at most after a restart, {time.monotonic() - started:.1f} s")


def test_chat_reaches_a_node_that_was_offline_across_a_hub_restart(world):
    started = time.monotonic()
    world.start_ledger()
    world.start_hub()
    a, b = world.node("a", listen=False, hub=True), world.node("b", listen=False, hub=True)
    ch = open_channel(a, b, 5_000, 0)
    a.cmd(f"pay {ch} 5 first 20 hello", "PAID first ")
    b.quit()  # offline: its process is gone

    a.cmd(f"message {ch} while you were away", f"SENT {ch}")
    paid_at = a.send(f"pay {ch} 7 offline-1 120 paid while away")  # one call, never retried
    wait_until(lambda: a.cmd("pending", "PENDING ") == "PENDING 0", 30,
               "the hub stores both envelopes")
    assert world.hub is not None
    world.hub.kill()  # the queued envelopes are only on the hub's disk now
    world.hub.start()
    time.sleep(0.5)
    assert a.count("PAID offline-1") == 0  # nobody could answer yet

    msg_at = b.mark()
    b.start()
    line = a.wait_line("PAID offline-1 ", paid_at, 60, fail="ERR pay")
    assert json.loads(line.split(" ", 2)[2]) == {"echo": "paid while away", "amount": 7}
    # The free message too, though the hub delivers it while b's Node.open is still running,
    # before the application can register its callback (which then hears it, per Node.on).
    b.wait_line(f'MSG {ch} "while you were away"', msg_at, 20, this_run=True)
    sa, sb = agree(a, b, ch)
    assert sa["sent_by_me"] == 12 == sb["sent_by_peer"]
    close_and_check(world, a, b, ch)
    conserved(world, a, b)
    no_problems(a, b)
    print(f"offline delivery across a hub restart: {time.monotonic() - started:.1f} s")
