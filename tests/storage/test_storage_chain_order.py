"""A chain's failure hides only what comes at or after the failed request: the values of
earlier requests of the same chain, applied in the same batch and about to commit, stay
visible through `pending` / `Store.get_latest` until the batch settles. Hiding them too would
show the value from before them, one a successor starting meanwhile would build on."""
from __future__ import annotations

import threading
from collections.abc import Iterator

import lmdb
import pytest
from boom import BOOM, Injected

from paychan.storage.env import Store
from paychan.storage.errors import ChainBroken
from paychan.storage.writer import Chain, Put

WAIT = 5.0


class Pause:
    """A request that holds the writer inside its batch until released."""

    def __init__(self) -> None:
        self.inside, self.release = threading.Event(), threading.Event()

    def __call__(self, txn: lmdb.Transaction, s: Store) -> None:
        self.inside.set()
        self.release.wait(WAIT)

    def wait_inside(self) -> None:
        assert self.inside.wait(WAIT), "the writer never reached the pause"


@pytest.fixture
def pauses() -> Iterator[list[Pause]]:
    made: list[Pause] = []
    yield made
    for p in made:  # whatever happened, no writer stays paused
        p.release.set()


@pytest.mark.usefixtures("failing_apply")
def test_pending_keeps_an_earlier_write_of_the_chain_while_its_batch_settles(
        store: Store, pauses: list[Pause]) -> None:
    w = store.writer
    w.commit([Put("channels", b"k", b"S0")], timeout=WAIT)
    before, mid = Pause(), Pause()
    pauses += [before, mid]
    held = w.submit_fn(before)
    before.wait_inside()  # the writer is busy: what follows makes up the next batch
    chain = Chain("ch")
    r1 = w.submit([Put("channels", b"k", b"S1")], chain=chain)  # succeeds
    r2 = w.submit([Put("channels", b"k", BOOM), Put("channels", b"only-r2", b"x")],
                  chain=chain)  # fails: breaks the chain
    r3 = w.submit([Put("channels", b"k", b"S3")], chain=chain)  # refused: built on R2
    paused = w.submit_fn(mid)  # runs after R1, R2 and R3, before the batch commits
    # Nothing failed yet: the newest pending value wins.
    assert w.pending("channels", b"k") == (True, b"S3")
    assert store.get_latest("channels", b"k") == b"S3"
    before.release.set()
    held.result(WAIT)
    mid.wait_inside()
    try:
        # R1 applied, R2 failed, R3 refused, nothing committed: R1's value is the latest.
        assert chain.broken is not None
        assert w.pending("channels", b"k") == (True, b"S1")
        assert store.get_latest("channels", b"k") == b"S1"
        assert store.get("channels", b"k") == b"S0"  # not durable yet
        # What only the failed request put is hidden.
        assert w.pending("channels", b"only-r2") == (False, None)
        assert store.get_latest("channels", b"only-r2") is None
    finally:
        mid.release.set()
    paused.result(WAIT)
    assert r1.result(WAIT) == []
    with pytest.raises(Injected):
        r2.result(WAIT)
    with pytest.raises(ChainBroken):
        r3.result(WAIT)
    assert store.get("channels", b"k") == b"S1"
    assert store.get_latest("channels", b"k") == b"S1"
    assert w.pending("channels", b"k") == (False, None)
    assert store.get("channels", b"only-r2") is None


@pytest.mark.usefixtures("failing_apply")
def test_a_chain_failing_at_its_first_request_hides_all_of_its_batch(
        store: Store, pauses: list[Pause]) -> None:
    """The other side of the same rule: nothing of a chain at or after its first failure is
    visible, even while the batch is still open."""
    w = store.writer
    w.commit([Put("channels", b"k", b"S0")], timeout=WAIT)
    before, mid = Pause(), Pause()
    pauses += [before, mid]
    held = w.submit_fn(before)
    before.wait_inside()
    chain = Chain("ch")
    r1 = w.submit([Put("channels", b"k", BOOM)], chain=chain)
    r2 = w.submit([Put("channels", b"k", b"S2")], chain=chain)
    paused = w.submit_fn(mid)
    before.release.set()
    held.result(WAIT)
    mid.wait_inside()
    try:
        assert w.pending("channels", b"k") == (False, None)
        assert store.get_latest("channels", b"k") == b"S0"
    finally:
        mid.release.set()
    paused.result(WAIT)
    with pytest.raises(Injected):
        r1.result(WAIT)
    with pytest.raises(ChainBroken):
        r2.result(WAIT)
    assert store.get("channels", b"k") == b"S0"
