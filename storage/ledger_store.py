"""The ledger's own tables: accounts, channel records, the event log and seen transaction ids."""
from __future__ import annotations

from typing import Any

import lmdb

from paychan.protocol.contract import ChannelRecord
from paychan.protocol.errors import InsufficientBalance, NotANumber
from paychan.protocol.identity import check_amount
from paychan.protocol.tx import Tx, apply, channel_of
from paychan.storage.env import Store
from paychan.storage.keys import pack, u64, unpack

ACCOUNTS, CHANNELS = "ledger_accounts", "ledger_channels"
EVENTS, META = "ledger_events", "ledger_meta"
_HEIGHT = b"height"


def _account_key(address: bytes, asset: str) -> bytes:
    return address + asset.encode("utf-8")


class LedgerStore:
    """Applies transactions durably: one write transaction per submit, grouped by the writer."""

    def __init__(self, store: Store, network_id: str = "paychan-dev") -> None:
        self.store = store
        self.network_id = network_id

    # -- reads -----------------------------------------------------------------------------
    def balance(self, address: bytes, asset: str = "base") -> int:
        value = self.store.get_obj(ACCOUNTS, _account_key(address, asset))
        return int(value or 0)

    def channel(self, channel_id: bytes) -> ChannelRecord | None:
        obj = self.store.get_obj(CHANNELS, channel_id)
        return None if obj is None else ChannelRecord.from_obj(obj)

    def height(self) -> int:
        return int(self.store.get_obj(META, _HEIGHT) or 0)

    def events_since(self, height: int, limit: int = 1000) -> list[dict[str, Any]]:
        """Events with a height above `height`, oldest first."""
        out = []
        for _key, value in self.store.iter_from(EVENTS, u64(height + 1)):
            out.append(unpack(value))
            if len(out) >= limit:
                break
        return out

    # -- writes ----------------------------------------------------------------------------
    def mint(self, address: bytes, amount: int, asset: str = "base") -> int:
        check_amount(amount)

        def fn(txn: lmdb.Transaction, store: Store) -> int:
            key = _account_key(address, asset)
            raw = txn.get(key, db=store.db(ACCOUNTS))
            new = (unpack(raw) if raw else 0) + amount
            check_amount(new, "balance")
            txn.put(key, pack(new), db=store.db(ACCOUNTS))
            return int(new)

        return int(self.store.writer.transact(fn))

    def submit(self, tx_bytes: bytes, now: int) -> dict[str, Any]:
        """Verify and apply one transaction; returns its event. A replayed txid returns the
        original event with `duplicate: True` so that retries are harmless."""
        tx = Tx.from_bytes(tx_bytes)
        tx.verify()

        def fn(txn: lmdb.Transaction, store: Store) -> dict[str, Any]:
            seen = txn.get(b"tx:" + tx.txid, db=store.db(META))
            if seen is not None:
                original = txn.get(u64(unpack(seen)), db=store.db(EVENTS))
                assert original is not None, "a seen txid always has its event"
                return {**unpack(original), "duplicate": True}
            cid = channel_of(tx)
            raw = txn.get(cid, db=store.db(CHANNELS))
            rec = None if raw is None else ChannelRecord.from_obj(unpack(raw))
            applied = apply(rec, tx, now)
            asset = applied.record.params.asset
            if applied.debit:
                key = _account_key(tx.sender, asset)
                have = unpack(txn.get(key, db=store.db(ACCOUNTS)) or pack(0))
                if have < applied.debit:
                    raise InsufficientBalance(
                        f"account holds {have} {asset}, the transaction needs {applied.debit}")
                txn.put(key, pack(have - applied.debit), db=store.db(ACCOUNTS))
            for who, amount in applied.payouts:
                key = _account_key(who, asset)
                new = unpack(txn.get(key, db=store.db(ACCOUNTS)) or pack(0)) + amount
                if new >= 2**63:
                    raise NotANumber("an account balance would overflow")
                txn.put(key, pack(new), db=store.db(ACCOUNTS))
            txn.put(cid, pack(applied.record.to_obj()), db=store.db(CHANNELS))
            height = int(unpack(txn.get(_HEIGHT, db=store.db(META)) or pack(0))) + 1
            event = {"height": height, "channel_id": cid, "event": applied.event,
                     "record": applied.record.to_obj(), "time": now, "sender": tx.sender,
                     "payouts": [[w, a] for w, a in applied.payouts]}
            txn.put(u64(height), pack(event), db=store.db(EVENTS))
            txn.put(_HEIGHT, pack(height), db=store.db(META))
            txn.put(b"tx:" + tx.txid, pack(height), db=store.db(META))
            return event

        result: dict[str, Any] = self.store.writer.transact(fn)
        return result
