"""The one timer every measurement uses.

Policy: each callable is called once to warm up (first-touch page faults, thread-pool start). Then the callables
of one comparison take turns, round-robin, so that machine drift hits all of them alike. A turn opens with one
untimed call when several callables share the machine (another library's worker threads may still be spinning
after its own turn, e.g. OpenMP's busy-wait after a torch call delays TVM's next parallel region by ~4 ms), then
times calls until the turn has lasted ``turn_seconds`` (at least one). A callable has settled once it has at least
``min_repeats`` timed calls and ``min_seconds`` of them and, when ``spread`` is given, its interquartile range is
within ``spread`` times its median. The callables keep taking turns until every one has settled, so that all of
them are timed over the same minutes (a callable that settled early and stopped would be compared with another's
later minutes); one that cannot settle stops alone after ``max_seconds`` of timed calls (with ``spread``) or
``max_repeats`` calls. Reported: median and quartiles of its per-call times. Python's garbage collector is run once
before and kept off while timing (as ``timeit`` does): a full collection over the objects TVM and torch hold takes
milliseconds and would land in whichever call triggered it.

That opening call is not enough when pools spin for tens of ms (OpenBLAS): `python -m tvm_attn.bench` makes
every pool sleep when idle (tvm_attn/bench/__init__.py).
"""

from __future__ import annotations

import dataclasses
import gc
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


def measure_interleaved(fns: dict, *, min_seconds: float = 0.2, min_repeats: int = 5, max_repeats: int = 100_000,
                        turn_seconds: float = 0.02, spread: float | None = None,
                        max_seconds: float = MAX_SECONDS) -> dict:
    """Time each ``fns[name]()`` by the policy above; returns {name: Timing}."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _measure_interleaved(fns, min_seconds, min_repeats, max_repeats, turn_seconds, spread, max_seconds)
    finally:
        if was_enabled:
            gc.enable()


def _measure_interleaved(fns, min_seconds, min_repeats, max_repeats, turn_seconds, spread, max_seconds) -> dict:
    first = {name: _timed(fn) for name, fn in fns.items()}  # warm-up
    samples = {name: [] for name in fns}

    def settled(name):
        times = samples[name]
        return (len(times) >= min_repeats and sum(times) >= min_seconds
                and (spread is None or _relative_iqr(times) <= spread))

    def capped(name):
        times = samples[name]
        return len(times) >= max_repeats or (spread is not None and sum(times) >= max_seconds
                                             and len(times) >= min_repeats)

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

        if all(settled(n) or capped(n) for n in fns):
            break
        active = [n for n in fns if not capped(n)]
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
