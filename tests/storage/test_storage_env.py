"""The store: one environment per path, reopen persistence, schema refusal, reads, map full."""
import os
from pathlib import Path

import lmdb
import pytest

from paychan.storage.env import DB_NAMES, SCHEMA_VERSION, Store
from paychan.storage.errors import SchemaTooNew, StorageError, StoreClosed, StoreFull
from paychan.storage.keys import from_u64, pack, u64
from paychan.storage.writer import Append, Put


def test_reopen_keeps_data(tmp_path: Path) -> None:
    path = tmp_path / "data"
    first = Store.open(path)
    first.writer.commit([Put("channels", b"ch1", pack({"sent": 5}))])
    first.close()
    assert first.closed
    with pytest.raises(StoreClosed):
        first.get("channels", b"ch1")

    second = Store.open(path)
    try:
        assert second is not first
        assert second.get_obj("channels", b"ch1") == {"sent": 5}
        assert second.get_obj("meta", b"schema_version") == SCHEMA_VERSION
    finally:
        second.close()


def test_same_instance_per_path_with_reference_count(tmp_path: Path) -> None:
    path = tmp_path / "data"
    a = Store.open(path)
    os.symlink(path, tmp_path / "link")
    b = Store.open(tmp_path / "link")
    c = Store.open(str(tmp_path / "data" / ".." / "data"))
    assert a is b is c
    a.close()
    b.close()
    assert not c.closed
    c.writer.commit([Put("kv", b"k", b"v")])
    assert c.get("kv", b"k") == b"v"
    c.close()
    assert c.closed
    c.close()  # closing again is harmless
    d = Store.open(path)
    assert d is not a
    assert d.get("kv", b"k") == b"v"
    d.close()


def test_all_named_databases_exist(store: Store) -> None:
    for name in DB_NAMES:
        assert store.count(name) == (1 if name == "meta" else 0)
    with pytest.raises(StorageError):
        store.db("nope")


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "data"
    s = Store.open(path)
    s.writer.commit([Put("meta", b"schema_version", pack(SCHEMA_VERSION + 1))])
    s.close()

    for _ in range(2):  # a refused open leaves nothing registered behind
        with pytest.raises(SchemaTooNew) as info:
            Store.open(path)
        message = str(info.value)
        assert f"version {SCHEMA_VERSION + 1}" in message
        assert f"version {SCHEMA_VERSION}" in message
        assert info.value.found == SCHEMA_VERSION + 1
        assert info.value.supported == SCHEMA_VERSION
        assert isinstance(info.value, StorageError)

    # The refusal did not modify the store: the version is still the newer one.
    env = lmdb.open(str(path), max_dbs=32, readonly=True, lock=False)
    try:
        with env.begin() as txn:
            meta = env.open_db(b"meta", txn=txn, create=False)
            assert txn.get(b"schema_version", db=meta) == pack(SCHEMA_VERSION + 1)
    finally:
        env.close()


def test_map_full_surfaces_as_store_full(tmp_path: Path) -> None:
    s = Store.open(tmp_path / "small", map_size=64 * 4096)
    try:
        with pytest.raises(StoreFull) as info:
            for i in range(100):
                s.writer.commit([Put("kv", u64(i), bytes(32 * 1024))])
        assert "map_size" in str(info.value)
        assert isinstance(info.value, StorageError)
        # The writer survives and small writes that fit still land.
        s.writer.commit([Put("kv", b"small", b"x")])
        assert s.get("kv", b"small") == b"x"
    finally:
        s.close()


def test_reads(store: Store) -> None:
    seqs = store.writer.commit([Append("payments", b"p", pack(i)) for i in range(300)])
    assert seqs == list(range(1, 301))
    store.writer.commit([Append("payments", b"q", pack("other"))])

    items = list(store.iter_prefix("payments", b"p"))
    assert [from_u64(k[1:]) for k, _ in items] == list(range(1, 301))
    # Big-endian keys: 255 sorts before 256 (little-endian or text keys would not).
    assert [from_u64(k[1:]) for k, _ in items[254:256]] == [255, 256]
    assert [store.get_obj("payments", k) for k, _ in items[:3]] == [0, 1, 2]

    tail = list(store.iter_from("payments", b"p" + u64(299)))
    assert [k for k, _ in tail] == [b"p" + u64(299), b"p" + u64(300), b"q" + u64(1)]
    bounded = list(store.iter_from("payments", b"p" + u64(10), stop=b"p" + u64(13)))
    assert [from_u64(k[1:]) for k, _ in bounded] == [10, 11, 12]

    assert store.count("payments") == 301
    last = store.last("payments", b"p")
    assert last is not None and last[0] == b"p" + u64(300)
    assert store.last("payments", b"zz") is None
    assert store.get("payments", b"missing") is None
    assert store.get_obj("payments", b"missing") is None


def test_corrupt_record_is_a_storage_error(store: Store) -> None:
    store.writer.commit([Put("kv", b"bad", b"\xc1")])  # 0xc1 is never valid msgpack
    with pytest.raises(StorageError, match="corrupt record"):
        store.get_obj("kv", b"bad")


def test_not_an_lmdb_dir_is_a_storage_error(tmp_path: Path) -> None:
    path = tmp_path / "data"
    path.mkdir()
    (path / "data.mdb").write_bytes(b"this is not an lmdb file" * 1000)
    with pytest.raises(StorageError, match="cannot open"):
        Store.open(path)
