"""Chained writer requests: visible through `pending` until written, all-or-nothing after a
failure, and `help()` writing on the caller's thread (but never from a completing callback)."""
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lmdb
import pytest
from boom import BOOM, Injected

from paychan.storage.env import Store
from paychan.storage.errors import ChainBroken
from paychan.storage.writer import Chain, Delete, Put, Writer

WAIT = 5.0


@contextmanager
def held(w: Writer) -> Iterator[Future[None]]:
    """Keep the writer thread inside one request: what is submitted meanwhile waits for the
    next batch, so the state before it is written can be looked at."""
    started, release = threading.Event(), threading.Event()

    def hold(txn: lmdb.Transaction, s: Store) -> None:
        started.set()
        release.wait(WAIT)

    fut = w.submit_fn(hold)
    assert started.wait(WAIT)
    try:
        yield fut
    finally:
        release.set()
    fut.result(WAIT)


# ---- pending values -------------------------------------------------------------------------


def test_chained_put_is_visible_until_durable_then_the_store_answers(store: Store) -> None:
    w = store.writer
    w.commit([Put("kv", b"k", b"old")], timeout=WAIT)
    chain = Chain("c")
    with held(w):
        fut = w.submit([Put("kv", b"k", b"new")], chain=chain)
        assert w.pending("kv", b"k") == (True, b"new")
        assert store.get_latest("kv", b"k") == b"new"
        assert store.get("kv", b"k") == b"old"  # not durable yet
        assert not fut.done()
        # Other keys and databases are not affected.
        assert w.pending("kv", b"other") == (False, None)
        assert w.pending("meta", b"k") == (False, None)
    assert fut.result(WAIT) == []
    assert w.pending("kv", b"k") == (False, None)
    assert store.get("kv", b"k") == b"new"
    assert store.get_latest("kv", b"k") == b"new"


def test_pending_is_already_settled_when_the_future_completes(store: Store) -> None:
    w = store.writer
    seen: list[tuple[bool, bytes | None]] = []
    with held(w):
        fut = w.submit([Put("kv", b"k", b"v")], chain=Chain("c"))
        fut.add_done_callback(lambda f: seen.append(w.pending("kv", b"k")))
    fut.result(WAIT)
    assert seen == [(False, None)]


def test_unchained_put_is_not_pending(store: Store) -> None:
    w = store.writer
    with held(w):
        fut = w.submit([Put("kv", b"k", b"v")])
        assert w.pending("kv", b"k") == (False, None)
        assert store.get_latest("kv", b"k") is None
    fut.result(WAIT)
    assert store.get_latest("kv", b"k") == b"v"


def test_chained_delete_shows_as_pending_none(store: Store) -> None:
    w = store.writer
    w.commit([Put("kv", b"k", b"old")], timeout=WAIT)
    with held(w):
        fut = w.submit([Delete("kv", b"k")], chain=Chain("c"))
        assert w.pending("kv", b"k") == (True, None)
        assert store.get_latest("kv", b"k") is None
        assert store.get("kv", b"k") == b"old"
    fut.result(WAIT)
    assert w.pending("kv", b"k") == (False, None)
    assert store.get("kv", b"k") is None


def test_newest_pending_value_wins(store: Store) -> None:
    w = store.writer
    one, two = Chain("one"), Chain("two")
    with held(w):
        futs = [w.submit([Put("kv", b"k", b"first")], chain=one)]
        futs.append(w.submit([Put("kv", b"k", b"second")], chain=one))
        assert w.pending("kv", b"k") == (True, b"second")
        futs.append(w.submit([Delete("kv", b"k")], chain=one))
        assert w.pending("kv", b"k") == (True, None)
        # Across chains too: whoever submitted last.
        futs.append(w.submit([Put("kv", b"k", b"third")], chain=two))
        assert store.get_latest("kv", b"k") == b"third"
    for fut in futs:
        fut.result(WAIT)
    assert w.pending("kv", b"k") == (False, None)
    assert store.get("kv", b"k") == b"third"


# ---- a broken chain -------------------------------------------------------------------------


@pytest.mark.usefixtures("failing_apply")
def test_failed_request_breaks_its_chain_and_only_its_chain(store: Store) -> None:
    w = store.writer
    bad, good = Chain("bad"), Chain("good")
    with held(w):
        failing = w.submit([Put("kv", b"a", BOOM)], chain=bad)
        later = w.submit([Put("kv", b"b", b"after-failure"), Delete("kv", b"x")], chain=bad)
        other_chain = w.submit([Put("kv", b"c", b"other-chain")], chain=good)
        unchained = w.submit([Put("kv", b"d", b"unchained")])
    with pytest.raises(Injected):
        failing.result(WAIT)
    with pytest.raises(ChainBroken, match="bad"):
        later.result(WAIT)
    assert other_chain.result(WAIT) == []
    assert unchained.result(WAIT) == []
    assert store.get("kv", b"a") is None
    assert store.get("kv", b"b") is None  # the later request wrote nothing
    assert store.get("kv", b"c") == b"other-chain"
    assert store.get("kv", b"d") == b"unchained"
    assert bad.broken is not None and good.broken is None
    # From now on the broken chain is refused at once, and nothing is queued.
    with pytest.raises(ChainBroken):
        w.submit([Put("kv", b"e", b"refused")], chain=bad)
    assert w.pending("kv", b"e") == (False, None)
    w.commit([Put("kv", b"flush", b"1")], timeout=WAIT)
    assert store.get("kv", b"e") is None
    assert w.submit([Put("kv", b"f", b"still-good")], chain=good).result(WAIT) == []
    assert store.get("kv", b"f") == b"still-good"


@pytest.mark.usefixtures("failing_apply")
def test_later_request_in_a_later_batch_fails_with_chain_broken(store: Store) -> None:
    w = store.writer
    chain = Chain("c")
    inside, release = threading.Event(), threading.Event()

    def hold(txn: lmdb.Transaction, s: Store) -> None:
        inside.set()
        release.wait(WAIT)

    with held(w):
        holding = w.submit_fn(hold)
        failing = w.submit([Put("kv", b"a", BOOM)], chain=chain)
    # The writer is inside `hold`, the failing request not run yet: this one is accepted and
    # waits for the next batch.
    assert inside.wait(WAIT)
    later = w.submit([Put("kv", b"b", b"after-failure")], chain=chain)
    release.set()
    holding.result(WAIT)
    with pytest.raises(Injected):
        failing.result(WAIT)
    with pytest.raises(ChainBroken):
        later.result(WAIT)
    assert store.get("kv", b"b") is None
    assert w.pending("kv", b"b") == (False, None)


@pytest.mark.usefixtures("failing_apply")
def test_broken_chain_pending_values_give_way_to_a_healthy_chain(store: Store) -> None:
    w = store.writer
    bad, good = Chain("bad"), Chain("good")
    inside, release = threading.Event(), threading.Event()

    def hold(txn: lmdb.Transaction, s: Store) -> None:
        inside.set()
        release.wait(WAIT)

    with held(w):
        healthy = w.submit([Put("kv", b"k", b"healthy")], chain=good)
        failing = w.submit([Put("kv", b"a", BOOM)], chain=bad)
        later = w.submit([Put("kv", b"k", b"from-bad"), Put("kv", b"only-bad", b"x")],
                         chain=bad)
        holding = w.submit_fn(hold)
        # Nothing has failed yet: the newest pending value is the bad chain's.
        assert w.pending("kv", b"k") == (True, b"from-bad")
        assert w.pending("kv", b"only-bad") == (True, b"x")
    # The batch ran its requests up to `hold`: the bad chain is broken, nothing is settled.
    assert inside.wait(WAIT)
    try:
        assert bad.broken is not None
        assert w.pending("kv", b"k") == (True, b"healthy")
        assert store.get_latest("kv", b"k") == b"healthy"
        assert w.pending("kv", b"only-bad") == (False, None)
        assert store.get_latest("kv", b"only-bad") is None
        assert w.pending("kv", b"a") == (False, None)
        with pytest.raises(ChainBroken):
            w.submit([Put("kv", b"k", b"refused")], chain=bad)
    finally:
        release.set()
    holding.result(WAIT)
    assert healthy.result(WAIT) == []
    with pytest.raises(Injected):
        failing.result(WAIT)
    with pytest.raises(ChainBroken):
        later.result(WAIT)
    assert store.get("kv", b"k") == b"healthy"
    assert store.get("kv", b"only-bad") is None
    assert w.pending("kv", b"k") == (False, None)


# ---- help() ---------------------------------------------------------------------------------


class ParkedWriter(Writer):
    """A writer whose own thread waits until `unpark`: meanwhile only `help()` writes, so
    which thread wrote a batch does not depend on timing."""

    def __init__(self, store: Store) -> None:
        self.parked = threading.Event()
        super().__init__(store)

    def _run(self) -> None:
        self.parked.wait()
        super()._run()

    def unpark_and_stop(self) -> None:
        self.parked.set()
        self.stop()


@pytest.fixture
def parked(tmp_path: Path) -> Iterator[tuple[ParkedWriter, ParkedWriter]]:
    """Two parked writers on two stores (their `store.writer` is never started)."""
    stores = [Store.open(tmp_path / "x"), Store.open(tmp_path / "y")]
    writers = (ParkedWriter(stores[0]), ParkedWriter(stores[1]))
    yield writers
    for w in writers:
        w.unpark_and_stop()
    for s in stores:
        s.close()


def whose_thread(key: bytes) -> Any:
    def fn(txn: lmdb.Transaction, s: Store) -> threading.Thread:
        txn.put(key, b"1", db=s.db("kv"))
        return threading.current_thread()
    return fn


def test_help_writes_the_queued_batch_on_the_calling_thread(
        parked: tuple[ParkedWriter, ParkedWriter]) -> None:
    w, _ = parked
    first = w.submit_fn(whose_thread(b"one"))
    second = w.submit([Put("kv", b"two", b"2")], chain=Chain("c"))
    assert not first.done()
    w.help()
    # Written, durable and completed before help() returned, on this very thread.
    assert first.done() and second.done()
    assert first.result() is threading.current_thread()
    assert second.result() == []
    assert w._store.get("kv", b"one") == b"1"
    assert w._store.get("kv", b"two") == b"2"
    assert w.pending("kv", b"two") == (False, None)
    assert w.stats == {"batches": 1, "requests": 2}
    w.help()  # nothing queued: nothing to do
    assert w.stats == {"batches": 1, "requests": 2}


def test_help_from_a_completing_callback_does_not_write(
        parked: tuple[ParkedWriter, ParkedWriter]) -> None:
    wx, wy = parked
    inner: list[Future[Any]] = []
    done_in_callback: list[bool] = []

    def on_done(f: Future[Any]) -> None:
        # Runs while wx completes its batch's futures: another writer's help() must not
        # start writing on this thread.
        for w in (wy, wx):
            fut = w.submit_fn(whose_thread(b"from-callback"))
            w.help()
            inner.append(fut)
            done_in_callback.append(fut.done())

    outer = wx.submit_fn(whose_thread(b"outer"))
    outer.add_done_callback(on_done)
    wx.help()
    assert outer.result() is threading.current_thread()
    assert done_in_callback == [False, False]
    assert wy._store.get("kv", b"from-callback") is None
    # Outside the callback, help() writes them on this thread after all.
    wy.help()
    wx.help()
    assert [f.result(WAIT) for f in inner] == [threading.current_thread()] * 2
    assert wy._store.get("kv", b"from-callback") == b"1"


def test_help_returns_at_once_while_another_thread_writes(store: Store) -> None:
    w = store.writer
    with held(w):
        fut = w.submit([Put("kv", b"k", b"v")])
        w.help()  # the writer thread holds the batch: help() must not wait for it
        assert not fut.done()
    assert fut.result(WAIT) == []
    assert store.get("kv", b"k") == b"v"
