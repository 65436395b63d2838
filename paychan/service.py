"""Process-wide settings for a long-running paychan process (a daemon or an agent)."""
from __future__ import annotations

import gc

# Collect the youngest generation every this many new container objects instead of
# Python's 700: a payment allocates a few dozen (futures, closures, messages) that plain
# reference counting frees, yet with a hundred payments in flight the default threshold
# runs a collection every few dozen payments, and each older-generation collection walks
# every object of the process.
YOUNG_THRESHOLD = 20_000


def tune_gc(young: int = YOUNG_THRESHOLD) -> None:
    """Move what is alive now (modules, the node, its actors) out of the collector's sight
    and collect the young generation less often. Call it once, after startup.

    The trade: reference cycles that become garbage are found a little later, so memory
    may hold up to about `young` dead container objects more. Nothing is lost or kept
    for good; `gc.unfreeze()` and `gc.set_threshold(700, 10, 10)` restore the defaults."""
    if young < 1:
        raise ValueError("young must be at least 1")
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(young, older, oldest)
