"""The one timer every measurement uses.

Policy: each callable is called once to warm up (first-touch page faults, thread-pool start). Then the callables
of one comparison take turns, round-robin, so that machine drift hits all of them alike. A turn opens with one
untimed call when several callables share the machine (another library's worker threads may still be spinning
after its own turn, e.g. OpenMP's busy-wait after a torch call delays TVM's next parallel region by ~4 ms), then
times calls until the turn has lasted ``turn_seconds`` (at least one). A callable stops once it has at least
``min_repeats`` timed calls and ``min_seconds`` of them (or ``max_repeats``) and, when ``spread`` is given, once
its interquartile range is within ``spread`` times its median (or after ``max_seconds`` of timed calls, when the
machine stays noisy). Reported: median and quartiles of its per-call times.

That opening call is not enough when pools spin for tens of ms (OpenBLAS): `python -m tvm_attn.bench` makes
every pool sleep when idle (tvm_attn/bench/__init__.py).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

_SLOW_CALL = 0.1  # seconds: no untimed opening call for callables this slow (a few ms of spin are < 1% of one)
# The benchmark's spread target: each provider of a point is timed until its interquartile range is within 5% of its
# median, or for MAX_SECONDS of calls (a noisy minute of a shared VM then costs time instead of a wrong ratio).
SPREAD = 0.05
MAX_SECONDS = 2.0


@dataclasses.dataclass(frozen=True)
class Timing:
    median_ms: float
    q25_ms: float
    q75_ms: float
    repeats: int

    def gflops(self, flops: int) -> float:
        return flops / (self.median_ms * 1e-3) / 1e9


def measure_interleaved(fns: dict, *, min_seconds: float = 0.2, min_repeats: int = 5, max_repeats: int = 1000,
                        turn_seconds: float = 0.02, spread: float | None = None,
                        max_seconds: float = MAX_SECONDS) -> dict:
    """Time each ``fns[name]()`` by the policy above; returns {name: Timing}."""
    first = {name: _timed(fn) for name, fn in fns.items()}  # warm-up
    samples = {name: [] for name in fns}
    active = list(fns)
    while active:
        for name in active:
            fn = fns[name]
            last = samples[name][-1] if samples[name] else first[name]
            if len(fns) > 1 and last < _SLOW_CALL:
                fn()
            turn_start = time.perf_counter()
            while True:
                samples[name].append(_timed(fn))
                if time.perf_counter() - turn_start >= turn_seconds or len(samples[name]) >= max_repeats:
                    break
        active = [n for n in active if len(samples[n]) < max_repeats
                  and (len(samples[n]) < min_repeats or sum(samples[n]) < min_seconds
                       or (spread is not None and sum(samples[n]) < max_seconds
                           and _relative_iqr(samples[n]) > spread))]
    result = {}
    for name, times in samples.items():
        q25, q50, q75 = np.percentile(np.array(times) * 1e3, [25, 50, 75])
        result[name] = Timing(float(q50), float(q25), float(q75), len(times))
    return result


def measure(fn, **policy) -> Timing:
    """Time one callable by the same policy."""
    return measure_interleaved({"fn": fn}, **policy)["fn"]


def _relative_iqr(times: list) -> float:
    q25, q50, q75 = np.percentile(times, [25, 50, 75])
    return float((q75 - q25) / q50)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
