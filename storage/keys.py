"""Key and value codecs: fixed-width big-endian integers so byte order is numeric order."""
from __future__ import annotations

import struct
from typing import Any

import msgpack

__all__ = ["U64_MAX", "compose", "from_u64", "pack", "prefix_end", "u64", "unpack"]

U64_MAX = (1 << 64) - 1
_U64 = struct.Struct(">Q")


def u64(n: int) -> bytes:
    """`n` as 8 big-endian bytes; raises ValueError outside 0..2**64-1."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"u64 needs an int, not {type(n).__name__}")
    if not 0 <= n <= U64_MAX:
        raise ValueError(f"{n} does not fit in an unsigned 64-bit key")
    return _U64.pack(n)


def from_u64(b: bytes) -> int:
    """The integer encoded by `u64`; `b` must be exactly 8 bytes."""
    if len(b) != 8:
        raise ValueError(f"a u64 key is 8 bytes, got {len(b)}")
    value: int = _U64.unpack(b)[0]
    return value


def compose(*parts: bytes | int | str) -> bytes:
    """Concatenate key parts: ints as `u64`, str as UTF-8, bytes as they are.

    Parts are joined without separators, so every part except the last should have a
    fixed width (ids, ints); otherwise two different tuples could give the same key.
    """
    out = bytearray()
    for part in parts:
        if isinstance(part, bytes):
            out += part
        elif isinstance(part, str):
            out += part.encode("utf-8")
        elif isinstance(part, int) and not isinstance(part, bool):
            out += u64(part)
        else:
            raise TypeError(f"a key part is bytes, int or str, not {type(part).__name__}")
    return bytes(out)


def prefix_end(prefix: bytes) -> bytes | None:
    """The smallest key greater than every key starting with `prefix` (None: no such key)."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])


def pack(obj: Any) -> bytes:
    """Encode a value for storage (msgpack, bin and str kept apart)."""
    return msgpack.packb(obj, use_bin_type=True)


def unpack(b: bytes | bytearray | memoryview) -> Any:
    """Decode a value written by `pack`; map keys may be any type (e.g. int ids).

    Accepts a memoryview too, as py-lmdb returns with `buffers=True`.
    """
    return msgpack.unpackb(b, raw=False, strict_map_key=False)
