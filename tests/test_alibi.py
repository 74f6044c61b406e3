"""ALiBi (AttentionSpec.alibi_slopes: BLOOM, MPT): each score of query i and key j gains -slope_h * (i + seq_kv -
seq_q - j), in the dense and pruned variants' prefill and decode kernels, through the cache, the torch op and exported
kernels, against the float64 reference; refused where it is not added. The paged cache's check is in
tests/test_paged.py."""

from __future__ import annotations

import io

import numpy as np
import pytest

import tvm_attn
import tvm_attn.kernel
from conftest import FEATURE_SHAPES as SHAPES, assert_matches_reference, knobs_for, make_inputs
from tvm_attn import export, runtime


def bloom_slopes(heads: int) -> np.ndarray:
    """BLOOM's slopes for a power-of-two head count: 2^(-8 h / heads), h = 1..heads."""
    return 2.0 ** (-8.0 * np.arange(1, heads + 1) / heads)


CASES = [("flash", shape) for shape in SHAPES] + [("standard", SHAPES[0]), ("standard", SHAPES[1]),
                                                  ("mqa", SHAPES[1]), ("mqa", SHAPES[5])]


@pytest.mark.parametrize("variant,shape", CASES, ids=str)
def test_dense_variants_add_alibi(variant, shape):
    heads, kv_heads, seq_q, seq_kv, head_dim, causal, window, dtype = shape
    slopes = bloom_slopes(heads)
    spec = tvm_attn.AttentionSpec(batch=2, heads=heads, kv_heads=kv_heads, seq_q=seq_q, seq_kv=seq_kv,
                                  head_dim=head_dim, causal=causal, window=window, dtype=dtype, alibi_slopes=slopes)
    q, k, v = make_inputs(spec, seed=seq_kv, q_scale=2.0)
    out = tvm_attn.attention(q, k, v, variant=variant, causal=causal, window=window, alibi_slopes=slopes)
    assert_matches_reference(variant, spec, out, q, k, v)
    plain = tvm_attn.get_variant(variant).reference(tvm_attn.AttentionSpec(**{**spec.__dict__, "alibi_slopes": None}),
                                                    q, k, v)
    assert np.nanmax(np.abs(tvm_attn.get_variant(variant).reference(spec, q, k, v) - plain)) > 0.05  # it can fail


# The pruned variants on a prefill and a decode shape each (their knobs: the first of conftest.KNOBS); they select
# among the biased scores
PRUNED_CASES = [(variant, shape) for variant in ("threshold", "topk", "mass") for shape in (SHAPES[0], SHAPES[2])]


@pytest.mark.parametrize("variant,shape", PRUNED_CASES, ids=str)
def test_pruned_variants_select_among_biased_scores(variant, shape):
    heads, kv_heads, seq_q, seq_kv, head_dim, causal, window, dtype = shape
    knob = knobs_for(variant)[0]
    slopes = bloom_slopes(heads)
    spec = tvm_attn.AttentionSpec(batch=2, heads=heads, kv_heads=kv_heads, seq_q=seq_q, seq_kv=seq_kv,
                                  head_dim=head_dim, causal=causal, window=window, dtype=dtype, alibi_slopes=slopes,
                                  **knob)
    q, k, v = make_inputs(spec, seed=seq_kv, q_scale=2.0)
    out = tvm_attn.attention(q, k, v, variant=variant, causal=causal, window=window, alibi_slopes=slopes, **knob)
    assert_matches_reference(variant, spec, out, q, k, v)


def test_alibi_with_softcap_and_sinks():
    """The bias comes after softcapping (a capped score can still be biased far below); sinks join as usual."""
    slopes = np.array([0.5, 0.0, -0.1, 2.0])
    spec = tvm_attn.AttentionSpec(batch=1, heads=4, kv_heads=2, seq_q=20, seq_kv=70, head_dim=32, causal=True,
                                  softcap=3.0, sinks=True, alibi_slopes=slopes)
    q, k, v = make_inputs(spec, seed=5, q_scale=3.0)
    sinks = np.array([1.0, 2.0, 0.0, -1.0], np.float32)
    out = tvm_attn.attention(q, k, v, causal=True, softcap=3.0, sinks=sinks, alibi_slopes=slopes)
    assert_matches_reference("flash", spec, out, q, k, v, sinks=sinks)


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_alibi_through_a_cache(dtype):
    """Decode (1 row) and prefill-sized (12 rows) calls through a KVCache (an int8 one's decode reading its codes),
    and a left-padded row: ALiBi's distances are those within its own sequence."""
    rng = np.random.default_rng(2)
    cache = tvm_attn.KVCache(batch=2, kv_heads=2, head_dim=64, capacity=400, dtype=dtype)
    cache.append(*(rng.standard_normal((2, 2, 300, 64)).astype(np.float32) for _ in "kv"))
    k, v = cache.dequantized() if cache.integer else (cache.k, cache.v)
    slopes = bloom_slopes(4)
    for n_q in (1, 12):
        q = (2 * rng.standard_normal((2, 4, n_q, 64))).astype(np.float32)
        spec = tvm_attn.AttentionSpec(batch=2, heads=4, kv_heads=2, seq_q=n_q, seq_kv=300, head_dim=64, causal=True,
                                      alibi_slopes=slopes)
        assert_matches_reference("flash", spec, cache.attend(q, alibi_slopes=slopes), q, k, v)
    mask = np.ones((2, 300), np.int64)
    mask[1, :100] = 0
    out = cache.attend(q, alibi_slopes=slopes, attention_mask=mask)
    spec = tvm_attn.AttentionSpec(batch=1, heads=4, kv_heads=2, seq_q=12, seq_kv=200, head_dim=64, causal=True,
                                  alibi_slopes=slopes)
    assert_matches_reference("flash", spec, out[1:], q[1:], k[1:, :, 100:], v[1:, :, 100:])


def test_torch_op_and_export_add_alibi(tmp_path):
    torch = pytest.importorskip("torch")
    import tvm_attn.torch_ops  # noqa: F401

    slopes = bloom_slopes(4)
    spec = tvm_attn.AttentionSpec(batch=1, heads=4, kv_heads=2, seq_q=19, seq_kv=19, head_dim=32, causal=True,
                                  alibi_slopes=slopes)
    q, k, v = make_inputs(spec, seed=7)
    out = torch.ops.tvm_attn.attention(*map(torch.from_numpy, (q, k, v)), "flash", True,
                                       alibi_slopes=torch.from_numpy(slopes))
    assert_matches_reference("flash", spec, out.numpy(), q, k, v)
    kernel = runtime.load(export.export("flash", spec, "host", tmp_path, log=io.StringIO()).manifest)
    assert kernel.manifest["semantics"]["alibi_slopes"] == list(spec.alibi_slopes)
    assert_matches_reference("flash", spec, kernel(q, k, v), q, k, v)


def test_bad_slopes_are_clear_errors():
    spec = tvm_attn.AttentionSpec(batch=1, heads=4, kv_heads=2, seq_q=5, seq_kv=9, head_dim=32)
    q, k, v = make_inputs(spec)
    for bad, error, match in [(np.ones(3), ValueError, r"shape \(heads,\) = \(4,\)"),
                              (np.ones((4, 1)), ValueError, "shape"),
                              (["a"] * 4, TypeError, "floats"),
                              (np.array([0, np.nan, 0, 0]), ValueError, "finite.*head 1"),
                              (0.5, TypeError, "sequence or array")]:
        with pytest.raises(error, match=match):
            tvm_attn.attention(q, k, v, alibi_slopes=bad)
    good = bloom_slopes(4)
    q, k, v = make_inputs(tvm_attn.AttentionSpec(**{**spec.__dict__, "seq_q": 20, "seq_kv": 20}))  # prefill
    for schedule in ("blas", "sme"):
        with pytest.raises(ValueError, match=f"schedule='{schedule}' does not add ALiBi"):
            tvm_attn.attention(q, k, v, alibi_slopes=good, schedule=schedule)
    kernel = tvm_attn.build("flash", tvm_attn.AttentionSpec(**{**spec.__dict__, "alibi_slopes": good}))
    q6, k6, v6 = make_inputs(tvm_attn.AttentionSpec(**{**spec.__dict__, "heads": 6}))
    with pytest.raises(ValueError, match="inputs have heads=6"):
        kernel(q6, k6, v6)
