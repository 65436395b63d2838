"""In-process transport between nodes, with drop / delay / duplicate / reorder knobs for tests."""
from __future__ import annotations

import heapq
import itertools
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("paychan.loopback")

Deliver = Callable[[bytes], None]


@dataclass
class Faults:
    """Probabilities per envelope; `delay` is the most seconds an envelope may wait (reorders)."""

    drop: float = 0.0
    duplicate: float = 0.0
    delay: float = 0.0
    seed: int | None = None


class LoopbackNetwork:
    """Routes envelopes by recipient key on its own delivery thread, so senders never block."""

    def __init__(self, faults: Faults | None = None) -> None:
        self.faults = faults or Faults()
        self._rng = random.Random(self.faults.seed)
        self._nodes: dict[bytes, Deliver] = {}
        self._peer_back: dict[bytes, Callable[[bytes], None]] = {}
        self._queue: list[tuple[float, int, bytes, bytes]] = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._stopped = False
        self.delivered = 0
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="paychan-loopback", daemon=True)
        self._thread.start()

    def attach(self, address: bytes, deliver: Deliver,
               peer_back: Callable[[bytes], None] | None = None) -> None:
        """Join; every node already here hears (on its own thread) that `address` is back."""
        with self._cv:
            self._nodes[address] = deliver
            others = [cb for who, cb in self._peer_back.items() if who != address]
            if peer_back is not None:
                self._peer_back[address] = peer_back
        for cb in others:
            threading.Thread(target=cb, args=(address,), daemon=True,
                             name="paychan-loopback-peer-back").start()

    def detach(self, address: bytes) -> None:
        with self._cv:
            self._nodes.pop(address, None)
            self._peer_back.pop(address, None)

    def is_attached(self, address: bytes) -> bool:
        with self._cv:
            return address in self._nodes

    def set_faults(self, faults: Faults) -> None:
        with self._cv:
            self.faults = faults
            self._rng = random.Random(faults.seed)

    def send(self, recipient: bytes, envelope: bytes) -> None:
        f = self.faults
        if not (f.drop or f.duplicate or f.delay):
            # No faults to inject: hand over on the sender's thread (the recipient's node only
            # decodes and queues for an actor), sparing a thread switch per message.
            deliver = self._nodes.get(recipient)
            if deliver is None:
                self.dropped += 1
                return
            try:
                deliver(envelope)
                self.delivered += 1
            except Exception:
                log.exception("delivery failed")
            return
        with self._cv:
            f, rng = self.faults, self._rng
            if f.drop and rng.random() < f.drop:
                self.dropped += 1
                return
            copies = 2 if f.duplicate and rng.random() < f.duplicate else 1
            now = time.monotonic()
            for _ in range(copies):
                at = now + (rng.random() * f.delay if f.delay else 0.0)
                heapq.heappush(self._queue, (at, next(self._seq), recipient, envelope))
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stopped and (
                        not self._queue or self._queue[0][0] > time.monotonic()):
                    wait = self._queue[0][0] - time.monotonic() if self._queue else None
                    self._cv.wait(wait)
                if self._stopped:
                    return
                _, _, recipient, envelope = heapq.heappop(self._queue)
                deliver = self._nodes.get(recipient)
            if deliver is None:
                self.dropped += 1  # the peer is offline; sync on its return repairs this
                continue
            try:
                deliver(envelope)
                self.delivered += 1
            except Exception:
                log.exception("delivery failed")

    def close(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify()
        self._thread.join(timeout=5)


_default: LoopbackNetwork | None = None
_default_lock = threading.Lock()


def default_network() -> LoopbackNetwork:
    """The process-wide network that in-process nodes join unless given another."""
    global _default
    with _default_lock:
        if _default is None:
            _default = LoopbackNetwork()
        return _default
