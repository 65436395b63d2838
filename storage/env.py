"""The LMDB environment of a data dir: opened once per process, named databases, reads."""
from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, cast

import lmdb

from paychan.storage.errors import SchemaTooNew, StorageError, StoreClosed, StoreFull
from paychan.storage.keys import pack, prefix_end, unpack

if TYPE_CHECKING:
    from paychan.storage.writer import Writer

__all__ = [
    "DB_NAMES",
    "SCHEMA_VERSION",
    "SchemaTooNew",
    "StorageError",
    "Store",
    "StoreClosed",
    "StoreFull",
    "store_full",
]

SCHEMA_VERSION = 1
SCHEMA_KEY = b"schema_version"

# Every named database is created when the store opens, so a handle never has to be
# created inside a write transaction that might later abort.
DB_NAMES: tuple[str, ...] = (
    "meta",
    "channels",
    "payments",  # append-only payment log
    "results",  # idempotent replies, by payment id
    "outcomes",  # payer-side final outcomes, by payment id
    "outbox",
    "tasks",  # watcher tasks
    "peers",
    "kv",
    "ledger_accounts",
    "ledger_channels",
    "ledger_events",
    "ledger_meta",
)

# One reader slot per concurrent read transaction across all processes sharing the dir;
# LMDB's default of 126 is low once many actors read at once.
MAX_READERS = 1024

DbRef = str | Any  # a database name or a handle from Store.db()

# LMDB must not be opened twice for the same path in one process: closing either
# environment drops the process's file locks for both. Hence one registry per process.
_registry: dict[str, Store] = {}
_closing: dict[str, threading.Event] = {}
_registry_lock = threading.Lock()


# Bumped in a forked child, so a store can tell it was inherited without a getpid() call on
# every read.
_fork_generation = 0


def _forget_after_fork() -> None:
    # A forked child must not touch the parent's environments; it opens its own.
    global _registry_lock, _fork_generation
    _fork_generation += 1
    _registry.clear()
    _closing.clear()
    _registry_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)


def store_full(path: str, map_size: int) -> StoreFull:
    """The error raised when LMDB reports MDB_MAP_FULL for the store at `path`."""
    return StoreFull(
        f"the store at {path} is full (map_size={map_size} bytes); "
        f"reopen it with a larger map_size, e.g. Store.open(path, map_size={map_size * 2})")


class Store:
    """One LMDB environment per data dir per process, shared by reference count.

    Get one with `Store.open(path)`; every `open` must be matched by one `close()`.
    Writes go through `store.writer` (group commit); reads may come from any thread.
    """

    def __init__(self, path: str, env: lmdb.Environment, dbs: dict[str, Any],
                 map_size: int) -> None:
        # Private: use Store.open, which keeps one instance per path.
        self.path = path
        self.map_size = map_size
        self._env: lmdb.Environment | None = env
        self._dbs = dbs
        self._refs = 1
        self._pid = os.getpid()
        self._generation = _fork_generation
        self._writer: Writer | None = None
        self._writer_lock = threading.Lock()
        self._shutting = False

    # ---- lifecycle ----------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike[str], map_size: int = 1 << 30,
             max_dbs: int = 32) -> Store:
        """The store of data dir `path`, opening it if this process has not already.

        While a store is open, later calls return the same instance (and count a
        reference); `map_size` and `max_dbs` come from the first call.
        """
        os.makedirs(path, mode=0o700, exist_ok=True)
        real = os.path.realpath(path)
        while True:
            with _registry_lock:
                closing = _closing.get(real)
                if closing is None:
                    store = _registry.get(real)
                    if store is not None:
                        store._refs += 1
                        return store
                    store = cls._open_env(real, map_size, max_dbs)
                    _registry[real] = store
                    return store
            # Another thread is closing this path; wait so that two environments for
            # the same file never coexist.
            closing.wait()

    @classmethod
    def _open_env(cls, path: str, map_size: int, max_dbs: int) -> Store:
        if max_dbs < len(DB_NAMES):
            raise StorageError(f"max_dbs={max_dbs} is below the {len(DB_NAMES)} databases needed")
        try:
            env = lmdb.open(
                path, map_size=map_size, max_dbs=max_dbs, max_readers=MAX_READERS,
                sync=True, metasync=True, writemap=False, lock=True, subdir=True,
                # The files hold signed vouchers: readable by their owner only.
                mode=0o600)
        except lmdb.Error as exc:
            raise StorageError(f"cannot open the store at {path}: {exc}") from exc
        try:
            dbs = cls._prepare(path, env, map_size)
        except BaseException:
            env.close()
            raise
        return cls(path, env, dbs, map_size)

    @staticmethod
    def _prepare(path: str, env: lmdb.Environment, map_size: int) -> dict[str, Any]:
        try:
            with env.begin(write=True) as txn:
                meta = env.open_db(b"meta", txn=txn)
                raw = txn.get(SCHEMA_KEY, db=meta)
                if raw is not None:
                    _check_schema(path, raw)
                # The version is read before any other database is created, so a newer
                # store is refused without being modified.
                dbs = {name: env.open_db(name.encode(), txn=txn) for name in DB_NAMES}
                if raw is None:
                    txn.put(SCHEMA_KEY, pack(SCHEMA_VERSION), db=meta)
                return dbs
        except lmdb.MapFullError as exc:
            raise store_full(path, map_size) from exc
        except lmdb.Error as exc:
            raise StorageError(f"cannot prepare the store at {path}: {exc}") from exc

    def close(self) -> None:
        """Drop one reference; the last one stops the writer (draining it) and closes LMDB."""
        writer = self._writer
        if writer is not None and writer.on_writer_thread():
            # Closing would wait for the writer to drain, i.e. for this very thread.
            raise StorageError("a store cannot be closed from its writer thread")
        with _registry_lock:
            if self._refs == 0:
                return
            if os.getpid() != self._pid:
                # Inherited across fork: closing would release the parent's reader slots.
                self._refs = 0
                self._env = None
                return
            self._refs -= 1
            if self._refs > 0:
                return
            done = threading.Event()
            _closing[self.path] = done
            _registry.pop(self.path, None)
        try:
            with self._writer_lock:
                # From here on no writer can be started against an environment about to close.
                self._shutting = True
                writer = self._writer
            if writer is not None:
                writer.stop()
            env, self._env = self._env, None
            if env is not None:
                env.close()
        finally:
            with _registry_lock:
                _closing.pop(self.path, None)
            done.set()

    @property
    def closed(self) -> bool:
        return self._env is None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"open, refs={self._refs}"
        return f"<Store {self.path} ({state})>"

    # ---- handles ----------------------------------------------------------------------

    @property
    def env(self) -> lmdb.Environment:
        """The LMDB environment; write only through `writer`, which owns the write lock."""
        env = self._env
        if env is None:
            raise StoreClosed(f"the store at {self.path} is closed")
        if self._generation != _fork_generation:
            raise StorageError("a store cannot be used across fork; open it again in the child")
        return env

    def db(self, name: str) -> Any:
        """The handle of named database `name` (one of DB_NAMES)."""
        try:
            return self._dbs[name]
        except KeyError:
            raise StorageError(f"no database named {name!r}; known: {', '.join(DB_NAMES)}") \
                from None

    @property
    def writer(self) -> Writer:
        """This store's group-commit writer, started on first use."""
        writer = self._writer
        if writer is not None:  # read once per commit: no lock once it exists
            return writer
        with self._writer_lock:
            if self._writer is None:
                if self._shutting or self.closed:
                    raise StoreClosed(f"the store at {self.path} is closed")
                from paychan.storage.writer import Writer

                self._writer = Writer(self)
            return self._writer

    # ---- reads --------------------------------------------------------------------------
    # Each read takes an optional `txn` so the same helpers work inside a writer function
    # (where they must see the uncommitted writes of that transaction).

    @contextmanager
    def _read(self, txn: lmdb.Transaction | None) -> Iterator[lmdb.Transaction]:
        if txn is not None:
            yield txn
            return
        with self.env.begin() as own:
            yield own

    def _handle(self, db: DbRef) -> Any:
        return self.db(db) if isinstance(db, str) else db

    def get(self, db: DbRef, key: bytes, txn: lmdb.Transaction | None = None) -> bytes | None:
        """The raw value at `key`, or None."""
        handle = self.db(db) if isinstance(db, str) else db
        # Without buffers=True, py-lmdb returns bytes copies, valid after the txn ends.
        if txn is not None:
            return cast("bytes | None", txn.get(key, db=handle))
        with self.env.begin() as own:  # not _read: this runs several times per payment
            return cast("bytes | None", own.get(key, db=handle))

    def get_latest(self, db: str, key: bytes) -> bytes | None:
        """Like `get`, but a value a chained writer request is about to write wins (see
        `writer.Chain`): what the owner of the chain last decided, durable or not yet."""
        writer = self._writer
        if writer is not None:
            found, value = writer.pending(db, key)
            if found:
                return value
        return self.get(db, key)

    def get_obj(self, db: DbRef, key: bytes, txn: lmdb.Transaction | None = None) -> Any:
        """The msgpack-decoded value at `key`, or None when absent."""
        raw = self.get(db, key, txn)
        if raw is None:
            return None
        try:
            return unpack(raw)
        except Exception as exc:
            raise StorageError(f"corrupt record in {db!r} at key {key.hex()}: {exc}") from exc

    def iter_prefix(self, db: DbRef, prefix: bytes,
                    txn: lmdb.Transaction | None = None) -> Iterator[tuple[bytes, bytes]]:
        """(key, value) for every key starting with `prefix`, in key order.

        Without `txn` the iterator reads one snapshot, held until it is exhausted or closed.
        """
        return self.iter_from(db, prefix, prefix_end(prefix), txn)

    def iter_from(self, db: DbRef, start_key: bytes, stop: bytes | None = None,
                  txn: lmdb.Transaction | None = None) -> Iterator[tuple[bytes, bytes]]:
        """(key, value) for keys >= `start_key` (and < `stop` if given), in key order."""
        handle = self._handle(db)
        with self._read(txn) as t, t.cursor(db=handle) as cur:
            if not cur.set_range(start_key):
                return
            for key, value in cur.iternext():
                if stop is not None and cast(bytes, key) >= stop:
                    return
                yield cast(bytes, key), cast(bytes, value)

    def last(self, db: DbRef, prefix: bytes = b"",
             txn: lmdb.Transaction | None = None) -> tuple[bytes, bytes] | None:
        """The (key, value) with the greatest key starting with `prefix`, or None."""
        with self._read(txn) as t, t.cursor(db=self._handle(db)) as cur:
            return last_under(cur, prefix)

    def count(self, db: DbRef, txn: lmdb.Transaction | None = None) -> int:
        """Number of entries in `db`."""
        with self._read(txn) as t:
            entries: int = t.stat(self._handle(db))["entries"]
            return entries


def last_under(cur: lmdb.Cursor, prefix: bytes) -> tuple[bytes, bytes] | None:
    """Position `cur` on the last key starting with `prefix`; its (key, value) or None."""
    end = prefix_end(prefix)
    found = cur.set_range(end) if end is not None else False
    # set_range lands on the first key >= end (outside the prefix) or fails at the end
    # of the database; either way the candidate is the key just before.
    found = cur.prev() if found else cur.last()
    if not found:
        return None
    key = cast(bytes, cur.key())
    if not key.startswith(prefix):
        return None
    return key, cast(bytes, cur.value())


def _check_schema(path: str, raw: bytes) -> None:
    try:
        found = unpack(raw)
    except Exception as exc:
        raise StorageError(f"the store at {path} has an unreadable schema version") from exc
    if isinstance(found, bool) or not isinstance(found, int):
        raise StorageError(f"the store at {path} has an invalid schema version {found!r}")
    if found > SCHEMA_VERSION:
        raise SchemaTooNew(
            f"the store at {path} has schema version {found}, but this paychan supports up to "
            f"version {SCHEMA_VERSION}; upgrade paychan to open it",
            found=found, supported=SCHEMA_VERSION)
    if found < SCHEMA_VERSION:
        # No older layout has ever been released, so there is nothing to migrate from.
        raise StorageError(
            f"the store at {path} has schema version {found}, which this paychan (version "
            f"{SCHEMA_VERSION}) cannot migrate")
