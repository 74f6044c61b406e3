"""Input distributions the benchmark reports on. Pruning results are never shown on a degenerate softmax only."""

from __future__ import annotations

import numpy as np

from .. import references
from ..runtime import numpy_dtype

# name -> scale of q. With scale 1/sqrt(d), gaussian q and k give scores of std 1: a broad softmax. Scaling q by 4
# gives scores of std 4: a peaked softmax closer to trained attention (see row_entropy for what each gives).
DISTRIBUTIONS = {"gaussian": 1.0, "peaked": 4.0}


def make_inputs(spec, distribution: str, seed: int = 0):
    """q, k, v of ``spec`` (its dtype) drawn from ``distribution``."""
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}: use one of {', '.join(DISTRIBUTIONS)}")
    rng = np.random.default_rng(seed)
    dtype = numpy_dtype(spec.dtype)
    q = (rng.standard_normal(spec.q_shape) * DISTRIBUTIONS[distribution]).astype(dtype)
    k = rng.standard_normal(spec.kv_shape).astype(dtype)
    v = rng.standard_normal(spec.kv_shape).astype(dtype)
    return q, k, v


def row_entropy(spec, q, k) -> float:
    """Mean softmax entropy of the rows of batch 0, head 0, in nats (log(seq_kv) is uniform)."""
    p = references.softmax_weights(spec, references.scores(spec, q[:1, :1], k[:1, :1]))
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=-1)
    return float(h.mean())
