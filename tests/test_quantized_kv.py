"""Integer KV caches: the int8 format (codes and a scale per row) and KVCache(dtype="int8") through every variant,
against the float64 reference over the dequantized K and V (what the cache stores), and bad input refused."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import tvm_attn
from conftest import assert_matches_reference, knobs_for
from tvm_attn import quantized_kv
from tvm_attn.kernel import Kernel


def _rows(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def test_quantize_rounds_each_row_to_its_scale():
    rng = np.random.default_rng(0)
    x = _rows(rng, 3, 2, 50, 40) * rng.uniform(0.01, 100, (3, 2, 50, 1)).astype(np.float32)
    codes, scales = quantized_kv.quantize(x)
    assert codes.dtype == np.int8 and scales.dtype == np.float32 and scales.shape == x.shape[:-1]
    assert np.abs(codes).max() == quantized_kv.LEVELS  # every row's largest element maps to +-127
    np.testing.assert_allclose(scales, np.abs(x).max(-1) / quantized_kv.LEVELS, rtol=1e-7)
    error = np.abs(quantized_kv.dequantize(codes, scales) - x)
    assert (error <= scales[..., None] * (0.5 + 1e-5)).all()  # half a step, float32 rounding aside


def test_key_codes_in_blocks_of_positions():
    """K's codes go into blocks of KEY_BLOCK positions (dimension-major) and come back by position, across block
    edges and from any start."""
    rng = np.random.default_rng(2)
    block = quantized_kv.KEY_BLOCK
    codes = rng.integers(-127, 128, (2, 3, 3 * block + 31, 8)).astype(np.int8)
    blocks = np.zeros((2, 3, 4, 8, block), np.int8)
    start = 0
    for n in (37, 1, block + 26, 30, block + 1):  # appends that start and end mid-block: 3 * block + 31
        quantized_kv.write_key_codes(blocks, codes[:, :, start:start + n], start)
        start += n
    np.testing.assert_array_equal(quantized_kv.key_codes(blocks, 0, start), codes)
    np.testing.assert_array_equal(quantized_kv.key_codes(blocks, block + 3, 2 * block + 1),
                                  codes[:, :, block + 3:2 * block + 1])
    np.testing.assert_array_equal(blocks[0, 1, 1, :, 5], codes[0, 1, block + 5])


def test_quantize_zero_and_non_finite_rows():
    x = np.zeros((4, 8), np.float32)
    x[1, 3] = np.nan
    x[2, 0] = np.inf
    x[3] = 1.0
    codes, scales = quantized_kv.quantize(x)
    assert (codes[:3] == 0).all() and scales[0] == 0
    back = quantized_kv.dequantize(codes, scales)
    assert (back[0] == 0).all() and np.isnan(back[1]).all() and np.isnan(back[2]).all()
    np.testing.assert_array_equal(back[3], 1.0)


# (heads, kv_heads, head_dim, prefill, decode steps, window): GQA, MHA and MQA; head_dims that fill no 16-lane step
# (40, 72); prefills that fill no 128-key tile.
LOOPS = [(8, 2, 64, 300, 3, None), (4, 4, 40, 37, 2, None), (6, 1, 72, 200, 2, 50), (4, 2, 64, 1, 3, None)]


# flash over every loop, the other variants over one each
INT8_LOOPS = [("flash", *loop) for loop in LOOPS] + [
    (variant, *LOOPS[n % len(LOOPS)]) for n, variant in enumerate(("standard", "mqa", "topk", "threshold", "mass"))]


@pytest.mark.parametrize("variant,heads,kv_heads,head_dim,prefill,steps,window", INT8_LOOPS, ids=str)
def test_prefill_then_decode_through_an_int8_cache(variant, heads, kv_heads, head_dim, prefill, steps, window):
    """Each call equals the float64 reference over the cache's dequantized K and V: decode calls of the dense
    variants read the codes, the others dequantize."""
    knobs = knobs_for(variant)[0]
    rng = np.random.default_rng(heads + prefill)
    total = prefill + steps
    q_all = _rows(rng, 2, heads, total, head_dim, scale=2.0 if knobs else 1.0)
    k_all, v_all = _rows(rng, 2, kv_heads, total, head_dim), _rows(rng, 2, kv_heads, total, head_dim, scale=3.0)
    cache = tvm_attn.KVCache(batch=2, kv_heads=kv_heads, head_dim=head_dim, capacity=total + 5, dtype="int8")
    for start, end in [(0, prefill)] + [(prefill + s, prefill + s + 1) for s in range(steps)]:
        cache.append(k_all[:, :, start:end], v_all[:, :, start:end])
        q = q_all[:, :, start:end]
        out = cache.attend(q, variant=variant, window=window, **knobs)
        k, v = cache.dequantized()
        spec = tvm_attn.AttentionSpec(batch=2, heads=heads, kv_heads=kv_heads, seq_q=end - start, seq_kv=end,
                                      head_dim=head_dim, causal=True, window=window, **knobs)
        assert_matches_reference(variant, spec, out, q, k, v)


def test_dense_decode_reads_the_codes():
    """A dense decode call runs the kernel reading int8 codes and scales (no dequantized copy); a prefill-sized one
    the float32 kernel."""
    rng = np.random.default_rng(3)
    cache = tvm_attn.KVCache(batch=1, kv_heads=2, head_dim=64, capacity=300, dtype="int8")
    cache.append(_rows(rng, 1, 2, 300, 64), _rows(rng, 1, 2, 300, 64))
    for n_q in (1, 8, 9):
        cache.attend(_rows(rng, 1, 4, n_q, 64))
    assert sorted((k.kernel_spec.kv_dtype or "-", k.path) for k in cache._kernels.values()) == [
        ("-", "prefill"), ("int8", "decode")]


def test_padded_batch_through_an_int8_cache():
    rng = np.random.default_rng(4)
    length = 90
    k, v = _rows(rng, 3, 2, length, 64), _rows(rng, 3, 2, length, 64)
    q = _rows(rng, 3, 4, 1, 64)
    mask = np.ones((3, length), np.int64)
    mask[0, :30] = 0  # left padding
    mask[2, :1] = 0
    cache = tvm_attn.KVCache(batch=3, kv_heads=2, head_dim=64, capacity=length, dtype="int8")
    cache.append(k, v)
    out = cache.attend(q, attention_mask=mask)
    dk, dv = cache.dequantized()
    for row, first in enumerate((30, 0, 1)):
        spec = tvm_attn.AttentionSpec(batch=1, heads=4, kv_heads=2, seq_q=1, seq_kv=length - first, head_dim=64,
                                      causal=True)
        assert_matches_reference("flash", spec, out[row:row + 1], q[row:row + 1], dk[row:row + 1, :, first:],
                                 dv[row:row + 1, :, first:])


def test_int8_cache_bytes_and_accessors():
    cache = tvm_attn.KVCache(batch=1, kv_heads=2, head_dim=64, capacity=10, dtype="int8")
    cache.append(np.ones((1, 2, 3, 64), np.float32), np.full((1, 2, 3, 64), -2.0, np.float32))
    assert cache.k.dtype == np.int8 and cache.k.shape == (1, 2, 3, 64)
    k_scale, v_scale = cache.scales
    assert k_scale.shape == v_scale.shape == (1, 2, 3)
    k, v = cache.dequantized()
    np.testing.assert_array_equal(k, 1.0)
    np.testing.assert_array_equal(v, -2.0)
    cache.truncate(1)
    assert cache.dequantized()[0].shape == (1, 2, 1, 64)
    with pytest.raises(AttributeError, match="no scales"):
        tvm_attn.KVCache(batch=1, kv_heads=1, head_dim=8, capacity=4).scales


def test_bad_input_to_an_int8_cache():
    cache = tvm_attn.KVCache(batch=1, kv_heads=2, head_dim=32, capacity=8, dtype="int8")
    with pytest.raises(TypeError, match="k must be float32"):
        cache.append(np.zeros((1, 2, 1, 32), np.int8), np.zeros((1, 2, 1, 32), np.int8))
    with pytest.raises(TypeError, match="k must be float32"):
        cache.append(np.zeros((1, 2, 1, 32), np.float16), np.zeros((1, 2, 1, 32), np.float16))
    cache.append(np.ones((1, 2, 4, 32), np.float32), np.ones((1, 2, 4, 32), np.float32))
    with pytest.raises(ValueError, match="cannot append 5 positions"):
        cache.append(np.ones((1, 2, 5, 32), np.float32), np.ones((1, 2, 5, 32), np.float32))
    assert cache.length == 4
    with pytest.raises(ValueError, match="shadow of K, and an int8 cache has none"):
        cache.attend(np.ones((1, 2, 1, 32), np.float32), variant="bounded", eps=0.1)
    with pytest.raises(ValueError, match="shadow=True"):
        tvm_attn.KVCache(batch=1, kv_heads=2, head_dim=32, capacity=8, dtype="int8", shadow=True)
    with pytest.raises(TypeError, match="dtype must be one of"):
        tvm_attn.KVCache(batch=1, kv_heads=2, head_dim=32, capacity=8, dtype="int4")
    with pytest.raises(TypeError, match="kv_dtype must be None"):
        tvm_attn.AttentionSpec(kv_dtype="uint8")


def test_integer_kernels_are_refused_where_they_do_not_exist():
    spec = tvm_attn.AttentionSpec(batch=1, heads=4, kv_heads=2, seq_q=1, seq_kv=64, head_dim=32, causal=True,
                                  kv_dtype="int8")
    kernel = tvm_attn.build("flash", spec)
    assert isinstance(kernel, Kernel) and kernel.kernel_spec.kv_dtype == "int8"
    q = np.zeros((1, 4, 1, 32), np.float32)
    with pytest.raises(TypeError, match="KVCache\\(dtype='int8'\\)"):
        kernel(q, np.zeros((1, 2, 64, 32), np.float32), np.zeros((1, 2, 64, 32), np.float32))
    with pytest.raises(ValueError, match="prefill kernel reads float K and V"):
        tvm_attn.build("flash", dataclasses.replace(spec, seq_q=64))
    with pytest.raises(ValueError, match="decode kernel reads float K and V"):
        tvm_attn.build("topk", dataclasses.replace(spec, top_k=4))
    with pytest.raises(LookupError, match="not tuned"):
        tvm_attn.build("flash", spec, schedule="tuned")


def test_byte_products_where_the_target_has_them():
    """The int8 decode kernel computes in NEON sdot byte products on Apple M (head_dim whole words of 4, up to 512)
    and widens the codes on x86; a compute asked for byte products it cannot do refuses, naming why."""
    from tvm_attn.variants import decode

    flash = tvm_attn.get_variant("flash")
    spec = tvm_attn.AttentionSpec(batch=1, heads=4, kv_heads=2, seq_q=1, seq_kv=64, head_dim=36, kv_dtype="int8")
    assert flash.computes_in_byte_products("decode", spec.kernel, "apple-m1")
    # P V too where head_dim is whole 16-dim interleaves of V's codes
    assert "pv_bytes" not in decode.compute(spec.kernel, byte_products=True).script()
    assert "pv_bytes" in decode.compute(dataclasses.replace(spec, head_dim=48).kernel, byte_products=True).script()
    for target in ({"kind": "llvm", "mtriple": "x86_64-pc-linux-gnu", "mcpu": "znver4"},
                   {"kind": "llvm", "mtriple": "x86_64-pc-linux-gnu", "mcpu": "x86-64-v3"}):
        assert not flash.computes_in_byte_products("decode", spec.kernel, target)
    for head_dim in (34, 516):
        wide = dataclasses.replace(spec, head_dim=head_dim)
        assert not flash.computes_in_byte_products("decode", wide.kernel, "apple-m1")
        with pytest.raises(ValueError, match=f"head_dim={head_dim}"):
            decode.compute(wide.kernel, byte_products=True)
    with pytest.raises(ValueError, match="kv_dtype=None"):
        decode.compute(dataclasses.replace(spec, kv_dtype=None).kernel, byte_products=True)
