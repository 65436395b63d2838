"""pykka actors without a thread of their own: the thread that tells one a message runs it."""
from __future__ import annotations

import logging
import sys
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pykka
from pykka import messages

log = logging.getLogger("paychan.actors")

#: How deep one thread may run actors inside actors before it hands the next one to the pool.
MAX_DEPTH = 4
#: Messages one thread handles for one actor before it hands the rest to the pool, so that a
#: busy actor cannot hold its caller (e.g. a transport's event loop) for long.
BUDGET = 64

_local = threading.local()
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _handoff(fn: Any) -> None:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(2, thread_name_prefix="paychan-actors")
        pool = _pool
    pool.submit(fn)


class _Inbox:
    """An actor's mailbox. Whoever puts into it while nobody runs the actor runs it."""

    __slots__ = ("_lock", "_queue", "_running", "actor")

    def __init__(self) -> None:
        self._queue: deque[Any] = deque()
        self._lock = threading.Lock()
        self._running = False
        self.actor: InlineActor | None = None

    def put(self, envelope: Any) -> None:
        with self._lock:
            self._queue.append(envelope)
            if self._running:
                return  # the thread running the actor takes it
            self._running = True
        assert self.actor is not None
        self.actor._inline_run()

    def get(self) -> Any:
        """Only for the thread running the actor (e.g. to hand its messages to a successor)."""
        with self._lock:
            return self._queue.popleft()

    def empty(self) -> bool:
        return not self._queue

    def qsize(self) -> int:
        return len(self._queue)

    def claim(self) -> bool:
        """Become the thread running the actor, if nobody is."""
        with self._lock:
            if self._running:
                return False
            self._running = True
            return True

    def release(self) -> None:
        with self._lock:
            self._running = False

    def next(self) -> Any:
        """The next message, or None after giving the actor up (the queue was empty)."""
        with self._lock:
            if self._queue:
                return self._queue.popleft()
            self._running = False
            return None


class InlineActor(pykka.Actor):
    """A pykka actor run by the threads that talk to it, one at a time, in mailbox order.

    `tell` and `ask` run the actor on the caller's thread when nobody is running it, and
    only queue the message when another thread is; that thread handles it before letting go.
    So a message costs no thread switch, and thousands of actors cost no threads. Handlers
    must therefore never block: they may run on a transport's event loop. A thread nested
    MAX_DEPTH actors deep, or that handled BUDGET messages in a row for one actor, hands the
    rest to a small shared pool. pykka's contract holds: one message at a time, on_start
    first, on_failure and on_stop as with a threading actor.
    """

    actor_inbox: _Inbox

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.actor_inbox.actor = self

    @staticmethod
    def _create_actor_inbox() -> Any:
        return _Inbox()

    @staticmethod
    def _create_future() -> pykka.Future[Any]:
        return pykka.ThreadingFuture()

    def _start_actor_loop(self) -> None:
        # on_start runs on the starting thread before any message, which wait meanwhile.
        claimed = self.actor_inbox.claim()
        assert claimed, "a new actor has nobody running it"
        self._actor_loop_setup()
        self._inline_drain(BUDGET)

    def _inline_run(self) -> None:
        depth = getattr(_local, "depth", 0)
        if depth >= MAX_DEPTH:
            _handoff(lambda: self._inline_drain(BUDGET))
            return
        _local.depth = depth + 1
        try:
            self._inline_drain(BUDGET)
        finally:
            _local.depth = depth

    def _inline_drain(self, budget: int) -> None:
        inbox = self.actor_inbox
        try:
            for _ in range(budget):
                envelope = inbox.next()
                if envelope is None:
                    return
                if self.actor_stopped.is_set():
                    self._inline_dead_letter(envelope)
                else:
                    self._inline_handle(envelope)
            # Still holding the actor: the pool carries on with what is left.
            _handoff(lambda: self._inline_drain(BUDGET))
        except BaseException:
            # Never leave the actor marked as run by a thread that has left it (e.g. no pool
            # at interpreter exit): the next message runs it again.
            inbox.release()
            raise

    def _inline_handle(self, envelope: Any) -> None:
        # As pykka's own loop: an ask gets the exception, a tell's failure stops the actor.
        try:
            response = self._handle_receive(envelope.message)
            if envelope.reply_to is not None:
                envelope.reply_to.set(response)
        except Exception:
            if envelope.reply_to is not None:
                log.info("exception returned from %s to caller", self, exc_info=True)
                envelope.reply_to.set_exception()
            else:
                self._handle_failure(*sys.exc_info())
                try:
                    self.on_failure(*sys.exc_info())
                except Exception:
                    self._handle_failure(*sys.exc_info())
        except BaseException:
            # E.g. KeyboardInterrupt on the caller's thread: stop, answer what waits.
            self._stop()
            while not self.actor_inbox.empty():
                self._inline_dead_letter(self.actor_inbox.get())
            raise

    def _inline_dead_letter(self, envelope: Any) -> None:
        """A message for a stopped actor: a stop request is answered, an ask gets
        ActorDeadError; subclasses may pass told messages on (see on_dead_letter)."""
        if envelope.reply_to is not None:
            if isinstance(envelope.message, messages._ActorStop):
                envelope.reply_to.set(None)
            else:
                try:
                    raise pykka.ActorDeadError(f"{self} stopped before handling the message")
                except pykka.ActorDeadError:
                    envelope.reply_to.set_exception()
            return
        self.on_dead_letter(envelope.message)

    def on_dead_letter(self, message: Any) -> None:
        """A told message that arrived after the actor stopped; dropped unless overridden."""
        log.debug("%s is stopped; dropped %r", self, type(message).__name__)
