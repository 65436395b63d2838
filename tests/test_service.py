"""paychan.tune_gc: what a long-running process calls once after startup."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

import paychan

PROBE = """
import gc, json, paychan
before = gc.get_threshold()
paychan.tune_gc({young})
print(json.dumps({{"before": before, "after": gc.get_threshold(),
                  "frozen": gc.get_freeze_count()}}))
"""


def _probe(young: str) -> dict[str, list[int] | int]:
    # In a child: the collector's settings are process-wide and the suite keeps Python's.
    out = subprocess.run([sys.executable, "-c", PROBE.format(young=young)], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    result: dict[str, list[int] | int] = json.loads(out)
    return result


def test_tune_gc_freezes_startup_and_raises_the_young_threshold() -> None:
    got = _probe("")
    before, after = got["before"], got["after"]
    assert isinstance(before, list) and isinstance(after, list)
    assert after[0] == paychan.service.YOUNG_THRESHOLD > before[0]
    assert after[1:] == before[1:]  # the older generations keep their settings
    assert isinstance(got["frozen"], int) and got["frozen"] > 1000  # modules and all


def test_tune_gc_takes_a_threshold() -> None:
    after = _probe("young=5000")["after"]
    assert isinstance(after, list) and after[0] == 5000


def test_tune_gc_refuses_a_threshold_below_one() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        paychan.tune_gc(0)
