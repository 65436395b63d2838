"""Helpers for tests that make a node's commits fail: the failing writer, a recording payment
handler and the agreement check both sides must pass afterwards."""
from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import lmdb
import pytest

import paychan
from paychan.protocol.errors import StorageError
from paychan.storage import writer as writer_module
from paychan.storage.env import Store
from paychan.storage.writer import Op

DEPOSIT = 1_000  # conftest's channel deposit, made by A


class FailingCommits:
    """Fails the next `times` requests that write the "channels" database of one store."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.real = writer_module.apply
        self.lock = threading.Lock()
        self.path: str | None = None
        self.left = 0
        self.error: Callable[[], BaseException] = lambda: StorageError("injected")
        self.failed: list[tuple[Op, ...]] = []
        monkeypatch.setattr(writer_module, "apply", self.apply)

    def arm(self, node: paychan.Node,
            error: Callable[[], BaseException] = lambda: StorageError("injected: write failed"),
            times: int = 1) -> None:
        with self.lock:
            self.path, self.error, self.left = node._core.store.path, error, times

    def apply(self, txn: lmdb.Transaction, store: Store, ops: Sequence[Op]) -> list[int]:
        with self.lock:
            fail = (self.left > 0 and store.path == self.path
                    and any(op.db == "channels" for op in ops))
            if fail:
                self.left -= 1
                self.failed.append(tuple(ops))
        if fail:
            raise self.error()
        return self.real(txn, store, ops)


class Served:
    """B's payment handler: remembers the payment ids it served, in order."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.served: list[str] = []

    def __call__(self, p: paychan.Payment) -> Any:
        with self.lock:
            self.served.append(p.payment_id)
        return ["served", p.message, p.amount]

    def ids(self) -> list[str]:
        with self.lock:
            return list(self.served)


def check_agreement(a: paychan.Node, b: paychan.Node, ch: str, sent: int,
                    deposit_b: int = 0) -> None:
    """Both sides agree on what A sent and on both deposits, and the deposits are all
    accounted for."""
    sa, sb = a.balances(ch), b.balances(ch)
    assert sa["sent_by_me"] == sb["sent_by_peer"] == sent
    assert sa["sent_by_peer"] == sb["sent_by_me"] == 0
    assert sa["deposited_by_me"] == sb["deposited_by_peer"] == DEPOSIT
    assert sa["deposited_by_peer"] == sb["deposited_by_me"] == deposit_b
    assert sa["my_balance"] + sa["peer_balance"] == DEPOSIT + deposit_b
    assert sb["my_balance"] + sb["peer_balance"] == DEPOSIT + deposit_b
    assert (sa["my_balance"], sa["peer_balance"]) == (sb["peer_balance"], sb["my_balance"])
    assert sa["my_balance"] == DEPOSIT - sent
