"""Threshold-pruned attention: drop softmax weights below tau (the row's largest always stays), renormalize."""

from __future__ import annotations

from tvm import te, tirx

from ..spec import AttentionSpec
from .common import inputs, scores_and_softmax_stats, weighted_output


def compute(spec: AttentionSpec):
    q, k, v = inputs(spec)
    qk, row_max, exp = scores_and_softmax_stats(spec, q, k)
    # The full softmax denominator decides which weights pass; the kept ones are renormalized among themselves.
    j = te.reduce_axis((0, spec.seq_kv), name="j")
    softmax_sum = te.compute(exp.shape[:3], lambda b, h, i: te.sum(exp[b, h, i, j], axis=j), name="softmax_sum")
    j = te.reduce_axis((0, spec.seq_kv), name="j")
    exp_max = te.compute(exp.shape[:3], lambda b, h, i: te.max(exp[b, h, i, j], axis=j), name="exp_max")
    tau = tirx.const(spec.threshold, spec.dtype)

    def kept_weight(b, h, i, jj):
        # p_j >= tau, written e_j >= tau * sum; or e_j is the row's largest weight. Comparing against the stored
        # max of e (not scale*qk against row_max) keeps the test exact under LLVM's fast-math rewrites.
        cut = te.min(tau * softmax_sum[b, h, i], exp_max[b, h, i])
        return tirx.Select(exp[b, h, i, jj] >= cut, exp[b, h, i, jj], tirx.const(0.0, spec.dtype))

    kept = te.compute(exp.shape, kept_weight, name="kept")
    out = weighted_output(spec, kept, v)
    return te.create_prim_func([q, k, v, out])
