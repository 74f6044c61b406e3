"""Tensor intrinsics for bfloat16 pair products accumulating in float32: 16 float32 lanes, each adding
a[2i] b[2i] + a[2i+1] b[2i+1] (AVX512-BF16 ``vdpbf16ps``). The computes that use them (``pairs=True``) store each
operand that lies along the lanes with the pair of its reduction index adjacent: (reduction / 2, lanes, 2), as
bfloat16 bits (variants/common.py: BF16_BITS). The
accumulators are the "local" cache of a register-blocked micro-kernel (schedules/common.py).

TVM has no LLVM ``bfloat`` type (its bfloat16 is i16 storage), and LLVM's intrinsic takes ``<32 x bfloat>``: a small
LLVM IR function, imported into the kernel's module and always inlined, bitcasts i16 lanes to bfloat and calls it.

Which targets have the instruction is a question for ``CpuCapabilities.bfloat16_dot``; ``pair_product_intrin``
answers which intrinsic (or None) a schedule tensorizes with.
"""

from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from tvm_attn.targets import CpuCapabilities, capabilities
from tvm_attn.variants.common import BF16_BITS
from tvm_attn.variants.common import widen as _widen

LANES = 16  # float32 accumulators per instruction (one 512-bit register)

_DPBF16PS_LL = """
define <16 x float> @tvm_attn_dpbf16ps_512(<16 x float> %acc, <32 x i16> %a, <32 x i16> %b) {
  %ab = bitcast <32 x i16> %a to <32 x bfloat>
  %bb = bitcast <32 x i16> %b to <32 x bfloat>
  %r = call <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float> %acc, <32 x bfloat> %ab, <32 x bfloat> %bb)
  ret <16 x float> %r
}
declare <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float>, <32 x bfloat>, <32 x bfloat>)
"""


@T.prim_func(s_tir=True)
def _broadcast_pair_desc(A: T.Buffer((2,), "uint16", offset_factor=1),
                         B: T.Buffer((LANES, 2), "uint16", offset_factor=1),
                         C: T.Buffer((LANES,), "float32", offset_factor=1, scope="local")) -> None:
    with T.sblock("root"):
        T.reads(C[0:LANES], A[0:2], B[0:LANES, 0:2])
        T.writes(C[0:LANES])
        for i, t in T.grid(LANES, 2):
            with T.sblock("update"):
                vi, vt = T.axis.remap("SR", [i, t])
                C[vi] = C[vi] + _widen(A[vt]) * _widen(B[vi, vt])


@T.prim_func(s_tir=True)
def _broadcast_pair_dpbf16ps(A: T.Buffer((2,), "uint16", offset_factor=1),
                             B: T.Buffer((LANES, 2), "uint16", offset_factor=1),
                             C: T.Buffer((LANES,), "float32", offset_factor=1, scope="local")) -> None:
    with T.sblock("root"):
        T.reads(C[0:LANES], A[0:2], B[0:LANES, 0:2])
        T.writes(C[0:LANES])
        with T.attr(0, "pragma_import_llvm", _DPBF16PS_LL):
            pair = T.reinterpret(A.vload([0], "uint16x2"), dtype="uint32")  # both halves as one 32-bit lane
            C[T.ramp(0, 1, LANES)] = T.call_pure_extern(
                "float32x16", "tvm_attn_dpbf16ps_512", C.vload([0], "float32x16"),
                T.reinterpret(T.broadcast(pair, LANES), dtype="uint16x32"),
                B.vload([0, 0], "uint16x32"))


@T.prim_func(s_tir=True)
def _lanewise_pair_desc(A: T.Buffer((2 * LANES,), "uint16", offset_factor=1),
                        B: T.Buffer((2 * LANES,), "bfloat16", offset_factor=1, align=2),
                        C: T.Buffer((LANES,), "float32", offset_factor=1, scope="local")) -> None:
    with T.sblock("root"):
        T.reads(C[0:LANES], A[0:2 * LANES], B[0:2 * LANES])
        T.writes(C[0:LANES])
        for i, t in T.grid(LANES, 2):
            with T.sblock("update"):
                vi, vt = T.axis.remap("SR", [i, t])
                C[vi] = C[vi] + _widen(A[vi * 2 + vt]) * _widen(B[vi * 2 + vt])


@T.prim_func(s_tir=True)
def _lanewise_pair_dpbf16ps(A: T.Buffer((2 * LANES,), "uint16", offset_factor=1),
                            B: T.Buffer((2 * LANES,), "bfloat16", offset_factor=1, align=2),
                            C: T.Buffer((LANES,), "float32", offset_factor=1, scope="local")) -> None:
    with T.sblock("root"):
        T.reads(C[0:LANES], A[0:2 * LANES], B[0:2 * LANES])
        T.writes(C[0:LANES])
        with T.attr(0, "pragma_import_llvm", _DPBF16PS_LL):
            C[T.ramp(0, 1, LANES)] = T.call_pure_extern(
                "float32x16", "tvm_attn_dpbf16ps_512", C.vload([0], "float32x16"), A.vload([0], "uint16x32"),
                T.reinterpret(B.vload([0], "bfloat16x32"), dtype="uint16x32"))


# C[i] += sum_t A[t] B[i, t]: one pair broadcast to every lane (a row of q or P against 16 columns of K or V)
BROADCAST_PAIR_DPBF16PS = "tvm_attn_bf16_broadcast_pair_dot_16_dpbf16ps"
# C[i] += sum_t A[2i + t] B[2i + t]: BF16_BITS against a bfloat16 argument read in place (partial dot products of
# a row of q with a row of K)
LANEWISE_PAIR_DPBF16PS = "tvm_attn_bf16_lanewise_pair_dot_16_dpbf16ps"
TensorIntrin.register(BROADCAST_PAIR_DPBF16PS, _broadcast_pair_desc, _broadcast_pair_dpbf16ps, override=True)
TensorIntrin.register(LANEWISE_PAIR_DPBF16PS, _lanewise_pair_desc, _lanewise_pair_dpbf16ps, override=True)


def has_pair_products(caps: CpuCapabilities) -> bool:
    """Whether kernels for this target compute bfloat16 matmuls in pair products (the instruction the intrinsics
    here lower to; NEON's bfdot is not wired yet)."""
    return caps.bfloat16_dot and caps.isa_class == "x86_64-avx512"


def uses_pair_products(kspec, target) -> bool:
    """Whether the bfloat16 kernels of ``kspec`` compute in pair products on ``target``: where it has them and the
    head dim is whole vectors of 2 x LANES (decode's partial dot products; prefill's P V takes LANES)."""
    return (kspec.dtype == "bfloat16" and kspec.head_dim % (2 * LANES) == 0
            and has_pair_products(capabilities(target if target is not None else "host")))


def in_pair_products(sch, name: str) -> bool:
    """Whether block ``name`` of a scheduled compute is written for pair products (it reads BF16_BITS)."""
    return any(str(region.source.dtype) == BF16_BITS for region in sch.get(sch.get_sblock(name)).reads)


def pair_product_intrin(caps: CpuCapabilities, kind: str) -> str:
    """The tensor intrinsic of ``kind`` ("broadcast" or "lanewise") for the target; ValueError when it has none."""
    if not has_pair_products(caps):
        raise ValueError(f"{caps.isa_class} target has no bfloat16 pair products the kernels use "
                         f"(bfloat16_dot={caps.bfloat16_dot})")
    intrins = {"broadcast": BROADCAST_PAIR_DPBF16PS, "lanewise": LANEWISE_PAIR_DPBF16PS}
    if kind not in intrins:
        raise ValueError(f"unknown pair product kind {kind!r}: use one of {', '.join(intrins)}")
    return intrins[kind]
