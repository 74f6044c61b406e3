"""Pieces shared by the variants: TE stages of the materialized-score ones (standard), tile arithmetic of all.

Block names are the contract with schedules/: k_t, qk, row_max, exp, row_sum, pv, out.
"""

from __future__ import annotations

from tvm import te, tirx

from ..fast_exp import softmax_exp
from ..spec import AttentionSpec


def inputs(spec: AttentionSpec):
    q = te.placeholder(spec.q_shape, spec.dtype, name="q")
    k = te.placeholder(spec.kv_shape, spec.dtype, name="k")
    v = te.placeholder(spec.kv_shape, spec.dtype, name="v")
    return q, k, v


def masked(spec: AttentionSpec, i, j, value, fill):
    """``value`` where query i sees key j (causal, bottom-right aligned), else ``fill``."""
    if not spec.causal:
        return value
    return tirx.Select(j <= i + spec.causal_offset, value, tirx.const(fill, spec.dtype))


def scores_and_softmax_stats(spec: AttentionSpec, q, k):
    """qk = q k^T (unscaled; k read transposed from k_t so keys lie along vector lanes), row_max = max visible
    scale*qk, exp = exp(scale*qk - row_max), 0 where masked."""
    g = spec.group_size
    k_t = te.compute((spec.batch, spec.kv_heads, spec.head_dim, spec.seq_kv),
                     lambda b, kh, d, j: k[b, kh, j, d], name="k_t")
    d = te.reduce_axis((0, spec.head_dim), name="d")
    qk = te.compute(
        (spec.batch, spec.heads, spec.seq_q, spec.seq_kv),
        lambda b, h, i, j: te.sum(q[b, h, i, d] * k_t[b, h // g, d, j], axis=d),
        name="qk",
    )
    neg = tirx.min_value(spec.dtype).value
    j = te.reduce_axis((0, spec.seq_kv), name="j")
    row_max = te.compute(
        (spec.batch, spec.heads, spec.seq_q),
        lambda b, h, i: te.max(masked(spec, i, j, qk[b, h, i, j] * spec.scale, neg), axis=j),
        name="row_max",
    )
    exp = te.compute(
        qk.shape,
        lambda b, h, i, j: masked(spec, i, j, softmax_exp(qk[b, h, i, j] * spec.scale - row_max[b, h, i]), 0.0),
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


def ceil_div(a: int, b: int) -> int:
    """Tiles of size b covering a."""
    return (a + b - 1) // b
