"""A handler answer that cannot travel to the payer becomes a refunded HandlerError."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import paychan
from paychan.actors.node import HANDLER_ERROR_CHARS
from paychan.protocol.errors import HandlerError
from paychan.protocol.wire import MAX_BODY

WAIT = 10.0  # every payment: a regression fails here rather than hanging
AMOUNT = 7
SUFFIX = " (refunded)"


class Unsendable(Exception):
    """Raised by a handler with a message far longer than a wire error may carry."""


def _too_large(p: paychan.Payment) -> Any:
    return "x" * (MAX_BODY + 1)


def _an_object(p: paychan.Payment) -> Any:
    return {"answer": object()}


def _a_set(p: paychan.Payment) -> Any:
    return {1, 2, 3}


def _long_exception(p: paychan.Payment) -> Any:
    raise Unsendable("y" * 200_000)


def _refused_then_served(a: paychan.Node, b: paychan.Node, channel: str, quick: bool,
                         handler: Callable[[paychan.Payment], Any]) -> HandlerError:
    """Pays through `handler`, checks the payment was refunded and that the next payment is
    served; returns the payer's error."""
    payer_before, payee_before = a.balances(channel), b.balances(channel)
    b.on_payment_received(handler, quick=quick)
    with pytest.raises(HandlerError) as raised:
        a.send_message_and_pay(channel, "ask", AMOUNT, timeout=WAIT, payment_id="refused")
    assert str(raised.value).endswith(SUFFIX)

    payer, payee = a.balances(channel), b.balances(channel)
    # Paid, then paid back by a refund voucher: each side sent AMOUNT more, balances unchanged.
    assert payer["sent_by_me"] == payer_before["sent_by_me"] + AMOUNT
    assert payer["sent_by_peer"] == payer_before["sent_by_peer"] + AMOUNT
    assert (payer["my_balance"], payer["peer_balance"]) == (
        payer_before["my_balance"], payer_before["peer_balance"])
    assert (payee["my_balance"], payee["peer_balance"]) == (
        payee_before["my_balance"], payee_before["peer_balance"])

    b.on_payment_received(lambda p: ["served", p.message], quick=quick)
    assert a.send_message_and_pay(channel, "tea", 2, timeout=WAIT) == ["served", "tea"]
    assert a.balances(channel)["my_balance"] == payer_before["my_balance"] - 2
    assert b.balances(channel)["my_balance"] == payee_before["my_balance"] + 2
    return raised.value


@pytest.mark.parametrize("quick", [False, True], ids=["pooled", "quick"])
def test_a_response_over_max_body_is_refunded(
        pair: tuple[paychan.Node, paychan.Node], channel: str, quick: bool) -> None:
    a, b = pair
    err = _refused_then_served(a, b, channel, quick, _too_large)
    assert "larger than" in str(err)
    assert "refunded" in str(err)


@pytest.mark.parametrize("quick", [False, True], ids=["pooled", "quick"])
@pytest.mark.parametrize("handler", [_an_object, _a_set], ids=["object", "set"])
def test_a_response_msgpack_cannot_carry_is_refunded(
        pair: tuple[paychan.Node, paychan.Node], channel: str, quick: bool,
        handler: Callable[[paychan.Payment], Any]) -> None:
    a, b = pair
    err = _refused_then_served(a, b, channel, quick, handler)
    assert "msgpack" in str(err)


@pytest.mark.parametrize("quick", [False, True], ids=["pooled", "quick"])
def test_a_huge_exception_message_is_cut_and_refunded(
        pair: tuple[paychan.Node, paychan.Node], channel: str, quick: bool) -> None:
    a, b = pair
    err = _refused_then_served(a, b, channel, quick, _long_exception)
    text = str(err)
    assert text == err.message
    assert text.startswith("Unsendable: yyy")
    why = text.removesuffix(SUFFIX)
    # Cut to the limit, no more and no less: the rest of the message was there to keep.
    assert len(why) == HANDLER_ERROR_CHARS
    assert why == ("Unsendable: " + "y" * 200_000)[:HANDLER_ERROR_CHARS]
