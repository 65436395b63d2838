"""The protocol's fast paths agree with the slow forms they replace."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pair import ChannelPair

from paychan.protocol import channel, wire
from paychan.protocol.channel import ActionPay, ChannelState
from paychan.protocol.errors import DecodeError, HandlerError, InternalError
from paychan.protocol.identity import Identity


def _busy_state() -> ChannelState:
    pair = ChannelPair(deposit_a=1000, deposit_b=500).open()
    pair.act(pair.a, ActionPay("p1", 10, {"q": "one"}))
    pair.flush()
    pair.act(pair.a, ActionPay("p2", 7, [1, 2]))  # left in flight: outgoing is not empty
    state = pair.a.state
    assert state is not None and state.outgoing
    return state


def test_channel_state_has_nothing_replace_could_skip() -> None:
    # channel.replace builds the object without __init__; that is only sound while
    # ChannelState has no __post_init__ and no field with init=False.
    assert not hasattr(ChannelState, "__post_init__")
    assert all(f.init for f in dataclasses.fields(ChannelState))


def test_replace_equals_dataclasses_replace() -> None:
    s = _busy_state()
    before = s.to_obj()
    for changes in ({}, {"credit_used": 3}, {"outgoing": (), "period": 2},
                    {"my_voucher": None, "serving": (("x", 1),)}):
        fast = channel.replace(s, **changes)
        assert fast == dataclasses.replace(s, **changes)
        assert fast is not s
        assert fast.to_obj() == dataclasses.replace(s, **changes).to_obj()
    assert s.to_obj() == before  # the original is untouched


def test_replace_refuses_unknown_fields() -> None:
    with pytest.raises(TypeError, match="no field 'balance'"):
        channel.replace(_busy_state(), balance=5)


def test_message_checks_name_the_field_and_convert_vouchers() -> None:
    s = _busy_state()
    v = s.outgoing[0].voucher
    built = wire.Pay(s.channel_id, "p9", v.to_obj(), 1, "m")  # voucher given as a list
    assert isinstance(built.voucher, wire.Voucher) and built.voucher == v
    with pytest.raises(DecodeError, match=r"^pay\.payment_id"):
        wire.Pay(s.channel_id, "", v, 1, "m")
    with pytest.raises(DecodeError, match=r"pay_result\.channel_id"):
        wire.PayResult(b"short", "p9", None)
    assert all(label == f"{cls.TYPE}.{name}"
               for cls in wire.Msg.__subclasses__() for name, _, label in cls._CHECKS)
    assert [n for n, _, _ in wire.Pay._CHECKS] == [n for n, _ in wire.Pay.SCHEMA]


def _nest(depth: int, leaf: Any = None) -> Any:
    out = leaf
    for _ in range(depth):
        out = [out]
    return out


# --- wire: the timestamp pre-scan -----------------------------------------------------------

# One of each size msgpack writes: 32-bit (fixext 4), 64-bit (fixext 8), 96-bit (ext 8).
TIMESTAMP_BLOBS = [msgpack.packb(msgpack.Timestamp(1, 0)),
                   msgpack.packb(msgpack.Timestamp(2**33, 5)),
                   msgpack.packb(msgpack.Timestamp(-(2**40), 0))]
# Every header that can start a timestamp, without its payload.
TIMESTAMP_HEADERS = [b"\xd6\xff", b"\xd7\xff"] + [
    prefix + bytes([n]) + b"\xff"
    for prefix in (b"\xc7", b"\xc8\x00", b"\xc9\x00\x00\x00") for n in (4, 8, 12)]
# Near misses: a wrong length, a cut header, other extension types, lone 0xff bytes.
NOT_HEADERS = [b"\xc7\x05\xff", b"\xc8\x01\x04\xff", b"\xc9\x00\x00\xff", b"\xd5\xff",
               b"\xd8\xff", b"\xd6\xfe", b"\xff", b"\xff\xff", b"\xc7\x04", b"\xc9\x00\x00\x00\x0c"]
# The bytes headers are made of, so random draws hit headers and near misses often.
HEADER_BYTES = st.lists(st.sampled_from([0x00, 0x01, 0x04, 0x08, 0x0C, 0xC7, 0xC8, 0xC9, 0xD6,
                                         0xD7, 0xFF]), max_size=40).map(bytes)


def _prescan_agrees(raw: bytes) -> bool:
    found = wire._may_hold_timestamp(raw)
    assert found == bool(wire._TIMESTAMP_HEADER.search(raw)), raw.hex()
    return found


def test_the_timestamp_blobs_cover_every_size() -> None:
    assert [b[:2] for b in TIMESTAMP_BLOBS] == [b"\xd6\xff", b"\xd7\xff", b"\xc7\x0c"]
    assert all(_prescan_agrees(b) for b in TIMESTAMP_BLOBS)
    assert all(_prescan_agrees(h) for h in TIMESTAMP_HEADERS)
    assert not any(_prescan_agrees(b) for b in NOT_HEADERS)


@given(st.binary(max_size=400))
def test_prescan_agrees_with_a_full_search_on_any_bytes(raw: bytes) -> None:
    _prescan_agrees(raw)


@given(HEADER_BYTES)
def test_prescan_agrees_on_bytes_made_of_header_parts(raw: bytes) -> None:
    _prescan_agrees(raw)


@given(st.lists(st.one_of(st.binary(max_size=12), st.sampled_from(TIMESTAMP_BLOBS),
                          st.sampled_from(TIMESTAMP_HEADERS), st.sampled_from(NOT_HEADERS),
                          HEADER_BYTES), max_size=12))
def test_prescan_agrees_on_spliced_timestamps(parts: list[bytes]) -> None:
    raw = b"".join(parts)
    found = _prescan_agrees(raw)
    if any(p in TIMESTAMP_BLOBS or p in TIMESTAMP_HEADERS for p in parts):
        assert found


@pytest.mark.parametrize("header", TIMESTAMP_HEADERS, ids=lambda h: h.hex())
@pytest.mark.parametrize("filler", [b"\x00", b"\xff", b"\xc9", b"a"], ids=lambda f: f.hex())
def test_prescan_finds_a_header_at_every_offset_and_at_the_end(header: bytes,
                                                               filler: bytes) -> None:
    for offset in range(6):
        assert _prescan_agrees(filler * offset + header + bytes(12))
        assert _prescan_agrees(filler * offset + header)  # the frame's very last bytes
        assert _prescan_agrees(filler * offset + header + b"\xff" * 7)


@pytest.mark.parametrize("size", [0, 1, 2, 5, 6, 7, 100, 5000])
def test_prescan_on_frames_full_of_ff(size: int) -> None:
    assert not _prescan_agrees(b"\xff" * size)
    for header in TIMESTAMP_HEADERS:
        assert _prescan_agrees(b"\xff" * size + header + b"\xff" * size)
    for near in NOT_HEADERS:
        _prescan_agrees(b"\xff" * size + near + b"\xff" * size)


def _hand_written_timestamps() -> list[bytes]:
    """The blobs msgpack writes, and the longer ext forms it also reads as timestamps."""
    return [*TIMESTAMP_BLOBS, b"\xc7\x04\xff" + bytes(4), b"\xc8\x00\x08\xff" + bytes(8),
            b"\xc9\x00\x00\x00\x0c\xff" + bytes(12)]


@pytest.mark.parametrize("blob", _hand_written_timestamps(), ids=lambda b: b[:6].hex())
def test_unpack_refuses_a_timestamp_anywhere(blob: bytes) -> None:
    frames = [
        blob,
        b"\x92\x01" + blob,                                   # [1, ts]
        b"\x92\x91\x92\x02" + blob + b"\xa1x",                # [[[2, ts]], "x"]
        b"\x81\xa1k" + blob,                                  # {"k": ts}
        b"\x82\xa1a\x90\xa1b\x81\xa1c\x92\xc0" + blob,        # {"a": [], "b": {"c": [nil, ts]}}
        b"\x92\xc4\x03\xff\xff\xff" + blob,                   # after bin bytes full of 0xff
        b"\x93" + b"\xcc\xff" * 2 + blob,                     # [255, 255, ts]
    ]
    for frame in frames:
        with pytest.raises(DecodeError, match="extension types are not allowed"):
            wire.unpack(frame)
    # Packed from Python objects too, nested in lists and maps.
    ts = msgpack.unpackb(blob)
    assert isinstance(ts, msgpack.Timestamp)
    for obj in ([ts], {"a": [1, {"b": ts}]}, [[[[ts]]], b"\xff" * 9]):
        with pytest.raises(DecodeError, match="extension types are not allowed"):
            wire.unpack(msgpack.packb(obj, use_bin_type=True))
    body = {"k": [1, 2]}
    frame = wire.encode(wire.Message(bytes(32), body))
    with pytest.raises(DecodeError, match="extension types are not allowed"):
        wire.decode(frame.replace(msgpack.packb(body), msgpack.packb({"k": [1, ts]})))


def test_unpack_still_reads_frames_with_ff_bytes() -> None:
    obj = [255, -1, b"\xff" * 20, "\u00ff", {"k": b"\xd6\xfe\xff"}, -(2**40)]
    assert wire.unpack(msgpack.packb(obj, use_bin_type=True)) == obj


# --- wire: decoding straight into the message ------------------------------------------------

_A = Identity(bytes([0xA1]) * 32)


@functools.cache
def _valid_messages() -> dict[str, list[wire.Msg]]:
    """One or more valid messages of each type, with real parameters, vouchers and signatures."""
    s = _busy_state()
    cid, period, v = s.channel_id, s.period, s.my_voucher
    assert v is not None
    refund = wire.Voucher.create(_A, cid, period, v.nonce + 1, v.sent + 3)
    err = HandlerError("boom").to_wire()
    sig = wire.sign_close(_A, cid, period, v.sent, 0)
    made: list[wire.Msg] = [
        wire.OpenPropose(cid, s.params, 1000),
        wire.OpenAccept(cid),
        wire.OpenReject(cid, {"code": 3, "message": "no"}),
        wire.Pay(cid, "p9", v, 3, {"q": [1, b"x", None, 2.5]}),
        wire.Pay(cid, "x" * wire.MAX_ID_LEN, v, 0, "plain"),
        wire.PayResult(cid, "p9", ["ok", {"n": 1}]),
        wire.PayResult(cid, "p9", None, err, refund),
        wire.Message(cid, {"hello": ["there", b"\xff"]}),
        wire.Sync(cid, period, v, refund, True),
        wire.Sync(cid, period, None, None),
        wire.CloseProposal(cid, period, v.sent, 0, sig),
        wire.CloseCoSigned(cid, period, v.sent, 0, sig),
        wire.ErrorMsg(cid, err),
    ]
    out: dict[str, list[wire.Msg]] = {}
    for m in made:
        out.setdefault(m.TYPE, []).append(m)
    return out


def _values(msg: wire.Msg) -> list[Any]:
    return [getattr(msg, name) for name in msg._NAMES]


def test_there_is_a_valid_message_of_every_type() -> None:
    assert set(_valid_messages()) == set(wire.MESSAGE_TYPES)
    for cls in wire.MESSAGE_TYPES.values():
        # _trusted and the constructor take the same values in the same order.
        assert cls._NAMES == tuple(f.name for f in dataclasses.fields(cls))


@pytest.mark.parametrize("name", sorted(wire.MESSAGE_TYPES))
def test_decode_builds_what_the_constructor_builds(name: str) -> None:
    for msg in _valid_messages()[name]:
        cls = type(msg)
        data = wire.encode(msg)
        decoded = wire.decode(data)
        assert type(decoded) is cls
        assert decoded == msg and msg == decoded
        assert repr(decoded) == repr(msg)
        for field_name in cls._NAMES:
            mine, theirs = getattr(decoded, field_name), getattr(msg, field_name)
            assert mine == theirs and type(mine) is type(theirs), field_name
        assert set(vars(decoded)) == set(cls._NAMES)  # nothing more than its fields
        from_map = cls._from_map(wire.unpack(data))
        assert from_map == msg and type(from_map) is cls
        # The constructor given the wire's own values (vouchers as lists) agrees too.
        obj = wire.unpack(data)
        assert cls(**{n: obj[n] for n in cls._NAMES}) == decoded
        assert wire.encode(decoded) == data


_VOUCHER_OBJ = [bytes(32), 1, 1, 5, bytes(64)]
_PARAMS_OBJ = [bytes([1]) * 32, bytes([2]) * 32, "base", 60, bytes(32), "testnet"]
_BAD_ERRORS = [{"code": "1", "message": "m"}, {"code": True, "message": "m"}, {"code": 1},
               {"code": 1, "message": b"m"}, {"code": 1, "message": "m", "extra": 0}, ["x"],
               "error", {"code": 1, "message": "x" * (wire.MAX_BODY + 1)}]
# Values each kind of field refuses; each is msgpack-able and decodes to itself.
BAD_VALUES: dict[str, list[Any]] = {
    "id32": [b"short", bytes(33), b"", "x" * 32, 5, None],
    "sig": [bytes(63), bytes(65), "s" * 64, None],
    "int": [-1, 2**63, 2**64 - 1, True, "1", 1.5, None],
    "period": [0, -1, 2**63, False, None],
    "pid": ["", "x" * (wire.MAX_ID_LEN + 1), 5, b"p1", None],
    "any": ["x" * (wire.MAX_BODY + 1), _nest(wire.MAX_DEPTH + 1), {"k": _nest(wire.MAX_DEPTH)}],
    "voucher": [None, [1, 2, 3, 4], "v", _VOUCHER_OBJ[:1] * 5, [bytes(31), *_VOUCHER_OBJ[1:]],
                [*_VOUCHER_OBJ[:1], 0, *_VOUCHER_OBJ[2:]], [*_VOUCHER_OBJ[:4], bytes(63)]],
    "voucher?": [[1, 2, 3, 4], 5, [*_VOUCHER_OBJ[:2], 0, *_VOUCHER_OBJ[3:]]],
    "params": [None, _PARAMS_OBJ[:5], [_PARAMS_OBJ[0], *_PARAMS_OBJ[:1], *_PARAMS_OBJ[2:]],
               [*_PARAMS_OBJ[:3], 0, *_PARAMS_OBJ[4:]], [*_PARAMS_OBJ[:5], ""]],
    "error": [None, *_BAD_ERRORS],
    "error?": _BAD_ERRORS,
    "bool": [1, 0, None, "true"],
}
FIELD_CASES = [(name, field_name, i)
               for name, cls in sorted(wire.MESSAGE_TYPES.items())
               for field_name, kind in cls.SCHEMA
               for i in range(len(BAD_VALUES[kind]))]


def _ctor_and_decode_errors(good: wire.Msg, changes: dict[str, Any]) -> tuple[str, str]:
    cls = type(good)
    with pytest.raises(DecodeError) as built:
        cls(**(dict(zip(cls._NAMES, _values(good), strict=True)) | changes))
    obj = wire.unpack(wire.encode(good)) | changes
    with pytest.raises(DecodeError) as decoded:
        wire.decode(msgpack.packb(obj, use_bin_type=True))
    assert type(decoded.value) is DecodeError and type(built.value) is DecodeError
    return built.value.message, decoded.value.message


@pytest.mark.parametrize(("name", "field_name", "index"), FIELD_CASES,
                         ids=[f"{n}.{f}-{i}" for n, f, i in FIELD_CASES])
def test_decode_raises_what_the_constructor_raises(name: str, field_name: str,
                                                   index: int) -> None:
    kind = dict(wire.MESSAGE_TYPES[name].SCHEMA)[field_name]
    good = _valid_messages()[name][0]
    built, decoded = _ctor_and_decode_errors(good, {field_name: BAD_VALUES[kind][index]})
    assert decoded == built


def test_open_propose_mismatch_is_raised_by_decode_as_by_the_constructor() -> None:
    good = _valid_messages()["open_propose"][0]
    built, decoded = _ctor_and_decode_errors(good, {"channel_id": bytes(32)})
    assert decoded == built == "open_propose.channel_id does not match its params"
    other = wire.ChannelParams(*_PARAMS_OBJ)
    built, decoded = _ctor_and_decode_errors(good, {"params": other.to_obj()})
    assert decoded == built == "open_propose.channel_id does not match its params"


@given(st.sampled_from(sorted(wire.MESSAGE_TYPES)), st.data())
def test_several_bad_fields_fail_on_the_same_field_either_way(name: str,
                                                              data: st.DataObject) -> None:
    good = data.draw(st.sampled_from(_valid_messages()[name]), label="message")
    changes = {}
    for field_name, kind in type(good).SCHEMA:
        if data.draw(st.booleans(), label=f"break {field_name}"):
            changes[field_name] = data.draw(st.sampled_from(BAD_VALUES[kind]), label=field_name)
    if not changes:
        assert wire.decode(wire.encode(good)) == good
        return
    built, decoded = _ctor_and_decode_errors(good, changes)
    assert decoded == built


# --- wire: messages built from checked values ------------------------------------------------

@pytest.mark.parametrize("name", sorted(wire.MESSAGE_TYPES))
def test_trusted_equals_the_checked_constructor(name: str) -> None:
    for msg in _valid_messages()[name]:
        cls, values = type(msg), _values(msg)
        trusted, checked = cls._trusted(*values), cls(*values)
        assert type(trusted) is cls
        assert trusted == checked == msg
        assert repr(trusted) == repr(checked)
        assert vars(trusted) == vars(checked)  # neither encoded yet: fields only
        assert wire.encode(trusted) == wire.encode(checked) == wire.encode(msg)
        assert wire.decode(wire.encode(trusted)) == checked
        with pytest.raises(ValueError):
            cls._trusted(*values[:-1])
        with pytest.raises(ValueError):
            cls._trusted(*values, None)
        with pytest.raises(ValueError):
            cls._trusted()


# --- wire: the encoding kept on the message --------------------------------------------------

@pytest.mark.parametrize("name", sorted(wire.MESSAGE_TYPES))
def test_encode_keeps_its_bytes_outside_eq_hash_and_repr(name: str) -> None:
    for msg in _valid_messages()[name]:
        cls, values = type(msg), _values(msg)
        encoded, never = cls(*values), cls(*values)
        data = wire.encode(encoded)
        assert wire.encode(encoded) is data
        assert data == wire.encode(cls(*values)) == wire.encode(cls._trusted(*values))
        assert "_wire" not in vars(never)
        assert encoded == never and never == encoded
        assert not (encoded != never)
        assert repr(encoded) == repr(never)
        assert data.hex() not in repr(encoded) and "_wire" not in repr(encoded)
        try:
            h = hash(never)
        except TypeError:  # a field holds a dict or list: neither hashes, encoded or not
            with pytest.raises(TypeError):
                hash(encoded)
        else:
            assert hash(encoded) == h
            assert len({encoded, never}) == 1
        # A copy with a changed field encodes afresh, not from the original's bytes.
        if isinstance(encoded, wire.OpenPropose):  # its channel_id must match its params
            changed: wire.Msg = dataclasses.replace(encoded, deposit=encoded.deposit + 1)
        else:
            changed = dataclasses.replace(encoded, channel_id=bytes(32))
        assert wire.encode(changed) != data
        assert wire.decode(wire.encode(changed)) == changed


def test_hashable_messages_hash_the_same_encoded_or_not() -> None:
    hashable = [m for ms in _valid_messages().values() for m in ms
                if m.TYPE in ("open_accept", "sync", "close_proposal", "close_cosigned")]
    assert len(hashable) == 5
    for msg in hashable:
        fresh = type(msg)(*_values(msg))
        before = hash(fresh)
        wire.encode(fresh)
        assert hash(fresh) == before == hash(type(msg)(*_values(msg)))


# --- channel: the invariant check ------------------------------------------------------------

def _two_way_state() -> ChannelState:
    """A's state after paying, being paid and served, with a payment of its own in flight."""
    pair = ChannelPair(deposit_a=1000, deposit_b=500).open()
    pair.act(pair.a, ActionPay("p1", 10, "one"))
    pair.flush()
    pair.act(pair.b, ActionPay("b1", 5, "two"))
    pair.flush()
    pair.act(pair.a, ActionPay("p2", 7, "three"))
    s = pair.a.state
    assert s is not None and s.outgoing and s.my_voucher and s.peer_voucher
    assert (s.my_sent, s.peer_sent, s.credit_used) == (17, 5, 5)
    return s


def _slow_problems(s: ChannelState) -> list[str]:
    """The rules as written before the fast path, through the state's properties."""
    problems = []
    if s.my_balance < 0:
        problems.append(f"my balance {s.my_balance} is negative")
    if s.peer_balance < 0:
        problems.append(f"peer balance {s.peer_balance} is negative")
    if not 0 <= s.credit_used <= s.peer_sent:
        problems.append(f"credit used {s.credit_used} outside [0, {s.peer_sent}]")
    for v in (s.my_voucher, s.peer_voucher):
        if v is not None and (v.channel_id != s.channel_id or v.period != s.period):
            problems.append("a held voucher is for another channel or period")
            break  # named once, as the fast path names it
    if any(o.voucher.nonce > s.my_nonce for o in s.outgoing):
        problems.append("an in-flight voucher is newer than our latest")
    return problems


def _broken(s: ChannelState) -> str | None:
    try:
        channel.check_invariants(s)
    except InternalError as exc:
        assert exc.message.startswith("channel invariant broken: ")
        return exc.message.removeprefix("channel invariant broken: ")
    return None


def _moved(v: wire.Voucher, **changes: Any) -> wire.Voucher:
    return dataclasses.replace(v, **changes)


def _breakages(s: ChannelState) -> dict[str, tuple[dict[str, Any], str]]:
    """Changes to `s` that each break one rule, with the problem they must be named by."""
    mine, theirs = s.my_voucher, s.peer_voucher
    assert mine is not None and theirs is not None
    elsewhere = "a held voucher is for another channel or period"
    return {
        "own balance": ({"deposit_me": 0}, "my balance -12 is negative"),
        "peer balance": ({"peer_voucher": _moved(theirs, sent=600)},
                         "peer balance -83 is negative"),
        "credit above": ({"credit_used": 6}, "credit used 6 outside [0, 5]"),
        "credit below": ({"credit_used": -1}, "credit used -1 outside [0, 5]"),
        "mine elsewhere": ({"my_voucher": _moved(mine, channel_id=bytes(32))}, elsewhere),
        "mine later": ({"my_voucher": _moved(mine, period=s.period + 1)}, elsewhere),
        "theirs elsewhere": ({"peer_voucher": _moved(theirs, channel_id=bytes(32))}, elsewhere),
        "theirs later": ({"peer_voucher": _moved(theirs, period=s.period + 1)}, elsewhere),
        "in flight newer": ({"my_voucher": _moved(mine, nonce=s.outgoing[0].voucher.nonce - 1)},
                            "an in-flight voucher is newer than our latest"),
    }


def test_invariants_hold_for_working_states() -> None:
    for s in (_busy_state(), _two_way_state()):
        channel.check_invariants(s)
        assert _slow_problems(s) == []
        channel.check_invariants(channel.replace(s, my_voucher=None, outgoing=()))


@pytest.mark.parametrize("rule", list(_breakages(_two_way_state())))
def test_invariants_name_the_one_broken_rule(rule: str) -> None:
    s = _two_way_state()
    changes, problem = _breakages(s)[rule]
    broken = channel.replace(s, **changes)
    assert _broken(broken) == problem
    assert _slow_problems(broken) == [problem]


def test_invariants_name_every_broken_rule_at_once() -> None:
    s = _two_way_state()
    mine = s.my_voucher
    assert mine is not None
    broken = channel.replace(s, deposit_me=0, deposit_peer=-100, credit_used=9,
                             my_voucher=_moved(mine, nonce=1, channel_id=bytes(32)))
    expected = ["my balance -12 is negative", "peer balance -88 is negative",
                "credit used 9 outside [0, 5]",
                "a held voucher is for another channel or period",
                "an in-flight voucher is newer than our latest"]
    assert _slow_problems(broken) == expected
    assert _broken(broken) == "; ".join(expected)


_STATES = (_busy_state(), _two_way_state())


@given(st.data())
def test_invariants_agree_with_the_slow_rules(data: st.DataObject) -> None:
    s = _STATES[data.draw(st.integers(0, 1), label="state")]
    breakages = _breakages(_STATES[1]) if s is _STATES[1] else {}
    changes: dict[str, Any] = {}
    for rule, (change, _) in breakages.items():
        if data.draw(st.booleans(), label=rule):
            changes |= change
    changes["credit_used"] = data.draw(st.integers(-3, 30), label="credit_used")
    changes["deposit_me"] = data.draw(st.integers(-5, 1500), label="deposit_me")
    changes["deposit_peer"] = data.draw(st.integers(-5, 800), label="deposit_peer")
    broken = channel.replace(s, **changes)
    slow = _slow_problems(broken)
    assert _broken(broken) == ("; ".join(slow) if slow else None)


# --- channel: phases hash by identity --------------------------------------------------------

def test_phases_hash_by_identity_and_look_up_by_value() -> None:
    assert len(channel.ALL_PHASES) == 5
    table = {p: i for i, p in enumerate(channel.Phase)}
    for i, p in enumerate(channel.Phase):
        assert hash(p) == object.__hash__(p)
        assert channel.Phase(p.value) is p
        assert table[channel.Phase(p.value)] == i
        assert {p: i}[channel.Phase(p.value)] == i
        assert channel.Phase[p.name] in {p}
    assert "__hash__" not in channel.Phase.__members__


# --- channel: the handler's answer is checked where it is made -------------------------------

@pytest.mark.parametrize("response", [
    "x" * (wire.MAX_BODY + 1), [b"\x00" * wire.MAX_BODY], object(), {1, 2}, {1: "int key"},
    _nest(wire.MAX_DEPTH + 1), msgpack.ExtType(1, b"x"), msgpack.Timestamp(1, 0),
], ids=["long", "long-bytes", "object", "set", "int-key", "deep", "ext", "timestamp"])
def test_handler_done_refuses_a_response_that_cannot_travel(response: Any) -> None:
    with pytest.raises(DecodeError):
        channel.ActionHandlerDone("p1", response)


@pytest.mark.parametrize("error", [*_BAD_ERRORS, {"code": 1, "message": "m", "data": object()}],
                         ids=lambda e: repr(e)[:30])
def test_handler_done_refuses_a_malformed_error(error: Any) -> None:
    with pytest.raises(DecodeError):
        channel.ActionHandlerDone("p1", None, error)


def test_handler_done_accepts_what_can_travel() -> None:
    assert channel.ActionHandlerDone("p1").response is None
    assert channel.ActionHandlerDone("p1", None).error is None
    near = "x" * (wire.MAX_BODY - 3)  # a 3-byte str16 header: exactly MAX_BODY encoded
    assert wire.body_size(near) == wire.MAX_BODY
    assert channel.ActionHandlerDone("p1", near).response is near
    with pytest.raises(DecodeError, match="larger than"):
        channel.ActionHandlerDone("p1", near + "x")
    assert channel.ActionHandlerDone("p1", {"k": [1, b"x", None]}).response == {"k": [1, b"x",
                                                                                      None]}
    err = HandlerError("x").to_wire()
    assert channel.ActionHandlerDone("p1", None, err).error == err
    assert channel.ActionHandlerDone("p1", None, {"code": 1, "message": "m"}).error is not None
