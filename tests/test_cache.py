"""KVCache and length-generic kernels: prefill then decode through a cache against the float64 reference, views
read in place, no compile per length, and bad input refused without touching the cache."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import tvm_attn
from conftest import assert_matches_reference, knobs_for, tolerance

D = 32


def _rng_qkv(rng, batch, heads, kv_heads, sq, skv, head_dim=D, q_scale=1.0):
    q = (rng.standard_normal((batch, heads, sq, head_dim)) * q_scale).astype(np.float32)
    k = rng.standard_normal((batch, kv_heads, skv, head_dim)).astype(np.float32)
    v = rng.standard_normal((batch, kv_heads, skv, head_dim)).astype(np.float32)
    return q, k, v


def _spec(q, k, **kw):
    b, h, sq, d = q.shape
    return tvm_attn.AttentionSpec(batch=b, heads=h, kv_heads=k.shape[1], seq_q=sq, seq_kv=k.shape[2], head_dim=d,
                                  **kw)


# (heads, kv_heads, prefill length, decode steps, window): lengths that fill no tile exactly.
LOOPS = [(4, 2, 37, 5, None), (4, 1, 70, 3, 16), (2, 2, 1, 4, None), (6, 3, 33, 2, 1)]


# standard and mqa decode with flash's kernel (the dense variants share it): two loops each.
CACHE_LOOPS = [(variant, *loop) for variant in tvm_attn.VARIANTS for n, loop in enumerate(LOOPS)
               if variant not in ("standard", "mqa") or n % 2 == ("standard", "mqa").index(variant)]


@pytest.mark.parametrize("variant,heads,kv_heads,prefill,steps,window", CACHE_LOOPS, ids=str)
def test_prefill_then_decode_through_the_cache(variant, heads, kv_heads, prefill, steps, window):
    knobs = knobs_for(variant)[0]
    rng = np.random.default_rng(1)
    total = prefill + steps
    q_all, k_all, v_all = _rng_qkv(rng, 2, heads, kv_heads, total, total,
                                   q_scale=2.0 if tvm_attn.get_variant(variant).knob else 1.0)
    cache = tvm_attn.KVCache(batch=2, kv_heads=kv_heads, head_dim=D, capacity=total)
    cache.append(k_all[:, :, :prefill], v_all[:, :, :prefill])
    pieces = [(0, prefill)] + [(prefill + s, prefill + s + 1) for s in range(steps)]
    for start, end in pieces:
        if start:
            cache.append(k_all[:, :, start:end], v_all[:, :, start:end])
        q = q_all[:, :, start:end]
        out = cache.attend(q, variant=variant, causal=True, window=window, **knobs)
        spec = _spec(q, cache.k, causal=True, window=window, **knobs)
        assert_matches_reference(variant, spec, out, q, np.ascontiguousarray(cache.k), np.ascontiguousarray(cache.v))
    assert cache.length == cache.capacity == total  # filled exactly to capacity


@pytest.mark.parametrize("variant", list(tvm_attn.VARIANTS))
def test_attend_without_causal_mask(variant):
    knobs = knobs_for(variant)[0]
    rng = np.random.default_rng(2)
    q, k, v = _rng_qkv(rng, 1, 4, 2, 9, 50, q_scale=2.0)
    cache = tvm_attn.KVCache(batch=1, kv_heads=2, head_dim=D, capacity=64)
    cache.append(k, v)
    out = cache.attend(q, variant=variant, causal=False, **knobs)
    assert_matches_reference(variant, _spec(q, k, **knobs), out, q, k, v)


@pytest.mark.parametrize("variant,window,causal", [("flash", None, True), ("flash", 6, True), ("topk", None, True),
                                                    ("flash", None, False)])
def test_padded_batch_rows_see_their_own_positions(variant, window, causal):
    """attention_mask pads rows on the left, the right, both, or entirely: each row's real queries attend to its
    real keys only (the float64 reference on that row's run alone), the rest of its rows are 0; prefill then a
    decode step."""
    knobs = knobs_for(variant)[0]
    rng = np.random.default_rng(7)
    q_all, k_all, v_all = _rng_qkv(rng, 5, 4, 2, 21, 21)
    cache = tvm_attn.KVCache(batch=5, kv_heads=2, head_dim=D, capacity=21, shadow=False)
    runs = [(0, 21), (7, 21), (0, 13), (3, 17), (0, 0)]  # none, left, right, both, all padding
    for start, end in ((0, 20), (20, 21)):
        cache.append(k_all[:, :, start:end], v_all[:, :, start:end])
        mask = np.zeros((5, end), np.int64)
        for row, (first, last) in enumerate(runs):
            mask[row, first:min(last, end)] = 1
        q = q_all[:, :, start:end]
        out = cache.attend(q, variant=variant, causal=causal, window=window, attention_mask=mask, **knobs)
        for row, (first, last) in enumerate(runs):
            last = min(last, end)
            real = [i for i in range(start, end) if first <= i < last]  # positions of q that are real
            rows = slice(real[0] - start, real[-1] + 1 - start) if real else slice(0, 0)
            assert not out[row, :, :rows.start].any() and not out[row, :, rows.stop:].any()
            if real:
                sub_q = q[row:row + 1, :, rows]
                sub_k, sub_v = k_all[row:row + 1, :, first:last], v_all[row:row + 1, :, first:last]
                spec = _spec(sub_q, sub_k, causal=causal, window=window, **knobs)
                assert_matches_reference(variant, spec, out[row:row + 1, :, rows], sub_q, sub_k, sub_v)
    with pytest.raises(ValueError, match="attention_mask row 1 has zeros between its ones"):
        cache.attend(q, attention_mask=np.array([[1] * 21, [1, 0] + [1] * 19] + [[1] * 21] * 3))
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(batch=5, length=21\)"):
        cache.attend(q, attention_mask=np.ones((5, 20)))
    shadowed = tvm_attn.KVCache(batch=5, kv_heads=2, head_dim=D, capacity=21)
    shadowed.append(k_all, v_all)
    with pytest.raises(ValueError, match="variant 'bounded' reads the cache's shadow of K, which does not take"):
        shadowed.attend(q_all[:, :, -1:], variant="bounded", eps=0.1, attention_mask=np.ones((5, 21), np.int64))


def test_attention_reads_strided_views_without_copying():
    """k_buf[:, :, :n] of a large buffer: the kernel reads it in place (peak extra memory far below K's size)."""
    rng = np.random.default_rng(3)
    capacity, n = 8192, 5000
    k_buf = rng.standard_normal((1, 2, capacity, 64)).astype(np.float32)
    v_buf = rng.standard_normal((1, 2, capacity, 64)).astype(np.float32)
    raw = np.empty(4 * 1 * 4 * 64 + 1, np.float32)
    q = raw[1:].reshape(1, 4, 4, 64)  # not 64-byte aligned
    q[...] = rng.standard_normal(q.shape)
    k, v = k_buf[:, :, :n], v_buf[:, :, :n]
    assert not k.flags.c_contiguous and q.ctypes.data % 64
    for variant in ("flash", "mqa"):
        tvm_attn.attention(q, k, v, variant=variant, causal=True)  # compile outside the measurement
        tracemalloc.start()
        out = tvm_attn.attention(q, k, v, variant=variant, causal=True)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < k.nbytes / 8, f"{variant}: {peak} bytes allocated during the call, K is {k.nbytes}"
        spec = _spec(q, k, causal=True)
        np.testing.assert_allclose(out, tvm_attn.reference(q, np.ascontiguousarray(k), np.ascontiguousarray(v),
                                                           causal=True),
                                   rtol=tolerance(spec), atol=tolerance(spec))


def test_views_with_unusual_strides_are_still_correct():
    rng = np.random.default_rng(4)
    q, k, v = _rng_qkv(rng, 2, 4, 2, 10, 30)
    k_t = np.ascontiguousarray(k.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)  # last axis not contiguous
    v_rev = np.ascontiguousarray(v[:, ::-1])[:, ::-1]  # negative head stride
    ref = tvm_attn.reference(q, k, v)
    spec = _spec(q, k)
    np.testing.assert_allclose(tvm_attn.attention(q, k_t, v_rev), ref, rtol=tolerance(spec), atol=tolerance(spec))


def test_a_loop_over_many_lengths_compiles_a_handful_of_kernels():
    rng = np.random.default_rng(5)
    cache = tvm_attn.KVCache(batch=1, kv_heads=2, head_dim=D, capacity=400)
    q, k, v = _rng_qkv(rng, 1, 4, 2, 1, 400)
    cache.append(k[:, :, :100], v[:, :, :100])
    cache.attend(rng.standard_normal((1, 4, 100, D)).astype(np.float32))  # the prefill kernel
    cache.append(k[:, :, 100:101], v[:, :, 100:101])
    cache.attend(q)  # the decode kernel
    before = tvm_attn.compile_count()
    for n in range(101, 400):
        cache.attend(q)
        cache.append(k[:, :, n:n + 1], v[:, :, n:n + 1])
    for chunk in (3, 17, 64, 129):  # prefill chunks of any length
        fresh = tvm_attn.KVCache(batch=1, kv_heads=2, head_dim=D, capacity=400)
        fresh.append(k[:, :, :chunk + 5], v[:, :, :chunk + 5])
        fresh.attend(rng.standard_normal((1, 4, chunk, D)).astype(np.float32))
    assert tvm_attn.compile_count() == before


def test_batch_is_a_run_time_size_too():
    rng = np.random.default_rng(6)
    before = None
    for batch in (1, 3, 2):
        q, k, v = _rng_qkv(rng, batch, 4, 2, 21, 40)
        out = tvm_attn.attention(q, k, v, causal=True)
        np.testing.assert_allclose(out, tvm_attn.reference(q, k, v, causal=True), rtol=1e-5, atol=1e-5)
        before = before if before is not None else tvm_attn.compile_count()
    assert tvm_attn.compile_count() == before


def test_views_and_truncate():
    rng = np.random.default_rng(7)
    _, k, v = _rng_qkv(rng, 1, 2, 2, 1, 10)
    cache = tvm_attn.KVCache(batch=1, kv_heads=2, head_dim=D, capacity=16)
    cache.append(k, v)
    assert cache.k.shape == (1, 2, 10, D) and np.shares_memory(cache.k, cache._k)
    np.testing.assert_array_equal(cache.v, v)
    assert cache._k.ctypes.data % 64 == 0
    cache.truncate(4)
    assert cache.length == 4 and cache.k.shape[2] == 4
    with pytest.raises(ValueError, match=r"length must be an int in \[0, 4\], got 5"):
        cache.truncate(5)


def _cache_with(n=5):
    rng = np.random.default_rng(8)
    _, k, v = _rng_qkv(rng, 2, 4, 2, 1, n)
    cache = tvm_attn.KVCache(batch=2, kv_heads=2, head_dim=D, capacity=8)
    cache.append(k, v)
    return cache


def test_append_past_capacity_leaves_the_cache_unchanged():
    cache = _cache_with(5)
    before_k, before_v = cache.k.copy(), cache.v.copy()
    k = np.ones((2, 2, 4, D), np.float32)
    with pytest.raises(ValueError, match="cannot append 4 positions to a cache holding 5 of capacity 8"):
        cache.append(k, k)
    assert cache.length == 5
    np.testing.assert_array_equal(cache.k, before_k)
    np.testing.assert_array_equal(cache.v, before_v)
    assert (cache._k[:, :, 5:] != 1).any()  # not even the part that would have fit


BAD_APPENDS = [
    (lambda k: (k.astype(np.float64), k), TypeError, "k must be float32, float16 or bfloat16, got float64"),
    (lambda k: (k, k.astype(np.float16)), TypeError, "v must be float32 like the cache, got float16"),
    (lambda k: (k[0], k[0]), ValueError, "k must have rank 4"),
    (lambda k: (k, k[:, :, :1]), ValueError, "k and v must have the same shape"),
    (lambda k: (k[:, :1], k[:, :1]), ValueError, "must have shape (batch=2, kv_heads=2, n, head_dim=32)"),
    (lambda k: (k[..., :16], k[..., :16]), ValueError, "head_dim=32"),
    (lambda k: (k.tolist(), k), TypeError, "k must be an array"),
]


@pytest.mark.parametrize("mutate,error,message", BAD_APPENDS, ids=[m[2][:30] for m in BAD_APPENDS])
def test_bad_appends(mutate, error, message):
    cache = _cache_with(5)
    k = np.zeros((2, 2, 2, D), np.float32)
    with pytest.raises(error, match=_literal(message)):
        cache.append(*mutate(k))
    assert cache.length == 5


BAD_ATTENDS = [
    (dict(q=np.zeros((1, 4, 1, D), np.float32)), ValueError, "q has batch 1, the cache 2"),
    (dict(q=np.zeros((2, 4, 1, 16), np.float32)), ValueError, "q has head_dim 16, the cache 32"),
    (dict(q=np.zeros((2, 3, 1, D), np.float32)), ValueError, "q has heads=3, not a multiple of the cache's kv_heads=2"),
    (dict(q=np.zeros((2, 4, 1, D), np.float64)), TypeError, "q must be float32, float16 or bfloat16, got float64"),
    (dict(q=np.zeros((2, 4, 6, D), np.float32)), ValueError, "n_q=6 query positions but the cache holds 5"),
    (dict(window=0), ValueError, "window must be >= 1, got 0"),
    (dict(window=4, causal=False), ValueError, "window=4 needs causal=True"),
    (dict(variant="flsh"), ValueError, "unknown variant 'flsh'"),
    (dict(variant="topk"), ValueError, "variant 'topk' needs top_k=..."),
    (dict(variant="topk", topk=3), TypeError, "unexpected keyword arguments ['topk']"),
    (dict(schedule="fast"), ValueError, "unknown schedule 'fast'"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD_ATTENDS, ids=[b[2][:30] for b in BAD_ATTENDS])
def test_bad_attends(kwargs, error, message):
    cache = _cache_with(5)
    q = kwargs.pop("q", np.zeros((2, 4, 1, D), np.float32))
    with pytest.raises(error, match=_literal(message)):
        cache.attend(q, **kwargs)
    assert cache.length == 5


def test_attend_on_an_empty_cache_and_bad_construction():
    cache = tvm_attn.KVCache(batch=1, kv_heads=1, head_dim=8, capacity=4)
    with pytest.raises(ValueError, match="the cache is empty"):
        cache.attend(np.zeros((1, 1, 1, 8), np.float32))
    with pytest.raises(ValueError, match="capacity must be >= 1, got 0"):
        tvm_attn.KVCache(batch=1, kv_heads=1, head_dim=8, capacity=0)
    with pytest.raises(TypeError, match="kv_heads must be an int, got 2.5"):
        tvm_attn.KVCache(batch=1, kv_heads=2.5, head_dim=8, capacity=4)
    with pytest.raises(TypeError, match="dtype must be one of float32, float16, bfloat16, int8, got .int4."):
        tvm_attn.KVCache(batch=1, kv_heads=1, head_dim=8, capacity=4, dtype="int4")


def _literal(message: str) -> str:
    import re
    return re.escape(message)
