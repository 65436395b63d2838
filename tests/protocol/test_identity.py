"""Identities, text forms, amounts and domain-separated signatures (DESIGN §3)."""
from __future__ import annotations

from typing import Any

import base58
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from paychan.protocol import errors
from paychan.protocol.errors import BrokenEncoding, InvalidPubkeys, NegativeAmount, NotANumber
from paychan.protocol.identity import (
    DOMAIN_CLOSE,
    DOMAIN_HUB_LOGIN,
    DOMAIN_TX,
    DOMAIN_VOUCHER,
    MAX_AMOUNT,
    Identity,
    check_amount,
    decode_address,
    decode_channel_id,
    encode_address,
    encode_channel_id,
    hash32,
    signing_bytes,
    verify,
)
from paychan.protocol.wire import Voucher

DOMAINS = (DOMAIN_VOUCHER, DOMAIN_CLOSE, DOMAIN_TX, DOMAIN_HUB_LOGIN)
ALICE = Identity(bytes([1]) * 32)
BOB = Identity(bytes([2]) * 32)

raw32 = st.binary(min_size=32, max_size=32)
seeds = st.binary(min_size=32, max_size=32)
periods = st.integers(min_value=1, max_value=2**63 - 1)
amounts = st.integers(min_value=0, max_value=2**63 - 1)


def assert_error(exc: pytest.ExceptionInfo[Any], cls: type, code: int, detail: int | None) -> None:
    """The exact class (not a subclass) with the exact code/detail pair of DESIGN §8."""
    assert type(exc.value) is cls, f"expected {cls.__name__}, got {type(exc.value).__name__}"
    assert exc.value.code == code
    assert exc.value.detail == detail


# --- text forms -----------------------------------------------------------------------------

@given(raw32)
def test_address_round_trip(raw: bytes) -> None:
    text = encode_address(raw)
    assert text.startswith("ak_")
    assert decode_address(text) == raw


@given(raw32)
def test_channel_id_round_trip(raw: bytes) -> None:
    text = encode_channel_id(raw)
    assert text.startswith("ch_")
    assert decode_channel_id(text) == raw


def test_identity_address_is_its_public_key() -> None:
    assert decode_address(ALICE.address) == ALICE.public
    assert len(ALICE.public) == 32
    assert ALICE.public != BOB.public
    # The same seed is the same key: the protocol layer makes no randomness of its own.
    assert Identity(bytes([1]) * 32).public == ALICE.public


B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


@given(raw32, st.data())
def test_a_flipped_character_breaks_the_checksum(raw: bytes, data: st.DataObject) -> None:
    text = encode_address(raw)
    i = data.draw(st.integers(min_value=3, max_value=len(text) - 1), label="position")
    new = data.draw(st.sampled_from(B58).filter(lambda c: c != text[i]), label="char")
    bad = text[:i] + new + text[i + 1:]
    with pytest.raises(errors.PaychanError) as exc:
        decode_address(bad)
    # A changed character changes the value: the checksum fails, or (when the value grows or
    # shrinks by a leading digit) the payload is no longer 32 bytes.
    assert type(exc.value) in (BrokenEncoding, InvalidPubkeys)
    if type(exc.value) is BrokenEncoding:
        assert (exc.value.code, exc.value.detail) == (3, 1005)


def test_a_flipped_character_is_broken_encoding() -> None:
    text = encode_address(ALICE.public)
    last = text[-1]
    bad = text[:-1] + ("2" if last != "2" else "3")
    with pytest.raises(BrokenEncoding) as exc:
        decode_address(bad)
    assert_error(exc, BrokenEncoding, 3, 1005)


@pytest.mark.parametrize("text", [
    "ch_" + encode_address(bytes(32))[3:],   # a channel id where an address belongs
    "ak" + encode_address(bytes(32))[3:],    # no underscore
    "AK_" + encode_address(bytes(32))[3:],
    encode_address(bytes(32))[3:],           # bare base58
    "",
    "ak_",
    "ak_0OIl",                               # not base58 characters
    "ak_ü" + encode_address(bytes(32))[4:],  # not ASCII
])
def test_wrong_prefix_or_garbage_is_broken_encoding(text: str) -> None:
    with pytest.raises(BrokenEncoding) as exc:
        decode_address(text)
    assert_error(exc, BrokenEncoding, 3, 1005)


@pytest.mark.parametrize("value", [None, 5, b"ak_abc", ["ak_"], 1.5])
def test_a_non_string_is_broken_encoding(value: Any) -> None:
    with pytest.raises(BrokenEncoding) as exc:
        decode_address(value)
    assert_error(exc, BrokenEncoding, 3, 1005)


def test_an_address_is_not_a_channel_id() -> None:
    with pytest.raises(BrokenEncoding) as exc:
        decode_channel_id(encode_address(ALICE.public))
    assert_error(exc, BrokenEncoding, 3, 1005)


@pytest.mark.parametrize("size", [0, 1, 31, 33, 64])
def test_a_payload_of_the_wrong_size_is_invalid_pubkeys(size: int) -> None:
    text = "ak_" + base58.b58encode_check(bytes(range(size))).decode()
    with pytest.raises(InvalidPubkeys) as exc:
        decode_address(text)
    assert_error(exc, InvalidPubkeys, 3, 1003)
    cid = "ch_" + base58.b58encode_check(bytes(range(size))).decode()
    with pytest.raises(InvalidPubkeys) as exc:
        decode_channel_id(cid)
    assert_error(exc, InvalidPubkeys, 3, 1003)


@pytest.mark.parametrize("seed", [b"", bytes(31), bytes(33), "x" * 32, None])
def test_an_identity_needs_a_32_byte_seed(seed: Any) -> None:
    with pytest.raises(InvalidPubkeys) as exc:
        Identity(seed)
    assert_error(exc, InvalidPubkeys, 3, 1003)


# --- amounts --------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [True, False, 1.0, 0.5, float("nan"), "1", b"1", None, [1]])
def test_check_amount_refuses_non_integers(value: Any) -> None:
    with pytest.raises(NotANumber) as exc:
        check_amount(value)
    assert_error(exc, NotANumber, 3, 1008)


@pytest.mark.parametrize("value", [-1, -(2**63), -(2**70)])
def test_check_amount_refuses_negatives(value: int) -> None:
    with pytest.raises(NegativeAmount) as exc:
        check_amount(value)
    assert_error(exc, NegativeAmount, 3, 1002)


@pytest.mark.parametrize("value", [2**63, 2**63 + 1, 2**64, 10**30])
def test_check_amount_refuses_too_large(value: int) -> None:
    with pytest.raises(NotANumber) as exc:
        check_amount(value)
    assert_error(exc, NotANumber, 3, 1008)


@pytest.mark.parametrize("value", [0, 1, 2**63 - 1])
def test_check_amount_accepts_the_range(value: int) -> None:
    assert check_amount(value) == value
    assert MAX_AMOUNT == 2**63


def test_check_amount_names_the_field() -> None:
    with pytest.raises(NegativeAmount, match="deposit"):
        check_amount(-5, "deposit")


# --- signatures -----------------------------------------------------------------------------

def test_signing_bytes_start_with_the_domain_tag() -> None:
    assert signing_bytes(DOMAIN_VOUCHER, [1, 2]).startswith(DOMAIN_VOUCHER + b"\x00")
    assert len(set(DOMAINS)) == len(DOMAINS)


# Tags without NUL: the NUL ends the tag, so no tag's bytes can run into another's payload.
domain_tags = st.one_of(st.sampled_from(DOMAINS),
                        st.binary(min_size=1, max_size=40).filter(lambda b: b"\x00" not in b))


@given(seeds, raw32, periods, periods, amounts, domain_tags, domain_tags)
def test_a_signature_never_verifies_under_another_domain(seed: bytes, cid: bytes, period: int,
                                                         nonce: int, sent: int, dom: bytes,
                                                         other: bytes) -> None:
    assume(dom != other)
    key = Identity(seed)
    fields = [cid, period, nonce, sent]
    sig = key.sign(dom, fields)
    assert verify(key.public, dom, fields, sig)
    assert not verify(key.public, other, fields, sig)


@given(seeds, seeds, raw32, periods, periods, amounts)
def test_a_voucher_never_verifies_under_another_key(seed: bytes, other: bytes, cid: bytes,
                                                    period: int, nonce: int, sent: int) -> None:
    assume(seed != other)
    key, stranger = Identity(seed), Identity(other)
    v = Voucher.create(key, cid, period, nonce, sent)
    assert v.verify(key.public)
    assert not v.verify(stranger.public)


@st.composite
def altered(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any]]:
    """Voucher fields and a copy with at least one of channel, period, nonce, sent changed."""
    orig = {"channel_id": draw(raw32), "period": draw(periods), "nonce": draw(periods),
            "sent": draw(amounts)}
    new = dict(orig)
    for name in draw(st.sets(st.sampled_from(sorted(orig)), min_size=1)):
        strategy = {"channel_id": raw32, "period": periods, "nonce": periods,
                    "sent": amounts}[name]
        new[name] = draw(strategy.filter(lambda x, old=orig[name]: x != old))
    return orig, new


@given(seeds, altered())
def test_a_voucher_never_verifies_with_altered_fields(seed: bytes,
                                                     pair: tuple[dict[str, Any],
                                                                 dict[str, Any]]) -> None:
    orig, new = pair
    key = Identity(seed)
    v = Voucher.create(key, **orig)
    forged = Voucher(**new, sig=v.sig)
    assert v.verify(key.public)
    assert not forged.verify(key.public)


@given(seeds, raw32, periods, amounts, amounts)
def test_a_voucher_signature_is_not_a_close_signature(seed: bytes, cid: bytes, period: int,
                                                      a: int, b: int) -> None:
    key = Identity(seed)
    fields = [cid, period, a, b]
    assert not verify(key.public, DOMAIN_CLOSE, fields, key.sign(DOMAIN_VOUCHER, fields))
    assert not verify(key.public, DOMAIN_VOUCHER, fields, key.sign(DOMAIN_CLOSE, fields))


@given(seeds, st.integers(min_value=0, max_value=63), st.integers(min_value=1, max_value=255))
def test_a_flipped_signature_bit_never_verifies(seed: bytes, pos: int, flip: int) -> None:
    key = Identity(seed)
    sig = bytearray(key.sign(DOMAIN_TX, ["x"]))
    sig[pos] ^= flip
    assert not verify(key.public, DOMAIN_TX, ["x"], bytes(sig))


@pytest.mark.parametrize("public, fields, sig", [
    (ALICE.public, [1], None),
    (ALICE.public, [1], 5),
    (ALICE.public, [1], "s" * 64),
    (ALICE.public, [1], bytes(63)),
    (None, [1], bytes(64)),
    (5, [1], bytes(64)),
    ("p" * 32, [1], bytes(64)),
    (bytes(31), [1], bytes(64)),
    (ALICE.public, [2**64], bytes(64)),      # not msgpack-able
    (ALICE.public, [object()], bytes(64)),
], ids=["sig-None", "sig-int", "sig-str", "sig-63", "key-None", "key-int", "key-str", "key-31",
        "field-2**64", "field-object"])
def test_verify_says_no_to_malformed_input_instead_of_raising(public: Any, fields: Any,
                                                              sig: Any) -> None:
    assert verify(public, DOMAIN_VOUCHER, fields, sig) is False


def test_hash32_is_32_bytes_and_order_sensitive() -> None:
    assert len(hash32("a", 1)) == 32
    assert hash32("a", 1) != hash32(1, "a")
    assert hash32("a", 1) == hash32("a", 1)
