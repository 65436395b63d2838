"""The protocol's fast paths agree with the slow forms they replace."""
from __future__ import annotations

import dataclasses

import pytest
from pair import ChannelPair

from paychan.protocol import channel, wire
from paychan.protocol.channel import ActionPay, ChannelState
from paychan.protocol.errors import DecodeError


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
