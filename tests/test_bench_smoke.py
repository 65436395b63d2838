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
    assert len(machine["load_average"]["start"]) == len(machine["load_average"]["end"]) == 3

    channels = result["config"]["channels"]
    cases = result["cases"]
    assert set(cases) == {f"{kind}_{n}" for kind in ("paychan", "bare", "paychan-xproc",
                                                     "bare-xproc") for n in (1, channels)}
    for key, case in cases.items():
        assert case["payments_per_s"] > 0, key
        assert case["latency_ms"]["p50"] > 0, key
        assert case["latency_ms"]["p99"] >= case["latency_ms"]["p50"], key
        assert case["cpu_ms_per_payment"] >= 0, key
        assert case["errors"] == 0, (key, case["first_errors"])
        # Every payment asked for was acknowledged with the expected response, and the
        # committed state agrees: the payer signed for exactly that many, the payee holds it
        # and served each one (across processes, read from the payee's store once it stopped).
        assert case["acknowledged"] == case["payments"], key
        assert case["state_consistent"], (key, case)
        assert case["served_by_payee"] == case["expected_sent"], key
        if case["kind"].endswith("-xproc"):
            # Commits are counted in the payer process: two durable commits per payment.
            assert case["commits"]["requests"] >= 2 * case["payments"], key
            if case["kind"] == "bare-xproc":
                assert case["commits"]["requests"] == 2 * case["payments"], key
            # Every process of the case stopped cleanly once measured.
            assert all(code == 0 for code in case["exit_codes"].values()), (key, case)
            assert case["cpu_ms_per_payment_by_process"], key
        else:
            # Four durable commits per payment on both sides of the comparison.
            assert case["commits"]["requests"] >= 4 * case["payments"], key
            if case["kind"] == "bare":
                assert case["commits"]["requests"] == 4 * case["payments"], key
    config = result["config"]
    assert cases["paychan_1"]["payments"] == config["payments_1_channel"]
    assert cases[f"paychan_{channels}"]["payments"] == config[f"payments_{channels}_channels"]
    assert cases["paychan-xproc_1"]["payments"] == config["xproc_payments_1_channel"]
    assert cases[f"paychan-xproc_{channels}"]["payments"] == \
        config[f"xproc_payments_{channels}_channels"]

    assert set(result["ratios"]) == {"1", str(channels), "xproc_1", f"xproc_{channels}"}
    for key, ratio in result["ratios"].items():
        for figure in ("throughput", "latency_p50", "latency_p99"):
            assert ratio[figure] > 0, (key, figure)

    # The targets are reported next to the figures, met or not, never asserted.
    assert set(result["targets"]) == {"xproc_1", f"xproc_{channels}"}
    for key, target in result["targets"].items():
        for figure in ("payments_per_s", "ratio_to_bare"):
            assert target[figure]["measured"] > 0, (key, figure)
            assert isinstance(target[figure]["met"], bool), (key, figure)
