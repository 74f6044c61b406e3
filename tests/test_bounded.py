"""Certified sparse attention: the int8 shadow of K a KVCache keeps, its bounds, and the bounded variant's
certificate |out - dense| <= 2 eps max|v| on gaussian, peaked and adversarial inputs."""

from __future__ import annotations

import numpy as np
import pytest

import tvm_attn
from conftest import assert_matches_reference, output_tolerance
from tvm_attn import certificate, references
from tvm_attn.kernel import build_shadow
from tvm_attn.runtime import numpy_dtype

B, H, KVH, D = 1, 6, 2, 40  # head_dim not a multiple of the 16 lanes


def _inputs(kind: str, n: int, sq: int, seed: int = 0, dtype: str = "float32"):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, H, sq, D))
    k = rng.standard_normal((B, KVH, n, D))
    v = rng.standard_normal((B, KVH, n, D))
    if kind == "peaked":
        q *= 4.0
    elif kind == "near_ties":  # groups of keys a hair apart
        k = np.repeat(k[:, :, : -(-n // 4)], 4, axis=2)[:, :, :n] + 1e-6 * rng.standard_normal((B, KVH, n, D))
        q *= 3.0
    elif kind == "equal_scores":  # every key the same: every row's weights uniform
        k[:] = k[:, :, :1]
    elif kind == "huge_logits":
        q *= 60.0
    elif kind == "outlier_key":  # one key far above its block's others: the block's range, and radius, blow up
        k[:, :, n // 2] = 25.0 * np.abs(k[:, :, n // 2])
        q = np.abs(q) * 2.0
    dt = numpy_dtype(dtype)
    return q.astype(dt), k.astype(dt), v.astype(dt)


def _spec(n: int, sq: int, eps: float, dtype: str = "float32", **kw):
    return tvm_attn.AttentionSpec(batch=B, heads=H, kv_heads=KVH, seq_q=sq, seq_kv=n, head_dim=D, causal=True,
                                  eps=eps, dtype=dtype, **kw)


def _filled_cache(k, v, pieces=(1, 31, 2, 64, 5), dtype="float32", shadow=None):
    """A cache holding k, v appended in pieces that start and end inside shadow blocks (with ``shadow=True`` the
    shadow is maintained through them; by default it is built at the first bounded attend)."""
    cache = tvm_attn.KVCache(B, KVH, D, capacity=k.shape[2] + 8, dtype=dtype, shadow=shadow)
    start, i = 0, 0
    while start < k.shape[2]:
        end = min(k.shape[2], start + pieces[i % len(pieces)])
        cache.append(k[:, :, start:end], v[:, :, start:end])
        start, i = end, i + 1
    return cache


@pytest.mark.parametrize("kind", ["gaussian", "peaked", "near_ties", "equal_scores", "huge_logits", "outlier_key"])
@pytest.mark.parametrize("eps", [0.01, 0.3])
def test_certificate_holds_through_the_cache(kind, eps):
    n, sq = 700, 2
    q, k, v = _inputs(kind, n, sq)
    spec = _spec(n, sq, eps)
    out = _filled_cache(k, v).attend(q, variant="bounded", eps=eps).astype(np.float64)
    dense = references.dense(spec, q, k, v)
    bound = 2 * eps * np.abs(v).max()
    assert np.abs(out - dense).max() <= bound + output_tolerance(spec)[1]
    assert_matches_reference("bounded", spec, out.astype(np.float32), q, k, v)


EXACT_KNOBS = [("topk", {"top_k": k}) for k in (1, 64, 2000)] + [
    ("threshold", {"threshold": t}) for t in (0.001, 0.05, 0.3)]


@pytest.mark.parametrize("kind", ["gaussian", "peaked", "huge_logits", "outlier_key"])
@pytest.mark.parametrize("variant,knob", EXACT_KNOBS, ids=str)
def test_topk_and_threshold_through_the_shadow_are_exact(kind, variant, knob):
    """Decode calls of top-k and threshold on a cache read the shadow, resolve only the keys its bounds cannot rule
    out, and give exactly the variant's reference (top_k past the visible keys: dense). Ties: the next test."""
    n, sq = 700, 4
    q, k, v = _inputs(kind, n, sq, seed=9 if variant == "topk" else 11)
    spec = tvm_attn.AttentionSpec(batch=B, heads=H, kv_heads=KVH, seq_q=sq, seq_kv=n, head_dim=D, causal=True,
                                  **knob)
    cache = _filled_cache(k, v)
    out = cache.attend(q, variant=variant, **knob)
    assert cache.shadow is not None  # the shadow's kernel served it
    assert_matches_reference(variant, spec, out, q, k, v)


# Softcap, ALiBi and sinks in the kernels reading the shadow (certificate.py: the bounds capped and biased as the
# scores, the sink an exact term): one kernel per variant with all three, each of which moves the output.
FEATURES = dict(softcap=4.0, alibi_slopes=(0.02, 0.01, 0.005, 0.04, 0.0025, 0.0))
SINKS = np.array([2.0, -1.0, 12.0, 5.0, 0.0, 8.0], np.float32)  # head 2's holds nearly all of its rows' mass


@pytest.mark.parametrize("variant,knob", [("bounded", {"eps": 0.05}), ("topk", {"top_k": 16}),
                                          ("threshold", {"threshold": 0.01})], ids=str)
def test_shadow_kernels_take_softcap_alibi_and_sinks(variant, knob):
    n, sq = 700, 3
    q, k, v = _inputs("peaked", n, sq, seed=13)
    spec = tvm_attn.AttentionSpec(batch=B, heads=H, kv_heads=KVH, seq_q=sq, seq_kv=n, head_dim=D, causal=True,
                                  sinks=True, **FEATURES, **knob)
    cache = _filled_cache(k, v)
    out = cache.attend(q, variant=variant, sinks=SINKS, **FEATURES, **knob)
    assert cache.shadow is not None  # the shadow's kernel served it
    assert_matches_reference(variant, spec, out, q, k, v, sinks=SINKS)
    ref = tvm_attn.get_variant(variant).reference
    for without in ({"softcap": None}, {"alibi_slopes": None}, {"sinks": False}):  # each feature matters
        plain = ref(tvm_attn.AttentionSpec(**{**spec.__dict__, **without}), q, k, v,
                    **({} if "sinks" in without else {"sinks": SINKS}))
        assert np.abs(plain - out).max() > 0.05, without
    if variant == "bounded":
        dense = references.dense(spec, q, k, v, sinks=SINKS)
        assert np.abs(out - dense).max() <= 2 * knob["eps"] * np.abs(v).max() + output_tolerance(spec)[1]
        assert references.bounded_keep(spec, q, k, SINKS).mean() < 0.5  # it still prunes
        direct = tvm_attn.attention(q, k, v, variant=variant, causal=True, sinks=SINKS, **FEATURES, **knob)
        np.testing.assert_allclose(direct, out, rtol=1e-5, atol=1e-6)  # the kernel quantizing K itself


@pytest.mark.parametrize("top_k,slopes", [(5, (6.0, 8.0)), (64, (0.4, 0.5))])
def test_topk_cut_past_the_bins_through_the_shadow(top_k, slopes):
    """Steep ALiBi slopes put each row's k-th key 17-40 logits below its top, past the 16 logits of the shadow's
    bins: the kernel cuts on the bounds themselves. Each key's value is scaled by e^(its gap to the top), so every
    key of the top k moves the output as much as the top one: a key missed at the cut shows."""
    n, heads = 700, KVH
    rng = np.random.default_rng(21)
    spec = tvm_attn.AttentionSpec(batch=B, heads=heads, kv_heads=KVH, seq_q=1, seq_kv=n, head_dim=D, causal=True,
                                  top_k=top_k, alibi_slopes=slopes)
    q, k, v = (rng.standard_normal(shape) for shape in (spec.q_shape, spec.kv_shape, spec.kv_shape))
    s = references.scores(spec, q, k)
    gap = s.max(axis=-1, keepdims=True) - s  # (B, heads, 1, n); one query row per KV head
    kth = np.sort(gap, axis=-1)[..., top_k - 1]
    assert ((kth > 17) & (kth < 40)).all()
    v = (v * np.exp(np.minimum(gap, 40.0))[0, :, 0, :, None]).astype(np.float32)
    q, k = q.astype(np.float32), k.astype(np.float32)
    out = _filled_cache(k, v).attend(q, variant="topk", top_k=top_k, alibi_slopes=slopes)
    ref = references.topk(spec, q, k, v)
    assert np.abs(ref).max() < 100  # the kept keys' terms are all O(1)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_topk_ties_go_to_the_lower_index_through_the_shadow():
    """Equal scores straddling the cut: the lower key indices fill the quota, as in the reference (and with every
    score equal, the first top_k keys)."""
    q, k, v = _inputs("equal_scores", 300, 1, seed=10)
    spec = tvm_attn.AttentionSpec(batch=B, heads=H, kv_heads=KVH, seq_q=1, seq_kv=300, head_dim=D, causal=True,
                                  top_k=9)
    out = _filled_cache(k, v).attend(q, variant="topk", top_k=9)
    np.testing.assert_allclose(out, references.topk(spec, q, k, v), rtol=1e-5, atol=1e-6)
    q, k, v = _inputs("gaussian", 300, 1, seed=10)
    k[:, :, 100:300:20] = k[:, :, 40:41]  # ten copies of key 40: equal scores straddle any cut through them
    s = references.scores(_spec(300, 1, 0.05), q, k)
    rank = int((s[0, 0, 0] > s[0, 0, 0, 40]).sum())  # keys above the copies, for head 0
    top_k = rank + 4  # the cut falls among the 11 equal keys
    spec = tvm_attn.AttentionSpec(batch=B, heads=H, kv_heads=KVH, seq_q=1, seq_kv=300, head_dim=D, causal=True,
                                  top_k=top_k)
    out = _filled_cache(k, v).attend(q, variant="topk", top_k=top_k)
    np.testing.assert_allclose(out, references.topk(spec, q, k, v), rtol=1e-5, atol=1e-6)


def test_threshold_scores_more_keys_when_the_bounds_cannot_decide(monkeypatch):
    """With a loose slack most rows have weights the sum's bounds cannot place against tau: more keys are then scored
    exactly until they can (every key at worst), and the result is still the reference's."""
    monkeypatch.setattr(certificate, "THRESHOLD_SLACK", 0.5)
    q, k, v = _inputs("gaussian", 700, 2, seed=12)
    scale = 0.151  # a kernel of its own (kernels are cached by spec, not by the slack)
    spec = tvm_attn.AttentionSpec(batch=B, heads=H, kv_heads=KVH, seq_q=2, seq_kv=700, head_dim=D, causal=True,
                                  threshold=0.002, scale=scale)
    out = _filled_cache(k, v).attend(q, variant="threshold", threshold=0.002, scale=scale)
    assert_matches_reference("threshold", spec, out, q, k, v)


def test_peaked_rows_read_few_keys():
    """Not a certificate that holds by keeping everything: on peaked rows most keys are ruled out."""
    q, k, _ = _inputs("peaked", 2048, 1, seed=3)
    kept = references.bounded_keep(_spec(2048, 1, 0.05), q, k)
    assert kept.mean() < 0.3, kept.mean()


def test_shadow_scores_are_within_the_radius():
    """|q . k - s^| <= radius for every key, float32 scores included, on inputs that stress the rounding."""
    for kind in ("gaussian", "huge_logits", "outlier_key"):
        q, k, _ = _inputs(kind, 333, 3, seed=5)
        spec = _spec(333, 3, 0.05)
        lower, upper = references.shadow_bounds(spec, q, k)
        exact = references.scores(spec, q, k)
        f32 = np.float32(spec.scale) * np.einsum("bhqd,bhkd->bhqk", q, np.repeat(k, H // KVH, axis=1))
        assert (lower <= exact).all() and (exact <= upper).all(), kind
        assert (lower <= f32).all() and (f32 <= upper).all(), kind
        assert (upper - lower).max() < 0.2 * (np.abs(exact).max() + 1), kind  # the bounds are tight


def test_appends_and_truncation_keep_the_shadow_of_the_filled_keys():
    q, k, v = _inputs("gaussian", 200, 1, seed=6)
    cache = _filled_cache(k, v, pieces=(3, 40, 1, 29), shadow=True)
    for length in (200, 161, 160, 7):
        cache.truncate(length)
        _, lo, step = cache.shadow.views(length)
        expected = certificate.quantize(k[:, :, :length])
        for got, want in zip((cache.shadow.codes_by_key(length), lo, step), expected):
            np.testing.assert_array_equal(got, want)
    cache.append(k[:, :, 7:50], v[:, :, 7:50])
    _, lo, step = cache.shadow.views(50)
    for got, want in zip((cache.shadow.codes_by_key(50), lo, step), certificate.quantize(k[:, :, :50])):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_cache(dtype):
    n, sq, eps = 300, 1, 0.05
    q, k, v = _inputs("peaked", n, sq, seed=7, dtype=dtype)
    spec = _spec(n, sq, eps, dtype=dtype)
    out = _filled_cache(k, v, dtype=dtype, shadow=True).attend(q, variant="bounded", eps=eps)
    assert_matches_reference("bounded", spec, out, q, k, v)


def test_attention_has_the_cache_semantics():
    """attention() quantizes K itself into the same shadow: same kept keys, same output (windowed: every key is passed,
    the blocks start at key 0 as in the cache)."""
    n, sq, eps, window = 300, 3, 0.05, 70
    q, k, v = _inputs("peaked", n, sq, seed=8)
    via_cache = _filled_cache(k, v).attend(q, variant="bounded", eps=eps, window=window)
    direct = tvm_attn.attention(q, k, v, variant="bounded", causal=True, window=window, eps=eps)
    np.testing.assert_allclose(direct, via_cache, rtol=1e-5, atol=1e-6)
    assert_matches_reference("bounded", _spec(n, sq, eps, window=window), direct, q, k, v)


def test_refusals():
    q, k, v = _inputs("gaussian", 40, 1)
    plain = tvm_attn.KVCache(B, KVH, D, capacity=64, shadow=False)
    plain.append(k, v)
    with pytest.raises(ValueError, match="shadow=False"):
        plain.attend(q, variant="bounded", eps=0.05)
    np.testing.assert_allclose(plain.attend(q), _filled_cache(k, v).attend(q), rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="shadow must be True, False or None"):
        tvm_attn.KVCache(B, KVH, D, capacity=64, shadow="yes")
    cache = _filled_cache(k, v)
    for eps in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="eps must be in"):
            cache.attend(q, variant="bounded", eps=eps)
    with pytest.raises(ValueError, match="needs eps"):
        cache.attend(q, variant="bounded")
    kernel = build_shadow("bounded", _spec(40, 1, 0.05))
    with pytest.raises(TypeError, match="cache.attend"):
        kernel(q, k, v)
