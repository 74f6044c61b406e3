"""TE pieces shared by the materialized-score variants (standard, threshold).

Block names are the contract with schedules/: qk, row_max, exp, row_sum, pv, out.
"""

from __future__ import annotations

from tvm import te, tirx

from ..spec import AttentionSpec


def inputs(spec: AttentionSpec):
    q = te.placeholder(spec.q_shape, spec.dtype, name="q")
    k = te.placeholder(spec.kv_shape, spec.dtype, name="k")
    v = te.placeholder(spec.kv_shape, spec.dtype, name="v")
    return q, k, v


def visible(spec: AttentionSpec, i, j):
    """Causal visibility of key j from query i (bottom-right aligned), or None when every key is visible."""
    return j <= i + spec.causal_offset if spec.causal else None


def masked(spec: AttentionSpec, i, j, value):
    cond = visible(spec, i, j)
    return value if cond is None else tirx.Select(cond, value, tirx.const(0.0, spec.dtype))


def scores_and_softmax_stats(spec: AttentionSpec, q, k):
    """qk = q k^T (unscaled), row_max = max visible scale*qk, exp = exp(scale*qk - row_max) (0 when masked)."""
    b_, h_, sq, d_ = spec.q_shape
    g = spec.group_size
    d = te.reduce_axis((0, spec.head_dim), name="d")
    qk = te.compute(
        (spec.batch, spec.heads, spec.seq_q, spec.seq_kv),
        lambda b, h, i, j: te.sum(q[b, h, i, d] * k[b, h // g, j, d], axis=d),
        name="qk",
    )
    j = te.reduce_axis((0, spec.seq_kv), name="j")
    row_max = te.compute(
        (spec.batch, spec.heads, spec.seq_q),
        lambda b, h, i: te.max(qk[b, h, i, j] * spec.scale, axis=j, where=visible(spec, i, j)),
        name="row_max",
    )
    exp = te.compute(
        qk.shape,
        lambda b, h, i, j: masked(spec, i, j, te.exp(qk[b, h, i, j] * spec.scale - row_max[b, h, i])),
        name="exp",
    )
    return qk, row_max, exp


def weighted_output(spec: AttentionSpec, weights, v):
    """out = (sum_j w_ij v_j) / (sum_j w_ij), 0 for rows whose weights are all 0."""
    g = spec.group_size
    j = te.reduce_axis((0, spec.seq_kv), name="j")
    row_sum = te.compute(
        weights.shape[:3], lambda b, h, i: te.sum(weights[b, h, i, j], axis=j), name="row_sum"
    )
    j = te.reduce_axis((0, spec.seq_kv), name="j")
    pv = te.compute(
        spec.q_shape,
        lambda b, h, i, dd: te.sum(weights[b, h, i, j] * v[b, h // g, j, dd], axis=j),
        name="pv",
    )
    zero = tirx.const(0.0, spec.dtype)
    out = te.compute(
        spec.q_shape,
        lambda b, h, i, dd: tirx.Select(row_sum[b, h, i] > zero, pv[b, h, i, dd] / row_sum[b, h, i], zero),
        name="out",
    )
    return out
