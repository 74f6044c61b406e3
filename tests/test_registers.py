"""The register budget: the hand schedules' micro-kernels fit the vector registers of every ISA they are built for.

For an AVX2 target (16 x 256-bit), an AVX-512 one (32 x 512-bit) and Apple M1..M4 (NEON, 32 x 128-bit), each dense
kernel is compiled, its micro-kernel loops found in the assembly (innermost loops with 8 or more vector FMAs), and
any vector register stored to the stack inside them fails the test.
"""

from __future__ import annotations

import dataclasses
import os

import pytest

import tvm_attn
from tvm_attn.bench.asm_loops import micro_kernel_loops
from tvm_attn.targets import capabilities

ISA_TARGETS = {
    "avx2": {"kind": "llvm", "mtriple": "x86_64-pc-linux-gnu", "mcpu": "x86-64-v3"},
    "avx512": {"kind": "llvm", "mtriple": "x86_64-pc-linux-gnu", "mcpu": "znver4"},
    **{f"apple-m{n}": f"apple-m{n}" for n in (1, 2, 3, 4)},
}
PREFILL = tvm_attn.AttentionSpec(batch=1, heads=8, kv_heads=2, seq_q=64, seq_kv=64, head_dim=64, causal=True)
DECODE = tvm_attn.AttentionSpec(batch=1, heads=8, kv_heads=2, seq_q=1, seq_kv=64, head_dim=128)
DECODE_INT8 = dataclasses.replace(DECODE, kv_dtype="int8")  # codes widened (x86) or in byte products (NEON)
KERNELS = {
    "flash": ("flash", PREFILL), "mqa": ("mqa", PREFILL), "standard": ("standard", PREFILL),
    "topk": ("topk", dataclasses.replace(PREFILL, top_k=8)), "decode": ("flash", DECODE),
    "decode-int8": ("flash", DECODE_INT8),
}


@pytest.mark.parametrize("isa", ISA_TARGETS)
@pytest.mark.parametrize("kernel", KERNELS)
def test_micro_kernels_do_not_spill(isa, kernel):
    variant, spec = KERNELS[kernel]
    asm = tvm_attn.build(variant, spec, target=ISA_TARGETS[isa], schedule="hand").executable.mod.inspect_source("asm")
    loops = micro_kernel_loops(asm)
    assert loops, f"no micro-kernel loop found in the {kernel} kernel for {isa}"
    spilling = [(loop.fmas, loop.stack_stores) for loop in loops if loop.stack_stores]
    assert not spilling, f"{kernel} for {isa}: micro-kernel loops (FMAs, stack stores) spill: {spilling}"


def test_avx2_integer_values_are_widened_once_for_the_group():
    """With 16 registers the int8 decode kernel's micro-kernels take the group's 4 rows: each widened vector of K's
    or V's codes feeds 4 FMAs (P V over 1 row and 8 vectors fed 1)."""
    asm = tvm_attn.build("flash", DECODE_INT8, target=ISA_TARGETS["avx2"], schedule="hand").executable.mod \
        .inspect_source("asm")
    loops = micro_kernel_loops(asm)
    ratios = [loop.fmas / n for loop in loops if (n := sum("vcvtdq2ps" in i for i in loop.instructions))]
    assert len(ratios) == 2 and min(ratios) >= 4, ratios


@pytest.mark.parametrize("isa", ["apple-m1", "apple-m4"])
def test_neon_integer_keys_and_values_in_byte_products(isa):
    """On NEON the int8 decode kernel's micro-kernels are sdot loops of 2 rows x 3 digits x 4 vectors (q K and P V;
    LLVM versions some of them), besides P V's float loop for the tile reaching past the cache's end."""
    asm = tvm_attn.build("flash", DECODE_INT8, target=ISA_TARGETS[isa], schedule="hand").executable.mod \
        .inspect_source("asm")
    byte_loops = [loop for loop in micro_kernel_loops(asm) if any("sdot" in i for i in loop.instructions)]
    assert len(byte_loops) >= 2 and {loop.fmas for loop in byte_loops} == {24}


def test_register_budget_from_the_target():
    from tvm_attn.schedules.common import register_block

    assert (register_block(capabilities(ISA_TARGETS["avx2"])).rows,
            register_block(capabilities(ISA_TARGETS["avx2"])).vectors) == (6, 2)
    for isa in ("avx512", "apple-m1", "apple-m4"):
        block = register_block(capabilities(ISA_TARGETS[isa]))
        assert (block.rows, block.vectors) == (6, 4) and block.registers <= 32


def test_a_block_too_large_for_avx2_is_caught(monkeypatch):
    """The check can fail: flash with the 4 x 4 block (16 accumulators + 4 operands + 1 broadcast) built for AVX2."""
    import tvm
    from tvm import s_tir

    from tvm_attn.schedules import common, flash
    from tvm_attn.variants import flash as flash_compute

    monkeypatch.setattr(flash, "register_block", lambda caps: common.RegisterBlock(4, 4))
    target = tvm_attn.resolve_target(ISA_TARGETS["avx2"])
    sch = s_tir.Schedule(tvm.IRModule({"main": flash_compute.compute(PREFILL.kernel)}))
    flash.schedule(sch, target)
    loops = micro_kernel_loops(tvm.compile(sch.mod, target=target).mod.inspect_source("asm"))
    assert any(loop.stack_stores for loop in loops)


def test_the_apple_estimate_reads_llvm_mca():
    """The Apple estimate (an estimate: llvm-mca's cycles per iteration of the apple-m3 build's micro-kernel loops)
    finds flash's two register-blocked matmul loops and gives them a share of the FMA pipes in (0, 1]."""
    from tvm_attn.bench import apple_estimate

    mca = apple_estimate.llvm_mca()
    if mca is None:
        if os.environ.get("CI"):
            pytest.fail("CI installs llvm-19 (.ci/run): llvm-mca >= 17 is missing")
        pytest.skip("needs llvm-mca from LLVM 17 or later (apt-get install llvm-19)")
    estimates = [e for e in apple_estimate.estimate(mca, ("apple-m3",)) if e.kernel == "flash prefill"]
    matmuls = [e for e in estimates if e.is_matmul]
    assert len(matmuls) == 2 and all(e.fmas == 24 for e in matmuls)  # the 6 x 4 blocks of qk and pv
    for e in matmuls:
        for model in apple_estimate.MODELS:
            assert 0 < e.fma_share(model) <= 1.0
    assert "an estimate" in apple_estimate.report(estimates, mca)
