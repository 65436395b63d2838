"""`paychan demo`: a client and a pay-per-call service on the embedded ledger, end to end."""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from typing import Any

from tqdm import tqdm

from paychan.actors.clock import VirtualClock
from paychan.api import Ledger, Node, Payment
from paychan.protocol.channel import Phase
from paychan.protocol.errors import HandlerError
from paychan.protocol.identity import decode_channel_id
from paychan.protocol.tx import make_tx


class Demo:
    def __init__(self, calls: int, price: int, data_dir: str, quiet: bool) -> None:
        self.calls, self.price, self.data_dir, self.quiet = calls, price, data_dir, quiet
        self.checks: list[dict[str, Any]] = []
        self.periods: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []

    def say(self, text: str = "") -> None:
        if not self.quiet:
            print(text, flush=True)

    def check(self, name: str, ok: bool, detail: str = "") -> None:
        self.checks.append({"check": name, "ok": bool(ok), "detail": detail})
        self.say(f"  [{'ok' if ok else 'FAILED'}] {name}{': ' + detail if detail else ''}")

    def run(self) -> bool:
        clock = VirtualClock()
        self.ledger = ledger = Ledger.embedded(os.path.join(self.data_dir, "ledger"), clock)
        client = Node.open(os.path.join(self.data_dir, "client"), ledger)
        service = Node.open(os.path.join(self.data_dir, "service"), ledger)
        try:
            return self._run(ledger, client, service)
        finally:
            client.stop()
            service.stop()
            ledger.close()

    def _run(self, ledger: Ledger, client: Node, service: Node) -> bool:
        minted = {"client": 10_000, "service": 1_000}
        ledger.mint(client.address, minted["client"])
        ledger.mint(service.address, minted["service"])
        self.say(f"client  {client.address}\nservice {service.address}")
        fraud_seen = threading.Event()

        def on_fraud(event: dict[str, Any]) -> None:
            self.events.append(event)
            fraud_seen.set()

        client.on("channel_closed_with_fraud_proof", on_fraud)

        def square(p: Payment) -> dict[str, Any]:
            if p.message.get("op") == "fail":
                raise RuntimeError("the service cannot do that")
            return {"result": p.message["x"] ** 2}

        service.on_payment_received(square)
        client.on_payment_received(lambda p: {"thanks": p.amount})

        self.say("\n1. open a channel: the client deposits 3,000")
        ch = client.create_channel(service, 3_000, dispute_period=600)
        cid = decode_channel_id(ch)
        self.say(f"   {ch}")
        # The service learns of the funding from the ledger a moment after the client does.
        service._core.wait_for(cid, lambda s: s.phase is Phase.OPEN, 10)
        self.check("channel open on both sides",
                   client.balances(ch)["status"] == "open"
                   and service.balances(ch)["status"] == "open")

        self.say(f"\n2. {self.calls} paid calls at {self.price} each")
        started = time.perf_counter()
        wrong = 0
        for i in tqdm(range(self.calls), disable=self.quiet, unit="call", file=sys.stdout):
            reply = client.send_message_and_pay(ch, {"op": "square", "x": i}, self.price)
            wrong += reply != {"result": i * i}
        elapsed = time.perf_counter() - started
        self.say(f"   {self.calls / elapsed:,.0f} calls/s")
        self.check("every response correct", wrong == 0, f"{self.calls - wrong}/{self.calls}")
        bal = client.balances(ch)
        self.show(client, service, ch)
        self.check("client paid exactly the calls", bal["sent_by_me"] == self.calls * self.price)

        self.say("\n3. a call whose handler fails is refunded")
        before = client.balances(ch)["my_balance"]
        try:
            client.send_message_and_pay(ch, {"op": "fail"}, 50)
            refunded = False
        except HandlerError as exc:
            refunded = "refunded" in exc.message
            self.say(f"   error: {exc.message}")
        self.check("failed call cost nothing",
                   refunded and client.balances(ch)["my_balance"] == before)

        self.say("\n4. close mutually")
        expect = client.balances(ch)
        start = {n: ledger.balance(x.address) for n, x in (("client", client),
                                                              ("service", service))}
        client.close(ch)
        paid = {n: ledger.balance(x.address) - start[n] for n, x in (("client", client),
                                                                        ("service", service))}
        self.periods.append({"period": 1, "how": "mutual close", **paid})
        self.check("payouts equal the channel balances",
                   paid == {"client": expect["my_balance"], "service": expect["peer_balance"]},
                   f"client {paid['client']}, service {paid['service']}")

        self.say("\n5. reopen the next period: both deposit, both pay")
        client.deposit(ch, 1_000)
        service.deposit(ch, 200)
        for i in range(10):
            client.send_message_and_pay(ch, {"op": "square", "x": i}, 5)
        for _ in range(6):
            service.send_message_and_pay(ch, "usage report", 10)
        self.show(client, service, ch)
        period2 = client.balances(ch)
        self.check("period 2 open with both deposits",
                   period2["period"] == 2 and period2["deposited_by_peer"] == 200)

        self.say("\n6. the service cheats: a solo close declaring a stale 'sent' of 0")
        start = {n: ledger.balance(x.address) for n, x in (("client", client),
                                                              ("service", service))}
        svc = service._core
        state = svc.state(cid)
        tx = make_tx(svc.identity, "close_solo", {
            "channel_id": cid, "period": state.period, "declared_sent_self": 0,
            "peer_voucher": state.peer_voucher.to_obj() if state.peer_voucher else None,
        }, os.urandom(16))
        ledger.client.submit(tx.to_bytes())
        fraud_seen.wait(15)
        paid = {n: ledger.balance(x.address) - start[n] for n, x in (("client", client),
                                                                        ("service", service))}
        self.periods.append({"period": 2, "how": "stale solo close, fraud proof", **paid})
        total = period2["deposited_by_me"] + period2["deposited_by_peer"]
        self.check("the watcher proved fraud", fraud_seen.is_set())
        self.check("the client took the whole channel", paid["client"] == total,
                   f"{paid['client']} of {total}")

        self.say("\n7. settlement")
        self.say(f"   {'period':>6}  {'how':<32} {'client':>8} {'service':>8}")
        for p in self.periods:
            self.say(f"   {p['period']:>6}  {p['how']:<32} {p['client']:>8} {p['service']:>8}")
        final = {n: ledger.balance(x.address) for n, x in (("client", client),
                                                             ("service", service))}
        self.final = final
        self.say(f"   ledger accounts: client {final['client']}, service {final['service']}")
        self.check("conservation: accounts hold everything minted",
                   sum(final.values()) == sum(minted.values()),
                   f"{sum(final.values())} == {sum(minted.values())}")
        return all(c["ok"] for c in self.checks)

    def show(self, client: Node, service: Node, ch: str) -> None:
        c, s = client.balances(ch), service.balances(ch)
        self.say(f"   client: balance {c['my_balance']}, sent {c['sent_by_me']}; "
                 f"service: balance {s['my_balance']}, sent {s['sent_by_me']}")


def main(calls: int = 300, price: int = 3, as_json: bool = False,
         data_dir: str | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    tmp = None
    if data_dir is None:
        tmp = data_dir = tempfile.mkdtemp(prefix="paychan-demo-")
    demo = Demo(calls, price, data_dir, quiet=as_json)
    try:
        ok = demo.run()
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    if as_json:
        print(json.dumps({"ok": ok, "calls": calls, "price": price, "checks": demo.checks,
                          "periods": demo.periods, "final": getattr(demo, "final", {})},
                         indent=2))
    else:
        print("\ndemo " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1
