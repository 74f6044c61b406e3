"""NaN and Inf (the rule in tvm_attn/references.py): a row that reads a NaN or +Inf score is NaN in every element,
-Inf scores are masked keys, a NaN or Inf in v reaches the rows that weigh its key. Every variant, both kernels
(prefill and decode), the cache's shadow kernels and 16-bit inputs: kernel and reference alike, no finite wrong row,
no hang."""

from __future__ import annotations

import numpy as np
import pytest

import tvm_attn
from conftest import ambiguous_rows, knobs_for, output_tolerance
from tvm_attn import certificate, references
from tvm_attn.runtime import numpy_dtype

HEADS, KV_HEADS, D = 4, 2, 16
SEQ_KV = 100
SEQ_Q = {"prefill": 37, "decode": 3}
KEY = SEQ_KV - 3  # the poisoned key: under the causal mask only the last rows see it

# What each case puts into q, k and v (one batch; kv head 0 serves query heads 0 and 1, kv head 1 heads 2 and 3).
CASES = ("nan_q", "nan_k", "inf_score", "neg_inf_key", "all_neg_inf", "nan_v", "inf_v")


def make_case(case: str, seq_q: int, seq_kv: int = SEQ_KV, dtype: str = "float32", seed: int = 0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((1, HEADS, seq_q, D))
    k = rng.standard_normal((1, KV_HEADS, seq_kv, D))
    v = rng.standard_normal((1, KV_HEADS, seq_kv, D))
    if case == "nan_q":  # one element of one row
        q[0, 1, seq_q - 1, 3] = np.nan
    elif case == "nan_k":  # one element of one key
        k[0, 0, KEY, 5] = np.nan
    elif case == "inf_score":  # score +Inf for rows with q_0 > 0 (NaN rows), -Inf for q_0 < 0 (key masked)
        k[0, 1, KEY] = 0.0
        k[0, 1, KEY, 0] = np.inf
    elif case == "neg_inf_key":  # score -Inf for every row of heads 2 and 3: the key is masked
        k[0, 1, KEY] = 0.0
        k[0, 1, KEY, 0] = np.inf
        q[0, 2:, :, 0] = -np.abs(q[0, 2:, :, 0]) - 0.1
    elif case == "all_neg_inf":  # every score of heads 2 and 3 is -Inf: rows that see no key, output 0
        k[0, 1] = 0.0
        k[0, 1, :, 0] = np.inf
        q[0, 2:, :, 0] = -np.abs(q[0, 2:, :, 0]) - 0.1
    elif case == "nan_v":
        v[0, 0, KEY, 5] = np.nan
    elif case == "inf_v":
        v[0, 0, KEY, 5] = np.inf
    else:
        raise ValueError(f"unknown case {case!r}")
    return tuple(x.astype(numpy_dtype(dtype)) for x in (q, k, v))


def assert_follows_the_rule(variant: str, spec: tvm_attn.AttentionSpec, out, q, k, v):
    ref = tvm_attn.get_variant(variant).reference(spec, q, k, v)
    out = np.asarray(out).astype(np.float64)
    np.testing.assert_array_equal(np.isnan(out).all(-1), np.isnan(ref).all(-1),
                                  err_msg=f"{variant}: the rows that are NaN (kernel, reference)")
    assert not (np.isfinite(out) & ~np.isfinite(ref)).any(), f"{variant}: finite where the reference is not"
    # The dense kernels multiply the values of keys a row does not weigh by 0: non-finite values there are allowed,
    # in the columns of v that hold a NaN or Inf.
    bad_columns = np.repeat((~np.isfinite(v.astype(np.float64))).any(axis=2), spec.group_size, axis=1)
    extra = ~np.isfinite(out) & np.isfinite(ref)
    assert not (extra & ~bad_columns[:, :, None, :]).any(), f"{variant}: non-finite where the reference is finite"
    both = np.isfinite(out) & np.isfinite(ref) & ~ambiguous_rows(variant, spec, q, k)[..., None]
    rtol, atol = output_tolerance(spec, variant, v)
    np.testing.assert_allclose(out[both], ref[both], rtol=rtol, atol=atol, err_msg=f"{variant}: finite elements")
    return ref


def _spec(seq_q: int, knobs: dict, dtype: str = "float32", seq_kv: int = SEQ_KV):
    return tvm_attn.AttentionSpec(batch=1, heads=HEADS, kv_heads=KV_HEADS, seq_q=seq_q, seq_kv=seq_kv, head_dim=D,
                                  causal=True, dtype=dtype, **knobs)


@pytest.fixture(autouse=True)
def _quiet_numpy():
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        yield


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("path", sorted(SEQ_Q))
@pytest.mark.parametrize("variant", list(tvm_attn.VARIANTS))
def test_kernels_follow_the_rule(variant, path, case):
    knobs = knobs_for(variant)[0]
    q, k, v = make_case(case, SEQ_Q[path])
    out = tvm_attn.attention(q, k, v, variant=variant, causal=True, **knobs)
    ref = assert_follows_the_rule(variant, _spec(SEQ_Q[path], knobs), out, q, k, v)
    nan_rows = np.isnan(ref).all(-1)
    if case in ("nan_q", "nan_k", "inf_score"):
        assert 0 < nan_rows.sum() < nan_rows.size, "the case poisons some rows, not all"
    else:
        assert not nan_rows.any()
    if case == "all_neg_inf":
        assert (out[0, 2:] == 0).all(), "rows whose scores are all -Inf see no key: 0"


@pytest.mark.parametrize("variant", ["flash", "topk", "threshold", "bounded"])
@pytest.mark.parametrize("case", ["nan_q", "nan_k", "inf_score"])
def test_decode_through_a_cache_follows_the_rule(variant, case):
    """Decode through a KVCache: flash's split-KV kernel; top-k, threshold and bounded read the cache's shadow of K,
    whose NaN or Inf blocks must not let a poisoned key be ruled out."""
    knobs = knobs_for(variant)[0]
    q, k, v = make_case(case, 2)
    cache = tvm_attn.KVCache(batch=1, kv_heads=KV_HEADS, head_dim=D, capacity=SEQ_KV, shadow=True)
    for start, end in ((0, 40), (40, KEY + 1), (KEY + 1, SEQ_KV)):  # the poisoned key arrives in the second append
        cache.append(k[:, :, start:end], v[:, :, start:end])
    out = cache.attend(q, variant=variant, **knobs)
    ref = assert_follows_the_rule(variant, _spec(2, knobs), out, q, k, v)
    assert np.isnan(ref).all(-1).any()


@pytest.mark.parametrize("variant,dtype", [("flash", "float16"), ("threshold", "bfloat16"), ("bounded", "bfloat16"),
                                           ("topk", "float16")])
@pytest.mark.parametrize("case", ["nan_k", "inf_score", "nan_v"])
def test_16bit_kernels_follow_the_rule(variant, dtype, case):
    knobs = knobs_for(variant)[0]
    q, k, v = make_case(case, SEQ_Q["decode"], dtype=dtype)
    out = tvm_attn.attention(q, k, v, variant=variant, causal=True, **knobs)
    assert_follows_the_rule(variant, _spec(SEQ_Q["decode"], knobs, dtype=dtype), out, q, k, v)


def test_the_reference_rule():
    """The dense reference on the cases: NaN rows exactly where a visible score is NaN or +Inf, -Inf keys masked,
    non-finite values only in the rows and columns that weigh them."""
    spec = _spec(SEQ_Q["prefill"], {})
    sees_key = references.visible_mask(spec)[:, KEY]  # the causal rows that see the poisoned key
    q, k, v = make_case("nan_k", spec.seq_q)
    nan_rows = np.isnan(tvm_attn.reference(q, k, v, causal=True)).all(-1)
    np.testing.assert_array_equal(nan_rows[0, :2], np.broadcast_to(sees_key, (2, spec.seq_q)))
    assert not nan_rows[0, 2:].any()

    q, k, v = make_case("inf_score", spec.seq_q)
    nan_rows = np.isnan(tvm_attn.reference(q, k, v, causal=True)).all(-1)
    np.testing.assert_array_equal(nan_rows[0, 2:], sees_key & (q[0, 2:, :, 0] > 0))

    q, k, v = make_case("neg_inf_key", spec.seq_q)
    k_without = np.delete(k, KEY, axis=2)
    v_without = np.delete(v, KEY, axis=2)
    with_key = tvm_attn.reference(q, k, v)  # not causal: every row sees the key, and masks it
    np.testing.assert_allclose(with_key[0, 2:], tvm_attn.reference(q, k_without, v_without)[0, 2:], rtol=1e-12)

    q, k, v = make_case("nan_v", spec.seq_q)
    out = tvm_attn.reference(q, k, v, causal=True)
    np.testing.assert_array_equal(np.isnan(out[0, :2, :, 5]), np.broadcast_to(sees_key, (2, spec.seq_q)))
    assert np.isfinite(np.delete(out, 5, axis=-1)).all() and np.isfinite(out[0, 2:]).all()

    q, k, v = make_case("inf_v", spec.seq_q)
    out = tvm_attn.reference(q, k, v, causal=True)
    assert (out[0, :2, :, 5][np.broadcast_to(sees_key, (2, spec.seq_q))] == np.inf).all()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", ["nan_q", "nan_k", "inf_score", "neg_inf_key", "all_neg_inf"])
def test_the_rule_is_torch_sdpa(case, causal):
    """torch SDPA (float64) gives the same NaN rows and values: without a mask, and causal with seq_q = seq_kv (its
    is_causal aligns top-left, ours bottom-right; they agree on square shapes). (With an explicit boolean mask
    torch's math path adds -Inf to a masked NaN score and poisons rows that do not see the key.)"""
    torch = pytest.importorskip("torch")
    seq_q = SEQ_KV if causal else SEQ_Q["prefill"]
    q, k, v = make_case(case, seq_q)
    group = HEADS // KV_HEADS
    expected = torch.nn.functional.scaled_dot_product_attention(
        *(torch.from_numpy(x.astype(np.float64)) for x in (q, np.repeat(k, group, 1), np.repeat(v, group, 1))),
        is_causal=causal).numpy()
    ref = tvm_attn.reference(q, k, v, causal=causal)
    np.testing.assert_array_equal(np.isnan(ref), np.isnan(expected))
    np.testing.assert_allclose(ref[~np.isnan(ref)], expected[~np.isnan(expected)], rtol=1e-10, atol=1e-12)


def test_the_shadow_of_a_nan_block_bounds_nothing():
    """A NaN in a block of K: lo -Inf, step +Inf, codes 0 for that dimension of that block, in certificate.quantize and
    in the cache's quantization kernel alike (so every bound from the block is NaN or +Inf: nothing is ruled out)."""
    _, k, v = make_case("nan_k", 1)
    codes, lo, step = certificate.quantize(k)
    block = KEY // certificate.BLOCK
    assert lo[0, 0, block, 5] == -np.inf and step[0, 0, block, 5] == np.inf
    assert (codes[0, 0, block * certificate.BLOCK:(block + 1) * certificate.BLOCK, 5] == 0).all()
    assert np.isfinite(np.delete(lo, block, axis=2)).all()
    cache = tvm_attn.KVCache(batch=1, kv_heads=KV_HEADS, head_dim=D, capacity=SEQ_KV, shadow=True)
    cache.append(k, v)
    _, lo_kernel, step_kernel = cache.shadow.views(SEQ_KV)
    np.testing.assert_array_equal(lo_kernel, lo)
    np.testing.assert_array_equal(step_kernel, step)
    np.testing.assert_array_equal(cache.shadow.codes_by_key(SEQ_KV), codes)
