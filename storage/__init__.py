"""LMDB persistence for paychan: one environment per data dir and a group-commit writer."""
from paychan.storage.env import DB_NAMES, SCHEMA_VERSION, Store
from paychan.storage.errors import SchemaTooNew, StorageError, StoreClosed, StoreFull
from paychan.storage.writer import Append, Delete, Put, Writer

__all__ = [
    "DB_NAMES",
    "SCHEMA_VERSION",
    "Append",
    "Delete",
    "Put",
    "SchemaTooNew",
    "StorageError",
    "Store",
    "StoreClosed",
    "StoreFull",
    "Writer",
]
