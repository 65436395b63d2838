"""Key codecs: fixed-width big-endian integers sort numerically; msgpack values round-trip."""
import random
from typing import Any, cast

import pytest

from paychan.storage.keys import compose, from_u64, pack, prefix_end, u64, unpack


def test_u64_round_trip_and_bounds() -> None:
    for n in (0, 1, 255, 256, 2**32, 2**64 - 1):
        assert len(u64(n)) == 8
        assert from_u64(u64(n)) == n
    with pytest.raises(ValueError):
        u64(-1)
    with pytest.raises(ValueError):
        u64(2**64)
    with pytest.raises(TypeError):
        u64(True)
    with pytest.raises(ValueError):
        from_u64(b"\x00" * 7)


def test_byte_order_is_numeric_order() -> None:
    rng = random.Random(7)
    numbers = [rng.randrange(2**64) for _ in range(500)] + [255, 256, 65535, 65536]
    assert sorted(numbers, key=u64) == sorted(numbers)
    assert u64(255) < u64(256)


def test_compose() -> None:
    assert compose(b"ch", 1, "x") == b"ch" + u64(1) + b"x"
    assert compose(b"a", 255) < compose(b"a", 256)
    assert compose() == b""
    with pytest.raises(TypeError):
        compose(cast(Any, 1.5))
    with pytest.raises(TypeError):
        compose(False)
    with pytest.raises(ValueError):
        compose(-1)


def test_prefix_end() -> None:
    assert prefix_end(b"ab") == b"ac"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"\xff\xff") is None
    assert prefix_end(b"") is None


def test_pack_round_trip() -> None:
    value = {"id": b"\x01\x02", "n": 2**63 - 1, 7: ["text", None, True]}
    assert unpack(pack(value)) == value
    assert isinstance(unpack(pack("s")), str)
    assert isinstance(unpack(pack(b"s")), bytes)
