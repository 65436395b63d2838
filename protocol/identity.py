"""Identities, text encodings, amounts and domain-separated signatures (DESIGN §3)."""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import base58
import msgpack
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from paychan.protocol.errors import BrokenEncoding, InvalidPubkeys, NegativeAmount, NotANumber

MAX_AMOUNT = 2**63  # exclusive upper bound of every amount
KEY_LEN = 32
SIG_LEN = 64

DOMAIN_VOUCHER = b"paychan/voucher/v1"
DOMAIN_CLOSE = b"paychan/close/v1"
DOMAIN_TX = b"paychan/tx/v1"
DOMAIN_HUB_LOGIN = b"paychan/hub-login/v1"


def check_amount(value: Any, what: str = "amount") -> int:
    """Return `value` if it is an int in [0, 2**63); raise the matching error otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise NotANumber(f"{what} must be an integer, got {type(value).__name__}")
    if value < 0:
        raise NegativeAmount(f"{what} must not be negative, got {value}")
    if value >= MAX_AMOUNT:
        raise NotANumber(f"{what} must be below 2**63, got {value}")
    return value


def canonical(fields: Sequence[Any]) -> bytes:
    """The canonical bytes of an ordered field list: msgpack of a list, bin type for bytes."""
    return msgpack.packb(list(fields), use_bin_type=True)


def signing_bytes(domain: bytes, fields: Sequence[Any]) -> bytes:
    # The NUL separates the tag from the payload so no tag is a prefix of another's bytes.
    return domain + b"\x00" + canonical(fields)


_BYTES = (bytes, bytearray, memoryview)


@lru_cache(maxsize=4096)
def _verify_key(public: bytes) -> VerifyKey:
    return VerifyKey(public)


def verify(public: bytes, domain: bytes, fields: Sequence[Any], sig: bytes) -> bool:
    """True when `sig` is `public`'s signature of `fields` under `domain`; False for anything
    malformed (wrong types or sizes, fields msgpack cannot carry), never an exception."""
    if not (isinstance(public, _BYTES) and len(public) == KEY_LEN
            and isinstance(sig, _BYTES) and len(sig) == SIG_LEN):
        return False
    try:
        _verify_key(bytes(public)).verify(signing_bytes(domain, fields), bytes(sig))
    except (BadSignatureError, ValueError, TypeError, OverflowError):
        return False
    return True


@dataclass(frozen=True)
class Identity:
    """An Ed25519 key pair. Built from a 32-byte seed: the protocol layer makes no randomness."""

    seed: bytes = field(repr=False)
    public: bytes = field(init=False)
    _key: SigningKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.seed, bytes) or len(self.seed) != KEY_LEN:
            raise InvalidPubkeys("an identity seed is 32 bytes")
        key = SigningKey(self.seed)
        object.__setattr__(self, "_key", key)
        object.__setattr__(self, "public", bytes(key.verify_key))

    @property
    def address(self) -> str:
        return encode_address(self.public)

    @property
    def signing_key(self) -> SigningKey:
        return self._key

    def sign(self, domain: bytes, fields: Sequence[Any]) -> bytes:
        return self._key.sign(signing_bytes(domain, fields)).signature


@lru_cache(maxsize=65536)  # ids are decoded on every API call; base58 is slow in Python
def _encode(prefix: str, raw: bytes) -> str:
    return prefix + base58.b58encode_check(raw).decode("ascii")


def _decode(prefix: str, text: Any, what: str) -> bytes:
    if isinstance(text, str):
        return _decode_text(prefix, text, what)
    raise BrokenEncoding(f"{what} must be a string starting with {prefix!r}")


@lru_cache(maxsize=65536)
def _decode_text(prefix: str, text: str, what: str) -> bytes:
    if not isinstance(text, str) or not text.startswith(prefix):
        raise BrokenEncoding(f"{what} must be a string starting with {prefix!r}")
    try:
        raw = base58.b58decode_check(text[len(prefix):])
    except ValueError as exc:
        raise BrokenEncoding(f"{what} {text!r}: {exc}") from None
    if len(raw) != KEY_LEN:
        raise InvalidPubkeys(f"{what} {text!r} does not hold 32 bytes")
    return raw


def encode_address(public: bytes) -> str:
    """`ak_` + base58check of a 32-byte public key."""
    return _encode("ak_", public)


def decode_address(text: Any) -> bytes:
    """The public key of an `ak_` address; BrokenEncoding or InvalidPubkeys when it is not one."""
    return _decode("ak_", text, "account")


def encode_channel_id(raw: bytes) -> str:
    return _encode("ch_", raw)


def decode_channel_id(text: Any) -> bytes:
    return _decode("ch_", text, "channel id")


def short(raw: bytes) -> str:
    """A short tag for logs: the first characters of the text form."""
    return encode_channel_id(raw)[:12]


def hash32(*parts: Any) -> bytes:
    return hashlib.blake2b(canonical(parts), digest_size=32).digest()
