"""float16 products (NEON fmlal / fmlal2): which kernels compute with them on which targets and that their
micro-kernels fit the registers. They run against the float64 reference under emulation (tests/test_arm64.py)."""

from __future__ import annotations

import dataclasses

import pytest

import tvm_attn
from tvm_attn.bench.asm_loops import micro_kernel_loops
from tvm_attn.variants import decode, uses_float16_products

DECODE = tvm_attn.AttentionSpec(batch=1, heads=8, kv_heads=2, seq_q=1, seq_kv=64, head_dim=128, dtype="float16")
WITH = ("apple-m1", "apple-m2", "apple-m3", "apple-m4",
        {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "neoverse-v2"})
WITHOUT = {  # targets whose float16 kernels widen to float32
    "avx512-fp16": {"kind": "llvm", "mtriple": "x86_64-pc-linux-gnu", "mcpu": "sapphirerapids"},  # no f16 -> f32 FMA
    "avx2": {"kind": "llvm", "mtriple": "x86_64-pc-linux-gnu", "mcpu": "x86-64-v3"},
    "armv8.0": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72"},  # no FEAT_FHM
}


def _asm(variant, spec, target):
    return tvm_attn.build(variant, spec, target=target, schedule="hand").executable.mod.inspect_source("asm")


@pytest.mark.parametrize("target", WITH, ids=str)
@pytest.mark.parametrize("variant", ["flash", "mqa", "standard"])
def test_float16_decode_multiplies_in_fmlal_without_spilling(target, variant):
    asm = _asm(variant, DECODE, target)
    assert "fmlal" in asm and "fmlal2" in asm
    loops = micro_kernel_loops(asm)
    products = [loop for loop in loops if any("fmlal" in i for i in loop.instructions)]
    assert products, "no micro-kernel loop multiplies in fmlal"
    spilling = [(loop.fmas, loop.stack_stores) for loop in loops if loop.stack_stores]
    assert not spilling, f"micro-kernel loops (FMAs, stack stores) spill: {spilling}"
    # q is kept in float16 and K is read as stored: the QK^T loop converts nothing
    assert not [i for loop in products for i in loop.instructions if i.startswith("fcvt")]


@pytest.mark.parametrize("target", WITHOUT)
def test_targets_without_them_widen(target):
    assert not uses_float16_products(DECODE.kernel, WITHOUT[target])
    assert "fmlal" not in _asm("flash", DECODE, WITHOUT[target])


def test_prefill_other_dtypes_and_head_dims_widen():
    assert "fmlal" not in _asm("flash", dataclasses.replace(DECODE, seq_q=64, seq_kv=64), "apple-m3")
    for spec in (dataclasses.replace(DECODE, dtype="bfloat16"), dataclasses.replace(DECODE, dtype="float32"),
                 dataclasses.replace(DECODE, head_dim=40)):  # head_dim not whole 16-lane steps
        assert not uses_float16_products(spec.kernel, "apple-m3")
    assert "fmlal" not in _asm("flash", dataclasses.replace(DECODE, head_dim=40), "apple-m3")


@pytest.mark.parametrize("dtype,head_dim", [("bfloat16", 64), ("float32", 64), ("float16", 40)])
def test_the_decode_compute_refuses_float16_products_it_cannot_do(dtype, head_dim):
    spec = dataclasses.replace(DECODE, dtype=dtype, head_dim=head_dim)
    with pytest.raises(ValueError, match=f"float16 products need float16 inputs.*{dtype} head_dim={head_dim}"):
        decode.compute(spec.kernel, float16_products=True)
