"""bench/run.py runs end to end and reports every figure (no timing is asserted: machines vary)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_bench_reports_every_case_and_ratio():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout)

    machine = result["machine"]
    assert machine["cpu_count"] >= 1
    assert machine["python"].startswith("3.")

    channels = result["config"]["channels"]
    cases = result["cases"]
    assert set(cases) == {"paychan_1", "bare_1", f"paychan_{channels}", f"bare_{channels}"}
    for key, case in cases.items():
        assert case["payments_per_s"] > 0, key
        assert case["latency_ms"]["p50"] > 0, key
        assert case["latency_ms"]["p99"] >= case["latency_ms"]["p50"], key
        assert case["errors"] == 0, (key, case["first_errors"])
        # Every payment asked for was acknowledged with the expected response, and the
        # committed state agrees: the payer signed for exactly that many, the payee holds it.
        assert case["acknowledged"] == case["payments"], key
        assert case["state_consistent"], (key, case)
        # Four durable commits per payment on both sides of the comparison.
        assert case["commits"]["requests"] >= 4 * case["payments"], key
        if case["kind"] == "bare":
            assert case["commits"]["requests"] == 4 * case["payments"], key
    assert cases["paychan_1"]["payments"] == result["config"]["payments_1_channel"]
    assert cases[f"paychan_{channels}"]["payments"] == \
        result["config"][f"payments_{channels}_channels"]
    assert cases["paychan_1"]["served_by_payee"] == cases["paychan_1"]["expected_sent"]

    for key in ("1", str(channels)):
        for figure in ("throughput", "latency_p50", "latency_p99"):
            assert result["ratios"][key][figure] > 0, (key, figure)
