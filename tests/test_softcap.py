"""Logit softcapping (AttentionSpec.softcap, Gemma 2): each score s becomes cap * tanh(s / cap) before the softmax,
in the dense and pruned variants' prefill and decode kernels and through the caches, against the float64 reference;
refused where it is not applied. The paged cache's check is in tests/test_paged.py. The transformers backend's Gemma 2 check is in tests/test_hf.py."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm.script import tirx as T

import tvm_attn
import tvm_attn.kernel
from conftest import assert_matches_reference, knobs_for, make_inputs
from tvm_attn.variants.common import TANH_CLAMP, softcapped

# (heads, kv_heads, seq_q, seq_kv, head_dim, causal, window, dtype): awkward lengths, GQA, a window, decode (1 and 3
# rows), 16-bit inputs (bfloat16 prefill in pair products on hosts with them)
SHAPES = [(4, 2, 70, 130, 40, True, None, "float32"), (6, 2, 33, 33, 64, False, None, "float32"),
          (4, 2, 3, 300, 64, True, 100, "float32"), (4, 4, 1, 257, 48, True, None, "float32"),
          (4, 2, 50, 50, 64, True, None, "bfloat16"), (4, 2, 2, 90, 32, True, None, "float16")]


# flash on every shape; standard and mqa (the same decode kernel as flash) on two each; the pruned variants that cap
# on a prefill and a decode shape each (their knobs: conftest.KNOBS)
CASES = [("flash", shape) for shape in SHAPES] + [("standard", SHAPES[0]), ("standard", SHAPES[3]),
                                                  ("mqa", SHAPES[1]), ("mqa", SHAPES[4])] + [
    (variant, shape) for variant in ("threshold", "topk", "mass") for shape in (SHAPES[0], SHAPES[2])]


@pytest.mark.parametrize("variant,shape", CASES, ids=str)
def test_variants_cap_their_scores(variant, shape):
    heads, kv_heads, seq_q, seq_kv, head_dim, causal, window, dtype = shape
    knob = knobs_for(variant)[0]
    spec = tvm_attn.AttentionSpec(batch=2, heads=heads, kv_heads=kv_heads, seq_q=seq_q, seq_kv=seq_kv,
                                  head_dim=head_dim, causal=causal, window=window, dtype=dtype, softcap=5.0, **knob)
    q, k, v = make_inputs(spec, seed=seq_kv, q_scale=3.0)  # scores well past the cap's linear range
    out = tvm_attn.attention(q, k, v, variant=variant, causal=causal, window=window, softcap=5.0, **knob)
    assert_matches_reference(variant, spec, out, q, k, v)


def test_top_k_decode_through_a_cache_caps_in_the_shadow_kernel():
    """A softcapped top-k decode call through a cache takes the kernel reading the cache's shadow of K, which cuts
    on the uncapped bounds (capping keeps the scores' order) and caps the candidates' exact scores
    (tests/test_bounded.py has the other shadow kernels, and top-k with softcap and ALiBi)."""
    rng = np.random.default_rng(4)
    cache = tvm_attn.KVCache(batch=1, kv_heads=2, head_dim=32, capacity=200)
    cache.append(*(rng.standard_normal((1, 2, 200, 32)).astype(np.float32) for _ in "kv"))
    q = (3 * rng.standard_normal((1, 4, 1, 32))).astype(np.float32)
    spec = tvm_attn.AttentionSpec(batch=1, heads=4, kv_heads=2, seq_q=1, seq_kv=200, head_dim=32, causal=True,
                                  top_k=8, softcap=2.0)
    assert_matches_reference("topk", spec, cache.attend(q, variant="topk", top_k=8, softcap=2.0), q, cache.k,
                             cache.v)
    assert cache.shadow is not None


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_softcap_through_a_cache(dtype):
    """Decode (1 row) and prefill-sized (12 rows) calls through a KVCache, an int8 one's decode reading its codes."""
    rng = np.random.default_rng(1)
    cache = tvm_attn.KVCache(batch=1, kv_heads=2, head_dim=64, capacity=400, dtype=dtype)
    rows = np.float16 if dtype == "float16" else np.float32
    cache.append(*(rng.standard_normal((1, 2, 300, 64)).astype(rows) for _ in "kv"))
    k, v = cache.dequantized() if cache.integer else (cache.k, cache.v)
    for n_q in (1, 12):
        q = (3 * rng.standard_normal((1, 4, n_q, 64))).astype(rows)
        spec = tvm_attn.AttentionSpec(batch=1, heads=4, kv_heads=2, seq_q=n_q, seq_kv=300, head_dim=64, causal=True,
                                      dtype=cache.input_dtype, softcap=4.0)
        assert_matches_reference("flash", spec, cache.attend(q, softcap=4.0), q, k, v)


@pytest.mark.parametrize("variant", ["flash", "topk"])
@pytest.mark.parametrize("cap", [0.5, 1e30])
def test_caps_kept_out_of_q_cap_the_scores(variant, cap):
    """Caps of 1 to 2^64 scale q by scale / cap, so that the scores come divided by it (common.score_scales); a
    smaller cap (q would grow) or a larger one (q would shrink to subnormals) divides the scores instead."""
    knob = knobs_for(variant)[0]
    spec = tvm_attn.AttentionSpec(batch=2, heads=4, kv_heads=2, seq_q=70, seq_kv=130, head_dim=40, causal=True,
                                  softcap=cap, **knob)
    q, k, v = make_inputs(spec, seed=5, q_scale=min(cap, 3.0) / 3)  # scores about the cap (not all tied in it)
    assert_matches_reference(variant, spec, tvm_attn.build(variant, spec)(q, k, v), q, k, v)


def test_flash_caps_the_scores_in_the_write_back_of_its_register_tiles():
    """flash's prefill kernel with a softcap has no pass of its own for it: the write-back of qk's register tiles
    computes the capped scores from the accumulators, and the raw scores never reach memory
    (schedules/common.schedule_score_terms)."""
    spec = tvm_attn.AttentionSpec(batch=1, heads=4, kv_heads=2, seq_q=64, seq_kv=64, head_dim=32, causal=True,
                                  softcap=5.0)
    text = tvm_attn.kernel.scheduled_module(tvm_attn.get_variant("flash"), spec, tvm_attn.resolve_target("host"),
                                            "hand", "prefill").mod.script()
    assert 'T.sblock("score_terms")' not in text and "S = T.sblock_alloc_buffer" not in text
    assert "S_adjusted = T.sblock_alloc_buffer" in text


@pytest.mark.parametrize("cap", [5.0, 30.0, 1e30])
def test_softcapped_scores_are_float32_close_to_tanh(cap):
    """softcapped near 0 (down to subnormal and zero arguments), around its clamp, over +-10 cap, +-Inf and NaN:
    within 5 float32 ulps of cap (absolute) of the float64 cap tanh(s / cap) (compiled for generic x86-64 or
    arm64, whichever the host is: the x86 code has no FMA, its worst case). A cap of 1e30 multiplies the
    quotient rather than the numerator's coefficients (which would overflow)."""
    n = 4096

    @T.prim_func(s_tir=True)
    def cap_all(x: T.Buffer((n,), "float32"), y: T.Buffer((n,), "float32")):
        for i in range(n):
            with T.sblock("y"):
                vi = T.axis.spatial(n, i)
                y[vi] = softcapped(x[vi], cap)

    f = tvm.compile(cap_all, target="llvm")
    s = np.concatenate([np.linspace(-10 * cap, 10 * cap, n - 13),
                        cap * np.array([-4e-4, -1e-7, -1e-30, 0.0, 1e-30, 1e-7, 4e-4]),
                        cap * TANH_CLAMP * np.array([-1.0001, -0.9999, 0.9999, 1.0001]), [np.inf, -np.inf]])
    s = s.astype(np.float32)
    got = np.zeros(n, np.float32)
    f(tvm.runtime.tensor(s), out := tvm.runtime.tensor(got))
    got = out.numpy()
    want = cap * np.tanh(s.astype(np.float64) / cap)
    assert np.abs(got - want).max() <= 5 * np.finfo(np.float32).eps * cap
    s[0] = np.nan
    f(tvm.runtime.tensor(s), out)
    assert np.isnan(out.numpy()[0])


@pytest.mark.parametrize("variant,seq_q", [("flash", 40), ("flash", 1), ("standard", 40), ("topk", 40)])
def test_a_nan_score_still_makes_a_nan_row_through_the_cap(variant, seq_q):
    """The vectorized kernels keep the NaN rule with softcapping (the clamps pass NaN on: no select guards it), and
    +Inf scores become +cap (finite rows)."""
    rng = np.random.default_rng(3)
    q = rng.standard_normal((1, 4, seq_q, 32)).astype(np.float32)
    k, v = (rng.standard_normal((1, 2, 70, 32)).astype(np.float32) for _ in "kv")
    q[0, 1, 0, 3] = np.nan  # head 1's first row reads NaN scores
    k[0, 0, 5, 2] = np.inf  # KV head 0's key 5: +-Inf scores, capped
    knob = knobs_for(variant)[0]
    with np.errstate(invalid="ignore"):
        out = tvm_attn.attention(q, k, v, variant=variant, causal=True, softcap=5.0, **knob)
        ref = tvm_attn.reference(q, k, v, variant=variant, causal=True, softcap=5.0, **knob)
    assert np.isnan(out[0, 1, 0]).all() and np.array_equal(np.isnan(out), np.isnan(ref))
    finite = ~np.isnan(ref)
    np.testing.assert_allclose(out[finite], ref[finite], atol=1e-5)


def test_softcap_refusals():
    for bad in (0.0, -1.0, float("inf"), float("nan"), "5"):
        with pytest.raises(ValueError, match="softcap must be a finite number > 0"):
            tvm_attn.AttentionSpec(softcap=bad)
    spec = tvm_attn.AttentionSpec(batch=1, heads=4, kv_heads=2, seq_q=64, seq_kv=64, head_dim=32, softcap=5.0)
    with pytest.raises(ValueError, match="schedule='blas' does not apply softcap=5.0"):
        tvm_attn.build("flash", spec, schedule="blas")
    with pytest.raises(ValueError, match="schedule='sme' does not apply softcap=5.0"):
        tvm_attn.build("flash", spec, target="apple-m4", schedule="sme")
