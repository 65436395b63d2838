"""Bad input through the API and through the loopback transport: a defined error, no state change.

Every case checks the error's JSON-RPC code pair (DESIGN §8) and that both sides' balances are
exactly what they were; the honest channel still pays afterwards.
"""
from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

import pytest

import paychan
from paychan.actors.envelope import Sealer
from paychan.protocol.errors import (
    BROKEN_ENCODING,
    INSUFFICIENT_BALANCE,
    NEGATIVE_AMOUNT,
    NOT_A_NUMBER,
    NOT_FOUND,
    REJECTED,
    UNAUTHORIZED,
    BadSignature,
    BrokenEncoding,
    PaychanError,
    Unauthorized,
)
from paychan.protocol.identity import decode_channel_id, encode_channel_id
from paychan.protocol.wire import MAX_BODY, Pay, PayResult, Voucher, decode, encode

DEPOSIT = 1_000  # the `channel` fixture's deposit
FUNDS = 10_000  # what the `pair` fixture mints for A


def rejected(err: PaychanError, detail: int) -> None:
    """`err` is a REJECTED error (code 3) whose data carries `detail`."""
    assert err.code == REJECTED, err.to_wire()
    assert err.data is not None and err.data[0]["code"] == detail, err.to_wire()


def snapshot(a: paychan.Node, b: paychan.Node, ch: str) -> tuple[dict[str, Any], ...]:
    return a.balances(ch), b.balances(ch)


class Wiretap:
    """Records every payload a node sends (before sealing) and passes it on."""

    def __init__(self, node: paychan.Node) -> None:
        self.sent: list[Any] = []
        core = node._core
        real = core.send

        def send(peer: bytes, payload: bytes) -> None:
            self.sent.append(decode(payload))
            real(peer, payload)

        core.send = send  # type: ignore[method-assign]

    def of_type(self, cls: type, payment_id: str | None = None) -> list[Any]:
        return [m for m in self.sent if isinstance(m, cls)
                and (payment_id is None or m.payment_id == payment_id)]


@pytest.fixture
def counted(pair: tuple[paychan.Node, paychan.Node]) -> list[str]:
    """B's handler, counting the payment ids it serves."""
    _, b = pair
    calls: list[str] = []

    def handler(p: paychan.Payment) -> Any:
        calls.append(p.payment_id)
        return ["served", p.message, p.amount]

    b.on_payment_received(handler)
    return calls


# --- through the API ------------------------------------------------------------------------

def test_unknown_and_garbage_channel_ids(pair, channel):
    a, b = pair
    before = snapshot(a, b, channel)
    unknown = encode_channel_id(os.urandom(32))
    with pytest.raises(PaychanError) as exc:
        a.send_message_and_pay(unknown, "hi", 1, timeout=5)
    rejected(exc.value, NOT_FOUND)
    for call in (lambda: a.balances(unknown), lambda: a.deposit(unknown, 1),
                 lambda: a.close(unknown)):
        with pytest.raises(PaychanError) as exc:
            call()
        rejected(exc.value, NOT_FOUND)
    for garbage in ("ch_garbage", "not a channel", "ch_" + "1" * 60, ""):
        with pytest.raises(BrokenEncoding) as exc2:
            a.send_message_and_pay(garbage, "hi", 1, timeout=5)
        rejected(exc2.value, BROKEN_ENCODING)
        with pytest.raises(BrokenEncoding):
            a.balances(garbage)
    assert snapshot(a, b, channel) == before
    assert a.send_message_and_pay(channel, "still fine", 3) == ["served", "still fine", 3]


@pytest.mark.parametrize(("amount", "detail"), [
    (-1, NEGATIVE_AMOUNT),
    (-(2**70), NEGATIVE_AMOUNT),
    (2**63, NOT_A_NUMBER),
    (2**200, NOT_A_NUMBER),
    (1.5, NOT_A_NUMBER),
    ("10", NOT_A_NUMBER),
    (True, NOT_A_NUMBER),
    (DEPOSIT + 1, INSUFFICIENT_BALANCE),
])
def test_bad_amounts_change_nothing(pair, channel, counted, amount, detail):
    a, b = pair
    before = snapshot(a, b, channel)
    with pytest.raises(PaychanError) as exc:
        a.send_message_and_pay(channel, "hi", amount, timeout=5)
    rejected(exc.value, detail)
    assert snapshot(a, b, channel) == before
    assert counted == []
    assert a.send_message_and_pay(channel, "after", 2) == ["served", "after", 2]


def test_overdraft_after_spending_most(pair, channel):
    a, b = pair
    a.send_message_and_pay(channel, "most", DEPOSIT - 10)
    before = snapshot(a, b, channel)
    with pytest.raises(PaychanError) as exc:
        a.send_message_and_pay(channel, "too much", 11)
    rejected(exc.value, INSUFFICIENT_BALANCE)
    assert snapshot(a, b, channel) == before
    assert a.send_message_and_pay(channel, "exactly the rest", 10)[2] == 10
    assert a.balances(channel)["my_balance"] == 0


def test_bad_deposits(pair, channel, ledger):
    a, b = pair
    before = snapshot(a, b, channel), ledger.balance(a.address)
    for amount, detail in ((-5, NEGATIVE_AMOUNT), (2**63, NOT_A_NUMBER),
                           (FUNDS, INSUFFICIENT_BALANCE)):  # FUNDS - DEPOSIT is left
        with pytest.raises(PaychanError) as exc:
            a.deposit(channel, amount)
        rejected(exc.value, detail)
    assert (snapshot(a, b, channel), ledger.balance(a.address)) == before


def test_channel_in_an_asset_the_account_lacks(pair, ledger):
    a, b = pair
    with pytest.raises(PaychanError) as exc:
        a.create_channel(b, 10, asset="gold", dispute_period=60)
    rejected(exc.value, INSUFFICIENT_BALANCE)
    assert a.channels() == [] and b.channels() == []
    assert ledger.balance(a.address, "gold") == 0
    assert ledger.balance(a.address) == FUNDS


def test_message_larger_than_64_kib(pair, channel, counted):
    a, b = pair
    before = snapshot(a, b, channel)
    for message in ("x" * (MAX_BODY + 1), b"\0" * MAX_BODY, ["y" * 40_000, "z" * 40_000]):
        with pytest.raises(BrokenEncoding) as exc:
            a.send_message_and_pay(channel, message, 1)
        rejected(exc.value, BROKEN_ENCODING)
    with pytest.raises(BrokenEncoding):
        a.send_message_and_pay(channel, {1: "non-string key"}, 1)
    assert snapshot(a, b, channel) == before
    assert counted == []
    b.on_payment_received(lambda p: len(p.message))
    just_fits = "x" * (MAX_BODY - 8)
    assert a.send_message_and_pay(channel, just_fits, 1) == len(just_fits)


# --- through the loopback transport ---------------------------------------------------------

def first_pay(a: paychan.Node, b: paychan.Node, ch: str, tap: Wiretap) -> Pay:
    assert a.send_message_and_pay(ch, "real", 4, payment_id="real-1") == ["served", "real", 4]
    pays = tap.of_type(Pay, "real-1")
    assert len(pays) == 1
    return pays[0]


def test_garbage_and_misaddressed_envelopes(nodes, pair, channel, wait_until):
    a, b = pair
    c = nodes.open("c")
    b_key = b._core.identity.public
    before = snapshot(a, b, channel)
    net = b._core.network
    handled = net.delivered + net.dropped
    junk = [b"", b"\x00garbage", os.urandom(300), b"\x94\xa3pc1" + os.urandom(40),
            b"\xc1" * 10, b"\xdd\xff\xff\xff\xff"]
    for raw in junk:
        err = b._core.on_envelope(raw)
        assert isinstance(err, BrokenEncoding), (raw, err)
        net.send(b_key, raw)  # the same through the network's delivery thread
    # A real envelope from A, sealed for C: B must not open it.
    for_c = a._core.sealer.seal(c._core.identity.public, b"anything")
    err = b._core.on_envelope(for_c)
    assert isinstance(err, Unauthorized) and err.code == UNAUTHORIZED
    net.send(b_key, for_c)
    # Sealed for B, but the payload is not a message.
    err = b._core.on_envelope(a._core.sealer.seal(b_key, b"not msgpack \xc1"))
    assert isinstance(err, BrokenEncoding)
    # Sealed for B by A, but the ciphertext was flipped in transit.
    good = bytearray(a._core.sealer.seal(b_key, b"payload"))
    good[-1] ^= 1
    err = b._core.on_envelope(bytes(good))
    assert isinstance(err, BadSignature)
    wait_until(lambda: net.delivered + net.dropped >= handled + len(junk) + 1,
               what="the network to hand over every envelope")
    assert snapshot(a, b, channel) == before
    assert a.send_message_and_pay(channel, "honest", 2) == ["served", "honest", 2]


def test_tampered_vouchers_are_refused(pair, channel, counted, wait_until):
    a, b = pair
    tap_a, tap_b = Wiretap(a), Wiretap(b)
    real = first_pay(a, b, channel, tap_a)
    before = snapshot(a, b, channel)
    v = real.voucher
    bad_sig = bytes([v.sig[0] ^ 0xFF]) + v.sig[1:]
    forged = [
        # The real voucher's fields under a broken signature, on a new payment id.
        Pay(real.channel_id, "forged-1", replace(v, sig=bad_sig), real.amount, "free?"),
        # A higher total and nonce under the real (now wrong) signature.
        Pay(real.channel_id, "forged-2", replace(v, nonce=v.nonce + 1, sent=v.sent + 500),
            500, "free?"),
        # A voucher signed by B itself, passed off as A's.
        Pay(real.channel_id, "forged-3", Voucher.create(b._core.identity, real.channel_id,
                                                         v.period, v.nonce + 1, v.sent + 9),
            9, "free?"),
    ]
    b_key = b._core.identity.public
    for msg in forged:
        envelope = a._core.sealer.seal(b_key, encode(msg))  # really from A, so it opens
        assert b._core.on_envelope(envelope) is None  # delivered; the actor refuses it
    for msg in forged:
        wait_until(lambda m=msg: tap_b.of_type(PayResult, m.payment_id),
                   what=f"B's answer to {msg.payment_id}")
        answer = tap_b.of_type(PayResult, msg.payment_id)[0]
        assert answer.response is None and answer.refund is None
        assert answer.error is not None
        assert answer.error["data"][0]["code"] == BadSignature.detail
    assert counted == ["real-1"]
    assert snapshot(a, b, channel) == before
    held = b._core.state(decode_channel_id(channel)).peer_voucher
    assert held == v  # B still holds A's real voucher
    assert a.send_message_and_pay(channel, "honest", 2) == ["served", "honest", 2]


def test_replayed_pay_is_answered_from_the_stored_result(pair, channel, counted, wait_until):
    a, b = pair
    tap_a, tap_b = Wiretap(a), Wiretap(b)
    real = first_pay(a, b, channel, tap_a)
    first_answer = tap_b.of_type(PayResult, "real-1")
    assert len(first_answer) == 1
    before = snapshot(a, b, channel)
    envelope = a._core.sealer.seal(b._core.identity.public, encode(real))
    for _ in range(3):
        assert b._core.on_envelope(envelope) is None
        b._core.network.send(b._core.identity.public, envelope)
    wait_until(lambda: len(tap_b.of_type(PayResult, "real-1")) == 7,
               what="B to answer all six replays")
    assert all(r == first_answer[0] for r in tap_b.of_type(PayResult, "real-1"))
    assert counted == ["real-1"]  # served once
    assert snapshot(a, b, channel) == before
    # A retry through the API with the same payment id is not charged either.
    assert a.send_message_and_pay(channel, "real", 4, payment_id="real-1") == [
        "served", "real", 4]
    assert snapshot(a, b, channel) == before
    assert a.send_message_and_pay(channel, "honest", 2) == ["served", "honest", 2]
    assert a.balances(channel)["sent_by_me"] == b.balances(channel)["sent_by_peer"] == 6


def test_pay_from_a_non_party_is_refused(nodes, ledger, pair, channel, counted, wait_until):
    a, b = pair
    tap_a = Wiretap(a)
    real = first_pay(a, b, channel, tap_a)
    c = nodes.open("c")
    before = snapshot(a, b, channel)
    c_id = c._core.identity
    b_key = b._core.identity.public
    v = Voucher.create(c_id, real.channel_id, 1, real.voucher.nonce + 1, 50)
    intruder = Pay(real.channel_id, "intruder-1", v, 50, "let me in")
    err = b._core.on_envelope(c._core.sealer.seal(b_key, encode(intruder)))
    assert isinstance(err, Unauthorized)
    # C replays A's own real Pay under C's seal: still not a party.
    err = b._core.on_envelope(c._core.sealer.seal(b_key, encode(
        replace(real, payment_id="intruder-2"))))
    assert isinstance(err, Unauthorized)
    # An impostor Sealer claiming A's key cannot produce an envelope that opens.
    impostor = Sealer(c_id)
    forged = bytearray(impostor.seal(b_key, encode(replace(real, payment_id="intruder-3"))))
    a_key = a._core.identity.public
    forged[forged.index(c_id.public):forged.index(c_id.public) + 32] = a_key
    assert isinstance(b._core.on_envelope(bytes(forged)), BadSignature)
    net = b._core.network
    handled = net.delivered + net.dropped
    c._core.send(b_key, encode(intruder))  # and through the network
    wait_until(lambda: net.delivered + net.dropped > handled, what="the intruder's envelope")
    assert counted == ["real-1"]
    assert snapshot(a, b, channel) == before
    assert a.send_message_and_pay(channel, "honest", 2) == ["served", "honest", 2]
