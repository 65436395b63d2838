"""Peer messages, vouchers and channel parameters: frozen dataclasses, strict msgpack codec."""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack

from paychan.protocol.errors import DecodeError, PaychanError
from paychan.protocol.identity import (
    DOMAIN_CLOSE,
    DOMAIN_VOUCHER,
    KEY_LEN,
    SIG_LEN,
    Identity,
    check_amount,
    hash32,
    verify,
)

PROTOCOL_VERSION = 1
MAX_BODY = 64 * 1024  # a message or response, msgpack-encoded
MAX_FRAME = 2 * MAX_BODY + 4096
MAX_ID_LEN = 64
MAX_ASSET_LEN = 32
MAX_DISPUTE_PERIOD = 10 * 365 * 24 * 3600
MAX_DEPTH = 128  # nesting levels of a message or response


def _bytes(v: Any, n: int, what: str) -> bytes:
    if not isinstance(v, bytes) or len(v) != n:
        raise DecodeError(f"{what} must be {n} bytes")
    return v


def _int(v: Any, what: str, lo: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or v >= 2**63:
        raise DecodeError(f"{what} must be an integer in [{lo}, 2**63)")
    return v


def _text(v: Any, what: str, max_len: int, min_len: int = 1) -> str:
    if not isinstance(v, str) or not min_len <= len(v) <= max_len:
        raise DecodeError(f"{what} must be a string of {min_len}..{max_len} characters")
    return v


_WALKED = (list, tuple, dict, msgpack.ExtType, msgpack.Timestamp)
_EXT = (msgpack.ExtType, msgpack.Timestamp)
_KEY = (str, bytes)


def _check_tree(value: Any, what: str, max_depth: int | None = MAX_DEPTH) -> None:
    """Refuse what a strict decoder refuses (map keys other than str or bytes, extension types)
    and, with `max_depth`, nesting deeper than that (it breaks ==, repr and json downstream)."""
    # Plain loops, no generators: this runs on every message of every payment.
    stack: list[tuple[Any, int]] = [(value, 0)]
    pop, push = stack.pop, stack.append
    while stack:
        v, depth = pop()
        if isinstance(v, _EXT):
            raise DecodeError(f"{what}: msgpack extension types are not allowed")
        if max_depth is not None and depth >= max_depth:
            raise DecodeError(f"{what} nests deeper than {max_depth} levels")
        if isinstance(v, dict):
            for k in v:
                if not isinstance(k, _KEY):
                    raise DecodeError(f"{what}: map keys must be strings or bytes")
            items: Any = v.values()
        else:
            items = v
        depth += 1
        for x in items:
            if isinstance(x, _WALKED):
                push((x, depth))


def body_size(value: Any) -> int:
    """Encoded size of an application value; DecodeError when msgpack cannot carry it or the
    peer's strict decoder would refuse it (so nothing is signed for a request that cannot
    arrive)."""
    if isinstance(value, _WALKED):
        _check_tree(value, "value")
    try:
        return len(msgpack.packb(value, use_bin_type=True))
    except (TypeError, ValueError, OverflowError) as exc:
        raise DecodeError(f"value is not msgpack-able: {exc}") from None


def check_body(value: Any, what: str = "message") -> Any:
    if body_size(value) > MAX_BODY:
        raise DecodeError(f"{what} is larger than {MAX_BODY} bytes encoded")
    return value


@dataclass(frozen=True, slots=True)
class ChannelParams:
    """What both parties agree at open. `channel_id` is derived, never chosen."""

    initiator: bytes
    responder: bytes
    asset: str
    dispute_period: int
    salt: bytes
    network_id: str
    # Derived once, and a plain attribute: it is read many times per payment.
    channel_id: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _bytes(self.initiator, KEY_LEN, "initiator")
        _bytes(self.responder, KEY_LEN, "responder")
        if self.initiator == self.responder:
            raise DecodeError("initiator and responder must differ")
        _text(self.asset, "asset", MAX_ASSET_LEN)
        _int(self.dispute_period, "dispute_period", lo=1)
        if self.dispute_period > MAX_DISPUTE_PERIOD:
            raise DecodeError("dispute_period is longer than ten years")
        _bytes(self.salt, KEY_LEN, "salt")
        _text(self.network_id, "network_id", 64)
        object.__setattr__(self, "channel_id", hash32(
            "paychan/channel/v1", self.network_id, self.initiator, self.responder, self.asset,
            self.salt))

    def peer_of(self, me: bytes) -> bytes:
        if me == self.initiator:
            return self.responder
        if me == self.responder:
            return self.initiator
        raise DecodeError("not a party of this channel")

    def to_obj(self) -> list[Any]:
        return [self.initiator, self.responder, self.asset, self.dispute_period, self.salt,
                self.network_id]

    @classmethod
    def from_obj(cls, obj: Any) -> ChannelParams:
        if not isinstance(obj, list) or len(obj) != 6:
            raise DecodeError("params must be a list of 6")
        return cls(*obj)


@dataclass(frozen=True, slots=True)
class Voucher:
    """Payer's signed claim: in `period` of `channel_id` it has sent `sent` in total (nonce-th)."""

    channel_id: bytes
    period: int
    nonce: int
    sent: int
    sig: bytes

    def __post_init__(self) -> None:
        _bytes(self.channel_id, KEY_LEN, "voucher.channel_id")
        _int(self.period, "voucher.period", lo=1)
        _int(self.nonce, "voucher.nonce", lo=1)
        _int(self.sent, "voucher.sent")
        _bytes(self.sig, SIG_LEN, "voucher.sig")

    def signed_fields(self) -> list[Any]:
        return [self.channel_id, self.period, self.nonce, self.sent]

    @classmethod
    def create(cls, key: Identity, channel_id: bytes, period: int, nonce: int,
               sent: int) -> Voucher:
        check_amount(sent, "sent")
        sig = key.sign(DOMAIN_VOUCHER, [channel_id, period, nonce, sent])
        return cls(channel_id, period, nonce, sent, sig)

    def verify(self, public: bytes) -> bool:
        return verify(public, DOMAIN_VOUCHER, self.signed_fields(), self.sig)

    def to_obj(self) -> list[Any]:
        return [self.channel_id, self.period, self.nonce, self.sent, self.sig]

    @classmethod
    def from_obj(cls, obj: Any) -> Voucher:
        if not isinstance(obj, list) or len(obj) != 5:
            raise DecodeError("voucher must be a list of 5")
        return cls(*obj)


def close_fields(channel_id: bytes, period: int, sent_initiator: int,
                 sent_responder: int) -> list[Any]:
    return [channel_id, period, sent_initiator, sent_responder]


def sign_close(key: Identity, channel_id: bytes, period: int, sent_initiator: int,
               sent_responder: int) -> bytes:
    return key.sign(DOMAIN_CLOSE, close_fields(channel_id, period, sent_initiator, sent_responder))


def verify_close(public: bytes, channel_id: bytes, period: int, sent_initiator: int,
                 sent_responder: int, sig: bytes) -> bool:
    return verify(public, DOMAIN_CLOSE,
                  close_fields(channel_id, period, sent_initiator, sent_responder), sig)


# --- peer messages --------------------------------------------------------------------------
# Each field has a kind; the codec checks every field against it on decode and encode.
_KINDS = {
    "id32": lambda v, n: _bytes(v, KEY_LEN, n),
    "sig": lambda v, n: _bytes(v, SIG_LEN, n),
    "int": lambda v, n: _int(v, n),
    "period": lambda v, n: _int(v, n, lo=1),
    "pid": lambda v, n: _text(v, n, MAX_ID_LEN),
    "any": lambda v, n: check_body(v, n),
    "voucher": lambda v, n: v if isinstance(v, Voucher) else Voucher.from_obj(v),
    "voucher?": lambda v, n: None if v is None else (
        v if isinstance(v, Voucher) else Voucher.from_obj(v)),
    "params": lambda v, n: v if isinstance(v, ChannelParams) else ChannelParams.from_obj(v),
    "error?": lambda v, n: None if v is None else check_error(v, n),
    "error": lambda v, n: check_error(v, n),
    "bool": lambda v, n: v if isinstance(v, bool) else _fail(n, "a boolean"),
}


def _fail(what: str, expected: str) -> Any:
    raise DecodeError(f"{what} must be {expected}")


def check_error(v: Any, what: str) -> dict[str, Any]:
    """An error object as the wire carries it: code, message and optional data."""
    if not isinstance(v, dict) or not isinstance(v.get("code"), int) or isinstance(
            v.get("code"), bool) or not isinstance(v.get("message"), str):
        raise DecodeError(f"{what} must be an error object with code and message")
    if set(v) - {"code", "message", "data"}:
        raise DecodeError(f"{what} has unknown keys")
    check_body(v, what)
    return v


class Msg:
    """Base of every peer message: a `TYPE` tag and a schema of (field, kind)."""

    TYPE: ClassVar[str]
    SCHEMA: ClassVar[tuple[tuple[str, str], ...]]
    channel_id: bytes

    # (field, its check, its name in errors), made once per class: messages are built on
    # every payment and formatting the names each time shows.
    _CHECKS: ClassVar[tuple[tuple[str, Callable[[Any, str], Any], str], ...]] = ()
    _NAMES: ClassVar[tuple[str, ...]] = ()
    _KEYS: ClassVar[frozenset[str]] = frozenset()  # the keys of its wire map

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._CHECKS = tuple((name, _KINDS[kind], f"{cls.TYPE}.{name}")
                            for name, kind in cls.SCHEMA)
        cls._NAMES = tuple(name for name, _ in cls.SCHEMA)
        cls._KEYS = frozenset(("type", "v", *cls._NAMES))

    def __post_init__(self) -> None:
        for name, check, label in self._CHECKS:
            value = getattr(self, name)
            checked = check(value, label)
            if checked is not value:  # decoded into its type (a voucher from a list)
                object.__setattr__(self, name, checked)
        self._check_whole()

    def _check_whole(self) -> None:
        """Checks across fields, after each field passed its own."""

    @classmethod
    def _from_map(cls, obj: dict[str, Any]) -> Msg:
        """The message of a decoded wire map holding exactly its fields, checked as
        `__post_init__` checks it, without the frozen dataclass's per-field setattr."""
        msg = object.__new__(cls)
        fields = msg.__dict__
        for name, check, label in cls._CHECKS:
            fields[name] = check(obj[name], label)
        msg._check_whole()
        return msg

    @classmethod
    def _trusted(cls, *values: Any) -> Any:
        """A message from values already checked (by the action that carried them, or made
        here): the state machine builds one or two per payment."""
        msg = object.__new__(cls)
        msg.__dict__.update(zip(cls._NAMES, values, strict=True))
        return msg


_OBJ_TYPES = (Voucher, ChannelParams)


@dataclass(frozen=True)
class OpenPropose(Msg):
    TYPE = "open_propose"
    SCHEMA = (("channel_id", "id32"), ("params", "params"), ("deposit", "int"))
    channel_id: bytes
    params: ChannelParams
    deposit: int

    def _check_whole(self) -> None:
        if self.params.channel_id != self.channel_id:
            raise DecodeError("open_propose.channel_id does not match its params")


@dataclass(frozen=True)
class OpenAccept(Msg):
    TYPE = "open_accept"
    SCHEMA = (("channel_id", "id32"),)
    channel_id: bytes


@dataclass(frozen=True)
class OpenReject(Msg):
    TYPE = "open_reject"
    SCHEMA = (("channel_id", "id32"), ("error", "error"))
    channel_id: bytes
    error: dict[str, Any]


@dataclass(frozen=True)
class Pay(Msg):
    TYPE = "pay"
    SCHEMA = (("channel_id", "id32"), ("payment_id", "pid"), ("voucher", "voucher"),
              ("amount", "int"), ("message", "any"))
    channel_id: bytes
    payment_id: str
    voucher: Voucher
    amount: int
    message: Any


@dataclass(frozen=True)
class PayResult(Msg):
    """The payee's answer: a response, or an error with a refund voucher when it was charged."""

    TYPE = "pay_result"
    SCHEMA = (("channel_id", "id32"), ("payment_id", "pid"), ("response", "any"),
              ("error", "error?"), ("refund", "voucher?"))
    channel_id: bytes
    payment_id: str
    response: Any = None
    error: dict[str, Any] | None = None
    refund: Voucher | None = None


@dataclass(frozen=True)
class Message(Msg):
    TYPE = "message"
    SCHEMA = (("channel_id", "id32"), ("body", "any"))
    channel_id: bytes
    body: Any


@dataclass(frozen=True)
class Sync(Msg):
    """After (re)connect: my latest voucher and the latest of yours that I hold."""

    TYPE = "sync"
    SCHEMA = (("channel_id", "id32"), ("period", "period"), ("mine", "voucher?"),
              ("yours", "voucher?"), ("reply", "bool"))
    channel_id: bytes
    period: int
    mine: Voucher | None
    yours: Voucher | None
    reply: bool = False


@dataclass(frozen=True)
class CloseProposal(Msg):
    TYPE = "close_proposal"
    SCHEMA = (("channel_id", "id32"), ("period", "period"), ("sent_initiator", "int"),
              ("sent_responder", "int"), ("sig", "sig"))
    channel_id: bytes
    period: int
    sent_initiator: int
    sent_responder: int
    sig: bytes


@dataclass(frozen=True)
class CloseCoSigned(CloseProposal):
    """The other party's signature over the same figures: the same fields, another type."""

    TYPE = "close_cosigned"


@dataclass(frozen=True)
class ErrorMsg(Msg):
    TYPE = "error"
    SCHEMA = (("channel_id", "id32"), ("error", "error"))
    channel_id: bytes
    error: dict[str, Any]


MESSAGE_TYPES: dict[str, type[Msg]] = {
    cls.TYPE: cls for cls in (OpenPropose, OpenAccept, OpenReject, Pay, PayResult, Message, Sync,
                              CloseProposal, CloseCoSigned, ErrorMsg)
}


def encode(msg: Msg) -> bytes:
    """Bytes of a message: one msgpack map with `type`, `v` and its schema fields. Kept on the
    (immutable) message: a payment's result is both stored and sent, and sending the bytes
    that were stored holds even if the application changes its response object meanwhile."""
    fields = msg.__dict__
    data: bytes | None = fields.get("_wire")
    if data is None:
        out: dict[str, Any] = {"type": msg.TYPE, "v": PROTOCOL_VERSION}
        for name in msg._NAMES:
            value = fields[name]
            out[name] = value.to_obj() if isinstance(value, _OBJ_TYPES) else value
        data = fields["_wire"] = msgpack.packb(out, use_bin_type=True)
    return data


def _no_ext(code: int, data: bytes) -> Any:
    raise DecodeError("msgpack extension types are not allowed")


# msgpack decodes extension type -1 (a timestamp) itself, without calling ext_hook. These are
# the headers that can start one (fixext 4/8, ext 8/16/32 of length 4, 8 or 12); only frames
# holding such bytes are searched for Timestamp objects.
_TIMESTAMP_HEADER = re.compile(
    rb"[\xd6\xd7]\xff|\xc7[\x04\x08\x0c]\xff|\xc8\x00[\x04\x08\x0c]\xff"
    rb"|\xc9\x00\x00\x00[\x04\x08\x0c]\xff")


def _may_hold_timestamp(raw: bytes) -> bool:
    """True when `raw` holds a timestamp header. Every header ends in 0xff and is at most six
    bytes long, so only the few bytes before each 0xff (found by memchr) are searched: a
    search of the whole frame costs more than decoding it."""
    i = raw.find(b"\xff")
    while i != -1:
        if _TIMESTAMP_HEADER.search(raw, max(0, i - 5), i + 1):
            return True
        i = raw.find(b"\xff", i + 1)
    return False


def unpack(data: Any, max_size: int = MAX_FRAME) -> Any:
    """Strict msgpack decoding with size limits; only DecodeError escapes."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError("expected bytes")
    if len(data) > max_size:
        raise DecodeError(f"frame of {len(data)} bytes exceeds {max_size}")
    raw = bytes(data)
    try:
        obj = msgpack.unpackb(raw, raw=False, strict_map_key=True, ext_hook=_no_ext,
                              use_list=True)
    except DecodeError:
        raise
    except Exception as exc:  # msgpack raises a zoo of types; all of them mean "malformed"
        raise DecodeError(f"malformed msgpack: {type(exc).__name__}") from None
    if _may_hold_timestamp(raw):
        _check_tree(obj, "frame", max_depth=None)
    return obj


def decode(data: Any) -> Msg:
    """A message from bytes. Any malformation raises DecodeError and nothing else."""
    obj = unpack(data)
    if not isinstance(obj, dict):
        raise DecodeError("a message is a map")
    kind = obj.get("type")
    cls = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise DecodeError(f"unknown message type {kind!r}")
    version = obj.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:  # not 1.0, not True
        raise DecodeError(f"unsupported protocol version {version!r}")
    if obj.keys() != cls._KEYS:
        raise DecodeError(f"{kind}: fields must be exactly {list(cls._NAMES)}")
    try:
        return cls._from_map(obj)
    except DecodeError:
        raise
    except PaychanError as exc:
        raise DecodeError(f"{kind}: {exc.message}") from None
    except Exception as exc:  # a constructor tripping on a hostile value is still a decode error
        raise DecodeError(f"{kind}: {type(exc).__name__}") from None

