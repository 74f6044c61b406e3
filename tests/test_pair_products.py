"""bfloat16 pair products (AVX512-BF16 vdpbf16ps, NEON bfdot): which kernels compute with them on which targets,
that their micro-kernels fit the registers, and that they match the float64 reference (on a host that has the
instruction; the arm64 ones run under emulation in tests/test_arm64.py)."""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np
import pytest

import tvm_attn
from conftest import TREE_16, assert_matches_reference, make_inputs, pair_products_here, tolerance
from tvm_attn import references
from tvm_attn.bench.asm_loops import micro_kernel_loops
from tvm_attn.schedules.pair_products import has_pair_products
from tvm_attn.variants import uses_pair_products
from tvm_attn.targets import capabilities

AVX512_BF16 = {"kind": "llvm", "mtriple": "x86_64-pc-linux-gnu", "mcpu": "znver4"}
WITH = {"avx512-bf16": (AVX512_BF16, "vdpbf16ps"), "apple-m2": ("apple-m2", "bfdot"),
        "apple-m4": ("apple-m4", "bfdot")}
WITHOUT = {  # targets whose bfloat16 kernels widen to float32
    "avx2": {"kind": "llvm", "mtriple": "x86_64-pc-linux-gnu", "mcpu": "x86-64-v3"},
    "avx512 without bf16": {"kind": "llvm", "mtriple": "x86_64-pc-linux-gnu", "mcpu": "skylake-avx512"},
    "apple-m1": "apple-m1",  # no BF16
}
PREFILL = tvm_attn.AttentionSpec(batch=1, heads=8, kv_heads=2, seq_q=64, seq_kv=64, head_dim=64, causal=True,
                                 dtype="bfloat16")
DECODE = dataclasses.replace(PREFILL, seq_q=1, head_dim=128, causal=False)
TREE = dataclasses.replace(DECODE, seq_q=16, causal=True, tree_parents=TREE_16)  # the tree kernel
KERNELS = {"flash prefill": ("flash", PREFILL), "mqa prefill": ("mqa", PREFILL), "decode": ("flash", DECODE),
           "standard decode": ("standard", DECODE), "tree": ("flash", TREE)}
HOST_HAS_THEM = has_pair_products(capabilities("host"))


def _asm(variant, spec, target):
    return tvm_attn.build(variant, spec, target=target, schedule="hand").executable.mod.inspect_source("asm")


# The tree kernel's schedule is the same on every NEON target with BF16: compiled for one of them.
PAIRS = [(isa, kernel) for kernel in KERNELS for isa in WITH if not (kernel == "tree" and isa == "apple-m4")]


@pytest.mark.parametrize("isa,kernel", PAIRS)
def test_bfloat16_kernels_use_pair_products_where_the_target_has_them(isa, kernel):
    variant, spec = KERNELS[kernel]
    target, instruction = WITH[isa]
    asm = _asm(variant, spec, target)
    assert instruction in asm
    loops = micro_kernel_loops(asm)
    assert loops, f"no micro-kernel loop in the {kernel} kernel"
    spilling = [(loop.fmas, loop.stack_stores) for loop in loops if loop.stack_stores]
    assert not spilling, f"{kernel}: micro-kernel loops (FMAs, stack stores) spill: {spilling}"


@pytest.mark.parametrize("target", WITHOUT)
def test_targets_without_them_widen(target):
    assert not uses_pair_products(PREFILL.kernel, WITHOUT[target])
    asm = _asm("flash", PREFILL, WITHOUT[target])
    assert "vdpbf16ps" not in asm and "bfdot" not in asm


def test_other_dtypes_and_head_dims_widen():
    for spec in (dataclasses.replace(PREFILL, dtype="float32"), dataclasses.replace(PREFILL, dtype="float16"),
                 dataclasses.replace(PREFILL, head_dim=48)):  # head_dim not whole pairs of 16-lane vectors
        assert not uses_pair_products(spec.kernel, AVX512_BF16)
    assert "vdpbf16ps" not in _asm("flash", dataclasses.replace(PREFILL, head_dim=48), AVX512_BF16)


SHAPES = [  # (variant, heads, kv_heads, seq_q, seq_kv, head_dim, causal, window, scale)
    ("flash", 4, 4, 100, 300, 64, True, None, None),
    ("mqa", 8, 2, 77, 77, 128, True, None, None),
    ("flash", 2, 1, 200, 260, 32, True, 50, None),
    ("mqa", 4, 2, 130, 129, 64, False, None, -0.3),  # a negative scale: q's sign flipped, the max stays the max
    ("flash", 8, 2, 1, 1000, 128, False, None, None),  # decode
    ("flash", 4, 1, 3, 333, 64, True, None, -0.2),
    ("standard", 4, 4, 1, 129, 32, True, None, None),
]


@pytest.mark.skipif(not HOST_HAS_THEM, reason="this host has no AVX512-BF16")
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_pair_products_match_the_reference(shape):
    variant, heads, kv_heads, seq_q, seq_kv, head_dim, causal, window, scale = shape
    spec = tvm_attn.AttentionSpec(batch=2, heads=heads, kv_heads=kv_heads, seq_q=seq_q, seq_kv=seq_kv,
                                  head_dim=head_dim, causal=causal, window=window, scale=scale, dtype="bfloat16")
    assert pair_products_here(variant, spec)
    q, k, v = make_inputs(spec, seed=seq_kv)
    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    out = np.asarray(tvm_attn.build(variant, spec)(q.astype(ml_dtypes.bfloat16), k.astype(ml_dtypes.bfloat16),
                                                   v.astype(ml_dtypes.bfloat16)))
    assert_matches_reference(variant, spec, out, q, k, v)
    _assert_within_twice_the_naive_error(spec, out, q, k, v)


# (heads, kv_heads, nodes, cached keys, head_dim, scale, features): groups of 5 and 7 heads pad their row tiles to
# whole vectors of rows; 1500 and 2100 cached keys span two and three chunks of keys, merged by their scaled maxes.
TREE_SHAPES = [
    (10, 2, 16, 1500, 64, None, dict(sinks=True)),
    (7, 1, 16, 300, 128, -0.2, dict(softcap=20.0, sinks=True, alibi_slopes=tuple(0.3 / (h + 1) for h in range(7)))),
    (4, 4, 12, 2100, 32, None, dict(window=40)),
]


@pytest.mark.skipif(not HOST_HAS_THEM, reason="this host has no AVX512-BF16")
@pytest.mark.parametrize("shape", TREE_SHAPES, ids=str)
def test_the_tree_kernel_in_pair_products_matches_the_reference(shape):
    heads, kv_heads, nodes, cached, head_dim, scale, features = shape
    parents = TREE_16[:nodes]
    spec = tvm_attn.AttentionSpec(batch=2, heads=heads, kv_heads=kv_heads, seq_q=nodes, seq_kv=cached + nodes,
                                  head_dim=head_dim, causal=True, scale=scale, dtype="bfloat16",
                                  tree_parents=parents, **features)
    kernel = tvm_attn.build("flash", spec)
    assert kernel.path == "tree" and pair_products_here("flash", spec)
    q, k, v = make_inputs(spec, seed=cached)
    sinks = np.linspace(-2.0, 3.0, heads).astype(np.float32) if spec.sinks else None
    out = np.asarray(kernel(q, k, v, sinks=sinks, tree_parents=parents))
    assert_matches_reference("flash", spec, out, q, k, v, sinks=sinks)
    if sinks is None:  # (the naive implementation has no sinks)
        _assert_within_twice_the_naive_error(spec, out, *(x.astype(np.float64) for x in (q, k, v)))


def _assert_within_twice_the_naive_error(spec, out, q, k, v) -> None:
    """FlashAttention's test: ``out`` misses the float64 reference by no more than twice what a naive implementation
    of the same precision (weights rounded to bfloat16 against the row max, output rounded to bfloat16) does."""
    ref = references.dense(spec, q, k, v)
    naive = _rounded_weights_attention(spec, q, k, v).astype(ml_dtypes.bfloat16).astype(np.float64)
    error, naive_error = np.abs(out.astype(np.float64) - ref).max(), np.abs(naive - ref).max()
    assert error <= 2 * naive_error + tolerance(spec), (error, naive_error)


def _rounded_weights_attention(spec, q, k, v) -> np.ndarray:
    weights = references.softmax_weights(spec, references.scores(spec, q, k))
    top = weights.max(axis=-1, keepdims=True)
    rounded = (weights / np.where(top > 0, top, 1)).astype(ml_dtypes.bfloat16).astype(np.float64)
    total = rounded.sum(axis=-1, keepdims=True)
    return (rounded / np.where(total > 0, total, 1)) @ np.repeat(v, spec.group_size, axis=1)
