"""The int8 shadow of K and the certificate over it: its format, constants and quantization (numpy), which the
kernels (variants/bounded.py), the cache's shadow (shadow.py) and the references share.

K is cut along the sequence into blocks of BLOCK keys (from position 0). Per block and dimension d the shadow keeps
an offset lo_d (the block's minimum) and a step t_d ((max - min) / 255), and per key a code c_jd in 0..255 with
k_jd ~ lo_d + t_d c_jd. For a (pre-scaled) query q the shadow score s^_j = sum_d q_d (lo_d + t_d c_jd) is within

    radius = sum_d |q_d| (t_d / 2 + margin_d),   margin_d = MARGIN(head_dim) (|lo_d| + 255 t_d)

of the exact score q . k_j: t_d / 2 is the rounding of the code, and the margin covers the float32 rounding of the
quantization, of the shadow score and of the exact score the kernels compare it with. Every score is thus known
within +-radius from 1/4 of the bytes of float32 K (1/2 of 16-bit K), and keys whose upper bounds are low are
never read.

The bounded variant bins each visible key by how far its upper bound u_j = s^_j + radius lies below the row's
largest, U: bin_j = floor((U - u_j) / CUT_STEP), capped at CUT_STEPS. It keeps the keys of bins < n for the smallest
n in 1..CUT_STEPS such that

    sum_{bin_j >= n} e^(u_j - U)  <=  CERTIFY * eps / (1 - eps) * sum_{bin_j < n} e^(l_j - U),   l_j = s^_j - radius

(every visible key when none does): the dropped keys' softmax mass is then at most eps, and |out - dense| <=
2 eps max|v| per element.

Softcapping and ALiBi (AttentionSpec.softcap, alibi_slopes) map u_j as they map the score (capped, then biased): an
upper bound of the score the softmax takes. u_j - 2 radius stays a lower bound, since cap tanh(x / cap) moves no two
scores farther apart, so every rule here holds for those scores unchanged. (Top-k without ALiBi cuts on the
uncapped bounds: capping is monotone, so the top k of the capped scores are those of the uncapped ones; only the
candidates' exact scores are capped.) A sink (AttentionSpec.sinks) is a term known exactly: it joins the kept side
of the certificate, e^(sink - U), and the sum threshold compares weights with.

Top-k through a cache is exact: with n the smallest bin count whose keys (bins < n) number at least k, those keys all
score above U - n CUT_STEP - 2 R (R: the row's largest radius), so a key whose upper bound is below that is not in
the top k; the rest (bins < n + 2 R / CUT_STEP + 2) get exact scores from K, and the top k of those are the answer.
Where fewer than k keys lie in the bins (steep ALiBi slopes, huge logits), the same argument runs on a value c found
by bisecting the upper bounds themselves (at least k keys have u_j >= c): the candidates are the keys with
u_j >= c - 2 R.

Threshold through a cache is exact too: candidates are the keys that may weigh >= tau (e^u >= tau sum_j e^(l_j)),
that may be the largest, and enough more that the rest's sum is known within THRESHOLD_SLACK of the row's; each is
kept or dropped against tau times both bounds of the sum, and while one falls between them more keys are scored
exactly (every key at worst), narrowing the bounds.
"""

from __future__ import annotations

import numpy as np

BLOCK = 32  # keys per shadow block: its offset and step, 8 bytes per dimension, add 1/4 byte per key and dimension
LEVELS = 255  # codes 0..255
CUT_STEP = 0.125  # logits per bin (a power of 2: the bin is an exact scaling)
CUT_STEPS = 128  # bins below the top: 16 logits, e^-16 = 1e-7 of the top key's weight; past them every key is kept
CERTIFY = 1.0 - 2.0**-10  # slack for the float32 sums of the certificate (their relative error is < 1e-5)
# Threshold through a cache: keys are scored exactly until the bounds on the rest's softmax sum are this close
# (relative to the row's sum) before deciding; weights the bounds cannot place against tau make it score more keys.
# Measured on SmolLM2's 8k K/V at tau 0.001: 0.1 to 1.0 alike (1.3x flash decode), 1e-2 1.15x, 3e-3 1.11x.
THRESHOLD_SLACK = 0.1


def margin(head_dim: int) -> float:
    """Relative margin per dimension: float32 rounding of the quantization (< 2^-14 of a block's range), of the
    shadow score and of the exact score (each < (head_dim + 2) 2^-24 of sum_d |q_d| max|k_d|), with 2x to spare."""
    return 2.0 * ((2 * head_dim + 4) * 2.0**-24 + 2.0**-14)


def blocks(n: int) -> int:
    """Shadow blocks covering n keys."""
    return -(-n // BLOCK)


def quantize(k: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The shadow of k (..., n, head_dim), blocks from key 0: (codes uint8 (..., n, head_dim), lo and step float32
    (..., blocks(n), head_dim)). float32 arithmetic, as the kernels quantize."""
    k = np.asarray(k, dtype=np.float32)
    parts = [_quantize_blocks(g) for g in _blocks_of(k)]
    codes = np.concatenate([c.reshape(*k.shape[:-2], -1, k.shape[-1]) for c, _, _ in parts], axis=-2)
    return codes, np.concatenate([lo for _, lo, _ in parts], axis=-2), np.concatenate([t for _, _, t in parts], axis=-2)


def _blocks_of(k: np.ndarray) -> list[np.ndarray]:
    """k (..., n, d) as its whole blocks (..., n // BLOCK, BLOCK, d) and its partial last block (..., 1, m, d)."""
    *lead, n, d = k.shape
    full = n // BLOCK * BLOCK
    groups = [k[..., :full, :].reshape(*lead, full // BLOCK, BLOCK, d)] if full else []
    return groups + ([k[..., None, full:, :]] if n > full else [])


def _quantize_blocks(g: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes (..., blocks, m, d), lo and step (..., blocks, d) of float32 key blocks g (..., blocks, m, d).

    A NaN in a block's dimension makes its lo -Inf and its max +Inf, so the step is +Inf and every bound computed
    from it NaN or +Inf (the kernels then score every key: none is ruled out); codes are 0 where the step is 0 or
    infinite."""
    with np.errstate(invalid="ignore", over="ignore"):
        lo, hi = g.min(axis=-2), g.max(axis=-2)
        lo[np.isnan(lo)] = -np.inf
        hi[np.isnan(hi)] = np.inf
        step = (hi - lo) / np.float32(LEVELS)
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = (g - lo[..., None, :]) / step[..., None, :]
    # 0 / 0 where a dimension is constant over the block (step 0); x / inf = 0 and inf / inf = NaN where it is +Inf
    np.nan_to_num(scaled, copy=False, nan=0.0)
    return np.clip(np.rint(scaled, out=scaled), 0, LEVELS, out=scaled).astype(np.uint8), lo, step
