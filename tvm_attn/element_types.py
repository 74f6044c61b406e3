"""The element types of the kernels' buffers and the conversions between them. Kept apart from the computes so that
the schedules' tensor intrinsics (schedules/pair_products.py) can state their operands in the same terms."""

from __future__ import annotations

from tvm.script import tirx as T

ACC = "float32"  # scores, softmax statistics, accumulators and scratch, whatever the arguments' dtype

# Kernel-internal bfloat16 values are stored as their bits: TVM computes in float32 whatever a bfloat16 buffer it
# allocates holds (it widens the buffer), and pair products need them 16 bits wide.
BF16_BITS = "uint16"


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
        bits = T.reinterpret(x, dtype="uint32")
        return T.Cast(BF16_BITS, (bits + T.uint32(0x7FFF) + ((bits >> T.uint32(16)) & T.uint32(1))) >> T.uint32(16))
    return x if dtype == ACC else T.Cast(dtype, x)


def bits_of(x):
    """A loaded bfloat16 argument element as BF16_BITS."""
    return T.reinterpret(x, dtype=BF16_BITS)
