"""The supervisor: spawns channel actors on first use, restarts them from storage, bounds them."""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pykka

from paychan.actors.channel_actor import ChannelActor, Start, answer
from paychan.protocol.errors import NotAllowedAtState, PaychanError
from paychan.protocol.identity import encode_channel_id

if TYPE_CHECKING:
    from paychan.actors.node import NodeCore

log = logging.getLogger("paychan.supervisor")

MAX_FAILURES = 5
FAILURE_WINDOW = 10.0


class Quarantined(NotAllowedAtState):
    """The channel failed too often and is no longer run; its stored state is kept."""


class Supervisor:
    """Short on purpose: recovery lives in the actor's on_start (reload) and in the store."""

    def __init__(self, core: NodeCore, max_live: int = 256, idle_seconds: float = 30.0) -> None:
        self.core = core
        self.max_live = max_live
        self.idle_seconds = idle_seconds
        self._touch_every = min(1.0, idle_seconds / 4)
        self._live: OrderedDict[bytes, tuple[pykka.ActorRef[Any], float]] = OrderedDict()
        self._stopping: dict[bytes, pykka.ActorRef[Any]] = {}
        self._failures: dict[bytes, deque[float]] = {}
        self.quarantined: dict[bytes, str] = {}
        self.restarts = 0
        self.peak_live = 0
        self._lock = threading.RLock()
        self._closed = threading.Event()
        self._reaper = threading.Thread(target=self._reap, name="paychan-reaper", daemon=True)
        self._reaper.start()

    def live_count(self) -> int:
        with self._lock:
            return len(self._live)

    def tell(self, channel_id: bytes, message: Any) -> None:
        """Deliver to the channel's actor, spawning it from storage when it is not running."""
        for _ in range(3):
            ref = self._ref(channel_id)
            try:
                ref.tell(message)
                return
            except pykka.ActorDeadError:
                with self._lock:
                    if self._live.get(channel_id, (None,))[0] is ref:
                        del self._live[channel_id]
        raise NotAllowedAtState(f"channel {encode_channel_id(channel_id)} cannot be started")

    def start_new(self, channel_id: bytes, start: Start) -> None:
        self.tell(channel_id, start)

    def _ref(self, channel_id: bytes) -> pykka.ActorRef[Any]:
        # Fast path, once per message: a live actor, taken without the lock (a dict read is
        # atomic), its place in the idle order refreshed only now and then.
        entry = self._live.get(channel_id)
        if entry is not None and not self._closed.is_set() and entry[0].is_alive():
            if time.monotonic() - entry[1] < self._touch_every:
                return entry[0]
        with self._lock:
            return self._ref_locked(channel_id)

    def _ref_locked(self, channel_id: bytes) -> pykka.ActorRef[Any]:
        # Never two owners of one channel's state, and never a wait: an actor asked to stop
        # keeps taking messages (they queue behind its stop) and hands what it still holds to
        # its successor when it stops (handover); once stopped, a successor is started.
        if self._closed.is_set():
            raise NotAllowedAtState("the node is closed")
        if channel_id in self.quarantined:
            raise Quarantined(f"channel {encode_channel_id(channel_id)} is quarantined: "
                              f"{self.quarantined[channel_id]}")
        entry = self._live.get(channel_id)
        if entry is not None and entry[0].is_alive():
            self._live[channel_id] = (entry[0], time.monotonic())
            self._live.move_to_end(channel_id)
            return entry[0]
        old = self._stopping.get(channel_id)
        if old is not None:
            if old.is_alive():
                return old
            del self._stopping[channel_id]
        while len(self._live) >= self.max_live:
            victim, (vref, _) = self._live.popitem(last=False)
            self._stop(victim, vref)
        ref = ChannelActor.start(self.core, channel_id)
        self._live[channel_id] = (ref, time.monotonic())
        self.peak_live = max(self.peak_live, len(self._live))
        return ref

    def _stop(self, channel_id: bytes, ref: pykka.ActorRef[Any]) -> None:
        # stop() queues behind what the actor already holds, so nothing in its mailbox is lost.
        self._stopping[channel_id] = ref
        ref.stop(block=False)

    def handover(self, channel_id: bytes, ref: pykka.ActorRef[Any],
                 queued: Sequence[Any]) -> None:
        """Called by a stopping actor (`ref`) with the messages it still held: a successor
        rebuilt from storage takes them, in order, unless the channel is quarantined or the
        node is stopping, when their callers get the refusal."""
        refusal: PaychanError | None = None
        left = deque(queued)  # not yet delivered
        with self._lock:
            for table in (self._live, self._stopping):
                entry = table.get(channel_id)
                if entry is not None and (entry[0] if isinstance(entry, tuple) else entry) is ref:
                    del table[channel_id]  # only its own entry: a successor may be there
            deaths = 0
            while left and refusal is None:
                try:
                    if self._closed.is_set():
                        raise NotAllowedAtState("the node is stopping")
                    successor = self._ref_locked(channel_id)  # locked: nothing overtakes them
                    successor.tell(left[0])
                    left.popleft()
                except PaychanError as err:
                    refusal = err
                except pykka.ActorDeadError:
                    # The successor died on one of them (it ran inline): the ones it took are
                    # its own to answer; the rest go to the next one, a few times at most.
                    deaths += 1
                    if deaths > MAX_FAILURES:
                        refusal = NotAllowedAtState(f"channel {encode_channel_id(channel_id)} "
                                                    "cannot be restarted")
        if refusal is not None:
            for message in left:
                reply = getattr(message, "reply", None)
                if reply is not None:
                    answer(reply, refusal)

    def failed(self, channel_id: bytes, ref: pykka.ActorRef[Any], exc: Any,
               queued: Sequence[Any] = ()) -> None:
        """Called on the failing actor's thread (pykka on_failure) with the messages it still
        held; counts the failure (quarantine) and hands them over (see handover)."""
        now = time.monotonic()
        # A handler result the dead actor was committing is lost with it: let the call run
        # again when the payer resends it.
        self.core.forget_running(channel_id)
        with self._lock:
            times = self._failures.setdefault(channel_id, deque(maxlen=MAX_FAILURES))
            times.append(now)
            self.restarts += 1
            quarantine = len(times) >= MAX_FAILURES and now - times[0] <= FAILURE_WINDOW
            if quarantine:
                self.quarantined[channel_id] = repr(exc)
            self.handover(channel_id, ref, queued)
        cid = encode_channel_id(channel_id)
        if quarantine:
            log.error("%s quarantined after %d failures in %.0f s: %r", cid, MAX_FAILURES,
                      FAILURE_WINDOW, exc)
            self.core.emit_event("channel_quarantined", channel_id, {"error": repr(exc)})
        else:
            log.warning("%s failed (%r); it restarts from storage on its next message", cid, exc)

    def release(self, channel_id: bytes) -> None:
        """Lift a quarantine (after the cause was mended)."""
        with self._lock:
            self.quarantined.pop(channel_id, None)
            self._failures.pop(channel_id, None)

    def _reap(self) -> None:
        while not self._closed.wait(max(0.05, self.idle_seconds / 4)):
            cutoff = time.monotonic() - self.idle_seconds
            with self._lock:
                idle = [cid for cid, (_, used) in self._live.items() if used < cutoff]
                for cid in idle:
                    ref, _ = self._live.pop(cid)
                    self._stop(cid, ref)

    def stop_all(self) -> None:
        self._closed.set()
        with self._lock:
            refs = [ref for ref, _ in self._live.values()] + list(self._stopping.values())
            self._live.clear()
            self._stopping.clear()
        for ref in refs:
            try:
                ref.stop(block=True, timeout=10)
            except (pykka.ActorDeadError, pykka.Timeout):
                pass  # gone already, or stuck: reported below, the rest still stop
        alive = [ref for ref in refs if ref.is_alive()]
        if alive:
            log.warning("%d channel actors still alive after stop", len(alive))
