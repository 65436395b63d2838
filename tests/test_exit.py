"""A program that forgets to close its ledger or stop its nodes still exits, losing nothing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import paychan

EXIT_WITHIN = 60  # seconds; a hang at exit fails here instead of stalling the suite

FORGETFUL = """
import json, os, sys, paychan
base = sys.argv[1]
led = paychan.Ledger.embedded(data_dir=os.path.join(base, "ledger"))
tmp = paychan.Ledger.embedded()  # a temporary ledger: its folder goes at exit
a = paychan.Node.open(os.path.join(base, "a"), ledger=led)
b = paychan.Node.open(os.path.join(base, "b"), ledger=led)
b.on_payment_received(lambda p: ["got", p.message])
led.mint(a.address, 1_000)
ch = a.create_channel(b, 600)
reply = a.send_message_and_pay(ch, "hi", 7, timeout=10)
print(json.dumps({"reply": reply, "channel": ch, "a": a.address, "b": b.address,
                  "tmp": tmp.client.data_dir}), flush=True)
# No stop, no close: the interpreter must still end.
"""


def test_a_program_that_closes_nothing_exits_and_keeps_what_was_acknowledged(
        tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", FORGETFUL, str(tmp_path)], capture_output=True,
                          text=True, timeout=EXIT_WITHIN)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout)
    assert out["reply"] == ["got", "hi"]
    assert not os.path.exists(out["tmp"])  # the temporary ledger was closed and removed

    # Everything acknowledged before the exit is in the stores.
    led = paychan.Ledger.embedded(data_dir=str(tmp_path / "ledger"))
    try:
        assert led.balance(out["a"]) == 1_000 - 600
        a = paychan.Node.open(str(tmp_path / "a"), ledger=led)
        try:
            balances = a.balances(out["channel"])
            assert balances["sent_by_me"] == 7 and balances["my_balance"] == 600 - 7
        finally:
            a.stop()
    finally:
        led.close()
