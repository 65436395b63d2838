"""Regressions around who owns a channel's state, and in what order its effects leave.

- A failing actor's hand-over does not delete a successor another thread started meanwhile:
  never two live actors for one channel (two owners sign two vouchers with one nonce).
- Effects of one channel leave in order: a step that waits for nothing is not emitted ahead
  of an earlier step whose commit is durable but whose effects are still being emitted.
- A quick handler that tells its own channel while that channel's actor is being stopped
  neither waits for that actor (its own thread runs it) nor starts a second one.
- What a failed commit drags down with it is not lost: a ledger event or a peer's message
  handled behind it, and a payment queued behind it, go to the successor.

Every scenario is staged with threading.Event hooks installed through monkeypatch, so nothing
depends on timing and nothing leaks into other tests; every wait has a timeout.
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import lmdb
import pykka
import pytest
from commit_faults import DEPOSIT, FailingCommits, Served, check_agreement

import paychan
from paychan.actors.channel_actor import ChannelActor, Cmd, load_record
from paychan.actors.loopback import Faults, LoopbackNetwork
from paychan.actors.node import NodeCore, result_of
from paychan.protocol import channel as machine
from paychan.protocol.errors import InternalError, StorageError
from paychan.protocol.identity import decode_channel_id
from paychan.storage.env import Store
from paychan.storage.writer import Writer

WAIT = 5.0


# ---- helpers ------------------------------------------------------------------------------


def live_actors(node: paychan.Node, cid: bytes) -> list[ChannelActor]:
    """The node's running actors for channel `cid` (a stopped actor leaves the registry)."""
    found = []
    for ref in pykka.ActorRegistry.get_by_class(ChannelActor):
        actor = ref.actor_inbox.actor
        if (actor is not None and actor.channel_id == cid and actor.core is node._core
                and ref.is_alive()):
            found.append(actor)
    return found


class Gates:
    """Named events for staging a scenario; all are set at teardown, whatever happened, so no
    thread of a failed test stays blocked in a hook."""

    def __init__(self) -> None:
        self._events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def __getitem__(self, name: str) -> threading.Event:
        with self._lock:
            return self._events.setdefault(name, threading.Event())

    def wait(self, name: str) -> None:
        assert self[name].wait(WAIT), f"timed out waiting for {name!r}"

    def open_all(self) -> None:
        with self._lock:
            events = list(self._events.values())
        for event in events:
            event.set()


@pytest.fixture
def gates(nodes: Any) -> Iterator[Gates]:
    # Depends on `nodes`: torn down first, so blocked hooks are released before nodes stop.
    made = Gates()
    yield made
    made.open_all()


def start_thread(target: Callable[[], Any]) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def joined(thread: threading.Thread) -> None:
    thread.join(WAIT)
    assert not thread.is_alive(), "a helper thread is stuck"


@pytest.fixture
def failing(monkeypatch: pytest.MonkeyPatch) -> FailingCommits:
    return FailingCommits(monkeypatch)


class HeldWriter:
    """Keeps a node's writer thread inside one request: commits made meanwhile wait for the
    next batch, so several of them are pending at once."""

    def __init__(self, node: paychan.Node) -> None:
        self.started, self.release = threading.Event(), threading.Event()

        def hold(txn: lmdb.Transaction, s: Store) -> None:
            self.started.set()
            self.release.wait(WAIT)

        self.future = node._core.store.writer.submit_fn(hold)
        assert self.started.wait(WAIT), "the writer never ran the holding request"

    def let_go(self) -> None:
        self.release.set()
        self.future.result(WAIT)


@pytest.fixture
def hold_writer(gates: Gates) -> Iterator[Callable[[paychan.Node], HeldWriter]]:
    held: list[HeldWriter] = []

    def hold(node: paychan.Node) -> HeldWriter:
        held.append(HeldWriter(node))
        return held[-1]

    yield hold
    for h in held:
        h.release.set()


# ---- r1: a failing actor's hand-over keeps the successor started meanwhile ------------------


def test_failed_actor_hand_over_keeps_a_successor_started_meanwhile(
        pair, channel, gates, monkeypatch, wait_until):
    """Actor X fails with m1 queued behind the failing message. While the supervisor is still
    handling X's failure, another thread pays m4: it finds X dead and starts X2. X's hand-over
    must give m1 to X2, not delete X2's entry and start a third actor beside it (two owners
    of one channel, each signing its own voucher with the same nonce)."""
    a, b = pair
    served = Served()
    b.on_payment_received(served)
    cid = decode_channel_id(channel)
    core = a._core
    real_step = machine.step

    def step(state: Any, inp: Any, now: int, key: Any) -> Any:
        if key is core.identity and isinstance(inp, machine.ActionPay):
            if inp.payment_id == "boom":
                gates["boom in"].set()
                gates.wait("boom go")
                raise RuntimeError("injected: a bug in the machine")
            if inp.payment_id == "m4":
                gates["m4 in"].set()
                gates.wait("m4 go")
        return real_step(state, inp, now, key)

    monkeypatch.setattr(machine, "step", step)
    real_forget = core.forget_running

    def forget_running(channel_id: bytes) -> None:
        # The first thing Supervisor.failed does: hold the failing actor's thread here.
        if not gates["failed in"].is_set():
            gates["failed in"].set()
            gates.wait("failed go")
        real_forget(channel_id)

    monkeypatch.setattr(core, "forget_running", forget_running)
    futures: dict[str, Future[Any]] = {}

    def pay(pid: str, amount: int) -> None:
        futures[pid] = core.pay_future(cid, pid, amount, pid)

    payer = start_thread(lambda: pay("boom", 1))  # runs actor X on its thread
    gates.wait("boom in")
    pay("m1", 7)  # queued behind "boom" in X
    gates["boom go"].set()  # X fails; its on_failure drains [m1] and calls failed()
    gates.wait("failed in")
    other = start_thread(lambda: pay("m4", 3))  # finds X dead: starts X2, which takes m4
    gates.wait("m4 in")
    assert len(live_actors(a, cid)) == 1
    gates["failed go"].set()  # X's hand-over: m1 goes to X2, behind m4
    joined(payer)
    # failed() returned: still one owner, and it is the one the supervisor knows.
    live = live_actors(a, cid)
    assert len(live) == 1, f"{len(live)} live actors own the channel"
    assert core.supervisor._live[cid][0] is live[0].actor_ref
    gates["m4 go"].set()
    joined(other)

    with pytest.raises(InternalError):
        futures["boom"].result(WAIT)
    assert result_of(futures["m1"].result(WAIT)) == ["served", "m1", 7]
    assert result_of(futures["m4"].result(WAIT)) == ["served", "m4", 3]
    assert sorted(served.ids()) == ["m1", "m4"]  # each paid exactly once
    check_agreement(a, b, channel, 10)
    assert len(live_actors(a, cid)) == 1


# ---- r2: effects of one channel leave in order ----------------------------------------------


def test_a_step_waiting_for_nothing_is_not_emitted_before_an_earlier_steps_effects(
        pair, channel, gates, monkeypatch):
    """A pays from an event loop, so the writer thread completes the pay's commit and emits
    its effects. Its commit future is done while those effects are still being emitted; a
    message sent meanwhile (a step with nothing to commit) must wait for them, not go out
    first on the caller's thread."""
    a, _ = pair
    cid = decode_channel_id(channel)
    core = a._core
    sends: list[str] = []
    real_after_commit = core.after_commit

    def after_commit(channel_id: bytes, state: Any, effects: list[Any]) -> None:
        kinds = [type(e.msg).__name__ for e in effects if isinstance(e, machine.Send)]
        if channel_id == cid and "Pay" in kinds and not gates["pay emitting"].is_set():
            gates["pay emitting"].set()  # the commit future is done, its callbacks running
            gates.wait("pay go")
        sends.extend(kinds)
        real_after_commit(channel_id, state, effects)

    monkeypatch.setattr(core, "after_commit", after_commit)

    async def pay_on_a_loop() -> Future[Any]:
        # On an event loop the actor does not write its commit: the writer thread does.
        return core.pay_future(cid, "p-1", 5, "the payment")

    paid = asyncio.run(pay_on_a_loop())
    gates.wait("pay emitting")
    answered: Future[Any] = Future()
    core.tell(cid, machine.ActionMessage("sent after the payment"), answered)
    # The actor handled the message on this thread; it has nothing to commit, but it must
    # not be emitted (nor answered) before the pay's effects.
    assert "Message" not in sends, sends
    assert not answered.done()
    gates["pay go"].set()
    answered.result(WAIT)
    assert result_of(paid.result(WAIT)) == ["served", "the payment", 5]
    assert "Pay" in sends and "Message" in sends, sends
    assert sends.index("Pay") < sends.index("Message"), sends


# ---- r3: a quick handler telling its own channel while its actor stops ----------------------


class GatedQueue:
    """Stands in for a writer's queue: the writer thread's blocking `get` waits for `gate`,
    so while it is closed every batch is written by a helping caller (Writer.help), i.e. by
    the thread running the channel actor. Everything else is the real queue."""

    def __init__(self, real: queue.SimpleQueue[Any], writer_thread: threading.Thread) -> None:
        self._real = real
        self._writer_thread = writer_thread
        self.gate = threading.Event()

    def get(self, *args: Any, **kwargs: Any) -> Any:
        if threading.current_thread() is self._writer_thread:
            self.gate.wait()
        return self._real.get(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@pytest.fixture
def park_writer(nodes: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Writer],
                                                                                   None]]:
    """`park(writer)`: from now on only helping callers write that writer's batches. The gate
    opens at teardown, before the nodes stop (stopping needs the writer thread)."""
    parked: list[GatedQueue] = []

    def park(w: Writer) -> None:
        gated = GatedQueue(w._queue, w._thread)
        monkeypatch.setattr(w, "_queue", gated)
        parked.append(gated)
        # The writer thread is blocked in the real queue's get: give it one request, after
        # which it asks the gated queue. Until a request is seen on the writer thread, again.
        for _ in range(100):
            if w.submit_fn(lambda txn, s: threading.current_thread()).result(WAIT) is w._thread:
                return
        raise AssertionError("the writer thread never took a request")

    yield park
    for gated in parked:
        gated.gate.set()


@pytest.fixture
def delayed_network() -> Iterator[LoopbackNetwork]:
    """A network of its own whose envelopes are delivered by its thread, never the sender's."""
    net = LoopbackNetwork(Faults(delay=0.0005, seed=1))
    yield net
    net.close()


def test_quick_handler_telling_its_stopping_channel_neither_waits_nor_doubles_the_actor(
        delayed_network, nodes, ledger, tmp_path: Path, gates, park_writer, monkeypatch,
        wait_until):
    """B's quick handler runs inside B's channel actor (the delivering thread wrote the
    commit and emits its effects). It tells its own channel, then another channel's start
    evicts this one (max_live_channels=1): the actor's stop is queued behind what it is
    running. The handler's result, told to the channel next, must queue behind that stop and
    go to the successor: waiting for the actor to stop would wait ~10 s for this very
    thread, then start a second actor while the first still has messages."""
    net = delayed_network
    a = nodes.add(paychan.Node(NodeCore(str(tmp_path / "a"), ledger.client, network=net)))
    b = nodes.add(paychan.Node(NodeCore(str(tmp_path / "b"), ledger.client, network=net,
                                        max_live_channels=1)))
    ledger.mint(a.address, 10 * DEPOSIT)
    ch = a.create_channel(b, DEPOSIT, dispute_period=60)
    wait_until(lambda: b.balances(ch)["deposited_by_peer"] == DEPOSIT, timeout=WAIT,
               what="B to see the funding")
    cid = decode_channel_id(ch)
    core = b._core
    other = bytes(32)  # an unknown channel: starting its actor evicts ch's
    inside = threading.local()
    seen: list[tuple[str, int]] = []  # (input handled by B's ch actor, live actors for ch)
    staged: dict[str, Any] = {}
    real_on_receive = ChannelActor.on_receive

    def on_receive(self: ChannelActor, message: Any) -> Any:
        if self.core is not core or self.channel_id != cid or not isinstance(message, Cmd):
            return real_on_receive(self, message)
        seen.append((type(message.inp).__name__, len(live_actors(b, cid))))
        was, inside.actor = getattr(inside, "actor", None), self
        try:
            return real_on_receive(self, message)
        finally:
            inside.actor = was

    monkeypatch.setattr(ChannelActor, "on_receive", on_receive)

    def handler(p: paychan.Payment) -> Any:
        if p.payment_id == "evicted" and not gates["armed"].is_set():
            gates["armed"].set()
            running = getattr(inside, "actor", None)
            staged["inside its actor"] = running is not None and running.channel_id == cid
            core.tell(cid, machine.ActionMessage("queued before the eviction"))
            evict = start_thread(lambda: core.supervisor.tell(other, Cmd(machine.ActionSync())))
            joined(evict)
            staged["evicted"] = cid not in core.supervisor._live
            staged["still running"] = running is not None and running.actor_ref.is_alive()
        return ["served", p.message, p.amount]

    b.on_payment_received(handler, quick=True)
    assert a.send_message_and_pay(ch, "warm-up", 1, timeout=WAIT) == ["served", "warm-up", 1]
    park_writer(core.store.writer)  # B's commits are now written by the actor's thread
    seen.clear()
    started = time.monotonic()
    reply = a.send_message_and_pay(ch, "evicted", 2, timeout=WAIT, payment_id="evicted")
    took = time.monotonic() - started
    assert reply == ["served", "evicted", 2]
    # The scenario happened as staged: the handler ran inside ch's actor, which it evicted.
    assert staged == {"inside its actor": True, "evicted": True, "still running": True}
    assert took < 3.0, f"the payment took {took:.1f} s"
    assert seen, "B's channel actor handled nothing"
    assert max(live for _, live in seen) == 1, seen
    assert [inp for inp, _ in seen].count("ActionHandlerDone") == 1, seen
    assert len(live_actors(b, cid)) == 1
    check_agreement(a, b, ch, 3)


# ---- r6: what a failed commit drags down goes to the successor ------------------------------


class Handled:
    """Records (node core, input type) for every command a channel actor handles."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.lock = threading.Lock()
        self.inputs: list[tuple[Any, str]] = []
        real = ChannelActor.on_receive

        def on_receive(actor: ChannelActor, message: Any) -> Any:
            if isinstance(message, Cmd):
                with self.lock:
                    self.inputs.append((actor.core, type(message.inp).__name__))
            return real(actor, message)

        monkeypatch.setattr(ChannelActor, "on_receive", on_receive)

    def count(self, node: paychan.Node, kind: str) -> int:
        with self.lock:
            return sum(1 for core, k in self.inputs if core is node._core and k == kind)


def test_ledger_event_refused_behind_a_failed_commit_reaches_the_successor(
        pair, channel, ledger, failing, hold_writer, wait_until):
    """A's pay commit will fail; B's deposit reaches A while that commit is pending, so A's
    actor decides the deposit on top of it and its commit is refused (ChainBroken). Nobody
    waits on a ledger event: it must go to the successor, or A never sees the deposit."""
    a, b = pair
    ledger.mint(b.address, DEPOSIT)
    cid = decode_channel_id(channel)
    core = a._core
    restarts = core.supervisor.restarts
    held = hold_writer(a)
    failing.arm(a)
    doomed = core.pay_future(cid, "p-fails", 7, "x")
    b.deposit(channel, 200, wait=False)

    def decided() -> bool:
        record = load_record(core, cid, latest=True)
        return record is not None and record[0].deposit_peer == 200

    wait_until(decided, timeout=WAIT, what="A's actor to decide B's deposit (pending)")
    assert a.balances(channel)["deposited_by_peer"] == 0  # not durable yet
    held.let_go()
    with pytest.raises(StorageError):
        doomed.result(WAIT)
    assert len(failing.failed) == 1
    wait_until(lambda: a.balances(channel)["deposited_by_peer"] == 200, timeout=WAIT,
               what="A to see B's deposit after the failed commit")
    assert core.supervisor.restarts == restarts + 1
    # The channel goes on, and both sides agree.
    assert a.send_message_and_pay(channel, "after", 3, timeout=WAIT) == ["served", "after", 3]
    check_agreement(a, b, channel, 3, deposit_b=200)


def test_peer_message_waiting_on_a_failed_commit_reaches_the_successor(
        pair, channel, failing, hold_writer, monkeypatch, wait_until):
    """B's message reaches A while A's pay commit (which will fail) is pending: A's actor has
    nothing to commit for it, so it waits for that commit before emitting its event. When
    the commit fails, the message must go to the successor, not vanish with it."""
    a, b = pair
    cid = decode_channel_id(channel)
    core = a._core
    handled = Handled(monkeypatch)
    heard: list[Any] = []
    a.on("message", lambda event: heard.append(event["body"]))
    held = hold_writer(a)
    failing.arm(a)
    doomed = core.pay_future(cid, "p-fails", 7, "x")
    b.send_message(channel, "hello A")
    wait_until(lambda: handled.count(a, "ReceiveMessage") == 1, timeout=WAIT,
               what="A's actor to handle B's message")
    assert heard == []  # waits for the pending commit
    held.let_go()
    with pytest.raises(StorageError):
        doomed.result(WAIT)
    wait_until(lambda: heard == ["hello A"], timeout=WAIT,
               what="A to hear B's message after the failed commit")
    assert a.send_message_and_pay(channel, "after", 3, timeout=WAIT) == ["served", "after", 3]
    assert heard == ["hello A"]  # once
    check_agreement(a, b, channel, 3)


def test_pay_queued_behind_a_failed_one_is_paid_exactly_once(
        pair, channel, failing, hold_writer, wait_until):
    """Two payments in flight: the first commit fails, the second (built on it) is refused by
    the chain. The first caller hears of the failure; the second, refused only because of the
    first, is paid by the successor, once; the first, retried, is paid once too."""
    a, b = pair
    served = Served()
    b.on_payment_received(served)
    cid = decode_channel_id(channel)
    core = a._core
    held = hold_writer(a)
    failing.arm(a)
    first = core.pay_future(cid, "p-1", 5, "one")
    second = core.pay_future(cid, "p-2", 6, "two")
    assert not first.done() and not second.done()
    held.let_go()
    with pytest.raises(StorageError):
        first.result(WAIT)
    assert result_of(second.result(WAIT)) == ["served", "two", 6]
    assert len(failing.failed) == 1
    assert served.ids() == ["p-2"]
    check_agreement(a, b, channel, 6)
    assert a.send_message_and_pay(channel, "one", 5, timeout=WAIT, payment_id="p-1") == [
        "served", "one", 5]
    assert served.ids() == ["p-2", "p-1"]
    check_agreement(a, b, channel, 11)
    wait_until(lambda: len(live_actors(a, cid)) == 1, timeout=WAIT, what="one live actor")
