"""Integer KV caches: how K and V are stored in 8 bits.

Each key and value row (one position of one KV head, head_dim elements) is stored as int8 codes c in -127..127 and
one float32 scale s = max|x| / 127, and stands for s * c (symmetric, round half to even). The kernels read the codes
and fold the scales into the scores (s_k q . c) and into the softmax weights (p s_v), so dequantizing costs one
multiply per key, not per element; a row costs head_dim + 4 bytes instead of 2 head_dim (16-bit) or 4 head_dim.

Chosen by measurement (SmolLM2-135M's perplexity over the model study's 4094 predictions; README "Integer KV
caches"): this cache +0.21% against the float32 cache; K and V round-tripped through 32-element blocks (q8_0)
-0.02%, through K per channel over 32-key groups with V per row (KIVI) -0.004%. All are within the 0.5% goal; per
row is the one whose dequantization is a multiply per key.

A row holding NaN or +-Inf gets a NaN or infinite scale and codes 0: it dequantizes to NaN (0 x Inf), so a
non-finite input poisons the rows that read it instead of passing as a finite wrong value.

The cache stores K's codes in blocks of KEY_BLOCK positions, dimension-major within a block: (..., blocks, head_dim,
KEY_BLOCK), so the decode kernel loads a vector of keys' codes per dimension and computes q . k for a vector of keys
at once, with no sum across lanes. V's codes stay one row per position (P V sums rows of V).
"""

from __future__ import annotations

import numpy as np

from .spec import KV_DTYPES

LEVELS = 127  # codes -127..127 (symmetric: -128 unused)
KEY_BLOCK = 64  # positions per block of K's codes (a cache line of codes per dimension)
CODE_DTYPE = {"int8": np.int8}


def quantize(x: np.ndarray, dtype: str = "int8") -> tuple[np.ndarray, np.ndarray]:
    """Rows x (..., head_dim) as (codes (..., head_dim) int8, scales (...) float32); float32 arithmetic, as the
    cache's append."""
    if dtype not in KV_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(KV_DTYPES)}, got {dtype!r}")
    x = np.asarray(x, dtype=np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        scale = np.max(np.abs(x), axis=-1) / np.float32(LEVELS)  # NaN where a row has a NaN
    usable = np.isfinite(scale) & (scale > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        scaled = x / np.where(usable, scale, np.float32(1))[..., None]
    scaled[~usable] = 0
    codes = np.clip(np.rint(scaled, out=scaled), -LEVELS, LEVELS, out=scaled).astype(CODE_DTYPE[dtype])
    return codes, scale.astype(np.float32)


def dequantize(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The float32 rows codes (..., head_dim) with scales (...) stand for: what the kernels compute with."""
    with np.errstate(invalid="ignore"):
        return codes.astype(np.float32) * scales[..., None]


def key_blocks(n: int) -> int:
    """Blocks of KEY_BLOCK positions covering n."""
    return -(-n // KEY_BLOCK)


def write_key_codes(blocks: np.ndarray, codes: np.ndarray, start: int) -> None:
    """Write codes (..., n, head_dim) of positions start.. into K's blocks (..., blocks, head_dim, KEY_BLOCK)."""
    end = start + codes.shape[-2]
    position = start
    while position < end:
        block, lane = divmod(position, KEY_BLOCK)
        stop = min(end, (block + 1) * KEY_BLOCK)
        blocks[..., block, :, lane:lane + stop - position] = np.swapaxes(codes[..., position - start:stop - start, :],
                                                                          -1, -2)
        position = stop


def key_codes(blocks: np.ndarray, start: int, end: int) -> np.ndarray:
    """The codes of positions start..end-1 from K's blocks (..., blocks, head_dim, KEY_BLOCK), as (..., n, head_dim)
    (a copy)."""
    first, last = start // KEY_BLOCK, key_blocks(end)
    by_position = np.swapaxes(blocks[..., first:last, :, :], -1, -2)
    by_position = by_position.reshape(*by_position.shape[:-3], -1, by_position.shape[-1])
    return np.ascontiguousarray(by_position[..., start - first * KEY_BLOCK:end - first * KEY_BLOCK, :])
