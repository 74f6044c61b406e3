"""The public API: caching, awkward memory layouts, targets, the registry."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import tvm_attn
from conftest import make_inputs, tolerance


def test_registry_has_the_variants():
    assert set(tvm_attn.VARIANTS) == {"standard", "flash", "mqa", "threshold", "topk", "mass",
                                     "bounded"}
    for name, variant in tvm_attn.VARIANTS.items():
        assert variant.name == name and callable(variant.compute) and callable(variant.schedule)


def test_kernels_are_cached_per_spec():
    spec = tvm_attn.AttentionSpec(batch=1, heads=2, seq_q=9, head_dim=16)
    assert tvm_attn.build("flash", spec) is tvm_attn.build("flash", spec)
    assert tvm_attn.build("flash", spec) is not tvm_attn.build("flash", spec, schedule="untuned")


def test_identical_modules_compile_once():
    """standard, flash and mqa share their decode kernel: it compiles once; a different kernel still compiles."""
    spec = tvm_attn.AttentionSpec(batch=2, heads=4, kv_heads=2, seq_q=1, seq_kv=37, head_dim=24, causal=True)
    before = tvm_attn.compile_count()
    kernels = [tvm_attn.build(variant, spec, schedule="hand") for variant in ("standard", "flash", "mqa")]
    assert tvm_attn.compile_count() == before + 1
    assert {k.variant for k in kernels} == {"standard", "flash", "mqa"}
    assert all(k.executable is kernels[0].executable for k in kernels)
    q, k, v = make_inputs(spec)
    for kernel in kernels:
        np.testing.assert_array_equal(kernel(q, k, v), kernels[0](q, k, v))
    windowed = tvm_attn.build("flash", dataclasses.replace(spec, window=16), schedule="hand")
    assert tvm_attn.compile_count() == before + 2 and windowed.executable is not kernels[0].executable


def test_spec_defaults_are_the_seeds():
    spec = tvm_attn.AttentionSpec()
    assert (spec.batch, spec.heads, spec.kv_heads, spec.head_dim) == (2, 8, 8, 64)
    assert spec.seq_kv == spec.seq_q and spec.scale == pytest.approx(64 ** -0.5)


def test_non_contiguous_and_unaligned_inputs():
    spec = tvm_attn.AttentionSpec(batch=1, heads=4, kv_heads=2, seq_q=33, seq_kv=40, head_dim=32)
    q, k, v = make_inputs(spec)
    ref = tvm_attn.reference(q, k, v)
    # A transposed view (non-contiguous) and a view starting 4 bytes into a buffer (not 64-byte aligned).
    q_t = np.ascontiguousarray(q.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    raw = np.empty(k.size + 1, np.float32)
    k_unaligned = raw[1:].reshape(k.shape)
    k_unaligned[...] = k
    assert not q_t.flags.c_contiguous and k_unaligned.ctypes.data % 64 != 0
    out = tvm_attn.attention(q_t, k_unaligned, v[:, :, ::1])
    np.testing.assert_allclose(out, ref, rtol=tolerance(spec), atol=tolerance(spec))


def test_scale_is_honoured():
    spec = tvm_attn.AttentionSpec(batch=1, heads=2, seq_q=8, head_dim=16, scale=0.5)
    q, k, v = make_inputs(spec)
    out = tvm_attn.attention(q, k, v, scale=0.5)
    np.testing.assert_allclose(out, tvm_attn.reference(q, k, v, scale=0.5), rtol=tolerance(spec),
                               atol=tolerance(spec))
    assert not np.allclose(out, tvm_attn.reference(q, k, v), atol=1e-3)


@pytest.mark.parametrize("variant", list(tvm_attn.VARIANTS))
def test_every_variant_compiles_for_apple_m3(variant):
    knobs = {"threshold": {"threshold": 0.01}, "topk": {"top_k": 8}, "mass": {"eps": 0.05},
             "bounded": {"eps": 0.05}}.get(variant, {})
    spec = tvm_attn.AttentionSpec(batch=1, heads=4, kv_heads=2, seq_q=33, seq_kv=70, head_dim=64, causal=True,
                                  **knobs)
    kernel = tvm_attn.build(variant, spec, target="apple-m3")
    asm = kernel.executable.mod.inspect_source("asm")
    assert "fmla" in asm  # NEON fused multiply-add
    q, k, v = make_inputs(spec)
    with pytest.raises(RuntimeError, match="built for arm64-apple-macos-apple-m3"):
        kernel(q, k, v)


def test_targets():
    assert tvm_attn.target_key("apple-m3") == "arm64-apple-macos-apple-m3"
    dict_target = tvm_attn.resolve_target({"kind": "llvm", "mtriple": "arm64-apple-macos", "mcpu": "apple-m1"})
    assert tvm_attn.target_key(dict_target) == "arm64-apple-macos-apple-m1"
