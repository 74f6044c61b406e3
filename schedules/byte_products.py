"""Tensor intrinsics for byte dot products accumulating in int32: NEON ``sdot`` (FEAT_DotProd, every Apple M) adds,
into each of four int32 lanes, the four products of that lane's four signed bytes with four signed bytes broadcast
to every lane. The decode kernel over an int8 cache (``byte_products=True``) computes q . codes with them: q as three
signed-byte digits per dimension (tvm_attn/variants/decode.py says how), K's codes as words of four dimensions of one
key, so a lane holds one key's partial dot product.

The cache stores K's codes dimension-major (tvm_attn/quantized_kv.py: a vector of keys per dimension, what the
widening kernels of every other ISA want); ``INTERLEAVE_INTRIN`` turns four dimensions of 16 keys into those words
(one ``st4``), per block of keys, into a scratch buffer the products then read.

Which targets have the instruction is a question for ``CpuCapabilities.int8_dot``; x86's ``vpdpbusd`` multiplies
unsigned by signed bytes and is not used here (a widening kernel reads the int8 cache at memory speed on AVX-512).
"""

from __future__ import annotations

import functools

from tvm.ir.prim.expr import Shuffle
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from tvm_attn.targets import CpuCapabilities

ISA_CLASSES = ("aarch64-neon",)
WORD = 4  # bytes (dimensions of one key) per int32 lane of sdot
LANES = 4  # int32 lanes of one sdot
INTERLEAVE_KEYS = 16  # keys per interleave: four 16-byte vectors of codes (one per dimension) in, 64 bytes out


# Tuning records' traces name the intrinsics they tensorize with: a renamed one makes its logs unreadable.
DOT_INTRIN = "tvm_attn_byte_dot_4_sdot"
INTERLEAVE_INTRIN = "tvm_attn_interleave_16x4_bytes"


@functools.cache
def register_intrinsics() -> None:
    """Register DOT_INTRIN and INTERLEAVE_INTRIN, on first use (parsing their TVMScript takes ~0.5 s, which a
    process that never schedules byte products should not pay at import)."""

    @T.prim_func(s_tir=True)
    def _dot_desc(A: T.Buffer((WORD,), "int8", offset_factor=1),
                  B: T.Buffer((LANES, WORD), "int8", offset_factor=1, align=4),
                  C: T.Buffer((LANES,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0:LANES], A[0:WORD], B[0:LANES, 0:WORD])
            T.writes(C[0:LANES])
            for i, t in T.grid(LANES, WORD):
                with T.sblock("update"):
                    vi, vt = T.axis.remap("SR", [i, t])
                    C[vi] = C[vi] + T.Cast("int32", A[vt]) * T.Cast("int32", B[vi, vt])

    @T.prim_func(s_tir=True)
    def _dot_impl(A: T.Buffer((WORD,), "int8", offset_factor=1),
                  B: T.Buffer((LANES, WORD), "int8", offset_factor=1, align=4),
                  C: T.Buffer((LANES,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0:LANES], A[0:WORD], B[0:LANES, 0:WORD])
            T.writes(C[0:LANES])
            digits = T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"), LANES),
                                   dtype="int8x16")  # LLVM folds the broadcast into sdot's by-element form
            C[T.ramp(0, 1, LANES)] = T.call_llvm_pure_intrin(
                "int32x4", "llvm.aarch64.neon.sdot.v4i32.v16i8", C.vload([0], "int32x4"),
                B.vload([0, 0], "int8x16"), digits)

    @T.prim_func(s_tir=True)
    def _interleave_desc(K: T.Buffer((WORD, INTERLEAVE_KEYS), "int8", offset_factor=1, strides=(T.int32(), 1),
                                     align=1),
                         W: T.Buffer((INTERLEAVE_KEYS, WORD), "int8", offset_factor=1, align=4)) -> None:
        with T.sblock("root"):
            T.reads(K[0:WORD, 0:INTERLEAVE_KEYS])
            T.writes(W[0:INTERLEAVE_KEYS, 0:WORD])
            for j, t in T.grid(INTERLEAVE_KEYS, WORD):
                with T.sblock("update"):
                    vj, vt = T.axis.remap("SS", [j, t])
                    W[vj, vt] = K[vt, vj]

    @T.prim_func(s_tir=True)
    def _interleave_impl(K: T.Buffer((WORD, INTERLEAVE_KEYS), "int8", offset_factor=1, strides=(T.int32(), 1),
                                     align=1),
                         W: T.Buffer((INTERLEAVE_KEYS, WORD), "int8", offset_factor=1, align=4)) -> None:
        with T.sblock("root"):
            T.reads(K[0:WORD, 0:INTERLEAVE_KEYS])
            T.writes(W[0:INTERLEAVE_KEYS, 0:WORD])
            # One shuffle of the four rows into words, stored whole: LLVM emits st4. (Byte and halfword zips with
            # four 16-byte stores instead, estimated for an M4's decode at 4096 keys, d128
            # (tvm_attn.bench.apple_estimate): 1.07x (GQA 32/8) and 1.19x (MHA) faster under llvm-mca's Neoverse-V2
            # model, 1.07x and 1.11x slower under its Apple model.)
            W[0, T.ramp(0, 1, WORD * INTERLEAVE_KEYS)] = Shuffle(
                [K.vload([t, 0], "int8x16") for t in range(WORD)],
                [t * INTERLEAVE_KEYS + j for j in range(INTERLEAVE_KEYS) for t in range(WORD)])

    TensorIntrin.register(DOT_INTRIN, _dot_desc, _dot_impl, override=True)
    TensorIntrin.register(INTERLEAVE_INTRIN, _interleave_desc, _interleave_impl, override=True)


def has_byte_products(caps: CpuCapabilities) -> bool:
    """Whether kernels for this target compute byte dot products: NEON with FEAT_DotProd (sdot; every Apple M)."""
    return caps.int8_dot and caps.isa_class in ISA_CLASSES


def byte_dot_intrin(caps: CpuCapabilities) -> str:
    """The byte dot product intrinsic (C[i] += sum_t A[t] B[i, t], LANES lanes of WORD bytes); ValueError when the
    target has none."""
    if not has_byte_products(caps):
        raise ValueError(f"{caps.isa_class} target has no byte dot products the kernels use "
                         f"(int8_dot={caps.int8_dot})")
    register_intrinsics()
    return DOT_INTRIN


def interleave_intrin() -> str:
    """The intrinsic turning four dimensions of INTERLEAVE_KEYS keys' codes into words of WORD bytes per key."""
    register_intrinsics()
    return INTERLEAVE_INTRIN
