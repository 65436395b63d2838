"""The embedded ledger actor: the settlement contract over LMDB, a clock, and an event stream."""
from __future__ import annotations

import atexit
import logging
import shutil
import tempfile
import weakref
from collections.abc import Callable
from typing import Any

import pykka

from paychan.actors.clock import VirtualClock, WallClock
from paychan.protocol.contract import ChannelRecord
from paychan.storage.env import Store
from paychan.storage.ledger_store import LedgerStore

log = logging.getLogger("paychan.ledger")

Listener = Callable[[dict[str, Any]], None]


class LedgerActor(pykka.ThreadingActor):
    """Sole writer of the ledger tables. Never asks another actor, so asking it cannot deadlock."""

    # A program that forgets Ledger.close() must still exit: the interpreter does not wait for
    # this thread, and _close_all_at_exit stops the actor (closing its store) at exit instead.
    # Every transaction is durable before its caller hears of it, so nothing is lost.
    use_daemon_thread = True

    def __init__(self, data_dir: str, clock: WallClock | VirtualClock,
                 network_id: str = "paychan-dev") -> None:
        super().__init__()
        self.data_dir = data_dir
        self.clock = clock
        self.network_id = network_id
        self.listeners: dict[int, Listener] = {}
        self._next = 0

    def on_start(self) -> None:
        self.store = Store.open(self.data_dir)
        self.ledger = LedgerStore(self.store, self.network_id)
        log.info("ledger open at %s, height %d", self.data_dir, self.ledger.height())

    def on_stop(self) -> None:
        self.store.close()

    def now(self) -> int:
        return self.clock.now()

    def mint(self, address: bytes, amount: int, asset: str = "base") -> int:
        return self.ledger.mint(address, amount, asset)

    def balance(self, address: bytes, asset: str = "base") -> int:
        return self.ledger.balance(address, asset)

    def channel(self, channel_id: bytes) -> ChannelRecord | None:
        return self.ledger.channel(channel_id)

    def height(self) -> int:
        return self.ledger.height()

    def events_since(self, height: int, limit: int = 1000) -> list[dict[str, Any]]:
        return self.ledger.events_since(height, limit)

    def submit(self, tx_bytes: bytes) -> dict[str, Any]:
        event = self.ledger.submit(tx_bytes, self.clock.now())
        if not event.get("duplicate"):
            log.info("ledger height %d: %s on %s", event["height"], event["event"],
                     event["channel_id"].hex()[:12])
            for listener in list(self.listeners.values()):
                try:
                    listener(event)
                except Exception:  # a listener's fault must not undo a landed transaction
                    log.exception("ledger listener failed")
        return event

    def subscribe(self, listener: Listener) -> int:
        self._next += 1
        self.listeners[self._next] = listener
        return self._next

    def unsubscribe(self, token: int) -> None:
        self.listeners.pop(token, None)


class EmbeddedLedger:
    """A handle on an in-process ledger actor (what `paychan.Ledger.embedded` returns)."""

    def __init__(self, data_dir: str | None = None,
                 clock: WallClock | VirtualClock | None = None,
                 network_id: str = "paychan-dev") -> None:
        self._tmp = None
        if data_dir is None:
            self._tmp = tempfile.mkdtemp(prefix="paychan-ledger-")
            data_dir = self._tmp
        self.data_dir = data_dir
        self.clock = clock or WallClock()
        self.network_id = network_id
        self.ref = LedgerActor.start(data_dir, self.clock, network_id)
        self.proxy = self.ref.proxy()
        _open.add(self)

    def now(self) -> int:
        return int(self.clock.now())

    def advance(self, seconds: int) -> None:
        self.clock.advance(seconds)

    def mint(self, address: bytes, amount: int, asset: str = "base") -> int:
        return int(self.proxy.mint(address, amount, asset).get())

    def balance(self, address: bytes, asset: str = "base") -> int:
        return int(self.proxy.balance(address, asset).get())

    def channel(self, channel_id: bytes) -> ChannelRecord | None:
        rec: ChannelRecord | None = self.proxy.channel(channel_id).get()
        return rec

    def height(self) -> int:
        return int(self.proxy.height().get())

    def events_since(self, height: int, limit: int = 1000) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = self.proxy.events_since(height, limit).get()
        return events

    def submit(self, tx_bytes: bytes, timeout: float = 30.0) -> dict[str, Any]:
        event: dict[str, Any] = self.proxy.submit(tx_bytes).get(timeout=timeout)
        return event

    def subscribe(self, listener: Listener) -> int:
        return int(self.proxy.subscribe(listener).get())

    def unsubscribe(self, token: int) -> None:
        if self.ref.is_alive():
            self.proxy.unsubscribe(token).get()

    def on_tick(self, callback: Callable[[int], None]) -> None:
        """Hear virtual-clock moves (the watcher wakes on them); the wall clock needs polling."""
        if isinstance(self.clock, VirtualClock):
            self.clock.listen(callback)

    def close(self) -> None:
        _open.discard(self)
        if self.ref.is_alive():
            self.ref.stop()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


# Embedded ledgers not closed yet, closed at interpreter exit (their temporary folder too).
_open: weakref.WeakSet[EmbeddedLedger] = weakref.WeakSet()


@atexit.register
def _close_all_at_exit() -> None:
    for ledger in list(_open):
        try:
            ledger.close()
        except Exception:
            log.exception("embedded ledger failed to close at exit")
