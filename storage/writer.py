"""The group-commit writer: one thread per store turns many requests into one durable commit."""
from __future__ import annotations

import asyncio
import atexit
import logging
import queue
import threading
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import lmdb

from paychan.storage.env import DB_NAMES, last_under, store_full
from paychan.storage.errors import ChainBroken, StorageError, StoreClosed
from paychan.storage.future import LightFuture
from paychan.storage.keys import U64_MAX, from_u64, u64

if TYPE_CHECKING:
    from paychan.storage.env import Store

__all__ = ["Append", "Chain", "Delete", "Op", "Put", "Writer", "append", "apply"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_DB_NAMES = frozenset(DB_NAMES)


@dataclass(frozen=True, slots=True)
class Put:
    """Set `key` in database `db` to `value` (overwriting)."""

    db: str
    key: bytes
    value: bytes


@dataclass(frozen=True, slots=True)
class Delete:
    """Remove `key` from database `db`; removing an absent key is not an error."""

    db: str
    key: bytes


@dataclass(frozen=True, slots=True)
class Append:
    """Store `value` at `prefix + u64(n)` where n is one more than the last n under `prefix`."""

    db: str
    prefix: bytes
    value: bytes


Op = Put | Delete | Append
_KEYED = (Put, Delete)  # a tuple: `Put | Delete` would build a union on every call


def append(txn: lmdb.Transaction, store: Store, db: str, prefix: bytes, value: bytes) -> int:
    """Append `value` under `prefix` inside `txn`; returns its sequence number (first is 1).

    Every key under `prefix` must be `prefix + u64(n)`; anything longer means two
    prefixes overlap, which would corrupt the sequence, so it is refused.
    """
    handle = store.db(db)
    with txn.cursor(db=handle) as cur:
        last = last_under(cur, prefix)
    if last is None:
        seq = 1
    else:
        key = last[0]
        if len(key) != len(prefix) + 8:
            raise StorageError(
                f"cannot append under {prefix.hex()!r} in {db!r}: key {key.hex()} is not "
                "prefix + u64; another prefix overlaps this one")
        seq = from_u64(key[len(prefix):]) + 1
        if seq > U64_MAX:
            raise StorageError(f"sequence under {prefix.hex()!r} in {db!r} is exhausted")
    txn.put(prefix + u64(seq), value, db=handle)
    return seq


def apply(txn: lmdb.Transaction, store: Store, ops: Sequence[Op]) -> list[int]:
    """Apply `ops` in order inside `txn`; returns the sequence numbers Appends allocated."""
    seqs: list[int] = []
    for op in ops:
        if type(op) is Put or isinstance(op, Put):  # the common case without the MRO walk
            txn.put(op.key, op.value, db=store.db(op.db))
        elif isinstance(op, Delete):
            txn.delete(op.key, db=store.db(op.db))
        else:
            seqs.append(append(txn, store, op.db, op.prefix, op.value))
    return seqs


class Chain:
    """Requests that land in the order submitted, or not at all once one of them failed.

    A channel actor goes on with its next message before its last commit is durable; its
    requests form a chain so that a later one never lands without an earlier one (it would
    carry a state built on writes that were lost). Until a chain's request is written, what it
    puts is visible through `Writer.pending` (and `Store.get_latest`)."""

    __slots__ = ("broken", "broken_at", "name")

    def __init__(self, name: str = "") -> None:
        self.name = name
        self.broken: BaseException | None = None
        # The request that failed first: those before it may still land (same batch).
        self.broken_at = 0


def _break(req: _Request, error: BaseException) -> None:
    chain = req.chain
    if chain is None:
        return
    if chain.broken is None:
        chain.broken = error
        chain.broken_at = req.seq  # 0 (a request without puts): nothing pending is kept
    elif req.seq < chain.broken_at:
        chain.broken_at = req.seq  # an earlier one failed too (retried alone after a batch)


class _Request:
    __slots__ = ("chain", "error", "fn", "future", "ops", "result", "seq")

    def __init__(self, ops: tuple[Op, ...] | None, fn: Callable[..., Any] | None,
                 chain: Chain | None = None) -> None:
        self.ops = ops
        self.fn = fn
        self.chain = chain
        self.seq = 0
        self.future: Future[Any] = LightFuture()
        self.result: Any = None
        self.error: BaseException | None = None


# Which threads are completing a batch's futures right now (of any writer): their callbacks
# must not start writing another batch themselves (see Writer.help).
_completing = threading.local()


# Writers still running at interpreter exit are drained, so nothing already queued is lost
# when a program forgets to close its store.
_live: weakref.WeakSet[Writer] = weakref.WeakSet()


@atexit.register
def _drain_all_at_exit() -> None:
    for writer in list(_live):
        try:
            writer.stop()
        except Exception:
            log.exception("storage writer failed to drain at exit")


class Writer:
    """The only code that writes to a store: one thread, one write transaction per batch.

    The thread takes every request waiting in its queue, runs each in a nested transaction
    (so a failing request rolls back alone), commits the batch once with fsync, and only
    then completes all of its futures. A completed future therefore means durable data.

    Futures are completed on the thread that wrote their batch: the writer thread, a caller
    that helped (`help`, `commit`), or an event loop allowed to write (`write_on`). Their
    callbacks must be quick and must not block on the writer (use `submit`, never `commit`,
    from a callback).
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        self._max_key = store.env.max_key_size()
        self._queue: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        # The writer thread sleeps on the bell, not on the queue: a request submitted from an
        # event loop that writes its own requests (see `submit`) is queued in order without
        # waking it.
        self._bell: queue.SimpleQueue[None] = queue.SimpleQueue()
        self._inline_loops: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
        # Weak: a loop closed before its turn ended must not be kept (nor block a later one).
        self._flushing_on: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()  # one batch at a time, by whichever thread
        self._writing: threading.Thread | None = None
        self._stopped = False
        self._batches = 0
        self._requests = 0
        self._seq = 0
        # (db, key) -> [(seq, chain, value or None for a delete)], oldest first: what chained
        # requests put that is not written yet.
        self._pending: dict[tuple[str, bytes], list[tuple[int, Chain, bytes | None]]] = {}
        self._thread = threading.Thread(
            target=self._run, name=f"paychan-storage-writer:{store.path}", daemon=True)
        self._thread.start()
        _live.add(self)

    # ---- requests -----------------------------------------------------------------------

    def submit(self, ops: Sequence[Op], chain: Chain | None = None,
               loop: asyncio.AbstractEventLoop | None = None,
               helping: bool = False) -> Future[list[int]]:
        """Queue `ops` as one atomic request; the future gives the Append sequence numbers.

        With a `chain`, the request is refused with `ChainBroken` if an earlier request of the
        chain failed, and its Puts and Deletes are visible through `pending` until written.

        With `loop`, the running loop of the calling thread and one allowed to (`write_on`):
        the writer thread is not woken; at the end of the loop's turn the loop writes what is
        queued itself, in one batch, unless a batch is being written (then the writer thread
        takes them next). It spares the hand-over to the writer thread and back, and the
        completions run on the loop, which sends their frames without another hand-over. The
        loop blocks meanwhile, as a bare asyncio program writing durably does; what arrives
        then joins the next batch.

        With `helping`, the caller promises to call `help()` next, which writes the request
        or else wakes the writer thread: woken now, it would find nothing to do."""
        checked = ops if type(ops) is tuple else tuple(ops)
        max_key = self._max_key
        for op in checked:
            # A plain Put that is obviously fine skips the full check (which names the fault).
            if not (type(op) is Put and type(op.key) is bytes and type(op.value) is bytes
                    and 0 < len(op.key) <= max_key and op.db in _DB_NAMES):
                self._check(op)
        if chain is not None and chain.broken is not None:
            raise ChainBroken(f"an earlier write of {chain.name} failed: {chain.broken}")
        if loop is None:
            return self._enqueue(_Request(checked, None, chain), ring=not helping)
        if (loop not in self._inline_loops or not loop.is_running()
                or loop is not asyncio._get_running_loop()):
            # Not a loop allowed to write, or not this thread's: it may never run this turn's
            # end (stopped, or idle on another thread). The writer thread takes it.
            return self._enqueue(_Request(checked, None, chain))
        future = self._enqueue(_Request(checked, None, chain), ring=False)
        with self._lock:
            scheduled = loop in self._flushing_on
            self._flushing_on.add(loop)
        if not scheduled:
            try:
                loop.call_soon(self._flush_on, loop)
            except RuntimeError:  # the loop is closing: the writer thread takes it
                with self._lock:
                    self._flushing_on.discard(loop)
                self._ring()
        return future

    def writes_on(self, loop: asyncio.AbstractEventLoop | None) -> bool:
        """True for a loop allowed to write (`write_on`): blocking it on a commit would stall
        the commit itself, which that loop writes at the end of its turn."""
        return loop is not None and loop in self._inline_loops

    def write_on(self, loop: asyncio.AbstractEventLoop) -> None:
        """Let `loop` write its own requests (see `submit`). Only for a loop that may block for a
        durable commit: one that only carries this node's traffic, not an application's."""
        self._inline_loops.add(loop)

    def _flush_on(self, loop: asyncio.AbstractEventLoop) -> None:
        """The end of a loop's turn: write what is queued here, or wake the writer thread."""
        with self._lock:
            self._flushing_on.discard(loop)
        # What the completions of this write submit meanwhile has its own end of turn (or
        # rang the bell itself): only what this turn left is rung for.
        if not self._queue.empty() and self._help():
            return
        if not self._queue.empty():
            self._ring()

    def wake(self) -> None:
        """Have the writer thread write whatever is queued: for requests left to a loop that
        stopped before the end of its turn."""
        self._ring()

    def _ring(self) -> None:
        self._bell.put(None)

    def pending(self, db: str, key: bytes) -> tuple[bool, bytes | None]:
        """(True, value) when a chained request not yet written sets `key` (value None: it
        deletes it), else (False, None): then the store has the latest value."""
        with self._lock:
            entries = self._pending.get((db, key))
            if entries:
                for seq, chain, value in reversed(entries):
                    if chain.broken is None or seq < chain.broken_at:
                        return True, value
        return False, None

    def help(self) -> None:
        """Write the queued requests on this thread if no batch is being written (and this
        thread is not completing one): a caller that would wait for the writer thread saves
        two thread switches. Otherwise return at once; the writer thread takes them."""
        wrote = False
        try:
            wrote = not getattr(_completing, "depth", 0) and self._help()
        finally:  # even when interrupted: what is queued must not wait for another ring
            if not wrote and not self._queue.empty():
                self._ring()

    def submit_fn(self, fn: Callable[[lmdb.Transaction, Store], T]) -> Future[T]:
        """Queue `fn(txn, store)` to run in its own nested write transaction.

        If `fn` raises, only its writes are undone and its future carries the exception.
        `fn` runs on the thread writing the batch, so it must not block on the writer, and its
        result must not reference `txn`, which is gone when the future completes. If a whole
        batch fails to commit, its requests are retried one by one, so `fn` may run twice:
        keep its effects inside `txn`.
        """
        return self._submit_fn(fn, ring=True)

    def _submit_fn(self, fn: Callable[[lmdb.Transaction, Store], T], ring: bool) -> Future[T]:
        if not callable(fn):
            raise TypeError("submit_fn needs a callable fn(txn, store)")
        return self._enqueue(_Request(None, fn), ring=ring)

    def commit(self, ops: Sequence[Op], timeout: float | None = None) -> list[int]:
        """`submit(ops)` and wait until durable; returns the Append sequence numbers."""
        self._refuse_self_wait()
        future = self.submit(ops, helping=True)
        self.help()
        return future.result(timeout)

    def transact(self, fn: Callable[[lmdb.Transaction, Store], T],
                 timeout: float | None = None) -> T:
        """`submit_fn(fn)` and wait until durable; returns what `fn` returned or raises."""
        self._refuse_self_wait()
        future = self._submit_fn(fn, ring=False)
        self.help()
        return future.result(timeout)

    def _help(self) -> bool:
        """A waiting caller writes the queued batch itself when nobody else is writing: the
        same one durable transaction, two thread switches fewer. False when it wrote none."""
        if not self._write_lock.acquire(blocking=False):
            return False  # a batch is being written; ours joins the next one
        try:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return False  # the writer thread took it
            batch, stop = self._collect(item)
            if stop:
                self._queue.put(None)  # stopping is the writer thread's to do
                self._ring()
            self._write_guarded(batch)
            return True
        finally:
            self._write_lock.release()

    @property
    def stats(self) -> dict[str, int]:
        """Write transactions run ("batches") and the requests they carried ("requests")."""
        with self._lock:
            return {"batches": self._batches, "requests": self._requests}

    def stop(self) -> None:
        """Refuse new requests, write everything already queued, and end the thread."""
        if self.on_writer_thread():
            raise StorageError("the storage writer cannot be stopped from its own thread")
        with self._lock:
            if not self._stopped:
                self._stopped = True
                self._queue.put(None)
                self._ring()
        self._thread.join()
        _live.discard(self)

    @property
    def stopped(self) -> bool:
        return self._stopped

    def _enqueue(self, req: _Request, ring: bool = True) -> Future[Any]:
        with self._lock:
            if self._stopped:
                raise StoreClosed(f"the writer of the store at {self._store.path} is stopped")
            if req.chain is not None and req.ops:
                self._seq += 1
                req.seq = self._seq
                for op in req.ops:
                    if isinstance(op, _KEYED):
                        value = op.value if isinstance(op, Put) else None
                        self._pending.setdefault((op.db, op.key), []).append(
                            (req.seq, req.chain, value))
            self._queue.put(req)
        if ring:
            self._ring()
        return req.future

    def _settle(self, batch: list[_Request]) -> None:
        """The batch is written (or definitely not): its pending values give way to the store."""
        with self._lock:
            for req in batch:
                if not req.seq:
                    continue
                assert req.ops is not None
                for op in req.ops:
                    if isinstance(op, _KEYED):
                        where = (op.db, op.key)
                        entries = self._pending.get(where)
                        if not entries:
                            continue
                        if len(entries) == 1:
                            if entries[0][0] == req.seq:
                                del self._pending[where]
                        else:
                            entries[:] = [e for e in entries if e[0] != req.seq]
                            if not entries:
                                del self._pending[where]

    def on_writer_thread(self) -> bool:
        """True when called from the thread writing (inside a function or callback)."""
        current = threading.current_thread()
        return current is self._thread or current is self._writing

    def _refuse_self_wait(self) -> None:
        if self.on_writer_thread():
            raise StorageError(
                "waiting on the storage writer from its own thread would deadlock; use submit")

    def _check(self, op: object) -> None:
        # Checked on the caller's thread so mistakes raise where they were made.
        if isinstance(op, _KEYED):
            key, what, extra = op.key, "key", 0
        elif isinstance(op, Append):
            # An Append's key is its prefix plus the 8-byte sequence number.
            key, what, extra = op.prefix, "prefix", 8
        else:
            raise TypeError(f"not a storage op: {op!r}")
        if op.db not in _DB_NAMES:
            raise StorageError(f"no database named {op.db!r}; known: {', '.join(DB_NAMES)}")
        if not isinstance(key, bytes):
            raise TypeError(f"{type(op).__name__} {what} must be bytes")
        if not 0 < len(key) + extra <= self._max_key:
            raise StorageError(
                f"{type(op).__name__} key must be 1..{self._max_key} bytes, "
                f"got {len(key) + extra}")
        if not isinstance(op, Delete) and not isinstance(op.value, bytes):
            raise TypeError(f"{type(op).__name__} value must be bytes (see keys.pack)")

    # ---- the writer thread -----------------------------------------------------------

    def _collect(self, item: _Request | None) -> tuple[list[_Request], bool]:
        """`item` and everything queued behind it; True when the stop sentinel was among them."""
        batch: list[_Request] = []
        while True:
            if item is None:
                return batch, True
            # A future cancelled while queued is skipped, never half-done.
            if item.future.set_running_or_notify_cancel():
                batch.append(item)
            else:
                self._settle([item])
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return batch, False

    def _run(self) -> None:
        running = True
        while running:
            self._bell.get()
            while not self._bell.empty():  # one batch answers every ring so far
                self._bell.get_nowait()
            with self._write_lock:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    continue  # a caller wrote them meanwhile (help)
                batch, stop = self._collect(item)
                self._write_guarded(batch)
            running = not stop

    def _write_guarded(self, batch: list[_Request]) -> None:
        if not batch:
            return
        self._writing = threading.current_thread()
        try:
            try:
                self._write(batch)
            except BaseException as exc:  # keep serving; every caller hears about it
                log.exception("storage writer batch failed")
                self._settle(batch)
                for req in batch:
                    _break(req, exc)
                    if not req.future.done():
                        req.future.set_exception(exc)
        finally:
            self._writing = None

    def _write(self, batch: list[_Request]) -> None:
        env = self._store.env
        try:
            with env.begin(write=True) as txn:
                for req in batch:
                    self._run_one(txn, req)
        except BaseException as exc:
            failure = self._translate(exc)
            if len(batch) == 1:
                self._failed(batch[0], failure)
            else:
                # The batch as a whole did not commit (e.g. the map filled while saving the
                # free list): give each request that had succeeded its own chance.
                log.warning("group commit of %d requests failed (%s); retrying one by one",
                            len(batch), failure)
                self._write_singly(env, batch)
        with self._lock:
            self._batches += 1
            self._requests += len(batch)
        self._settle(batch)
        # Only now is everything in the batch durable (or definitely not written).
        _completing.depth = getattr(_completing, "depth", 0) + 1
        try:
            for req in batch:
                if req.error is not None:
                    req.future.set_exception(req.error)
                else:
                    req.future.set_result(req.result)
        finally:
            _completing.depth -= 1

    def _write_singly(self, env: lmdb.Environment, batch: list[_Request]) -> None:
        for req in batch:
            if req.error is not None:
                continue  # it failed on its own and was already rolled back
            try:
                with env.begin(write=True) as txn:
                    self._run_one(txn, req)
            except BaseException as exc:
                self._failed(req, self._translate(exc))

    @staticmethod
    def _failed(req: _Request, error: BaseException) -> None:
        req.result, req.error = None, error
        _break(req, error)

    def _run_one(self, txn: lmdb.Transaction, req: _Request) -> None:
        store = self._store
        chain = req.chain
        # Refused once an earlier request of the chain failed; one before the failed one (in
        # the same batch, retried alone after the batch failed) still lands.
        if chain is not None and chain.broken is not None and not (
                req.seq and req.seq < chain.broken_at):
            req.result, req.error = None, ChainBroken(
                f"an earlier write of {chain.name} failed: {chain.broken}")
            return
        try:
            with store.env.begin(write=True, parent=txn) as child:
                if req.fn is not None:
                    result = req.fn(child, store)
                else:
                    assert req.ops is not None
                    result = apply(child, store, req.ops)
        except BaseException as exc:
            self._failed(req, self._translate(exc, ops=req.ops is not None))
            return
        req.result, req.error = result, None

    def _translate(self, exc: BaseException, ops: bool = True) -> BaseException:
        if isinstance(exc, lmdb.MapFullError):
            full = store_full(self._store.path, self._store.map_size)
            full.__cause__ = exc
            return full
        if ops and isinstance(exc, lmdb.Error):
            wrapped = StorageError(f"write failed: {exc}")
            wrapped.__cause__ = exc
            return wrapped
        return exc
