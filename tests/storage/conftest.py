"""Fixtures of the storage tests: a fresh store on a real LMDB file, a writer failing on BOOM."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from boom import fail_on_boom

from paychan.storage.env import Store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store.open(tmp_path / "data")
    yield s
    s.close()


@pytest.fixture
def failing_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests that put BOOM fail as a write would; every other request is applied."""
    fail_on_boom(monkeypatch)
