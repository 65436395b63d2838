"""Ledger transactions: signed envelopes and their pure application to a channel record."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from paychan.protocol import contract
from paychan.protocol.contract import ChannelRecord, Payouts
from paychan.protocol.errors import BadSignature, Conflict, DecodeError, InvalidParams, NotFound
from paychan.protocol.identity import DOMAIN_TX, Identity, check_amount, verify
from paychan.protocol.wire import ChannelParams, Voucher, unpack

KINDS = ("create", "deposit", "close_mutual", "close_solo", "confirm", "fraud_proof",
         "set_delegate")


@dataclass(frozen=True, slots=True)
class Tx:
    """A transaction signed by the ledger account that submits it. `txid` makes replays visible."""

    kind: str
    sender: bytes
    txid: bytes
    body: dict[str, Any]
    sig: bytes

    def signed_fields(self) -> list[Any]:
        return [self.kind, self.sender, self.txid,
                msgpack.packb(self.body, use_bin_type=True)]

    def to_bytes(self) -> bytes:
        return msgpack.packb([self.kind, self.sender, self.txid, self.body, self.sig],
                             use_bin_type=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> Tx:
        obj = unpack(data)
        if not isinstance(obj, list) or len(obj) != 5:
            raise DecodeError("a transaction is a list of 5")
        kind, sender, txid, body, sig = obj
        if kind not in KINDS:
            raise DecodeError(f"unknown transaction kind {kind!r}")
        if not (isinstance(sender, bytes) and len(sender) == 32 and isinstance(txid, bytes)
                and len(txid) == 16 and isinstance(body, dict) and isinstance(sig, bytes)):
            raise DecodeError("malformed transaction")
        return cls(kind, sender, txid, body, sig)

    def verify(self) -> None:
        if not verify(self.sender, DOMAIN_TX, self.signed_fields(), self.sig):
            raise BadSignature("transaction is not signed by its sender")


def make_tx(key: Identity, kind: str, body: dict[str, Any], txid: bytes) -> Tx:
    """Sign a transaction. `txid` (16 bytes) comes from the caller: this layer has no randomness."""
    if kind not in KINDS:
        raise InvalidParams(f"unknown transaction kind {kind!r}")
    unsigned = Tx(kind, key.public, txid, body, b"")
    return Tx(kind, key.public, txid, body, key.sign(DOMAIN_TX, unsigned.signed_fields()))


def channel_of(tx: Tx) -> bytes:
    """The channel a transaction acts on."""
    if tx.kind == "create":
        return _params(tx.body).channel_id
    cid = tx.body.get("channel_id")
    if not isinstance(cid, bytes) or len(cid) != 32:
        raise DecodeError("transaction has no valid channel_id")
    return cid


def _params(body: dict[str, Any]) -> ChannelParams:
    try:
        return ChannelParams.from_obj(body.get("params"))
    except (TypeError, ValueError) as exc:
        raise DecodeError(f"bad params: {exc}") from None


def _get(body: dict[str, Any], name: str) -> Any:
    if name not in body:
        raise InvalidParams(f"transaction body lacks {name!r}")
    return body[name]


def _voucher(obj: Any) -> Voucher | None:
    return None if obj is None else Voucher.from_obj(obj)


@dataclass(frozen=True, slots=True)
class Applied:
    """The outcome of one transaction: the new record, what the sender pays in, what is paid out."""

    record: ChannelRecord
    event: str
    debit: int
    payouts: Payouts


def apply(rec: ChannelRecord | None, tx: Tx, now: int) -> Applied:
    """Apply a verified transaction to its channel's record; raises with no effect if refused."""
    b = tx.body
    if tx.kind == "create":
        if rec is not None:
            raise Conflict("the channel already exists")
        deposit = check_amount(_get(b, "deposit"), "deposit")
        return Applied(contract.create(_params(b), tx.sender, deposit), "create", deposit, ())
    rec = contract.require(rec, channel_of(tx))
    period = _get(b, "period") if tx.kind != "deposit" else b.get("period", rec.period)
    if tx.kind == "deposit":
        amount = check_amount(_get(b, "amount"), "amount")
        if period != rec.period:
            raise Conflict(f"channel is in period {rec.period}, not {period}")
        return Applied(contract.deposit_(rec, tx.sender, amount), "deposit", amount, ())
    if tx.kind == "close_mutual":
        new, payouts = contract.close_mutual(
            rec, period, _get(b, "sent_initiator"), _get(b, "sent_responder"),
            _get(b, "sig_initiator"), _get(b, "sig_responder"))
        return Applied(new, "close_mutual", 0, payouts)
    if tx.kind == "close_solo":
        new = contract.close_solo(rec, tx.sender, period, _get(b, "declared_sent_self"),
                                  _voucher(b.get("peer_voucher")), now)
        return Applied(new, "close_solo", 0, ())
    if tx.kind == "confirm":
        new, payouts = contract.confirm(rec, tx.sender, period, b.get("additional_sent", 0), now)
        return Applied(new, "confirm", 0, payouts)
    if tx.kind == "fraud_proof":
        voucher = _voucher(_get(b, "voucher"))
        if voucher is None:
            raise InvalidParams("fraud_proof needs a voucher")
        new, payouts = contract.fraud_proof(rec, tx.sender, period, voucher)
        return Applied(new, "fraud_proof", 0, payouts)
    if tx.kind == "set_delegate":
        return Applied(contract.set_delegate(rec, tx.sender, b.get("delegate")), "set_delegate",
                       0, ())
    raise NotFound(f"unknown transaction kind {tx.kind!r}")
