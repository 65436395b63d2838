"""`paychan demo` end to end as a user runs it: a separate process, its JSON summary checked."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONSOLE_SCRIPT = Path(sys.executable).with_name("paychan")

# What the demo mints and deposits (paychan/demo.py): client 10,000 and service 1,000 minted;
# period 1 funded by the client's 3,000; period 2 by 1,000 (client) and 200 (service).
MINTED = 11_000
PERIOD_DEPOSITS = {1: 3_000, 2: 1_200}


def run(*command: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(command), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("how", ["module", "console_script"])
def test_demo_json_reports_every_check_ok_and_conservation(how, tmp_path):
    calls, price = 60, 3
    if how == "module":
        command = [sys.executable, "-m", "paychan.cli"]
    else:
        assert CONSOLE_SCRIPT.exists(), f"no console script at {CONSOLE_SCRIPT}"
        command = [str(CONSOLE_SCRIPT)]
    proc = run(*command, "demo", "--json", "--calls", str(calls), "--price", str(price),
               "--data", str(tmp_path / "demo"))
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    summary = json.loads(proc.stdout)  # nothing but the JSON on stdout

    assert summary["ok"] is True
    assert (summary["calls"], summary["price"]) == (calls, price)
    failed = [c for c in summary["checks"] if not c["ok"]]
    assert not failed, failed
    names = {c["check"] for c in summary["checks"]}
    for expected in ("every response correct", "failed call cost nothing",
                     "payouts equal the channel balances", "the watcher proved fraud",
                     "the client took the whole channel",
                     "conservation: accounts hold everything minted"):
        assert expected in names, (expected, sorted(names))

    # Conservation: each period pays out exactly what was deposited in it, and the ledger
    # accounts end up holding everything minted.
    periods = {p["period"]: p for p in summary["periods"]}
    assert set(periods) == set(PERIOD_DEPOSITS)
    for period, deposits in PERIOD_DEPOSITS.items():
        assert periods[period]["client"] + periods[period]["service"] == deposits, periods
    assert periods[1]["service"] == calls * price  # the calls, and not the refunded one
    assert (periods[2]["client"], periods[2]["service"]) == (PERIOD_DEPOSITS[2], 0)
    assert sum(summary["final"].values()) == MINTED, summary["final"]


def test_demo_human_output_ends_with_passed():
    proc = run(sys.executable, "-m", "paychan.cli", "demo", "--calls", "10")
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert proc.stdout.rstrip().endswith("demo passed"), proc.stdout[-2000:]
    assert "FAILED" not in proc.stdout
