"""Actor-layer fixtures: a ledger on a virtual clock, two nodes on real LMDB dirs, a funded channel.

Every node a test opens through `nodes.open(name)` is stopped at teardown (stopping twice is
harmless), then the ledger; a test that stops and reopens a node opens it again the same way.
Helpers are fixtures too (test modules cannot import this file: pytest loads each conftest.py
under the name `conftest`).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import paychan

DEPOSIT = 1_000
FUNDS = 10_000


class Nodes:
    """Opens nodes under tmp_path and remembers them all, so teardown stops every one."""

    def __init__(self, root: Path, ledger: paychan.Ledger) -> None:
        self.root = root
        self.ledger = ledger
        self.opened: list[paychan.Node] = []

    def open(self, name: str, **kwargs: Any) -> paychan.Node:
        node = paychan.Node.open(str(self.root / name), ledger=self.ledger, **kwargs)
        self.opened.append(node)
        return node

    def add(self, node: paychan.Node) -> paychan.Node:
        self.opened.append(node)
        return node

    def stop_all(self) -> None:
        for node in reversed(self.opened):
            node.stop()


def echo(p: paychan.Payment) -> Any:
    return ["served", p.message, p.amount]


@pytest.fixture
def ledger() -> Iterator[paychan.Ledger]:
    led = paychan.Ledger.embedded(data_dir=None, clock=paychan.VirtualClock())
    yield led
    led.close()


@pytest.fixture
def nodes(tmp_path: Path, ledger: paychan.Ledger) -> Iterator[Nodes]:
    made = Nodes(tmp_path, ledger)
    yield made
    made.stop_all()


@pytest.fixture
def pair(nodes: Nodes, ledger: paychan.Ledger) -> tuple[paychan.Node, paychan.Node]:
    """Two nodes; A holds FUNDS on the ledger and B answers every payment with `echo`."""
    a = nodes.open("a")
    b = nodes.open("b")
    ledger.mint(a.address, FUNDS)
    b.on_payment_received(echo)
    return a, b


@pytest.fixture
def channel(pair: tuple[paychan.Node, paychan.Node]) -> str:
    """An OPEN channel from A to B funded with DEPOSIT by A."""
    a, b = pair
    ch = a.create_channel(b, DEPOSIT, dispute_period=60)
    # create_channel returns once A sees the funding; B follows the ledger on its own.
    _wait_until(lambda: b.balances(ch)["deposited_by_peer"] == DEPOSIT, what="B to see funding")
    return ch


def _wait_until(predicate: Callable[[], bool], timeout: float = 10.0,
                what: str = "condition") -> None:
    """Poll `predicate` until it holds; fail the test with `what` otherwise."""
    deadline = time.monotonic() + timeout
    pause = 0.005
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(pause)
        pause = min(pause * 2, 0.1)


@pytest.fixture
def wait_until() -> Callable[..., None]:
    """`wait_until(predicate, timeout=10.0, what=...)`: poll until it holds, else fail."""
    return _wait_until
