"""A market of agents over the real actors: random channels and payments, faults, restarts."""
from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from paychan.actors.clock import VirtualClock
from paychan.actors.loopback import Faults, LoopbackNetwork
from paychan.actors.node import NodeCore, Payment
from paychan.api import Ledger, Node
from paychan.protocol import errors

MINT = 10_000


@dataclass
class Report:
    agents: int
    channels: int = 0
    attempted: int = 0
    acknowledged: int = 0
    refunded: int = 0
    refused: int = 0
    unfinished: int = 0
    restarts: int = 0
    paid_by: dict[str, int] = field(default_factory=dict)
    received_by: dict[str, int] = field(default_factory=dict)
    exact: bool = False  # every account ends at minted - paid + received (acknowledged calls)
    final_balances: dict[str, int] = field(default_factory=dict)
    conserved: bool = False
    agreed: bool = False
    seconds: float = 0.0


class Market:
    """Agents that open channels to random peers and pay them; some handlers fail at random."""

    def __init__(self, agents: int, seed: int, faults: Faults, fail_rate: float,
                 data_dir: str) -> None:
        self.rng = random.Random(seed)
        self.fail_rate = fail_rate
        self.data_dir = data_dir
        self.ledger = Ledger.embedded(f"{data_dir}/ledger", VirtualClock())
        self.network = LoopbackNetwork(faults)
        self.names = [f"agent{i}" for i in range(agents)]
        self.nodes: dict[str, Node] = {name: self._open(name) for name in self.names}
        for node in self.nodes.values():
            self.ledger.mint(node.address, MINT)
        self.channels: list[tuple[str, str, str]] = []  # (payer, payee, ch)
        self.report = Report(agents)

    def _open(self, name: str) -> Node:
        def handler(p: Payment) -> Any:
            if self.rng.random() < self.fail_rate:
                raise RuntimeError("the service is busy")
            return {"served": p.message}

        core = NodeCore(f"{self.data_dir}/{name}", self.ledger.client, network=self.network,
                        payment_handler=handler)
        return Node(core)

    def open_channels(self, count: int) -> None:
        for _ in range(count):
            payer, payee = self.rng.sample(self.names, 2)
            ch = self.nodes[payer].create_channel(self.nodes[payee], 500, dispute_period=30)
            self.channels.append((payer, payee, ch))
        self.report.channels = len(self.channels)

    def trade(self, rounds: int, restart_every: int) -> None:
        for r in range(rounds):
            payer, payee, ch = self.rng.choice(self.channels)
            amount = self.rng.randint(1, 5)
            pid = f"r{r}"
            self.report.attempted += 1
            if self._pay(payer, ch, pid, amount):
                received = self.report.received_by
                received[payee] = received.get(payee, 0) + amount
            if restart_every and r % restart_every == restart_every - 1:
                victim = self.rng.choice(self.names)
                self.nodes[victim].stop()
                self.nodes[victim] = self._open(victim)
                self.report.restarts += 1

    def _pay(self, payer: str, ch: str, pid: str, amount: int) -> bool:
        for _ in range(8):  # a lost message is finished by retrying the same payment id
            try:
                self.nodes[payer].send_message_and_pay(ch, {"pid": pid}, amount, timeout=0.5,
                                                       payment_id=pid)
            except errors.Timeout:
                self.nodes[payer].sync(ch)
                continue
            except errors.HandlerError:
                self.report.refunded += 1
                return False
            except errors.PaychanError:
                self.report.refused += 1
                return False
            self.report.acknowledged += 1
            self.report.paid_by[payer] = self.report.paid_by.get(payer, 0) + amount
            return True
        self.report.unfinished += 1
        return False

    def settle(self) -> None:
        """Faults off; every channel agrees on its figures, then closes (solo if it must)."""
        self.network.set_faults(Faults())
        for payer, _payee, ch in self.channels:
            self.nodes[payer].sync(ch)
        time.sleep(0.5)
        self.report.agreed = all(self._agree(a, b, ch) for a, b, ch in self.channels)
        for payer, _payee, ch in self.channels:
            self.nodes[payer].close(ch, wait=False, mutual_timeout=3.0)
        self.ledger.advance(31)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(
                self.nodes[a].balances(ch)["period"] == 1 for a, _, ch in self.channels):
            time.sleep(0.1)
        balances = {n: self.ledger.balance(self.nodes[n].address) for n in self.names}
        self.report.final_balances = balances
        self.report.conserved = sum(balances.values()) == MINT * len(self.names)
        r = self.report
        self.report.exact = all(
            balances[n] == MINT - r.paid_by.get(n, 0) + r.received_by.get(n, 0) for n in self.names)

    def _agree(self, a: str, b: str, ch: str) -> bool:
        mine, theirs = self.nodes[a].balances(ch), self.nodes[b].balances(ch)
        return (mine["sent_by_me"], mine["sent_by_peer"]) == (theirs["sent_by_peer"],
                                                              theirs["sent_by_me"])

    def stop(self) -> None:
        for node in self.nodes.values():
            node.stop()
        self.ledger.close()
        self.network.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m paychan.simulations.market",
                                     description=__doc__)
    parser.add_argument("--agents", type=int, default=6)
    parser.add_argument("--channels", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--drop", type=float, default=0.05, help="share of envelopes dropped")
    parser.add_argument("--duplicate", type=float, default=0.05)
    parser.add_argument("--delay", type=float, default=0.01, help="most seconds of delay")
    parser.add_argument("--fail-rate", type=float, default=0.05, help="handlers that fail")
    parser.add_argument("--restart-every", type=int, default=100,
                        help="restart a random agent every N rounds (0: never)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    data_dir = tempfile.mkdtemp(prefix="paychan-market-")
    started = time.monotonic()
    market = Market(args.agents, args.seed, Faults(args.drop, args.duplicate, args.delay,
                                                   args.seed), args.fail_rate, data_dir)
    try:
        market.open_channels(args.channels)
        market.trade(args.rounds, args.restart_every)
        market.settle()
    finally:
        market.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    report = market.report
    report.seconds = round(time.monotonic() - started, 2)
    ok = report.conserved and report.exact and report.agreed and report.unfinished == 0
    if args.json:
        print(json.dumps({"ok": ok, **report.__dict__}, indent=2))
    else:
        print(f"{report.agents} agents, {report.channels} channels, {report.attempted} payments "
              f"({report.acknowledged} acknowledged, {report.refunded} refunded, "
              f"{report.refused} refused, {report.unfinished} unfinished), "
              f"{report.restarts} restarts, {report.seconds} s")
        for name, balance in report.final_balances.items():
            print(f"  {name:<8} {balance:>7}  (paid {report.paid_by.get(name, 0)}, "
                  f"received {report.received_by.get(name, 0)})")
        print(f"both sides agree on every channel: {report.agreed}; "
              f"conservation: {report.conserved}; every account exact: {report.exact}")
        print("simulation " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
