"""The market simulation runs over the real actors with faults and restarts; balances exact."""
import json
import subprocess
import sys


def test_market_simulation_balances_exactly():
    out = subprocess.run(
        [sys.executable, "-m", "paychan.simulations.market", "--agents", "4", "--channels", "6",
         "--rounds", "80", "--restart-every", "40", "--seed", "7", "--json"],
        capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert report["ok"] and report["conserved"] and report["exact"] and report["agreed"]
    assert report["acknowledged"] + report["refunded"] + report["refused"] == 80
    assert report["acknowledged"] > 40 and report["restarts"] == 2
    assert sum(report["final_balances"].values()) == 4 * 10_000
