"""The SME tile matmul the SME-backed prefill calls (tvm_attn/variants/sme_prefill.py): C = A^T B in float32 for
A (K x M) and B (K x N) stored k-major (row k of A is a column of the product's left operand), as outer products
into Arm SME's ZA array. A TensorIR subroutine, not a kernel: it runs in streaming mode (``smstart`` on entry,
``smstop`` on exit), so the caller's NEON code never shares a function with streaming SVE code.

Per 2SVL x 2SVL block of C (32 x 32 floats at Apple M4's 512-bit streaming vector length): the four 32-bit ZA
tiles are zeroed, each k adds the outer product of two SVL-vectors of A's row k with two of B's row k (FMOPA into
the four tiles, predicated on the rows and columns that exist), and the tiles' rows are stored into C. Written
for any streaming vector length (``vscale``): tails of M and N are predicates, K is a trip count.

ZA is switched on and off here (``llvm.aarch64.sme.za.enable``): TVM 0.27's ZA pragma names an LLVM attribute LLVM
22 no longer has, so LLVM's "new ZA" prologue (which saves a caller's dormant ZA state) is not emitted. The caller
must hold no ZA state; TensorIR kernels and the Python, C and C++ that call them do not.
"""

from __future__ import annotations

import tvm
from tvm.script import tirx as T

NAME = "sme_matmul"
GLOBAL_VAR = tvm.ir.GlobalVar(NAME)

_VECTOR = "float32xvscalex4"  # one streaming SVE vector of float32 (4 x vscale lanes)
_PREDICATE = "uint1xvscalex4"
_ALL_TILES = 255  # the zero instruction's mask: every 32-bit ZA tile


def _lanes(start, end):
    """The predicate of lanes start + i < end."""
    return T.get_active_lane_mask(_PREDICATE, T.Cast("int32", start), T.Cast("int32", end))


def _load(predicate, address):
    return T.call_llvm_intrin(_VECTOR, "llvm.aarch64.sve.ld1", predicate, address)


def _outer_product(tile: int, rows, cols, a, b):
    """ZA tile ``tile`` += a b^T on the lanes ``rows`` x ``cols``."""
    return T.call_llvm_intrin("void", "llvm.aarch64.sme.mopa", T.int32(tile), rows, cols, a, b)


def outer_product_matmul():
    """The subroutine ``sme_matmul(M, N, K, a, lda, b, ldb, c, ldc)``: C[i, j] = sum_k A[k, i] B[k, j] for i < M,
    j < N, with A, B and C row-major at leading dimensions lda, ldb and ldc (elements). Only C's M x N elements are
    written. Call it as ``GLOBAL_VAR(M, N, K, ...)`` from a PrimFunc of the same IRModule."""
    SVF = 4 * T.vscale()  # float32 lanes of a streaming vector
    BLOCK = 2 * SVF  # rows and columns of C per block: 2 x 2 ZA tiles

    # Intermediate scalable vectors stay inline expressions: TVM 0.27 lowers a let-bound scalable vector to a
    # stack allocation it cannot place.
    @T.prim_func(private=True)
    def sme_matmul(M: T.int32, N: T.int32, K: T.int32, a: T.handle("float32"), lda: T.int32,
                   b: T.handle("float32"), ldb: T.int32, c: T.handle("float32"), ldc: T.int32):
        A = T.decl_buffer((K * lda,), "float32", data=a)
        B = T.decl_buffer((K * ldb,), "float32", data=b)
        C = T.decl_buffer((M * ldc,), "float32", data=c)
        T.attr(0, "pragma_aarch64_pstate_sm", "body")
        T.evaluate(T.call_llvm_intrin("void", "llvm.aarch64.sme.za.enable"))
        for i0, j0 in T.grid(T.ceildiv(M, BLOCK), T.ceildiv(N, BLOCK)):
            T.evaluate(T.call_llvm_intrin("void", "llvm.aarch64.sme.zero", T.int32(_ALL_TILES)))
            for k in range(K):
                # tile 2 * (row half) + (column half)
                T.evaluate(_outer_product(
                    0, _lanes(i0 * BLOCK, M), _lanes(j0 * BLOCK, N),
                    _load(_lanes(i0 * BLOCK, M), T.address_of(A[k * lda + i0 * BLOCK])),
                    _load(_lanes(j0 * BLOCK, N), T.address_of(B[k * ldb + j0 * BLOCK]))))
                T.evaluate(_outer_product(
                    1, _lanes(i0 * BLOCK, M), _lanes(j0 * BLOCK + SVF, N),
                    _load(_lanes(i0 * BLOCK, M), T.address_of(A[k * lda + i0 * BLOCK])),
                    _load(_lanes(j0 * BLOCK + SVF, N), T.address_of(B[k * ldb + j0 * BLOCK + SVF]))))
                T.evaluate(_outer_product(
                    2, _lanes(i0 * BLOCK + SVF, M), _lanes(j0 * BLOCK, N),
                    _load(_lanes(i0 * BLOCK + SVF, M), T.address_of(A[k * lda + i0 * BLOCK + SVF])),
                    _load(_lanes(j0 * BLOCK, N), T.address_of(B[k * ldb + j0 * BLOCK]))))
                T.evaluate(_outer_product(
                    3, _lanes(i0 * BLOCK + SVF, M), _lanes(j0 * BLOCK + SVF, N),
                    _load(_lanes(i0 * BLOCK + SVF, M), T.address_of(A[k * lda + i0 * BLOCK + SVF])),
                    _load(_lanes(j0 * BLOCK + SVF, N), T.address_of(B[k * ldb + j0 * BLOCK + SVF]))))
            for s in range(SVF):
                for tile in T.unroll(4):
                    if i0 * BLOCK + (tile // 2) * SVF + s < M:
                        T.evaluate(T.call_llvm_intrin(
                            "void", "llvm.aarch64.sme.st1w.horiz", _lanes(j0 * BLOCK + (tile % 2) * SVF, N),
                            T.address_of(C[(i0 * BLOCK + (tile // 2) * SVF + s) * ldc + j0 * BLOCK + (tile % 2) * SVF]),
                            T.Cast("int32", tile), T.Cast("int32", s)))
        T.evaluate(T.call_llvm_intrin("void", "llvm.aarch64.sme.za.disable"))

    return sme_matmul
