"""Live channel actors stay under `max_live_channels` while thousands of channels are used:
the supervisor stops the least recently used ones and restarts them from storage on demand."""
from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from paychan.protocol.identity import decode_channel_id

CAP = 64
CHANNELS = 5_000
PEERS = 4
WORKERS = 8  # enough to fill the group commit; more only adds thread switching on 2 cores


def test_thousands_of_channels_with_a_bounded_number_of_live_actors(nodes, ledger):
    a = nodes.open("a", max_live_channels=CAP)
    peers = [nodes.open(f"peer{i}", max_live_channels=CAP) for i in range(PEERS)]
    for peer in peers:
        peer.on_payment_received(lambda p: p.amount)
    ledger.mint(a.address, 2 * CHANNELS + 1_000)

    def open_and_pay(i: int) -> str:
        ch = a.create_channel(peers[i % PEERS], 2, dispute_period=60)
        assert a.send_message_and_pay(ch, i, 1) == 1
        return ch

    started = time.monotonic()
    with ThreadPoolExecutor(WORKERS) as pool:
        channels = list(pool.map(open_and_pay, range(CHANNELS)))
    elapsed = time.monotonic() - started
    print(f"\n{CHANNELS} channels opened and paid in {elapsed:.1f} s "
          f"({CHANNELS / elapsed:.0f}/s)")

    for node in (a, *peers):
        assert node._core.supervisor.peak_live <= CAP
        assert node._core.supervisor.live_count() <= CAP
    # Channel actors have no threads of their own; the cap bounds the actors kept in memory.
    assert threading.active_count() < (1 + PEERS) * CAP + 150
    assert len(set(channels)) == CHANNELS
    assert sorted(a.channels()) == sorted(channels)
    assert [len(p.channels()) for p in peers] == [CHANNELS // PEERS] * PEERS
    for ch in channels:  # every channel's state is stored, evicted or not
        s = a._core.state(decode_channel_id(ch))
        assert (s.my_sent, s.deposit_me, s.outgoing) == (1, 2, ())

    # A random sample, mostly evicted by now, still answers on both sides.
    rng = random.Random(5)
    sample = rng.sample(range(CHANNELS), 100)
    for i in sample:
        ch, peer = channels[i], peers[i % PEERS]
        assert a.balances(ch)["sent_by_me"] == 1
        assert peer.balances(ch)["sent_by_peer"] == 1
        assert a.send_message_and_pay(ch, "again", 1) == 1
        assert a.balances(ch)["sent_by_me"] == 2 and a.balances(ch)["my_balance"] == 0
    for node in (a, *peers):
        assert node._core.supervisor.peak_live <= CAP
    for i in sample[:10]:
        assert peers[i % PEERS].balances(channels[i])["sent_by_peer"] == 2


def test_idle_channel_actors_are_stopped_and_restart_from_storage(nodes, ledger, wait_until):
    a = nodes.open("a", max_live_channels=8, idle_seconds=0.2)
    b = nodes.open("b", max_live_channels=8, idle_seconds=0.2)
    b.on_payment_received(lambda p: ["served", p.message])
    ledger.mint(a.address, 1_000)
    channels = [a.create_channel(b, 10, dispute_period=60) for _ in range(20)]
    for i, ch in enumerate(channels):
        assert a.send_message_and_pay(ch, i, 1) == ["served", i]
    wait_until(lambda: a._core.supervisor.live_count() == 0
               and b._core.supervisor.live_count() == 0, what="idle actors to be stopped")
    for i, ch in enumerate(channels):
        assert a.send_message_and_pay(ch, i, 2) == ["served", i]
        assert a.balances(ch)["sent_by_me"] == 3
    wait_until(lambda: all(b.balances(ch)["sent_by_peer"] == 3 for ch in channels),
               what="B to hold every second voucher")
    assert a._core.supervisor.peak_live <= 8 and b._core.supervisor.peak_live <= 8
    assert a._core.supervisor.restarts == b._core.supervisor.restarts == 0  # stops, not failures
