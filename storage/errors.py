"""The storage layer's errors, all `StorageError`s so callers can catch the family at once."""
from __future__ import annotations

from paychan.protocol.errors import StorageError

__all__ = ["ChainBroken", "SchemaTooNew", "StorageError", "StoreClosed", "StoreFull"]


class SchemaTooNew(StorageError):
    """The data dir was written by a newer paychan; opening it could corrupt it."""

    def __init__(self, message: str | None = None, *, found: int = 0, supported: int = 0) -> None:
        super().__init__(message)
        self.found = found
        self.supported = supported


class StoreFull(StorageError):
    """The LMDB map is full; the store must be reopened with a larger `map_size`."""


class StoreClosed(StorageError):
    """The store (or its writer) was used after it was closed."""


class ChainBroken(StorageError):
    """An earlier request of the same chain failed, so this one was not written either."""
