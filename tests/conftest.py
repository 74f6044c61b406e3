"""Shared inputs and the one tolerance every kernel-vs-float64-reference comparison uses."""

from __future__ import annotations

import math

import numpy as np
import pytest

import tvm_attn
from tvm_attn import references
from tvm_attn.runtime import numpy_dtype

# A draft tree of 16 nodes branching at several depths (depth 7), as speculative decoding verifies: the tree kernel's
# (12-16 nodes).
TREE_16 = (-1, 0, 0, 1, 1, 2, 3, 3, 4, 5, 6, 7, 9, 9, 10, 14)

EPS32 = float(np.finfo(np.float32).eps)
# Unit roundoff (half an ulp, relative) of rounding a result to the output dtype.
UNIT_ROUNDOFF = {"float32": 0.0, "float16": 2.0**-11, "bfloat16": 2.0**-8}
DTYPES_16 = ("float16", "bfloat16")

# Knob values each pruned variant is tested with (the default grid uses the first).
KNOBS = {
    "threshold": [{"threshold": t} for t in (0.05, 0.001, 0.3)],
    "topk": [{"top_k": k} for k in (5, 1, 64, 1000)],
    "mass": [{"eps": e} for e in (0.05, 0.01, 0.3, 0.9)],
    "bounded": [{"eps": e} for e in (0.05, 0.01, 0.3)],
}


# The shapes of the attention-feature tests (sinks, ALiBi): (heads, kv_heads, seq_q, seq_kv, head_dim, causal, window,
# dtype): awkward lengths, GQA, not causal, a window, more queries than keys (rows that see no key output 0), decode
# (1 and 3 rows), 16-bit inputs (bfloat16 in pair products on hosts with them).
FEATURE_SHAPES = [(4, 2, 70, 130, 40, True, None, "float32"), (6, 2, 33, 33, 64, False, None, "float32"),
                  (4, 2, 3, 300, 64, True, 100, "float32"), (4, 4, 1, 257, 48, True, None, "float32"),
                  (4, 2, 40, 25, 32, True, None, "float32"), (4, 2, 50, 50, 64, True, None, "bfloat16"),
                  (4, 2, 1, 600, 64, True, None, "bfloat16"), (4, 2, 2, 90, 32, True, None, "float16")]


def knobs_for(variant: str) -> list[dict]:
    return KNOBS.get(variant, [{}])


def tolerance(spec: tvm_attn.AttentionSpec) -> float:
    """atol = rtol of the float32 computation every kernel does, against the float64 reference on the same inputs.

    A float32 output is a chain of D-term dot products, a seq_kv-term softmax sum and a seq_kv-term P V sum; rounding
    errors of such sums grow like eps * sqrt(terms) when they are independent. Allow 8x that.
    """
    return 8 * EPS32 * math.sqrt(spec.head_dim + spec.seq_kv)


def output_tolerance(spec: tvm_attn.AttentionSpec, variant: str | None = None, v=None,
                     target="host") -> tuple[float, float]:
    """(rtol, atol) of a kernel's output in spec.dtype against the float64 reference computed on the same (16-bit
    rounded) inputs: the float32 computation's tolerance, plus the one rounding of each result to the output dtype
    (|error| <= unit roundoff * |value|; float16 subnormals, below 6e-5, add at most 2^-25 absolute), plus what
    rounding the softmax weights to bfloat16 adds where ``variant``'s kernel for ``target`` computes P V in pair
    products."""
    tol = tolerance(spec)
    return tol + UNIT_ROUNDOFF[spec.dtype], tol + rounded_weights_error(variant, spec, v, target)


def rounded_weights_error(variant: str | None, spec: tvm_attn.AttentionSpec, v, target="host") -> float:
    """The bound on what bfloat16 pair products add to an output element of ``variant`` on ``target``: each weight
    rounded to bfloat16 (relative error <= u) with the sum of the rounded weights as the divisor moves out = sum_j
    p_j v_j / sum_j p_j by at most u / (1 - u) max_j |v_j - out| <= 2 u / (1 - u) max |v| (over finite v: rows
    weighing a non-finite value are not finite). 0 where the kernel computes in float32."""
    if variant is None or not pair_products_here(variant, spec, target):
        return 0.0
    u = UNIT_ROUNDOFF["bfloat16"]
    v = np.asarray(v, dtype=np.float64)
    return 2 * u / (1 - u) * float(np.abs(v[np.isfinite(v)]).max(initial=0.0))


def pair_products_here(variant: str, spec: tvm_attn.AttentionSpec, target="host") -> bool:
    """Whether the kernel serving ``spec`` computes in bfloat16 pair products on ``target`` (this host)."""
    v = tvm_attn.get_variant(variant)
    return v.computes_in_pairs(v.path_of(spec), spec.kernel, target)


def float16_products_here(variant: str, spec: tvm_attn.AttentionSpec, target="host") -> bool:
    """Whether the kernel serving ``spec`` computes float16 products unwidened (fmlal) on ``target``."""
    v = tvm_attn.get_variant(variant)
    return v.computes_in_float16_products(v.path_of(spec), spec.kernel, target)


def make_inputs(spec: tvm_attn.AttentionSpec, seed: int = 0, q_scale: float = 1.0):
    """Gaussian q, k, v of spec.dtype. q_scale > 1 sharpens the softmax (more weights clear a threshold)."""
    rng = np.random.default_rng(seed)
    dtype = numpy_dtype(spec.dtype)
    q = (rng.standard_normal(spec.q_shape) * q_scale).astype(dtype)
    k = rng.standard_normal(spec.kv_shape).astype(dtype)
    v = rng.standard_normal(spec.kv_shape).astype(dtype)
    return q, k, v


def ambiguous_rows(variant: str, spec: tvm_attn.AttentionSpec, q, k, sinks=None) -> np.ndarray:
    """(B, H, Sq) bool: rows whose keep decision float32 rounding could flip (a weight within 1e-4 relative of the
    threshold, or k-th and (k+1)-th scores within 1e-4; weights in the softmax with the sink logits ``sinks``).
    Elsewhere kernel and reference must agree."""
    s = references.scores(spec, q, k)
    vis = references.visible_mask(spec)
    if variant == "threshold":
        p = references.softmax_weights(spec, s, sinks)
        return (vis & (np.abs(p - spec.threshold) < 1e-4 * spec.threshold)).any(axis=-1)
    if variant == "topk":
        ordered = -np.sort(-np.where(vis, s, -np.inf), axis=-1)
        n = spec.top_k
        if n >= spec.seq_kv:
            return np.zeros(s.shape[:3], dtype=bool)
        with np.errstate(invalid="ignore"):  # -inf - -inf in rows with fewer than top_k + 1 visible keys
            gap = ordered[..., n - 1] - ordered[..., n]
        return np.isfinite(gap) & (gap < 1e-4)
    if variant == "mass":
        # A cumulative weight (descending order) so close to 1 - eps that float32 sums (error ~ eps32 sqrt(n))
        # could move the cut by one key.
        p = references.softmax_weights(spec, s, sinks)
        ordered = -np.sort(-np.where(vis, p, -1.0), axis=-1)
        sink = 0.0 if sinks is None else 1.0 - p.sum(axis=-1, keepdims=True)  # the sink's weight, counted first
        cumulative = np.cumsum(np.maximum(ordered, 0.0), axis=-1) + sink
        margin = 4 * EPS32 * math.sqrt(spec.seq_kv)
        return (np.abs(cumulative - (1.0 - spec.eps)) < margin).any(axis=-1)
    if variant == "bounded":
        return _bounded_ambiguous_rows(spec, q, k, sinks)
    return np.zeros(s.shape[:3], dtype=bool)


def _bounded_ambiguous_rows(spec, q, k, sinks=None) -> np.ndarray:
    """Rows where float32 could pick another set than float64: an upper bound within 2e-6 relative to the row's top
    bound (float32 shadow scores measured within 3.1e-7 of float64 ones) of the chosen bin edge or the one before
    it, or the certificate (with the sink's term, ``sinks``) at either within 1e-4 relative of its budget."""
    from tvm_attn import certificate

    vis = references.visible_mask(spec)
    lower, upper = references.shadow_bounds(spec, q, k)
    top = np.where(vis, upper, -np.inf).max(axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    e_up, e_low = np.where(vis, np.exp(upper - top), 0.0), np.where(vis, np.exp(lower - top), 0.0)
    e_sink = 0.0 if sinks is None else np.exp(np.asarray(sinks, np.float64)[:, None, None] - top)
    budget = certificate.CERTIFY * spec.eps / (1.0 - spec.eps)
    certified, close = [], []
    for n in range(1, certificate.CUT_STEPS + 1):
        edge = top - n * certificate.CUT_STEP
        kept = vis & (upper > edge)
        dropped, held = (np.where(kept, 0.0, e_up).sum(-1, keepdims=True),
                         budget * (np.where(kept, e_low, 0.0).sum(-1, keepdims=True) + e_sink))
        certified.append(dropped <= held)
        close.append((vis & (np.abs(upper - edge) < 2e-6 * (1 + np.abs(top)))).any(-1, keepdims=True)
                     | (np.abs(dropped - held) < 1e-4 * held))
    certified, close = np.concatenate(certified, -1), np.concatenate(close, -1)
    chosen = np.where(certified.any(-1), certified.argmax(-1), certificate.CUT_STEPS)  # index n - 1; CUT_STEPS: none
    rows = np.indices(chosen.shape)

    def at(i):
        return np.where((i >= 0) & (i < certificate.CUT_STEPS),
                        close[(*rows, np.clip(i, 0, certificate.CUT_STEPS - 1))], False)

    return at(chosen) | at(chosen - 1)


def assert_matches_reference(variant: str, spec: tvm_attn.AttentionSpec, out, q, k, v, target="host", sinks=None):
    """out, the kernel's for ``target`` (which the tolerance depends on), against the float64 reference (with the
    sink logits ``sinks``)."""
    ref = tvm_attn.get_variant(variant).reference(spec, q, k, v, **({} if sinks is None else {"sinks": sinks}))
    assert out.shape == ref.shape and out.dtype == numpy_dtype(spec.dtype)
    out = out.astype(np.float64)
    assert np.isfinite(out).all(), "kernel produced non-finite values"
    skip = ambiguous_rows(variant, spec, q, k, sinks)
    # Mass cuts with a small eps fall among many tiny weights, where more rows sit within float32 reach of 1 - eps.
    assert skip.sum() <= max(1, 0.1 * skip.size), f"{skip.sum()} of {skip.size} rows are ambiguous: pick other inputs"
    rtol, atol = output_tolerance(spec, variant, v, target)
    np.testing.assert_allclose(out[~skip], ref[~skip], rtol=rtol, atol=atol,
                               err_msg=f"{variant} {spec.name} differs from its float64 reference")


@pytest.fixture(scope="session")
def host_key() -> str:
    return tvm_attn.target_key("host")
