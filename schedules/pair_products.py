"""Tensor intrinsics for bfloat16 pair products accumulating in float32: float32 lanes, each adding
a[2i] b[2i] + a[2i+1] b[2i+1] (AVX512-BF16 ``vdpbf16ps``: 16 lanes; NEON ``bfdot``: 4). The computes that use them
(``pairs=True``) store each operand that lies along the lanes with the pair of its reduction index adjacent:
(reduction / 2, lanes, 2), as bfloat16 bits (element_types.BF16_BITS), or as (reduction / 2, lanes) words of
a pair each (element_types.BF16_PAIR: packed in registers and stored whole, where BF16_BITS pairs would be stored
lane by lane). The accumulators are the "local" cache of a register-blocked micro-kernel (schedules/common.py).

TVM has no LLVM ``bfloat`` type (its bfloat16 is i16 storage), and LLVM's intrinsics take ``<N x bfloat>``: a small
LLVM IR function, imported into the kernel's module and inlined, bitcasts i16 lanes to bfloat and calls it.

Which targets have the instruction is a question for ``CpuCapabilities.bfloat16_dot``; ``pair_dot`` gives the
target's instruction and ``pair_product_intrin`` the intrinsic a schedule tensorizes with.
"""

from __future__ import annotations

import dataclasses
import functools

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from tvm_attn.element_types import BF16_BITS, BF16_PAIR, pair_half
from tvm_attn.element_types import widen as _widen
from tvm_attn.targets import CpuCapabilities


@dataclasses.dataclass(frozen=True)
class PairDot:
    """One ISA's pair-product instruction ``mnemonic`` (LLVM's ``intrinsic``): ``lanes`` float32 accumulators."""

    mnemonic: str
    lanes: int
    intrinsic: str

    @property
    def pairs_type(self) -> str:
        return f"uint16x{2 * self.lanes}"

    @property
    def helper(self) -> str:
        """The LLVM IR function ``ir`` defines: (accumulators, 2 x lanes i16, 2 x lanes i16) -> accumulators."""
        return f"tvm_attn_{self.mnemonic}_{32 * self.lanes}"

    @property
    def ir(self) -> str:
        f, i16, bf16 = f"<{self.lanes} x float>", f"<{2 * self.lanes} x i16>", f"<{2 * self.lanes} x bfloat>"
        return f"""
define {f} @{self.helper}({f} %acc, {i16} %a, {i16} %b) {{
  %ab = bitcast {i16} %a to {bf16}
  %bb = bitcast {i16} %b to {bf16}
  %r = call {f} @{self.intrinsic}({f} %acc, {bf16} %ab, {bf16} %bb)
  ret {f} %r
}}
declare {f} @{self.intrinsic}({f}, {bf16}, {bf16})
"""


INSTRUCTIONS = {  # by CpuCapabilities.isa_class
    "x86_64-avx512": PairDot("dpbf16ps", 16, "llvm.x86.avx512bf16.dpbf16ps.512"),  # vdpbf16ps zmm
    "aarch64-neon": PairDot("bfdot", 4, "llvm.aarch64.neon.bfdot.v4f32.v8bf16"),  # bfdot v.4s, v.8h, v.8h
}


def _broadcast_pair(dot: PairDot):
    """(desc, impl) of C[i] += sum_t A[t] B[i, t]: one pair broadcast to every lane (a row of q or P against
    ``lanes`` columns of K or V, packed in pairs)."""
    n = dot.lanes

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((2,), BF16_BITS, offset_factor=1), B: T.Buffer((n, 2), BF16_BITS, offset_factor=1),
             C: T.Buffer((n,), "float32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0:n], A[0:2], B[0:n, 0:2])
            T.writes(C[0:n])
            for i, t in T.grid(n, 2):
                with T.sblock("update"):
                    vi, vt = T.axis.remap("SR", [i, t])
                    C[vi] = C[vi] + _widen(A[vt]) * _widen(B[vi, vt])

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((2,), BF16_BITS, offset_factor=1), B: T.Buffer((n, 2), BF16_BITS, offset_factor=1),
             C: T.Buffer((n,), "float32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0:n], A[0:2], B[0:n, 0:2])
            T.writes(C[0:n])
            with T.attr(0, "pragma_import_llvm", dot.ir):
                pair = T.reinterpret(A.vload([0], "uint16x2"), dtype="uint32")  # both halves as one 32-bit lane
                C[T.ramp(0, 1, n)] = T.call_pure_extern(
                    f"float32x{n}", dot.helper, C.vload([0], f"float32x{n}"),
                    T.reinterpret(T.broadcast(pair, n), dtype=dot.pairs_type), B.vload([0, 0], dot.pairs_type))

    return desc, impl


def _lanewise_pair(dot: PairDot):
    """(desc, impl) of C[i] += sum_t A[2i + t] B[2i + t]: BF16_BITS against a bfloat16 argument read in place
    (partial dot products of a row of q with a row of K)."""
    n = dot.lanes

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((2 * n,), BF16_BITS, offset_factor=1),
             B: T.Buffer((2 * n,), "bfloat16", offset_factor=1, align=2),
             C: T.Buffer((n,), "float32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0:n], A[0:2 * n], B[0:2 * n])
            T.writes(C[0:n])
            for i, t in T.grid(n, 2):
                with T.sblock("update"):
                    vi, vt = T.axis.remap("SR", [i, t])
                    C[vi] = C[vi] + _widen(A[vi * 2 + vt]) * _widen(B[vi * 2 + vt])

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((2 * n,), BF16_BITS, offset_factor=1),
             B: T.Buffer((2 * n,), "bfloat16", offset_factor=1, align=2),
             C: T.Buffer((n,), "float32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0:n], A[0:2 * n], B[0:2 * n])
            T.writes(C[0:n])
            with T.attr(0, "pragma_import_llvm", dot.ir):
                C[T.ramp(0, 1, n)] = T.call_pure_extern(
                    f"float32x{n}", dot.helper, C.vload([0], f"float32x{n}"), A.vload([0], dot.pairs_type),
                    T.reinterpret(B.vload([0], f"bfloat16x{2 * n}"), dtype=dot.pairs_type))

    return desc, impl


def _pair_words(dot: PairDot, a_dtype: str):
    """(desc, impl) of C[i] += sum_t A_t B_t[i] with B ``lanes`` BF16_PAIR words and A one pair broadcast to every
    lane: a BF16_PAIR word (a_dtype BF16_PAIR), or two adjacent elements of a bfloat16 argument ("bfloat16")."""
    n = dot.lanes
    a_shape, a_align = ((1,), 4) if a_dtype == BF16_PAIR else ((2,), 2)

    def a_value(A, t):
        return pair_half(A[0], t) if a_dtype == BF16_PAIR else _widen(A[t])

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer(a_shape, a_dtype, offset_factor=1, align=a_align),
             B: T.Buffer((n,), BF16_PAIR, offset_factor=1),
             C: T.Buffer((n,), "float32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0:n], A[0:a_shape[0]], B[0:n])
            T.writes(C[0:n])
            for i, t in T.grid(n, 2):
                with T.sblock("update"):
                    vi, vt = T.axis.remap("SR", [i, t])
                    C[vi] = C[vi] + a_value(A, vt) * pair_half(B[vi], vt)

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer(a_shape, a_dtype, offset_factor=1, align=a_align),
             B: T.Buffer((n,), BF16_PAIR, offset_factor=1),
             C: T.Buffer((n,), "float32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0:n], A[0:a_shape[0]], B[0:n])
            T.writes(C[0:n])
            with T.attr(0, "pragma_import_llvm", dot.ir):
                word = A[0] if a_dtype == BF16_PAIR else T.reinterpret(A.vload([0], f"{a_dtype}x2"), dtype=BF16_PAIR)
                C[T.ramp(0, 1, n)] = T.call_pure_extern(
                    f"float32x{n}", dot.helper, C.vload([0], f"float32x{n}"),
                    T.reinterpret(T.broadcast(word, n), dtype=dot.pairs_type),
                    T.reinterpret(B.vload([0], f"{BF16_PAIR}x{n}"), dtype=dot.pairs_type))

    return desc, impl


KINDS = {"broadcast": _broadcast_pair, "lanewise": _lanewise_pair,
         # B in BF16_PAIR words, A a word (P against V's pairs) or a pair of a bfloat16 argument read in place (K
         # against q's pairs)
         "word": lambda dot: _pair_words(dot, BF16_PAIR), "bfloat16_word": lambda dot: _pair_words(dot, "bfloat16")}


def _intrin_name(kind: str, dot: PairDot) -> str:
    # Tuning records' traces name the intrinsics they tensorize with: a renamed one makes its logs unreadable.
    return f"tvm_attn_bf16_{kind}_pair_dot_{dot.lanes}_{dot.mnemonic}"


@functools.cache
def _registered(kind: str, dot: PairDot) -> str:
    """The name of the intrinsic of ``kind`` for ``dot``, registered on first use (parsing its TVMScript takes
    ~0.3 s, which a process that never schedules 16-bit pair products should not pay at import)."""
    name = _intrin_name(kind, dot)
    TensorIntrin.register(name, *KINDS[kind](dot), override=True)
    return name


def register_intrinsics(isa_class: str | None = None) -> None:
    """Register the pair-product intrinsics of ``isa_class`` (None: of every ISA)."""
    for name, dot in INSTRUCTIONS.items():
        if isa_class in (None, name):
            for kind in KINDS:
                _registered(kind, dot)


def has_pair_products(caps: CpuCapabilities) -> bool:
    """Whether kernels for this target compute bfloat16 matmuls in pair products: AVX512-BF16 (vdpbf16ps) or NEON
    with BF16 (bfdot: Apple M2 and later; apple-m1 widens)."""
    return caps.bfloat16_dot and caps.isa_class in INSTRUCTIONS


def pair_dot(caps: CpuCapabilities) -> PairDot:
    """The target's pair-product instruction; ValueError when it has none."""
    if not has_pair_products(caps):
        raise ValueError(f"{caps.isa_class} target has no bfloat16 pair products the kernels use "
                         f"(bfloat16_dot={caps.bfloat16_dot})")
    return INSTRUCTIONS[caps.isa_class]


def in_pair_products(sch, name: str) -> bool:
    """Whether block ``name`` of a scheduled compute is written for pair products (it reads BF16_BITS or
    BF16_PAIR)."""
    return any(str(region.source.dtype) in (BF16_BITS, BF16_PAIR) for region in sch.get(sch.get_sblock(name)).reads)


def pair_product_intrin(caps: CpuCapabilities, kind: str) -> str:
    """The tensor intrinsic of ``kind`` (one of KINDS) for the target; ValueError when it has none."""
    if kind not in KINDS:
        raise ValueError(f"unknown pair product kind {kind!r}: use one of {', '.join(KINDS)}")
    return _registered(kind, pair_dot(caps))
