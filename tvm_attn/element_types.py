"""The element types of the kernels' buffers and the conversions between them. Kept apart from the computes so that
the schedules' tensor intrinsics (schedules/pair_products.py) can state their operands in the same terms."""

from __future__ import annotations

from tvm.script import tirx as T

ACC = "float32"  # scores, softmax statistics, accumulators and scratch, whatever the arguments' dtype

# Kernel-internal bfloat16 values are stored as their bits: TVM computes in float32 whatever a bfloat16 buffer it
# allocates holds (it widens the buffer), and pair products need them 16 bits wide.
BF16_BITS = "uint16"
# Two bfloat16 values' bits in one word, the even element of the pair in the low half (as pair-product instructions
# read a 32-bit lane): one vector lane per pair, so pairs are packed and stored with contiguous vector stores.
BF16_PAIR = "uint32"


def widen(x):
    """A loaded element as float32: 16-bit inputs are converted on load, BF16_BITS are a bfloat16's bits, float32
    passes through."""
    dtype = str(x.ty)
    if dtype == BF16_BITS:
        return T.Cast(ACC, T.reinterpret(x, dtype="bfloat16"))
    return x if dtype == ACC else T.Cast(ACC, x)


def narrow(x, dtype: str):
    """A float32 result as ``dtype`` (rounded to nearest even for 16-bit ones; BF16_BITS: a bfloat16's bits)."""
    if dtype == BF16_BITS:
        return T.Cast(BF16_BITS, _rounded_bits(x))
    return x if dtype == ACC else T.Cast(dtype, x)


def bits_of(x):
    """A loaded bfloat16 argument element as BF16_BITS."""
    return T.reinterpret(x, dtype=BF16_BITS)


def _rounded_bits(x):
    """The bfloat16 nearest to float32 ``x`` (ties to even), its bits in the low half of a uint32."""
    bits = T.reinterpret(x, dtype="uint32")
    return (bits + T.uint32(0x7FFF) + ((bits >> T.uint32(16)) & T.uint32(1))) >> T.uint32(16)


def pair_of(even, odd):
    """A BF16_PAIR of two values: float32 (rounded to bfloat16) or bfloat16 arguments' elements (exact)."""
    def low(x):
        dtype = str(x.ty)
        if dtype == "bfloat16":
            return T.Cast(BF16_PAIR, T.reinterpret(x, dtype=BF16_BITS))
        if dtype != ACC:
            raise TypeError(f"pair_of takes float32 or bfloat16 values, got {dtype}")
        return _rounded_bits(x)
    return low(even) | (low(odd) << T.uint32(16))


def pair_half(word, t):
    """Element ``t`` (0: even, 1: odd) of a BF16_PAIR as float32."""
    return T.reinterpret((word >> T.Cast(BF16_PAIR, 16 * t)) << T.uint32(16), dtype=ACC)
