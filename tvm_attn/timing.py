"""The one timer every measurement uses.

Policy: one warm-up call, then calls until at least ``min_seconds`` have passed and at least ``min_repeats`` calls
were made (at most ``max_repeats``); report median and quartiles of the per-call times.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np


@dataclasses.dataclass(frozen=True)
class Timing:
    median_ms: float
    q25_ms: float
    q75_ms: float
    repeats: int

    def gflops(self, flops: int) -> float:
        return flops / (self.median_ms * 1e-3) / 1e9


def measure(fn, *, min_seconds: float = 0.2, min_repeats: int = 5, max_repeats: int = 1000) -> Timing:
    """Time ``fn()`` by the policy above."""
    fn()  # warm-up: first-touch page faults, thread-pool start
    times = []
    start = time.perf_counter()
    while len(times) < max_repeats and (len(times) < min_repeats or time.perf_counter() - start < min_seconds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    q25, q50, q75 = np.percentile(np.array(times) * 1e3, [25, 50, 75])
    return Timing(float(q50), float(q25), float(q75), len(times))
