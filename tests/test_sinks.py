"""Attention sinks (AttentionSpec.sinks, gpt-oss' s_aux): one logit per query head joins each row's softmax
denominator as a key without a value, in the dense and pruned variants' prefill and decode kernels, through the cache,
the torch op and exported kernels, against the float64 reference; refused where it is not taken. The paged cache's
check is in tests/test_paged.py, the transformers backend's gpt-oss check in tests/test_hf.py."""

from __future__ import annotations

import io

import numpy as np
import pytest

import tvm_attn
import tvm_attn.kernel
from conftest import FEATURE_SHAPES as SHAPES, assert_matches_reference, knobs_for, make_inputs
from tvm_attn import export, runtime

CASES = [("flash", shape) for shape in SHAPES] + [("standard", SHAPES[0]), ("standard", SHAPES[4]),
                                                  ("mqa", SHAPES[1]), ("mqa", SHAPES[5])]


def sink_logits(heads: int, seq_kv: int, seed: int = 0) -> np.ndarray:
    """Logits near log(seq_kv): the sink holds a weight comparable to the keys' (some heads more, some less)."""
    rng = np.random.default_rng(seed)
    return (np.log(seq_kv) + 2 * rng.standard_normal(heads)).astype(np.float32)


def sink_moves_the_output(spec, q, k, v, sinks) -> float:
    """The largest change the sinks make to the reference: the test below can fail only if this is large."""
    flash = tvm_attn.get_variant("flash")
    plain = flash.reference(tvm_attn.AttentionSpec(**{**spec.__dict__, "sinks": False}), q, k, v)
    return float(np.nanmax(np.abs(flash.reference(spec, q, k, v, sinks=sinks) - plain)))


@pytest.mark.parametrize("variant,shape", CASES, ids=str)
def test_dense_variants_take_sinks(variant, shape):
    heads, kv_heads, seq_q, seq_kv, head_dim, causal, window, dtype = shape
    spec = tvm_attn.AttentionSpec(batch=2, heads=heads, kv_heads=kv_heads, seq_q=seq_q, seq_kv=seq_kv,
                                  head_dim=head_dim, causal=causal, window=window, dtype=dtype, sinks=True)
    q, k, v = make_inputs(spec, seed=seq_kv, q_scale=2.0)
    sinks = sink_logits(heads, seq_kv, seed=seq_q)
    out = tvm_attn.attention(q, k, v, variant=variant, causal=causal, window=window, sinks=sinks)
    assert_matches_reference(variant, spec, out, q, k, v, sinks=sinks)
    assert sink_moves_the_output(spec, q, k, v, sinks) > 0.05
    if seq_q > seq_kv:  # causal rows that see no key: still 0
        assert not np.asarray(out, np.float64)[:, :, : seq_q - seq_kv].any()


# The pruned variants on a prefill and a decode shape each (their knobs: the first of conftest.KNOBS)
PRUNED_CASES = [(variant, shape) for variant in ("threshold", "topk", "mass") for shape in (SHAPES[0], SHAPES[2])]


@pytest.mark.parametrize("variant,shape", PRUNED_CASES, ids=str)
def test_pruned_variants_keep_the_sink(variant, shape):
    heads, kv_heads, seq_q, seq_kv, head_dim, causal, window, dtype = shape
    knob = knobs_for(variant)[0]
    spec = tvm_attn.AttentionSpec(batch=2, heads=heads, kv_heads=kv_heads, seq_q=seq_q, seq_kv=seq_kv,
                                  head_dim=head_dim, causal=causal, window=window, dtype=dtype, sinks=True, **knob)
    q, k, v = make_inputs(spec, seed=seq_kv, q_scale=3.0)
    sinks = sink_logits(heads, seq_kv, seed=seq_q)
    out = tvm_attn.attention(q, k, v, variant=variant, causal=causal, window=window, sinks=sinks, **knob)
    assert_matches_reference(variant, spec, out, q, k, v, sinks=sinks)


def test_mass_keeps_no_key_where_the_sink_holds_enough():
    """A sink holding over 1 - eps of a row's softmax keeps no key: that head's rows are 0 (within 2 eps max|v| of
    dense attention with the sink); the others keep keys as usual."""
    spec = tvm_attn.AttentionSpec(batch=1, heads=4, kv_heads=2, seq_q=1, seq_kv=100, head_dim=32, causal=True,
                                  eps=0.05, sinks=True)
    q, k, v = make_inputs(spec, seed=9)
    sinks = np.array([0.0, np.log(100) + 5, 1.0, -1.0], np.float32)  # head 1's sink holds ~99% of its softmax
    out = tvm_attn.attention(q, k, v, variant="mass", eps=0.05, causal=True, sinks=sinks)
    assert_matches_reference("mass", spec, out, q, k, v, sinks=sinks)
    assert not out[:, 1].any() and out[:, 0].any()


def test_top_k_decode_through_a_cache_with_sinks_reads_the_shadow():
    """A top-k decode call with sinks through a cache takes the kernel reading the cache's shadow of K: top_k keys
    besides the sink (tests/test_bounded.py has the other shadow kernels)."""
    rng = np.random.default_rng(4)
    cache = tvm_attn.KVCache(batch=1, kv_heads=2, head_dim=32, capacity=200)
    cache.append(*(rng.standard_normal((1, 2, 200, 32)).astype(np.float32) for _ in "kv"))
    q = (3 * rng.standard_normal((1, 4, 1, 32))).astype(np.float32)
    sinks = sink_logits(4, 8)
    spec = tvm_attn.AttentionSpec(batch=1, heads=4, kv_heads=2, seq_q=1, seq_kv=200, head_dim=32, causal=True,
                                  top_k=8, sinks=True)
    assert_matches_reference("topk", spec, cache.attend(q, variant="topk", top_k=8, sinks=sinks), q, cache.k,
                             cache.v, sinks=sinks)
    assert cache.shadow is not None


def test_sinks_with_softcap_and_a_sink_far_above_every_score():
    """Softcapped scores with the sink; a sink logit 200 above the scores takes all the weight (output ~0, no
    overflow), one 200 below none (the output without sinks)."""
    spec = tvm_attn.AttentionSpec(batch=1, heads=4, kv_heads=2, seq_q=20, seq_kv=70, head_dim=32, causal=True,
                                  softcap=3.0, sinks=True)
    q, k, v = make_inputs(spec, seed=5, q_scale=3.0)
    sinks = np.array([1.0, 200.0, -200.0, 3.0], np.float32)
    out = tvm_attn.attention(q, k, v, causal=True, softcap=3.0, sinks=sinks)
    assert_matches_reference("flash", spec, out, q, k, v, sinks=sinks)
    assert np.abs(out[:, 1]).max() < 1e-30
    np.testing.assert_allclose(out[:, 2], tvm_attn.attention(q, k, v, causal=True, softcap=3.0)[:, 2], atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_sinks_through_a_cache(dtype):
    """Decode (1 row) and prefill-sized (12 rows) calls through a KVCache (an int8 one's decode reading its codes),
    and a padded batch."""
    rng = np.random.default_rng(2)
    cache = tvm_attn.KVCache(batch=2, kv_heads=2, head_dim=64, capacity=400, dtype=dtype)
    rows = tvm_attn.runtime.numpy_dtype(cache.input_dtype)
    cache.append(*(rng.standard_normal((2, 2, 300, 64)).astype(rows) for _ in "kv"))
    k, v = cache.dequantized() if cache.integer else (cache.k, cache.v)
    sinks = sink_logits(4, 300, seed=1)
    for n_q in (1, 12):
        q = (2 * rng.standard_normal((2, 4, n_q, 64))).astype(rows)
        spec = tvm_attn.AttentionSpec(batch=2, heads=4, kv_heads=2, seq_q=n_q, seq_kv=300, head_dim=64, causal=True,
                                      dtype=cache.input_dtype, sinks=True)
        assert_matches_reference("flash", spec, cache.attend(q, sinks=sinks), q, k, v, sinks=sinks)
    mask = np.ones((2, 300), np.int64)
    mask[1, :100] = 0  # row 1 left-padded: its sequence is positions 100..299
    out = cache.attend(q, sinks=sinks, attention_mask=mask)
    spec = tvm_attn.AttentionSpec(batch=1, heads=4, kv_heads=2, seq_q=12, seq_kv=200, head_dim=64, causal=True,
                                  dtype=cache.input_dtype, sinks=True)
    assert_matches_reference("flash", spec, out[1:], q[1:], k[1:, :, 100:], v[1:, :, 100:], sinks=sinks)


def test_torch_op_and_export_take_sinks(tmp_path):
    torch = pytest.importorskip("torch")
    import tvm_attn.torch_ops  # noqa: F401

    spec = tvm_attn.AttentionSpec(batch=1, heads=4, kv_heads=2, seq_q=19, seq_kv=19, head_dim=32, causal=True,
                                  sinks=True)
    q, k, v = make_inputs(spec, seed=7)
    sinks = sink_logits(4, 19)
    out = torch.ops.tvm_attn.attention(*map(torch.from_numpy, (q, k, v)), "flash", True,
                                       sinks=torch.from_numpy(sinks))
    assert_matches_reference("flash", spec, out.numpy(), q, k, v, sinks=sinks)
    kernel = runtime.load(export.export("flash", spec, "host", tmp_path, log=io.StringIO()).manifest)
    assert [a["name"] for a in kernel.manifest["arguments"]] == ["q", "k", "v", "sinks", "out"]
    assert kernel.manifest["semantics"]["sinks"] is True
    assert_matches_reference("flash", spec, kernel(q, k, v, sinks=sinks), q, k, v, sinks=sinks)
    with pytest.raises(ValueError, match="takes sinks"):
        kernel(q, k, v)


def test_bad_sinks_are_clear_errors():
    spec = tvm_attn.AttentionSpec(batch=1, heads=4, kv_heads=2, seq_q=5, seq_kv=9, head_dim=32, sinks=True)
    q, k, v = make_inputs(spec)
    good = np.zeros(4, np.float32)
    for bad, error, match in [(np.zeros(3, np.float32), ValueError, r"shape \(heads,\) = \(4,\)"),
                              (np.zeros((1, 4), np.float32), ValueError, "shape"),
                              (np.zeros(4, np.int32), TypeError, "floats"),
                              (np.array([0, np.nan, 0, 0], np.float32), ValueError, "finite.*head 1"),
                              (np.array([0, 0, np.inf, 0]), ValueError, "finite.*head 2"),
                              ([0.0] * 4, TypeError, "array")]:
        with pytest.raises(error, match=match):
            tvm_attn.attention(q, k, v, sinks=bad)
    kernel = tvm_attn.build("flash", spec)
    with pytest.raises(ValueError, match="takes sinks"):
        kernel(q, k, v)
    with pytest.raises(ValueError, match="without them"):
        tvm_attn.build("flash", tvm_attn.AttentionSpec(**{**spec.__dict__, "sinks": False}))(q, k, v, sinks=good)
    q, k, v = make_inputs(tvm_attn.AttentionSpec(**{**spec.__dict__, "seq_q": 20, "seq_kv": 20}))  # prefill
    for schedule in ("blas", "sme"):
        with pytest.raises(ValueError, match=f"schedule='{schedule}' does not take sinks"):
            tvm_attn.attention(q, k, v, sinks=good, schedule=schedule)
    with pytest.raises(TypeError, match="sinks must be a bool"):
        tvm_attn.AttentionSpec(sinks=good)
