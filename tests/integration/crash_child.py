"""The program the crash tests kill: one embedded ledger and two nodes in one process.

    python crash_child.py DIR MODE [RUN]  (RUN: the storm's run number or where cheat dies)

DIR holds everything that must survive a SIGKILL: the ledger (DIR/ledger), the nodes (DIR/a,
DIR/b), the channel made at setup (DIR/setup.json) and the virtual clock (DIR/clock). Modes:

- storm RUN  set up a channel funded by both sides (first run only), print READY, then pay in
             both directions from several threads with payment ids `<payer>-<RUN>-<thread>-<i>`,
             printing `ACK <payer> <payment_id> <amount>` once each payment is answered.
- verify     sync, wait until both sides agree, retry every payment id of DIR/acked.json, then
             those of DIR/cut.json (in flight at a kill), and print one JSON line: both
             nodes' balances and what the retries returned.
- close      agree, print CLOSING, close mutually (each message takes CLOSE_HOP seconds on the
             loopback network, so that a kill lands inside the close), print one JSON line:
             the ledger's payouts.
- cheat      make sure the period is funded and used both ways, then let b submit a stale solo
             close (it declares it sent nothing), and SIGKILL the process itself: with RUN
             "landed" from the ledger's first listener, before either node hears of the close;
             "returned" right after the submit returns; "task" once the victim has persisted
             its fraud proof task (its watcher is stopped, so the task never left).
- dispute    reopen with one second of the dispute window left and wait for the watcher's
             fraud proof; print one JSON line: the ledger's status and the victim's pending
             ledger tasks at reopening, and the payouts.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from typing import Any

import paychan
from paychan.actors.loopback import default_network
from paychan.protocol.errors import PaychanError
from paychan.protocol.identity import decode_channel_id
from paychan.protocol.tx import make_tx
from paychan.storage.env import Store
from paychan.storage.keys import unpack

DEPOSIT_A = 40_000
DEPOSIT_B = 30_000
DISPUTE_PERIOD = 60
SALT = b"paychan crash test channel salt!"
THREADS_PER_PAYER = 2
MAX_AMOUNT = 5
START_TIME = 1_700_000_000
CLOSE_HOP = 0.3  # seconds each message takes during the close

_out = threading.Lock()


def amount_of(thread: int, i: int) -> int:
    """What the storm's i-th payment of a payer's thread pays: 1..MAX_AMOUNT."""
    return 1 + (i * 7 + thread) % MAX_AMOUNT


def say(line: str) -> None:
    with _out:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def write_json(path: str, obj: Any) -> None:
    """Atomically: a kill leaves either the old file or the new one."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


class World:
    """The ledger and both nodes of DIR, opened in dependency order, stopped in reverse."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.clock_file = os.path.join(root, "clock")
        start = read_json(self.clock_file) if os.path.exists(self.clock_file) else START_TIME
        self.ledger = paychan.Ledger.embedded(os.path.join(root, "ledger"),
                                              paychan.VirtualClock(start))

    def open_nodes(self) -> None:
        self.a = paychan.Node.open(os.path.join(self.root, "a"), ledger=self.ledger)
        self.b = paychan.Node.open(os.path.join(self.root, "b"), ledger=self.ledger)
        self.a.on_payment_received(lambda p: ["a", p.message])
        self.b.on_payment_received(lambda p: ["b", p.message])
        self.nodes = {"a": self.a, "b": self.b}

    def advance(self, seconds: int) -> None:
        self.ledger.advance(seconds)
        write_json(self.clock_file, self.ledger.now())

    def stop(self) -> None:
        self.a.stop()
        self.b.stop()
        self.ledger.close()

    # -- the channel -------------------------------------------------------------------------
    def setup(self) -> str:
        path = os.path.join(self.root, "setup.json")
        if os.path.exists(path):
            ch: str = read_json(path)["channel"]
            return ch
        self.ledger.mint(self.a.address, DEPOSIT_A)
        self.ledger.mint(self.b.address, DEPOSIT_B)
        ch = self.a.create_channel(self.b, DEPOSIT_A, dispute_period=DISPUTE_PERIOD, salt=SALT)
        self.b.deposit(ch, DEPOSIT_B)
        self.wait(lambda: self.a.balances(ch)["deposited_by_peer"] == DEPOSIT_B,
                  "a sees b's deposit")
        write_json(path, {"channel": ch, "a": self.a.address, "b": self.b.address,
                          "deposit_a": DEPOSIT_A, "deposit_b": DEPOSIT_B})
        return ch

    def wait(self, predicate: Any, what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting until {what}")
            time.sleep(0.02)

    def caught_up(self, ch: str) -> None:
        """Each node's state is in the ledger's period (a restart replays missed events)."""
        cid = decode_channel_id(ch)
        rec = self.ledger.client.channel(cid)
        assert rec is not None
        for name, node in self.nodes.items():
            self.wait(lambda n=node: n._core.state(cid).period == rec.period,
                      f"{name} reaches period {rec.period}")

    def agree(self, ch: str, timeout: float = 30.0) -> int:
        """Sync until nothing is in flight and each side holds the other's latest voucher.
        Returns how many sync rounds it took."""
        cid = decode_channel_id(ch)
        a, b = self.a, self.b

        def agreed() -> bool:
            sa, sb = a._core.state(cid), b._core.state(cid)
            return (not sa.outgoing and not sb.outgoing and not sa.serving and not sb.serving
                    and sa.my_sent == sb.peer_sent and sb.my_sent == sa.peer_sent)

        rounds = 0
        deadline = time.monotonic() + timeout
        while True:
            rounds += 1
            a.sync(ch)
            b.sync(ch)
            round_ends = time.monotonic() + 3.0
            while time.monotonic() < round_ends:
                if agreed():
                    return rounds
                time.sleep(0.02)
            if time.monotonic() > deadline:
                raise TimeoutError(f"the nodes do not agree: {a.balances(ch)} / {b.balances(ch)}")


# -- modes -------------------------------------------------------------------------------------

def storm(world: World, run: int) -> None:
    world.open_nodes()
    ch = world.setup()
    say(f"READY {ch}")
    peer_of = {"a": "b", "b": "a"}

    def payer(name: str, thread: int) -> None:
        node = world.nodes[name]
        i = 0
        while True:
            pid = f"{name}-{run}-{thread}-{i}"
            amount = amount_of(thread, i)
            try:
                reply = node.send_message_and_pay(ch, pid, amount, payment_id=pid, timeout=20)
            except PaychanError as exc:
                say(f"ERR {name} {pid} {type(exc).__name__}: {exc}")
                time.sleep(0.05)
                continue  # the same id again: never pays twice
            if reply != [peer_of[name], pid]:
                say(f"BADREPLY {name} {pid} {reply!r}")
            say(f"ACK {name} {pid} {amount}")
            i += 1

    for name in ("a", "b"):
        for t in range(THREADS_PER_PAYER):
            threading.Thread(target=payer, args=(name, t), daemon=True).start()
    while True:  # until killed
        time.sleep(1)


def verify(world: World) -> None:
    world.open_nodes()
    ch = read_json(os.path.join(world.root, "setup.json"))["channel"]
    world.caught_up(ch)
    rounds = world.agree(ch)
    before = {n: node.balances(ch) for n, node in world.nodes.items()}
    acked = read_json(os.path.join(world.root, "acked.json"))
    wrong, retried = [], 0
    for payer, pid, amount in acked:
        node = world.nodes[payer]
        peer = "b" if payer == "a" else "a"
        reply = node.send_message_and_pay(ch, pid, amount, payment_id=pid, timeout=20)
        retried += 1
        if reply != [peer, pid]:
            wrong.append([payer, pid, reply])
    after = {n: node.balances(ch) for n, node in world.nodes.items()}
    # The payments a kill cut short: a retry finishes them (or makes them, if their voucher
    # never became durable), and the reply must be the handler's like any other.
    cut = read_json(os.path.join(world.root, "cut.json"))
    wrong_cut = []
    for payer, pid, amount in cut:
        peer = "b" if payer == "a" else "a"
        reply = world.nodes[payer].send_message_and_pay(ch, pid, amount, payment_id=pid,
                                                        timeout=20)
        if reply != [peer, pid]:
            wrong_cut.append([payer, pid, reply])
    say(json.dumps({"sync_rounds": rounds, "balances": before, "after_retries": after,
                    "retried": retried, "wrong_replies": wrong[:20], "cut": len(cut),
                    "wrong_cut_replies": wrong_cut[:20], "wrong_cut": len(wrong_cut),
                    "final": {n: node.balances(ch) for n, node in world.nodes.items()}}))
    world.stop()


def close(world: World) -> None:
    world.open_nodes()
    setup = read_json(os.path.join(world.root, "setup.json"))
    ch = setup["channel"]
    cid = decode_channel_id(ch)
    world.caught_up(ch)
    state = world.a._core.state(cid)
    say(f"RESUME {state.phase.value} {state.period} mutual={state.mutual is not None}")
    expect_file = os.path.join(world.root, "close_expect.json")
    if state.period == 1:
        world.agree(ch)
        bal = world.a.balances(ch)
        ledger_before = {n: world.ledger.balance(node.address) for n, node in world.nodes.items()}
        if not os.path.exists(expect_file):
            write_json(expect_file, {"a": bal["my_balance"], "b": bal["peer_balance"],
                                     "ledger_before": ledger_before, "first": bal})
        # A slow network: each message of the close takes CLOSE_HOP seconds, so the parent
        # can aim its kill before or after the peer has the proposal.
        net = default_network()
        send = net.send
        net.send = lambda peer, envelope: threading.Timer(CLOSE_HOP, send,
                                                          (peer, envelope)).start()
        say("CLOSING")
        world.a.close(ch, mutual=True, wait=True, mutual_timeout=20)
        net.send = send
    world.caught_up(ch)
    expect = read_json(expect_file)
    events = world.ledger.client.events_since(0)
    closes = [e for e in events if e["channel_id"] == cid and e["event"] == "close_mutual"]
    payouts = {("a" if bytes(w) == world.a._core.identity.public else "b"): int(x)
               for w, x in closes[0]["payouts"]} if closes else {}
    ledger_after = {n: world.ledger.balance(node.address) for n, node in world.nodes.items()}
    say(json.dumps({"expect": expect, "ledger_after": ledger_after, "payouts": payouts,
                    "close_mutual_events": len(closes),
                    "state": {n: node.balances(ch) for n, node in world.nodes.items()}}))
    world.stop()


def cheat(world: World, kill_at: str) -> None:
    if kill_at == "landed":
        def die_when_landed(event: dict[str, Any]) -> None:
            if event["event"] == "close_solo":
                os.kill(os.getpid(), signal.SIGKILL)
        # Subscribed before the nodes: the ledger calls it first, so neither node hears.
        world.ledger.client.subscribe(die_when_landed)
    world.open_nodes()
    ch = read_json(os.path.join(world.root, "setup.json"))["channel"]
    cid = decode_channel_id(ch)
    world.caught_up(ch)
    a, b = world.a, world.b
    period = a.balances(ch)["period"]
    if a.balances(ch)["deposited_by_me"] == 0:  # a settled period: fund the next one
        world.ledger.mint(a.address, DEPOSIT_A)
        world.ledger.mint(b.address, DEPOSIT_B)
        a.deposit(ch, DEPOSIT_A)
        b.deposit(ch, DEPOSIT_B)
        world.wait(lambda: a.balances(ch)["deposited_by_peer"] == DEPOSIT_B
                   and b.balances(ch)["deposited_by_peer"] == DEPOSIT_A, "both deposits seen")
    for i in range(5):
        a.send_message_and_pay(ch, "x", 3, payment_id=f"a-cheat{period}-{i}")
        b.send_message_and_pay(ch, "y", 2, payment_id=f"b-cheat{period}-{i}")
    world.agree(ch)
    sa, sb = a._core.state(cid), b._core.state(cid)
    write_json(os.path.join(world.root, f"cheat{period}.json"), {
        "period": period, "deposit_a": sa.deposit_me, "deposit_b": sa.deposit_peer,
        "b_sent": sb.my_sent, "ledger_before": {n: world.ledger.balance(node.address)
                                                for n, node in world.nodes.items()}})
    tx = make_tx(b._core.identity, "close_solo", {
        "channel_id": cid, "period": period, "declared_sent_self": 0,
        "peer_voucher": sb.peer_voucher.to_obj() if sb.peer_voucher else None,
    }, os.urandom(16))
    if kill_at == "task":
        a._core.watcher.stop()  # the victim decides, but its watcher never gets to submit
    say("CHEATING")
    world.ledger.client.submit(tx.to_bytes())
    if kill_at == "task":
        world.wait(lambda: any(t["kind"] == "fraud_proof" for t in a._core.watcher.pending()),
                   "the victim has a fraud proof to submit")
    os.kill(os.getpid(), signal.SIGKILL)


def dispute(world: World) -> None:
    ch = read_json(os.path.join(world.root, "setup.json"))["channel"]
    cid = decode_channel_id(ch)
    rec = world.ledger.client.channel(cid)
    assert rec is not None
    status_at_reopen = rec.status.value
    period = rec.period if rec.close is not None else rec.period - 1
    window_ends = None if rec.close is None else rec.close.started_at + rec.params.dispute_period
    victim = Store.open(os.path.join(world.root, "a"))
    victim_tasks = sorted(unpack(raw)["kind"] for _, raw in victim.iter_prefix("tasks", b""))
    victim.close()
    if window_ends is not None:  # reopen with one second of the window left
        world.advance(window_ends - 1 - world.ledger.now())
    now = world.ledger.now()
    world.open_nodes()
    world.wait(lambda: (world.ledger.client.channel(cid).period > period), "the period settles")
    world.caught_up(ch)
    events = [e for e in world.ledger.client.events_since(0)
              if e["channel_id"] == cid and e["record"][1] == period + 1
              and e["event"] in ("fraud_proof", "confirm", "close_mutual")]
    settled = events[0] if events else {}
    settled_by_a = bytes(settled.get("sender", b"")) == world.a._core.identity.public
    info = read_json(os.path.join(world.root, f"cheat{period}.json"))
    ledger_after = {n: world.ledger.balance(node.address) for n, node in world.nodes.items()}
    say(json.dumps({"period": period, "status_at_reopen": status_at_reopen,
                    "victim_tasks_at_reopen": victim_tasks, "now": now,
                    "window_ends": window_ends, "settled_by": settled.get("event"),
                    "settled_by_a": settled_by_a,
                    "cheat": info, "ledger_after": ledger_after}))
    world.stop()


def main() -> None:
    root, mode = sys.argv[1], sys.argv[2]
    os.makedirs(root, exist_ok=True)
    world = World(root)
    if mode == "storm":
        storm(world, int(sys.argv[3]))
    elif mode == "verify":
        verify(world)
    elif mode == "close":
        close(world)
    elif mode == "cheat":
        cheat(world, sys.argv[3])
    elif mode == "dispute":
        dispute(world)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
