"""A vectorizable float32 exp. TVM lowers ``exp`` to scalar ``expf`` calls, which would make the softmax cost more
than the two matmuls; this one is plain arithmetic, so LLVM vectorizes it.

Cephes' expf: exp(x) = 2^n * exp(r) with n = round(x / ln 2) and r = x - n ln 2 (ln 2 split in two for exactness),
exp(r) by a degree-7 polynomial on |r| <= ln(2)/2. Inputs are clamped to [-87.3, 88.0], so the result never
overflows and exp of very negative x is ~1e-38, not 0 (callers that need 0 mask explicitly). Max relative error
measured against float64 exp over [-87, 88]: tests/test_fast_exp.py states and checks the bound.
"""

from __future__ import annotations

from tvm import tirx

_LOG2E = 1.44269504088896341
_LN2_HI = 0.693359375
_LN2_LO = -2.12194440e-4
_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
X_MIN = -87.3
X_MAX = 88.0  # n = round(x / ln 2) must stay <= 127, or 2^n built from exponent bits is inf


def fast_exp(x):
    """exp(x) for a float32 PrimExpr x, in vectorizable arithmetic."""
    f32 = "float32"

    def c(value):
        return tirx.const(value, f32)

    # Plain expressions, no Let: MetaSchedule's FLOP estimator cannot read Let; TVM's CSE and LLVM fold repeats.
    x = tirx.max(tirx.min(x, c(X_MAX)), c(X_MIN))
    n = tirx.floor(x * c(_LOG2E) + c(0.5))
    r = x - n * c(_LN2_HI) - n * c(_LN2_LO)
    poly = c(_POLY[0])
    for coef in _POLY[1:]:
        poly = poly * r + c(coef)
    exp_r = poly * r * r + r + c(1.0)
    two_n = tirx.reinterpret(f32, tirx.shift_left(tirx.Cast("int32", n) + 127, 23))
    return exp_r * two_n

SOFTMAX_CUTOFF = -80.0


def softmax_exp(x):
    """fast_exp(x), but exactly 0 for x < -80, which is what softmax weights (x = score - row max <= 0) use.

    exp(-80) = 1.8e-35 is far below float32 resolution next to the row's largest weight (1). Without the cutoff,
    peaked rows produce weights near 1e-38 whose products with v are subnormal floats, which x86 CPUs process
    dozens of times slower: measured 4 ms instead of 0.1 ms for flash at seq 128 on peaked inputs.
    """
    return tirx.Select(x < tirx.const(SOFTMAX_CUTOFF, "float32"), tirx.const(0.0, "float32"), fast_exp(x))
