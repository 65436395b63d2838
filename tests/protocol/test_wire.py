"""The strict wire codec: every message round-trips; hostile bytes only ever raise DecodeError."""
from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from paychan.protocol.errors import DecodeError
from paychan.protocol.identity import DOMAIN_VOUCHER, Identity
from paychan.protocol.wire import (
    MAX_ASSET_LEN,
    MAX_BODY,
    MAX_DEPTH,
    MAX_DISPUTE_PERIOD,
    MAX_FRAME,
    MAX_ID_LEN,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    ChannelParams,
    CloseCoSigned,
    CloseProposal,
    ErrorMsg,
    Message,
    Msg,
    OpenAccept,
    OpenPropose,
    OpenReject,
    Pay,
    PayResult,
    Sync,
    Voucher,
    body_size,
    check_body,
    decode,
    encode,
    sign_close,
    unpack,
    verify_close,
)

U63 = 2**63 - 1
id32 = st.binary(min_size=32, max_size=32)
sig64 = st.binary(min_size=64, max_size=64)
amounts = st.integers(min_value=0, max_value=U63)
periods = st.integers(min_value=1, max_value=U63)
pids = st.text(min_size=1, max_size=MAX_ID_LEN)

# What msgpack carries and gives back unchanged (lists, not tuples; no NaN, which != itself).
scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1),
                    st.floats(allow_nan=False), st.text(max_size=20), st.binary(max_size=20))
bodies = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.one_of(st.text(max_size=8), st.binary(max_size=8)),
                                            inner, max_size=4)),
    max_leaves=12)
error_objs = st.builds(
    lambda code, message, data: {"code": code, "message": message} if data is None
    else {"code": code, "message": message, "data": data},
    st.integers(min_value=-(2**31), max_value=2**31), st.text(max_size=30),
    st.one_of(st.none(), st.lists(st.fixed_dictionaries({"code": st.integers(0, 2000),
                                                          "message": st.text(max_size=20)}),
                                  min_size=1, max_size=2)))
vouchers = st.builds(Voucher, id32, periods, periods, amounts, sig64)
# The first byte tells the parties apart, so they always differ.
params = st.builds(
    ChannelParams, id32.map(lambda b: b"\x00" + b[1:]), id32.map(lambda b: b"\xff" + b[1:]),
    st.text(min_size=1, max_size=MAX_ASSET_LEN),
    st.integers(min_value=1, max_value=MAX_DISPUTE_PERIOD), id32,
    st.text(min_size=1, max_size=64))

STRATEGIES: dict[str, st.SearchStrategy[Msg]] = {
    "open_propose": st.builds(lambda p, d: OpenPropose(p.channel_id, p, d), params, amounts),
    "open_accept": st.builds(OpenAccept, id32),
    "open_reject": st.builds(OpenReject, id32, error_objs),
    "pay": st.builds(Pay, id32, pids, vouchers, amounts, bodies),
    "pay_result": st.builds(PayResult, id32, pids, bodies, st.none() | error_objs,
                            st.none() | vouchers),
    "message": st.builds(Message, id32, bodies),
    "sync": st.builds(Sync, id32, periods, st.none() | vouchers, st.none() | vouchers,
                      st.booleans()),
    "close_proposal": st.builds(CloseProposal, id32, periods, amounts, amounts, sig64),
    "close_cosigned": st.builds(CloseCoSigned, id32, periods, amounts, amounts, sig64),
    "error": st.builds(ErrorMsg, id32, error_objs),
}
messages = st.one_of(*STRATEGIES.values())


def _nest(depth: int, leaf: Any) -> Any:
    out = leaf
    for _ in range(depth):
        out = [out]
    return out


def raw_map(msg: Msg) -> dict[str, Any]:
    out = msgpack.unpackb(encode(msg), raw=False)
    assert isinstance(out, dict)
    return out


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def decode_or_error(data: Any) -> Msg | None:
    """Decode; None on DecodeError. Any other exception fails the test."""
    try:
        msg = decode(data)
    except DecodeError as exc:
        assert (exc.code, exc.detail) == (3, 1005)
        return None
    assert isinstance(msg, tuple(MESSAGE_TYPES.values()))
    assert decode(encode(msg)) == msg  # whatever decodes is a well-formed message
    return msg


def assert_rejected(data: Any) -> None:
    with pytest.raises(DecodeError) as exc:
        decode(data)
    assert type(exc.value) is DecodeError
    assert (exc.value.code, exc.value.detail) == (3, 1005)


# --- round trips ----------------------------------------------------------------------------

def test_there_is_a_strategy_for_every_message_type() -> None:
    assert set(STRATEGIES) == set(MESSAGE_TYPES)
    for name, cls in MESSAGE_TYPES.items():
        assert cls.TYPE == name


@pytest.mark.parametrize("name", sorted(MESSAGE_TYPES))
def test_every_message_type_round_trips(name: str) -> None:
    @given(STRATEGIES[name])
    def check(msg: Msg) -> None:
        assert type(msg) is MESSAGE_TYPES[name]
        data = encode(msg)
        assert len(data) <= MAX_FRAME
        back = decode(data)
        assert type(back) is type(msg)
        assert back == msg
        assert encode(back) == data  # the encoding is canonical

    check()


@given(messages)
def test_an_encoding_is_one_map_with_type_v_and_exactly_the_schema(msg: Msg) -> None:
    obj = raw_map(msg)
    assert obj["type"] == msg.TYPE
    assert obj["v"] == PROTOCOL_VERSION
    assert set(obj) == {"type", "v", *(name for name, _ in msg.SCHEMA)}


def test_decode_accepts_bytearray_and_memoryview() -> None:
    msg = OpenAccept(bytes(32))
    assert decode(bytearray(encode(msg))) == msg
    assert decode(memoryview(encode(msg))) == msg


# --- hostile input --------------------------------------------------------------------------

@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_decode_error(data: bytes) -> None:
    decode_or_error(data)


@given(st.one_of(st.none(), st.integers(), st.text(), st.lists(st.integers())))
def test_non_bytes_input_is_a_decode_error(value: Any) -> None:
    assert_rejected(value)


@given(messages, st.data())
def test_byte_mutations_raise_only_decode_error(msg: Msg, data: st.DataObject) -> None:
    buf = bytearray(encode(msg))
    for _ in range(data.draw(st.integers(min_value=1, max_value=4), label="mutations")):
        op = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate", "dup"]))
        i = data.draw(st.integers(min_value=0, max_value=max(0, len(buf) - 1)), label="at")
        if op == "flip" and buf:
            buf[i] ^= data.draw(st.integers(min_value=1, max_value=255), label="mask")
        elif op == "insert":
            buf[i:i] = data.draw(st.binary(min_size=1, max_size=9), label="bytes")
        elif op == "delete" and buf:
            del buf[i:i + data.draw(st.integers(min_value=1, max_value=9), label="n")]
        elif op == "truncate":
            del buf[i:]
        else:
            buf[i:i] = buf[i:i + data.draw(st.integers(min_value=1, max_value=40), label="n")]
    decode_or_error(bytes(buf))


# Values of every msgpack type, including extension types and deep nesting.
hostile = st.one_of(
    bodies,
    st.builds(msgpack.ExtType, st.integers(min_value=0, max_value=127), st.binary(max_size=8)),
    st.builds(msgpack.Timestamp, st.integers(min_value=0, max_value=2**34 - 1)),
    st.floats(), st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.lists(st.binary(min_size=32, max_size=32), max_size=6),
    st.integers(min_value=1, max_value=3000).map(lambda n: _nest(n, 0)),
)


def _kind_of(msg: Msg, name: str) -> str:
    return dict(msg.SCHEMA)[name]


@given(messages, st.data())
def test_field_mutations_raise_only_decode_error(msg: Msg, data: st.DataObject) -> None:
    """Change field values (any type, ext types, nesting), add keys, remove keys."""
    obj = raw_map(msg)
    for _ in range(data.draw(st.integers(min_value=1, max_value=3), label="mutations")):
        op = data.draw(st.sampled_from(["replace", "remove", "add", "nested"]), label="op")
        key = data.draw(st.sampled_from(sorted(obj)), label="key") if obj else None
        if op == "replace" and key is not None:
            obj[key] = data.draw(hostile, label="value")
        elif op == "remove" and key is not None:
            del obj[key]
        elif op == "add":
            obj[data.draw(st.text(max_size=12), label="new key")] = data.draw(hostile)
        elif op == "nested" and key is not None and isinstance(obj[key], list) and obj[key]:
            inner = list(obj[key])
            j = data.draw(st.integers(min_value=0, max_value=len(inner) - 1), label="index")
            inner[j] = data.draw(hostile, label="inner value")
            obj[key] = inner
    try:
        blob = pack(obj)
    except (ValueError, OverflowError):  # too deep for msgpack to write: nothing to decode
        return
    decode_or_error(blob)


@given(messages, st.data())
def test_a_field_of_another_type_is_rejected(msg: Msg, data: st.DataObject) -> None:
    """Every typed field (all but the free-form message bodies) refuses a value of another
    Python type; an optional one also takes None."""
    obj = raw_map(msg)
    typed = [name for name, kind in msg.SCHEMA if kind != "any"]
    name = data.draw(st.sampled_from(typed), label="field")
    value = data.draw(hostile.filter(lambda v: type(v) is not type(obj[name])), label="value")
    if value is None and _kind_of(msg, name).endswith("?"):
        return
    obj[name] = value
    try:
        blob = pack(obj)
    except (ValueError, OverflowError):
        return
    assert_rejected(blob)


@given(messages, st.data())
def test_a_missing_field_is_rejected(msg: Msg, data: st.DataObject) -> None:
    obj = raw_map(msg)
    del obj[data.draw(st.sampled_from(sorted(obj)), label="removed")]
    assert_rejected(pack(obj))


@given(messages, st.text(max_size=12), bodies)
def test_an_extra_field_is_rejected(msg: Msg, key: str, value: Any) -> None:
    obj = raw_map(msg)
    if key in obj:
        return
    obj[key] = value
    assert_rejected(pack(obj))


@given(messages, st.one_of(st.integers(min_value=-(2**63), max_value=2**64 - 1), st.floats(),
                           st.text(), st.none(), st.booleans(), st.binary())
       .filter(lambda v: type(v) is not int or v != 1))
def test_a_wrong_protocol_version_is_rejected(msg: Msg, v: Any) -> None:
    obj = raw_map(msg)
    obj["v"] = v
    assert_rejected(pack(obj))


@pytest.mark.parametrize("v", [1.0, True, "1", b"\x01", [1], 2, 0, -1])
def test_protocol_version_must_be_the_integer_one(v: Any) -> None:
    obj = raw_map(OpenAccept(bytes(32)))
    obj["v"] = v
    assert_rejected(pack(obj))


@given(messages, st.one_of(st.text(max_size=20), st.integers(min_value=-(2**63), max_value=2**63),
                           st.none(), st.binary(max_size=20),
                           st.sampled_from([t.encode() for t in MESSAGE_TYPES])))
def test_an_unknown_type_is_rejected(msg: Msg, kind: Any) -> None:
    if kind in MESSAGE_TYPES:
        return
    obj = raw_map(msg)
    obj["type"] = kind
    assert_rejected(pack(obj))


@pytest.mark.parametrize("top", [[], [1, 2], 5, "open_accept", None, b"\x80"])
def test_a_message_is_a_map(top: Any) -> None:
    assert_rejected(pack(top))


def test_map_keys_must_be_strings() -> None:
    obj: dict[Any, Any] = raw_map(OpenAccept(bytes(32)))
    obj[1] = 2
    assert_rejected(pack(obj))


def test_another_messages_fields_are_rejected() -> None:
    obj = raw_map(OpenAccept(bytes(32)))
    obj["type"] = "error"
    assert_rejected(pack(obj))


EXT_BLOBS = {
    "ext0-empty": pack(msgpack.ExtType(0, b"")),
    "ext42": pack(msgpack.ExtType(42, b"abc")),
    "ext-5": b"\xd4\xfb\x78",             # negative (reserved) type codes, written by hand
    "ext-128": b"\xc7\x02\x80ab",
    "timestamp32": pack(msgpack.Timestamp(1, 0)),
    "timestamp64": pack(msgpack.Timestamp(2**33, 5)),
    "timestamp96": pack(msgpack.Timestamp(-(2**40), 0)),
    "timestamp-ext8": b"\xc7\x04\xff" + bytes(4),
    "timestamp-ext16": b"\xc8\x00\x08\xff" + bytes(8),
    "timestamp-ext32": b"\xc9\x00\x00\x00\x0c\xff" + bytes(12),
    "bad-timestamp": b"\xd5\xff\x00\x00",
}


def _with_body_blob(blob: bytes, wrap: bool) -> bytes:
    """A Message encoding whose body is the raw msgpack `blob` (inside a map when `wrap`)."""
    marker = "\ue000" * 8
    data = pack({**raw_map(Message(bytes(32), None)), "body": {"k": marker} if wrap else marker})
    packed_marker = pack(marker)
    assert data.count(packed_marker) == 1
    return data.replace(packed_marker, blob)


@pytest.mark.parametrize("blob", list(EXT_BLOBS.values()), ids=list(EXT_BLOBS))
def test_extension_types_are_rejected_anywhere(blob: bytes) -> None:
    assert_rejected(_with_body_blob(blob, wrap=False))
    assert_rejected(_with_body_blob(blob, wrap=True))
    with pytest.raises(DecodeError):
        unpack(b"\x92\x01" + blob)


def test_the_body_splicing_helper_builds_what_it_says() -> None:
    assert decode(_with_body_blob(pack([1, "x"]), wrap=True)) == Message(bytes(32),
                                                                           {"k": [1, "x"]})


@pytest.mark.parametrize("depth", [10, 600, 1000, 1500, 100_000])
def test_deep_nesting_is_a_decode_error_or_a_message(depth: int) -> None:
    raw = raw_map(Message(bytes(32), None))
    prefix = pack({k: v for k, v in raw.items() if k != "body"})
    # Append the body by hand: msgpack itself refuses to write a structure this deep.
    blob = bytes([prefix[0] + 1]) + prefix[1:] + pack("body") + b"\x91" * depth + b"\xc0"
    if depth <= 10:
        assert decode(blob) == Message(bytes(32), _nest(depth, None))
    elif depth >= 100_000:
        assert_rejected(blob)
    else:  # msgpack's own depth limit decides; either way nothing but DecodeError escapes
        decode_or_error(blob)


def test_a_frame_over_max_frame_is_rejected_before_parsing() -> None:
    ok = encode(Message(bytes(32), None))
    assert_rejected(ok + b"\x00" * (MAX_FRAME + 1 - len(ok)))
    with pytest.raises(DecodeError, match="exceeds"):
        unpack(b"\xc0" * (MAX_FRAME + 1))


def test_a_huge_declared_length_is_rejected() -> None:
    # bin32 claiming 4 GiB but carrying a few bytes
    assert_rejected(b"\x81\xa4body\xc6\xff\xff\xff\xff" + b"abc")
    # array32 claiming 4 billion elements
    assert_rejected(b"\xdd\xff\xff\xff\xff\x00")


@given(st.binary(max_size=40))
def test_trailing_bytes_are_rejected(tail: bytes) -> None:
    if not tail:
        return
    assert_rejected(encode(OpenAccept(bytes(32))) + tail)


# --- bodies ---------------------------------------------------------------------------------

def test_a_body_over_64_kib_is_rejected() -> None:
    cid = bytes(32)
    at_limit = b"x" * (MAX_BODY - 3)  # bin16 header: 3 bytes
    assert len(pack(at_limit)) == MAX_BODY
    assert check_body(at_limit) is at_limit
    msg = Message(cid, at_limit)
    assert decode(encode(msg)) == msg
    over = at_limit + b"x"
    with pytest.raises(DecodeError) as exc:
        Message(cid, over)
    assert (exc.value.code, exc.value.detail) == (3, 1005)
    with pytest.raises(DecodeError):
        check_body(over)
    # Built by hand (the frame is under MAX_FRAME), the decoder refuses it as well.
    obj = raw_map(Message(cid, None))
    obj["body"] = over
    blob = pack(obj)
    assert len(blob) < MAX_FRAME
    assert_rejected(blob)


def test_an_error_object_over_64_kib_is_rejected() -> None:
    obj = raw_map(ErrorMsg(bytes(32), {"code": 3, "message": "m"}))
    obj["error"] = {"code": 3, "message": "m" * MAX_BODY}
    assert_rejected(pack(obj))


def test_the_largest_pay_result_fits_in_a_frame() -> None:
    cid = bytes(32)
    big = b"r" * (MAX_BODY - 3)
    err = {"code": 3, "message": "x", "data": "d" * (MAX_BODY - 40)}
    assert len(pack(err)) <= MAX_BODY
    refund = Voucher(cid, U63, U63, U63, bytes(64))
    res = PayResult(cid, "p" * MAX_ID_LEN, big, err, refund)
    data = encode(res)
    assert len(data) <= MAX_FRAME
    assert decode(data) == res


@pytest.mark.parametrize("value", [object(), {1, 2}, 2**64, -(2**63) - 1])
def test_a_body_msgpack_cannot_carry_is_rejected(value: Any) -> None:
    with pytest.raises(DecodeError):
        Message(bytes(32), value)


# A body the peer's strict decoder would refuse must be refused when the message is built:
# otherwise a payer signs a voucher for a request that can never be delivered.
@pytest.mark.parametrize("value", [
    {1: "a"}, {None: 1}, {True: 1}, {1.5: 1}, {(1, 2): 3}, [{"ok": {7: 1}}],
    msgpack.ExtType(1, b"x"), msgpack.Timestamp(5), [msgpack.Timestamp(5)],
    _nest(MAX_DEPTH + 1, None), {"k": _nest(MAX_DEPTH, 1)},
], ids=["int-key", "none-key", "bool-key", "float-key", "tuple-key", "nested-int-key", "ext",
        "timestamp", "nested-timestamp", "too-deep", "too-deep-in-map"])
def test_a_body_the_peer_could_not_decode_is_rejected(value: Any) -> None:
    with pytest.raises(DecodeError) as exc:
        Message(bytes(32), value)
    assert (exc.value.code, exc.value.detail) == (3, 1005)
    with pytest.raises(DecodeError):
        body_size(value)
    with pytest.raises(DecodeError):
        Pay(bytes(32), "p", Voucher(bytes(32), 1, 1, 1, bytes(64)), 1, value)


def test_bodies_nest_up_to_max_depth() -> None:
    deep = _nest(MAX_DEPTH, None)
    msg = Message(bytes(32), {"k": _nest(MAX_DEPTH - 1, 1)})
    assert decode(encode(msg)) == msg
    assert decode(encode(Message(bytes(32), deep))) == Message(bytes(32), deep)


loose_bodies = st.recursive(
    st.one_of(scalars, st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=4)),
              st.builds(msgpack.Timestamp, st.integers(0, 2**32))),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.tuples(inner, inner),
        st.dictionaries(st.one_of(st.text(max_size=4), st.binary(max_size=4), st.integers(),
                                  st.none(), st.booleans(), st.tuples(st.integers())),
                        inner, max_size=3)),
    max_leaves=10)


@given(loose_bodies)
def test_whatever_a_constructor_accepts_the_peer_decodes(body: Any) -> None:
    try:
        msg = Message(bytes(32), body)
    except DecodeError:
        return
    back = decode(encode(msg))
    assert encode(back) == encode(msg)


@pytest.mark.parametrize("error", [
    None, "boom", {"code": 1}, {"message": "m"}, {"code": "1", "message": "m"},
    {"code": True, "message": "m"}, {"code": 1, "message": 2},
    {"code": 1, "message": "m", "extra": 1}, [1, "m"],
])
def test_error_objects_are_checked(error: Any) -> None:
    with pytest.raises(DecodeError):
        ErrorMsg(bytes(32), error)
    if error is not None:
        with pytest.raises(DecodeError):
            PayResult(bytes(32), "p", None, error, None)


# --- constructors ---------------------------------------------------------------------------

CID, SIG = bytes(32), bytes(64)


@pytest.mark.parametrize("args", [
    (bytes(31), 1, 1, 0, SIG), (bytes(33), 1, 1, 0, SIG), ("c" * 32, 1, 1, 0, SIG),
    (bytearray(32), 1, 1, 0, SIG),
    (CID, 0, 1, 0, SIG), (CID, -1, 1, 0, SIG), (CID, 2**63, 1, 0, SIG), (CID, True, 1, 0, SIG),
    (CID, 1.0, 1, 0, SIG),
    (CID, 1, 0, 0, SIG), (CID, 1, -3, 0, SIG), (CID, 1, 2**63, 0, SIG), (CID, 1, "1", 0, SIG),
    (CID, 1, 1, -1, SIG), (CID, 1, 1, 2**63, SIG), (CID, 1, 1, False, SIG), (CID, 1, 1, 0.0, SIG),
    (CID, 1, 1, None, SIG),
    (CID, 1, 1, 0, bytes(63)), (CID, 1, 1, 0, bytes(65)), (CID, 1, 1, 0, None),
])
def test_voucher_validates_itself(args: tuple[Any, ...]) -> None:
    with pytest.raises(DecodeError) as exc:
        Voucher(*args)
    assert (exc.value.code, exc.value.detail) == (3, 1005)


def test_voucher_limits_are_accepted() -> None:
    v = Voucher(CID, U63, U63, U63, SIG)
    assert Voucher.from_obj(v.to_obj()) == v
    assert Voucher(CID, 1, 1, 0, SIG).sent == 0


@pytest.mark.parametrize("obj", [None, [], [CID, 1, 1, 0], [CID, 1, 1, 0, SIG, 1],
                                 (CID, 1, 1, 0, SIG), {"channel_id": CID}])
def test_voucher_from_obj_needs_a_list_of_five(obj: Any) -> None:
    with pytest.raises(DecodeError):
        Voucher.from_obj(obj)


A, B, SALT = bytes([1]) * 32, bytes([2]) * 32, bytes([3]) * 32
GOOD = {"initiator": A, "responder": B, "asset": "base", "dispute_period": 600, "salt": SALT,
        "network_id": "testnet"}


@pytest.mark.parametrize("change", [
    {"initiator": bytes(31)}, {"responder": "b" * 32}, {"responder": A},
    {"asset": ""}, {"asset": "a" * (MAX_ASSET_LEN + 1)}, {"asset": b"base"},
    {"dispute_period": 0}, {"dispute_period": -1}, {"dispute_period": True},
    {"dispute_period": MAX_DISPUTE_PERIOD + 1}, {"dispute_period": 600.0},
    {"salt": bytes(16)}, {"salt": None},
    {"network_id": ""}, {"network_id": "n" * 65}, {"network_id": 1},
], ids=lambda c: next(iter(c)))
def test_channel_params_validate_themselves(change: dict[str, Any]) -> None:
    with pytest.raises(DecodeError) as exc:
        ChannelParams(**{**GOOD, **change})
    assert (exc.value.code, exc.value.detail) == (3, 1005)


def test_channel_params_limits_and_channel_id() -> None:
    p = ChannelParams(**{**GOOD, "asset": "a" * MAX_ASSET_LEN,
                         "dispute_period": MAX_DISPUTE_PERIOD, "network_id": "n" * 64})
    assert ChannelParams.from_obj(p.to_obj()) == p
    base = ChannelParams(**GOOD)
    assert len(base.channel_id) == 32
    # Every agreed parameter that names the channel changes its id.
    for name, value in [("initiator", SALT), ("responder", SALT), ("asset", "gold"),
                        ("salt", A[:31] + b"\x09"), ("network_id", "mainnet")]:
        assert ChannelParams(**{**GOOD, name: value}).channel_id != base.channel_id, name
    assert ChannelParams(**{**GOOD, "initiator": B, "responder": A}).channel_id != base.channel_id
    assert base.peer_of(A) == B and base.peer_of(B) == A
    with pytest.raises(DecodeError):
        base.peer_of(SALT)


def test_open_propose_must_match_its_params() -> None:
    p = ChannelParams(**GOOD)
    with pytest.raises(DecodeError):
        OpenPropose(bytes(32), p, 10)
    obj = raw_map(OpenPropose(p.channel_id, p, 10))
    obj["channel_id"] = bytes(32)
    assert_rejected(pack(obj))


# --- close signatures -----------------------------------------------------------------------

@given(id32, periods, amounts, amounts)
def test_close_signatures_bind_every_figure(cid: bytes, period: int, si: int, sr: int) -> None:
    key = Identity(bytes([7]) * 32)
    sig = sign_close(key, cid, period, si, sr)
    assert verify_close(key.public, cid, period, si, sr, sig)
    assert not verify_close(key.public, cid, period, sr + 1, si, sig)
    assert not verify_close(key.public, cid, period + 1 if period < U63 else 1, si, sr, sig)
    assert not verify_close(Identity(bytes([8]) * 32).public, cid, period, si, sr, sig)
    # A close signature is never a voucher signature over the same four numbers.
    assert not Voucher(cid, period, si or 1, sr, sig).verify(key.public)
    assert not key.sign(DOMAIN_VOUCHER, [cid, period, si, sr]) == sig
