"""Tensor intrinsics for float16 products accumulating in float32, lane by lane: NEON ``fmlal`` / ``fmlal2``
(FEAT_FHM, every Apple M) multiply four float16 lanes of each operand, widened, into four float32 accumulators, with
one rounding. The computes that use them (``float16_products=True``) keep the operand that is not read in place
(q) in float16, so no vector is widened before its products.

Which targets have the instruction is a question for ``CpuCapabilities.float16_products``; AVX512-FP16 has no
float16 -> float32 multiply-accumulate, so only NEON uses these.
"""

from __future__ import annotations

import functools

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from tvm_attn.targets import CpuCapabilities

LANES = 8  # one intrinsic: fmlal on the low four lanes of 8 float16 operands, fmlal2 on the high four
ISA_CLASSES = ("aarch64-neon",)


def _fmlal(half: str):
    return T.llvm_lookup_intrinsic_id(f"llvm.aarch64.neon.{half}.v4f32.v8f16")


# Tuning records' traces name the intrinsics they tensorize with: a renamed one makes its logs unreadable.
LANEWISE_INTRIN = "tvm_attn_f16_lanewise_product_8_fmlal"


@functools.cache
def register_intrinsics() -> None:
    """Register LANEWISE_INTRIN, on first use (parsing its TVMScript takes ~0.3 s, which a process that never
    schedules float16 products should not pay at import)."""

    @T.prim_func(s_tir=True)
    def _lanewise_desc(A: T.Buffer((LANES,), "float16", offset_factor=1),
                       B: T.Buffer((LANES,), "float16", offset_factor=1, align=2),
                       C: T.Buffer((LANES,), "float32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0:LANES], A[0:LANES], B[0:LANES])
            T.writes(C[0:LANES])
            for i in range(LANES):
                with T.sblock("update"):
                    vi = T.axis.spatial(LANES, i)
                    C[vi] = C[vi] + T.Cast("float32", A[vi]) * T.Cast("float32", B[vi])

    @T.prim_func(s_tir=True)
    def _lanewise_impl(A: T.Buffer((LANES,), "float16", offset_factor=1),
                       B: T.Buffer((LANES,), "float16", offset_factor=1, align=2),
                       C: T.Buffer((LANES,), "float32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0:LANES], A[0:LANES], B[0:LANES])
            T.writes(C[0:LANES])
            a = A.vload([0], "float16x8")
            b = B.vload([0], "float16x8")
            C[T.ramp(0, 1, 4)] = T.call_llvm_pure_intrin(_fmlal("fmlal"), C.vload([0], "float32x4"), a, b,
                                                         dtype="float32x4")
            C[T.ramp(4, 1, 4)] = T.call_llvm_pure_intrin(_fmlal("fmlal2"), C.vload([4], "float32x4"), a, b,
                                                         dtype="float32x4")

    TensorIntrin.register(LANEWISE_INTRIN, _lanewise_desc, _lanewise_impl, override=True)


def has_float16_products(caps: CpuCapabilities) -> bool:
    """Whether kernels for this target compute float16 products without widening first: NEON with FEAT_FHM
    (fmlal; every Apple M)."""
    return caps.float16_products and caps.isa_class in ISA_CLASSES


def float16_product_intrin(caps: CpuCapabilities) -> str:
    """The lanewise float16 product intrinsic (C[i] += A[i] B[i], LANES lanes); ValueError when the target has none."""
    if not has_float16_products(caps):
        raise ValueError(f"{caps.isa_class} target has no float16 products the kernels use "
                         f"(float16_products={caps.float16_products})")
    register_intrinsics()
    return LANEWISE_INTRIN


def in_float16_products(sch, name: str) -> bool:
    """Whether block ``name`` of a scheduled compute is written for float16 products: every operand it reads (its
    accumulator aside) is float16 (otherwise q is read in float32, and K widened where it is read)."""
    block = sch.get(sch.get_sblock(name))
    operands = [r.source for r in block.reads if not any(r.source.same_as(w.source) for w in block.writes)]
    return bool(operands) and all(str(b.dtype) == "float16" for b in operands)
