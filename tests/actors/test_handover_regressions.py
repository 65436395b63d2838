"""A successor that dies while taking the messages its failed predecessor handed over: the
ones it already took are its own to answer (a payment it made is never reported failed), the
rest go to the next successor."""
from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any

import paychan
from paychan.actors.node import result_of
from paychan.protocol import channel as machine
from paychan.protocol.identity import decode_channel_id

WAIT = 5.0


def test_messages_handed_over_survive_a_successor_that_dies_on_one(pair, channel, monkeypatch):
    a, b = pair
    cid = decode_channel_id(channel)
    core = a._core
    boom_in, boom_go, release_m1 = threading.Event(), threading.Event(), threading.Event()
    served: list[str] = []

    def handler(p: paychan.Payment) -> Any:
        served.append(p.payment_id)
        if p.payment_id == "m1":
            release_m1.wait(WAIT)  # m1's outcome stays on its way while we look
        return ["served", p.message, p.amount]

    b.on_payment_received(handler)
    real_step = machine.step

    def step(state: Any, inp: Any, now: int, key: Any) -> Any:
        if key is core.identity and isinstance(inp, machine.ActionPay):
            if inp.payment_id == "boom":
                boom_in.set()
                boom_go.wait(WAIT)
                raise RuntimeError("injected bug (boom)")
            if inp.payment_id == "boom2":
                raise RuntimeError("injected bug (boom2)")
        return real_step(state, inp, now, key)

    monkeypatch.setattr(machine, "step", step)
    futs: dict[str, Future[Any]] = {}
    first = threading.Thread(
        target=lambda: futs.__setitem__("boom", core.pay_future(cid, "boom", 1, "x")),
        daemon=True)
    first.start()
    assert boom_in.wait(WAIT)
    for pid, amount in (("m1", 7), ("boom2", 2), ("m3", 3)):
        futs[pid] = core.pay_future(cid, pid, amount, pid)  # queued behind "boom"
    boom_go.set()
    first.join(WAIT)
    assert futs["boom2"].exception(WAIT) is not None  # the bug fails that one alone
    assert result_of(futs["m3"].result(WAIT)) == ["served", "m3", 3]
    assert not futs["m1"].done(), f"m1 answered before its outcome: {futs['m1'].exception()}"
    release_m1.set()
    assert result_of(futs["m1"].result(WAIT)) == ["served", "m1", 7]
    assert sorted(served) == ["m1", "m3"]
    assert a.balances(channel)["sent_by_me"] == b.balances(channel)["sent_by_peer"] == 10
