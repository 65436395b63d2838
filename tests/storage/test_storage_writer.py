"""The group-commit writer: batching, nested rollback, Append sequences, draining on stop."""
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import lmdb
import pytest

from paychan.storage.env import Store
from paychan.storage.errors import StorageError, StoreClosed, StoreFull
from paychan.storage.keys import from_u64, pack, u64
from paychan.storage.writer import Append, Delete, Put

WAIT = 10.0


@contextmanager
def writer_held(store: Store) -> Iterator[Future[None]]:
    """Keep the writer busy inside one request so that everything submitted meanwhile
    lands in the next batch, whatever the thread timing."""
    started, release = threading.Event(), threading.Event()

    def hold(txn: lmdb.Transaction, s: Store) -> None:
        started.set()
        release.wait(WAIT)

    held = store.writer.submit_fn(hold)
    assert started.wait(WAIT)
    try:
        yield held
    finally:
        release.set()
    held.result(WAIT)


def put_and_fail(txn: lmdb.Transaction, s: Store) -> None:
    txn.put(b"shared", b"from-failing-fn", db=s.db("kv"))
    txn.put(b"only-failing", b"x", db=s.db("kv"))
    raise ValueError("handler blew up")


def test_failing_fn_rolls_back_alone(store: Store) -> None:
    w = store.writer
    before = w.stats
    with writer_held(store):
        good_put = w.submit([Put("kv", b"shared", b"from-put")])
        bad_fn = w.submit_fn(put_and_fail)
        good_fn = w.submit_fn(
            lambda txn, s: txn.put(b"after", b"y", db=s.db("kv")) and "done")
    assert good_put.result(WAIT) == []
    assert good_fn.result(WAIT) == "done"
    with pytest.raises(ValueError, match="handler blew up"):
        bad_fn.result(WAIT)
    # The hold request, then one batch holding the three others.
    assert w.stats["batches"] - before["batches"] == 2
    assert w.stats["requests"] - before["requests"] == 4
    assert store.get("kv", b"shared") == b"from-put"
    assert store.get("kv", b"only-failing") is None
    assert store.get("kv", b"after") == b"y"


def test_oversized_request_fails_alone_with_store_full(tmp_path: Path) -> None:
    s = Store.open(tmp_path / "small", map_size=64 * 4096)
    try:
        with writer_held(s):
            huge = s.writer.submit([Put("kv", b"huge", bytes(1 << 20))])
            small = s.writer.submit([Put("kv", b"small", b"x")])
        with pytest.raises(StoreFull, match="map_size"):
            huge.result(WAIT)
        assert small.result(WAIT) == []
        assert s.get("kv", b"small") == b"x"
        assert s.get("kv", b"huge") is None
    finally:
        s.close()


def test_ops_are_atomic_per_request(store: Store) -> None:
    store.writer.commit([Put("kv", b"a", b"1")])
    # A longer key under the 'log' prefix makes the Append fail; the Delete before it in
    # the same request must be undone with it.
    store.writer.commit([Put("payments", b"log" + u64(1) + b"!", b"odd")])
    with pytest.raises(StorageError, match="overlaps"):
        store.writer.commit([Delete("kv", b"a"), Append("payments", b"log", b"v")])
    assert store.get("kv", b"a") == b"1"


def test_append_allocates_in_order_within_and_across_batches(store: Store) -> None:
    w = store.writer
    with writer_held(store):
        first = w.submit([Append("payments", b"ch1", b"a"), Append("payments", b"ch1", b"b")])
        other = w.submit([Append("payments", b"ch2", b"z")])
        second = w.submit([Append("payments", b"ch1", b"c")])
    assert first.result(WAIT) == [1, 2]
    assert other.result(WAIT) == [1]
    assert second.result(WAIT) == [3]
    assert w.commit([Put("kv", b"k", b"v"), Append("payments", b"ch1", b"d")]) == [4]
    keys = [k for k, _ in store.iter_prefix("payments", b"ch1")]
    assert [from_u64(k[3:]) for k in keys] == [1, 2, 3, 4]
    assert [v for _, v in store.iter_prefix("payments", b"ch1")] == [b"a", b"b", b"c", b"d"]


def test_append_past_255_keeps_numeric_order(store: Store) -> None:
    seqs = store.writer.commit([Append("payments", b"", pack(i)) for i in range(260)])
    assert seqs == list(range(1, 261))
    # One more in a later batch continues from the stored last key, not from memory.
    assert store.writer.commit([Append("payments", b"", pack(260))]) == [261]
    values = [store.get_obj("payments", k) for k, _ in store.iter_prefix("payments", b"")]
    assert values == list(range(261))


def test_group_commit_groups_concurrent_requests(store: Store) -> None:
    w = store.writer
    threads, per_thread = 16, 40
    before = w.stats
    errors: list[BaseException] = []
    go = threading.Barrier(threads)

    def client(t: int) -> None:
        try:
            go.wait(WAIT)
            for i in range(per_thread):
                w.commit([Put("kv", b"%02d-%03d" % (t, i), pack([t, i]))], timeout=WAIT)
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=client, args=(t,)) for t in range(threads)]
    for th in workers:
        th.start()
    for th in workers:
        th.join(WAIT * 3)
    assert not errors
    requests = w.stats["requests"] - before["requests"]
    batches = w.stats["batches"] - before["batches"]
    assert requests == threads * per_thread
    assert batches < requests
    assert store.count("kv") == threads * per_thread
    for t in range(threads):
        for i in range(per_thread):
            assert store.get_obj("kv", b"%02d-%03d" % (t, i)) == [t, i]


def test_requests_queued_together_share_one_batch(store: Store) -> None:
    w = store.writer
    before = w.stats
    with writer_held(store):
        futures = [w.submit([Put("kv", u64(i), b"v")]) for i in range(100)]
    for f in futures:
        f.result(WAIT)
    assert w.stats["batches"] - before["batches"] == 2
    assert w.stats["requests"] - before["requests"] == 101
    assert store.count("kv") == 100


def test_stop_drains_the_queue_then_refuses(tmp_path: Path) -> None:
    path = tmp_path / "data"
    s = Store.open(path)
    w = s.writer
    closer = threading.Thread(target=s.close)
    with writer_held(s):
        futures = [w.submit([Put("kv", u64(i), pack(i))]) for i in range(200)]
        closer.start()
        while not w.stopped:
            threading.Event().wait(0.001)
        with pytest.raises(StoreClosed):
            w.submit([Put("kv", b"late", b"x")])
        with pytest.raises(StorageError):
            s.writer.submit([Put("kv", b"late", b"x")])
    closer.join(WAIT)
    assert not closer.is_alive()
    assert s.closed
    assert [f.result(0) for f in futures] == [[]] * 200

    s = Store.open(path)
    try:
        assert s.count("kv") == 200
        assert s.get("kv", b"late") is None
    finally:
        s.close()


def test_cancelled_request_is_skipped(store: Store) -> None:
    with writer_held(store):
        doomed = store.writer.submit([Put("kv", b"cancelled", b"x")])
        assert doomed.cancel()
        kept = store.writer.submit([Put("kv", b"kept", b"x")])
    kept.result(WAIT)
    assert store.get("kv", b"cancelled") is None
    assert store.get("kv", b"kept") == b"x"


def test_fn_sees_its_own_writes_and_returns(store: Store) -> None:
    def fn(txn: lmdb.Transaction, s: Store) -> list[object]:
        txn.put(b"k", pack({"n": 1}), db=s.db("kv"))
        return [s.get_obj("kv", b"k", txn=txn), s.count("kv", txn=txn)]

    assert store.writer.transact(fn) == [{"n": 1}, 1]


def test_waiting_on_the_writer_from_its_thread_is_refused(store: Store) -> None:
    def fn(txn: lmdb.Transaction, s: Store) -> None:
        s.writer.commit([Put("kv", b"inner", b"x")])

    with pytest.raises(StorageError, match="deadlock"):
        store.writer.transact(fn)


def test_bad_ops_raise_at_submit(store: Store) -> None:
    w = store.writer
    with pytest.raises(StorageError, match="no database"):
        w.submit([Put("nope", b"k", b"v")])
    with pytest.raises(TypeError):
        w.submit([Put("kv", b"k", cast(Any, {"not": "bytes"}))])
    with pytest.raises(TypeError):
        w.submit([Put("kv", cast(Any, "k"), b"v")])
    with pytest.raises(StorageError):
        w.submit([Put("kv", b"", b"v")])
    with pytest.raises(StorageError):
        w.submit([Put("kv", bytes(600), b"v")])
    with pytest.raises(TypeError):
        w.submit([cast(Any, "put")])
    assert w.commit([Delete("kv", b"never-there")]) == []
