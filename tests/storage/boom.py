"""A writer whose requests fail when they put BOOM, for tests of chained requests."""
from __future__ import annotations

from collections.abc import Sequence

import lmdb
import pytest

from paychan.storage import writer as writer_module
from paychan.storage.env import Store
from paychan.storage.writer import Op, Put

BOOM = b"BOOM"  # a Put of this value fails inside the writer


class Injected(RuntimeError):
    """The failure of a request that puts BOOM."""


def fail_on_boom(monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests that put BOOM fail as a write would; every other request is applied."""
    real = writer_module.apply

    def apply(txn: lmdb.Transaction, s: Store, ops: Sequence[Op]) -> list[int]:
        if any(isinstance(op, Put) and op.value == BOOM for op in ops):
            raise Injected("injected write failure")
        return real(txn, s, ops)

    monkeypatch.setattr(writer_module, "apply", apply)
