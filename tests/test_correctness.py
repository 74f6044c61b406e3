"""Every variant against its float64 reference, on awkward shapes, with each schedule."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import tvm_attn
from conftest import assert_matches_reference, knobs_for, make_inputs, tolerance
from tvm_attn.variants import path_for

HEADS = 4
SEQ_Q = (1, 7, 100, 128)
SEQ_KV = (1, 33, 100, 256)
HEAD_DIMS = (32, 64, 80)
KV_HEADS = (1, 2, HEADS)

# Sequence lengths are run-time sizes: one kernel serves every length of its path. So each variant takes the full
# (seq_q, seq_kv, causal) grid with one (kv_heads, head_dim) per path and causal flag, four kernels (compiles) checked
# at every length; the pairs rotate over the variants (test_every_head_grouping_and_head_dim takes every pair through
# each kernel).
HEAD_SHAPES = list(itertools.product(KV_HEADS, HEAD_DIMS))


def _grid(variant_index: int) -> list[tuple]:
    return [(sq, skv, causal,
             *HEAD_SHAPES[(4 * variant_index + 2 * (path_for(sq) == "prefill") + causal) % len(HEAD_SHAPES)])
            for sq, skv, causal in itertools.product(SEQ_Q, SEQ_KV, (False, True))]


def _spec(variant, sq, skv, causal, kvh, d, batch=2, **knobs):
    return tvm_attn.AttentionSpec(batch=batch, heads=HEADS, kv_heads=kvh, seq_q=sq, seq_kv=skv, head_dim=d,
                                  causal=causal, **knobs)


def _check(variant, spec, schedule="best", seed=0):
    # Sharper softmax for the pruned variants, so thresholds keep some keys and drop others.
    q_scale = 2.0 if tvm_attn.get_variant(variant).knob else 1.0
    q, k, v = make_inputs(spec, seed=seed, q_scale=q_scale)
    out = tvm_attn.build(variant, spec, schedule=schedule)(q, k, v)
    assert_matches_reference(variant, spec, out, q, k, v)


AWKWARD = [(variant, *shape) for n, variant in enumerate(tvm_attn.VARIANTS) for shape in _grid(n)]


@pytest.mark.parametrize("variant,sq,skv,causal,kvh,d", AWKWARD, ids=lambda x: str(x))
def test_matches_reference_on_awkward_shapes(variant, sq, skv, causal, kvh, d):
    _check(variant, _spec(variant, sq, skv, causal, kvh, d, **knobs_for(variant)[0]))


# threshold, topk and mass share one kernel (variants/pruned.py) but for the selection: they split the pairs among them.
PRUNED = ("threshold", "topk", "mass")
HEAD_GROUPINGS = [(variant, *shape) for variant in tvm_attn.VARIANTS for n, shape in enumerate(HEAD_SHAPES)
                  if variant not in PRUNED or n % len(PRUNED) == PRUNED.index(variant)]


@pytest.mark.parametrize("variant,kvh,d", HEAD_GROUPINGS)
def test_every_head_grouping_and_head_dim(variant, kvh, d):
    _check(variant, _spec(variant, 100, 33, True, kvh, d, batch=1, **knobs_for(variant)[0]))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("variant,knobs", [(v, kn) for v in ("threshold", "topk", "mass") for kn in knobs_for(v)],
                         ids=lambda x: str(x))
def test_pruning_knobs(variant, knobs, causal):
    _check(variant, _spec(variant, 100, 256, causal, 2, 32, **knobs))


@pytest.mark.parametrize("sq,skv,causal,kvh,d", [(7, 33, True, 2, 80), (128, 100, False, 1, 32)], ids=str)
@pytest.mark.parametrize("variant", list(tvm_attn.VARIANTS))
def test_untuned_reference_is_correct(variant, sq, skv, causal, kvh, d):
    _check(variant, _spec(variant, sq, skv, causal, kvh, d, **knobs_for(variant)[0]), schedule="untuned")


@pytest.mark.parametrize("causal", [False, True])
def test_flash_and_standard_agree_to_float32(causal):
    spec = _spec("flash", 100, 256, causal, 2, 64)
    q, k, v = make_inputs(spec, seed=3)
    flash = tvm_attn.build("flash", spec)(q, k, v)
    standard = tvm_attn.build("standard", spec)(q, k, v)
    tol = tolerance(spec)
    np.testing.assert_allclose(flash, standard, rtol=tol, atol=tol)


def test_pruning_that_keeps_everything_is_dense():
    spec = _spec("topk", 7, 33, True, 2, 32)
    q, k, v = make_inputs(spec, seed=4)
    dense = tvm_attn.reference(q, k, v, variant="standard", causal=True)
    tol = tolerance(spec)
    topk = tvm_attn.attention(q, k, v, variant="topk", causal=True, top_k=33)
    np.testing.assert_allclose(topk, dense, rtol=tol, atol=tol)
    # Every weight of a 33-key row is >= 1e-30 for these inputs, so nothing is pruned.
    tiny = tvm_attn.attention(q, k, v, variant="threshold", causal=True, threshold=1e-30)
    np.testing.assert_allclose(tiny, dense, rtol=tol, atol=tol)


def test_threshold_never_zeroes_a_row():
    """The seed's flaw: with near-uniform weights every weight fell under the threshold and rows became 0."""
    spec = _spec("threshold", 7, 256, False, 4, 32, threshold=0.5)
    q, k, v = make_inputs(spec, seed=5)
    q *= 0.01  # near-uniform softmax: no weight reaches 0.5, only the largest is kept
    out = tvm_attn.attention(q, k, v, variant="threshold", threshold=0.5)
    s = tvm_attn.references.scores(spec, q, k)
    top = np.repeat(v, spec.group_size, axis=1)[
        np.arange(2)[:, None, None], np.arange(HEADS)[None, :, None], s.argmax(axis=-1)]
    np.testing.assert_allclose(out, top, rtol=tolerance(spec), atol=tolerance(spec))


def test_rows_with_no_visible_key_are_zero():
    spec = _spec("flash", 128, 33, True, 2, 32)  # causal, seq_q > seq_kv: the first 95 rows see no key
    q, k, v = make_inputs(spec)
    for variant in tvm_attn.VARIANTS:
        knobs = knobs_for(variant)[0]
        out = tvm_attn.attention(q, k, v, variant=variant, causal=True, **knobs)
        assert (out[:, :, :95] == 0).all(), variant
        assert np.abs(out[:, :, 95:]).min(axis=-1).max() > 0, variant
