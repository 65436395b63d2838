"""The watcher: submits the node's persisted ledger tasks and retries them until they land."""
from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from paychan.protocol.errors import PaychanError
from paychan.protocol.identity import encode_channel_id
from paychan.protocol.tx import make_tx
from paychan.storage.keys import pack, unpack
from paychan.storage.writer import Delete, Put

if TYPE_CHECKING:
    from paychan.actors.node import NodeCore

log = logging.getLogger("paychan.watcher")

TASKS = "tasks"
MAX_BACKOFF = 30.0


class Watcher:
    """One thread. Tasks come from channel actors' commits (write-ahead), so none is lost."""

    def __init__(self, core: NodeCore, poll: float = 0.5) -> None:
        self.core = core
        self.poll = poll
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._retry_at: dict[bytes, float] = {}
        self.landed = 0
        self._thread = threading.Thread(target=self._run, name="paychan-watcher", daemon=True)
        self._thread.start()

    def kick(self, *_: Any) -> None:
        self._wake.set()

    def pending(self) -> list[dict[str, Any]]:
        return [unpack(v) for _, v in self.core.store.iter_prefix(TASKS, b"")]

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.poll)
            self._wake.clear()
            if self._stop.is_set():
                return
            for key, raw in list(self.core.store.iter_prefix(TASKS, b"")):
                if self._stop.is_set():
                    return
                if self._retry_at.get(key, 0) > time.monotonic():
                    continue
                task = unpack(raw)
                try:
                    if self.core.ledger_now() < task["not_before"]:
                        continue
                    self._submit(key, task)
                except Exception as exc:  # the ledger may be away: back off and try again
                    tries = task.get("tries", 0) + 1
                    delay = min(MAX_BACKOFF, 0.1 * 2 ** min(tries, 9))
                    self._retry_at[key] = time.monotonic() + delay
                    log.warning("%s %s failed (try %d, next in %.1f s): %s",
                                encode_channel_id(task["channel_id"]), task["kind"], tries, delay,
                                exc)
                    try:
                        self.core.store.writer.commit([Put(TASKS, key, _repack(task, tries))])
                    except Exception:
                        log.exception("cannot record a task retry")

    def _submit(self, key: bytes, task: dict[str, Any]) -> None:
        cid = task["channel_id"]
        tx = make_tx(self.core.identity, task["kind"], task["body"], task["txid"])
        try:
            event = self.core.ledger.submit(tx.to_bytes())
        except PaychanError as exc:
            if not self._obsolete(task):
                raise
            log.info("%s %s no longer needed: %s", encode_channel_id(cid), task["kind"], exc)
        else:
            log.info("%s %s landed at height %s", encode_channel_id(cid), task["kind"],
                     event.get("height"))
            self.landed += 1
        self.core.store.writer.commit([Delete(TASKS, key)])
        self._retry_at.pop(key, None)

    def _obsolete(self, task: dict[str, Any]) -> bool:
        """A refused task whose moment has passed: the ledger moved on to a later period."""
        rec = self.core.ledger.channel(task["channel_id"])
        if task["kind"] == "create":
            return rec is not None
        return rec is not None and rec.period > task["period"]

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)


def _repack(task: dict[str, Any], tries: int) -> bytes:
    return pack({**task, "tries": tries})
