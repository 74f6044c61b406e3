"""Standard attention: the full score matrix is materialized, then softmax, then P V."""

from __future__ import annotations

from tvm import te

from ..spec import AttentionSpec
from .common import inputs, scores_and_softmax_stats, weighted_output


def compute(spec: AttentionSpec):
    q, k, v = inputs(spec)
    _, _, exp = scores_and_softmax_stats(spec, q, k)
    out = weighted_output(spec, exp, v)
    return te.create_prim_func([q, k, v, out])
