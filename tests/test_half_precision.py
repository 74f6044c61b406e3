"""float16 and bfloat16 q, k, v: every variant, the cache and export, against the float64 reference computed on the
same 16-bit inputs (tolerances: conftest.output_tolerance)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import tvm_attn
from conftest import DTYPES_16, assert_matches_reference, knobs_for, make_inputs
from tvm_attn import export, runtime
from tvm_attn.runtime import numpy_dtype
from tvm_attn.spec import DTYPE_TAGS

# (seq_q, seq_kv, causal, kv_heads, head_dim, window): decode and prefill, GQA/MQA, odd lengths and head_dims.
GRID = [
    (1, 33, True, 2, 80, None),
    (3, 300, True, 1, 64, 100),
    (7, 100, False, 4, 32, None),
    (100, 256, True, 2, 64, None),
    (128, 1, False, 2, 32, None),
    (70, 200, True, 4, 32, 50),
]


def _spec(variant, sq, skv, causal, kvh, d, window=None, dtype="float16", batch=2):
    return tvm_attn.AttentionSpec(batch=batch, heads=4, kv_heads=kvh, seq_q=sq, seq_kv=skv, head_dim=d, causal=causal,
                                  window=window, dtype=dtype, **knobs_for(variant)[0])


def _knobs(spec):
    return dict(causal=spec.causal, window=spec.window, **spec.knobs())


# Every kernel's 16-bit loads and stores are the widen() and narrow() all variants share, and each shape is a compile
# of its own: the dense variants take the whole grid in both dtypes, the pruned ones alternate shapes between
# float16 and bfloat16, and bounded (~3 s a compile) takes three (decode windowed, prefill causal, non-causal: the
# kernel test_torch reuses).
CASES = [(variant, dtype, shape) for variant in tvm_attn.VARIANTS for dtype in DTYPES_16
         for n, shape in enumerate(GRID)
         if variant in ("standard", "flash", "mqa")
         or (variant == "bounded" and n in (1, 3, 4))
         or (variant != "bounded" and n % 2 == DTYPES_16.index(dtype))]


@pytest.mark.parametrize("variant,dtype,shape", CASES, ids=str)
def test_matches_reference(variant, dtype, shape):
    spec = _spec(variant, *shape, dtype=dtype)
    q, k, v = make_inputs(spec, q_scale=2.0 if tvm_attn.get_variant(variant).knob else 1.0)
    out = tvm_attn.attention(q, k, v, variant=variant, **_knobs(spec))
    assert_matches_reference(variant, spec, out, q, k, v)


@pytest.mark.parametrize("dtype", DTYPES_16)
def test_selection_uses_float32_scores(dtype):
    """Key 1 scores 1 + 2^-10, key 0 scores 1: equal once rounded to 16 bits (ties go to the first key), so top-1
    picks key 1 only if the kernel selects on the float32 scores."""
    np_dtype = numpy_dtype(dtype)
    q = np.zeros((1, 1, 1, 16), np_dtype)
    q[..., :2] = 1
    k = np.zeros((1, 1, 2, 16), np_dtype)
    k[0, 0, :, 0] = 1
    k[0, 0, 1, 1] = 2.0**-10
    v = np.zeros((1, 1, 2, 16), np_dtype)
    v[0, 0, 1] = 1
    for seq_q in (1, 9):  # the decode and the prefill kernel
        qs = np.repeat(q, seq_q, axis=2)
        out = tvm_attn.attention(qs, k, v, variant="topk", top_k=1, scale=1.0)
        np.testing.assert_array_equal(out.astype(np.float32), np.ones((1, 1, seq_q, 16), np.float32))


@pytest.mark.parametrize("dtype", DTYPES_16)
@pytest.mark.parametrize("variant", ["flash", "mqa", "topk", "mass"])
def test_cache_decode_loop(variant, dtype):
    """Prefill 20 positions, then decode 40 one at a time through a 16-bit cache: each step matches the reference
    on the cache's contents, and no step compiles a kernel."""
    spec = _spec(variant, 1, 60, True, 2, 64, dtype=dtype, batch=1)
    q, k, v = make_inputs(spec, seed=5, q_scale=2.0)
    queries = make_inputs(_spec(variant, 60, 60, True, 2, 64, dtype=dtype, batch=1), seed=6, q_scale=2.0)[0]
    cache = tvm_attn.KVCache(batch=1, kv_heads=2, head_dim=64, capacity=64, dtype=dtype)
    knobs = spec.knobs()
    cache.append(k[:, :, :20], v[:, :, :20])
    cache.attend(queries[:, :, :20], variant=variant, **knobs)
    cache.append(k[:, :, 20:21], v[:, :, 20:21])
    cache.attend(queries[:, :, 20:21], variant=variant, **knobs)
    compiled = tvm_attn.compile_count()
    for n in range(21, 60):
        cache.append(k[:, :, n:n + 1], v[:, :, n:n + 1])
        out = cache.attend(queries[:, :, n:n + 1], variant=variant, **knobs)
        step = dataclasses.replace(spec, seq_q=1, seq_kv=n + 1)
        assert_matches_reference(variant, step, out, queries[:, :, n:n + 1], cache.k, cache.v)
    assert tvm_attn.compile_count() == compiled
    assert cache.k.dtype == numpy_dtype(dtype) and cache.k.shape == (1, 2, 60, 64)
    np.testing.assert_array_equal(cache.k.view(np.uint16), k.view(np.uint16))


@pytest.mark.parametrize("dtype", DTYPES_16)
def test_kernel_reads_strided_16_bit_views_in_place(dtype):
    spec = _spec("flash", 1, 50, True, 2, 32, dtype=dtype, batch=1)
    q, k, v = make_inputs(spec)
    k_buf = np.zeros((1, 2, 80, 32), k.dtype)
    v_raw = np.zeros(v.size + 1, v.dtype)
    v_odd = v_raw[1:].reshape(v.shape)  # 2 bytes past an aligned address: element alignment only
    k_buf[:, :, :50], v_odd[...] = k, v
    assert v_odd.ctypes.data % 4 == 2
    out = tvm_attn.attention(q, k_buf[:, :, :50], v_odd, causal=True)
    assert_matches_reference("flash", spec, out, q, k, v)


@pytest.mark.parametrize("make, message", [
    (lambda q, k, v: (q.astype(np.float32), k, v), "k is float16 but q is float32"),
    (lambda q, k, v: (q, k, v.astype(numpy_dtype("bfloat16"))), "v is bfloat16 but q is float16"),
    (lambda q, k, v: (q.astype(np.float64), k, v), "q must be float32, float16 or bfloat16, got float64"),
    (lambda q, k, v: (q, k.astype(np.int16), v), "k must be float32, float16 or bfloat16, got int16"),
])
def test_mixed_and_unsupported_dtypes_are_refused(make, message):
    q, k, v = make_inputs(_spec("flash", 3, 5, False, 2, 16))
    with pytest.raises(TypeError, match=message):
        tvm_attn.attention(*make(q, k, v))


def test_cache_refuses_other_dtypes():
    cache = tvm_attn.KVCache(batch=1, kv_heads=1, head_dim=8, capacity=4, dtype="bfloat16")
    k = np.zeros((1, 1, 2, 8), np.float16)
    with pytest.raises(TypeError, match="k must be bfloat16 like the cache, got float16"):
        cache.append(k, k)
    assert cache.length == 0
    cache.append(k.astype(numpy_dtype("bfloat16")), k.astype(numpy_dtype("bfloat16")))
    with pytest.raises(TypeError, match="q must be bfloat16 like the cache, got float32"):
        cache.attend(np.zeros((1, 2, 1, 8), np.float32))
    with pytest.raises(TypeError, match="dtype must be one of float32, float16, bfloat16, int8, got 'float64'"):
        tvm_attn.KVCache(batch=1, kv_heads=1, head_dim=8, capacity=4, dtype="float64")


@pytest.mark.parametrize("dtype", DTYPES_16)
def test_export_and_load(tmp_path, dtype):
    spec = _spec("flash", 19, 19, True, 2, 32, dtype=dtype, batch=1)
    result = export.export("flash", spec, "host", tmp_path)
    manifest = json.loads(result.manifest.read_text())
    assert manifest["semantics"]["dtype"] == dtype
    assert {a["dtype"] for a in manifest["arguments"]} == {dtype}
    assert result.name.endswith(f"_{DTYPE_TAGS[dtype]}_{tvm_attn.target_key('host')}")
    kernel = runtime.load(result.library)
    q, k, v = make_inputs(spec, seed=2)
    assert_matches_reference("flash", spec, kernel(q, k, v), q, k, v)
    with pytest.raises(TypeError, match=f"q is float32, kernel {result.name} takes {dtype}"):
        kernel(q.astype(np.float32), k, v)


@pytest.mark.parametrize("dtype", DTYPES_16)
def test_exported_kernel_takes_torch_tensors(tmp_path, dtype):
    torch = pytest.importorskip("torch")
    spec = _spec("flash", 5, 5, False, 2, 16, dtype=dtype, batch=1)
    kernel = runtime.load(export.export("flash", spec, "host", tmp_path).library)
    q, k, v = make_inputs(spec, seed=1)
    tq, tk, tv = (torch.from_numpy(x.astype(np.float32)).to(getattr(torch, dtype)) for x in (q, k, v))
    out = kernel(tq, tk, tv)
    assert isinstance(out, torch.Tensor) and out.dtype == getattr(torch, dtype)
    assert_matches_reference("flash", spec, out.float().numpy().astype(numpy_dtype(dtype)), q, k, v)
