"""The asyncio twins: concurrent payments on one loop; a timeout leaves the payment to finish."""
import asyncio
import threading

import pytest

import paychan
from paychan.protocol import errors


@pytest.fixture
def nodes(tmp_path):
    ledger = paychan.Ledger.embedded(clock=paychan.VirtualClock())
    a = paychan.Node.open(str(tmp_path / "a"), ledger)
    b = paychan.Node.open(str(tmp_path / "b"), ledger, on_payment_received=lambda p: p.message)
    ledger.mint(a.address, 1_000)
    yield a, b
    a.stop()
    b.stop()
    ledger.close()


def test_concurrent_async_payments_on_one_loop(nodes):
    a, b = nodes

    async def main():
        chs = [await a.acreate_channel(b, 100) for _ in range(4)]
        replies = await asyncio.gather(*(a.asend_message_and_pay(chs[i % 4], i, 2)
                                         for i in range(40)))
        return chs, replies

    chs, replies = asyncio.run(main())
    assert replies == list(range(40))
    assert sum(a.balances(ch)["sent_by_me"] for ch in chs) == 80
    assert sum(b.balances(ch)["sent_by_peer"] for ch in chs) == 80


def test_async_timeout_then_retry_pays_once(nodes):
    a, b = nodes
    release = threading.Event()
    b.on_payment_received(lambda p: release.wait(10) and "late")
    ch = a.create_channel(b, 100)

    async def main():
        with pytest.raises(errors.Timeout):
            await a.asend_message_and_pay(ch, "x", 7, timeout=0.3, payment_id="slow-1")
        release.set()
        return await a.asend_message_and_pay(ch, "x", 7, timeout=10, payment_id="slow-1")

    assert asyncio.run(main()) == "late"
    assert a.balances(ch)["sent_by_me"] == 7


def test_async_refusal_raises_the_error(nodes):
    a, b = nodes
    ch = a.create_channel(b, 10)
    with pytest.raises(errors.InsufficientBalance):
        asyncio.run(a.asend_message_and_pay(ch, "too much", 11))
    assert a.balances(ch)["sent_by_me"] == 0
