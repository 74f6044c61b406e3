"""Decode attention in TensorIR: a few query rows against a long KV sequence, split across threads
(flash-decoding), K and V read once in their own layout.

The dense variants (standard, flash, mqa) compute the same function; this kernel serves their calls with at most
DECODE_MAX_ROWS query rows. The KV sequence of each (batch, KV head) is cut into up to ``max_splits`` chunks of at
least ``chunk_keys`` keys; every (batch, KV head, chunk) is a parallel task that keeps, per query row, a running max,
sum and unnormalized output over its chunk (the online softmax of flash); a second step merges the chunks. A task's
rows are the query heads of one KV group, so GQA reads each K/V row once for the whole group; with several query
positions (speculative decoding, short prefill chunks), a task walks its chunk once per position, from cache.

K is read as stored, rows of head_dim (no transpose per call): QK^T is a dot product per key, accumulated in
LANES-wide partial vectors (head_dim padded to a multiple of LANES, q zero there) and summed by a halving tree.

Integer K and V (KernelSpec.kv_dtype, an integer KVCache's: tvm_attn/quantized_kv.py) are read as codes with a scale
per row; K's codes are stored in blocks of KEY_BLOCK keys, dimension-major, so q . k is a matmul with the keys along
the vector lanes (no tree), and the kernel takes (q, k, v, k_scale, v_scale, out). In byte products (``byte_products``,
NEON sdot: schedules/byte_products.py) q is an integer row n = round(q / step), step = max|q| / Q_LEVELS, in DIGITS
signed bytes, and each block's codes are interleaved into words of WORD dimensions of a key; P V likewise, per block
of KEY_BLOCK keys, the weights' digits against V's codes interleaved by WORD keys (in tiles wholly below seq_kv).

Blocks (the contract with schedules/decode.py):
  split      one per (batch, KV head, chunk); inside it, per query position:
    q_rows                 the group's query rows, pre-scaled in float32 (unscaled in 16 bits for 16-bit products)
    init_stats, init_acc
    kv_tile                one per KV tile of the chunk the position can see; inside it:
      qk_part                per (row, key, lane): partial dot products over head_dim / LANES steps
      qk_half8, qk_half4, qk_half2, qk
                             the lanes summed pairwise (a tree: LLVM will not reorder a float sum) into S = q k^T
      (integer K instead: qk_codes, per (row, key) q . codes over head_dim; qk_scale, S = that times the key's scale;
       in byte products, q_peak and q_digits per position, and per key block key_block: k_words, qk_bytes (per
       (row, digit, key) int32 digits . codes), then qk_scale from the digits' sums)
      tile_max, rescale, p, tile_sum, pv, update, update_sum   as in flash (integer V: value_weight, the weights
                                                               times V's scales, before pv; in byte products, per
                                                               key block value_block: v_words, w_peak, w_digits,
                                                               pv_bytes, pv_scale, and pv for the last tile)
    save_acc, save_stats   the chunk's (output, max, sum) per row
  merge_max, merge_weight, merge_sum, merge_acc, out
             the chunks merged: w_c = e^(m_c - M), out = sum_c w_c o_c / sum_c w_c l_c
"""

from __future__ import annotations

import dataclasses

from tvm import tirx
from tvm.script import tirx as T

from ..fast_exp import softmax_exp
from ..quantized_kv import KEY_BLOCK
from ..spec import KernelSpec
from .common import (ACC, BF16_BITS, INF, LANE_SUM_LANES, OptionalArguments, Visibility, adjusted, bhsd, bhsd_kernel,
                     bits_of, ceil_div, fresh_block_names, init_online_softmax, online_softmax_state, merge_chunks,
                     online_softmax_tile, poisoned, row_scales, run_time_sizes, softmax_weights, sum_lanes,
                     update_output, value_weights, weighted_values, widen)


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """How the decode kernel splits the KV sequence: tiles of ``block_kv`` keys, chunks of at least ``chunk_keys``
    keys (whole tiles), at most ``max_splits`` chunks per (batch, KV head)."""

    block_kv: int = 128  # measured here at B1 H32 D128, 16k keys: 64 -> 128 keys per tile took MHA 26 -> 29 GB/s
    chunk_keys: int = 1024
    max_splits: int = 64

    def __post_init__(self):
        for name in ("block_kv", "chunk_keys", "max_splits"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DecodeConfig.{name} must be an int >= 1, got {value!r}")
        if self.chunk_keys % self.block_kv:
            raise ValueError(f"DecodeConfig.chunk_keys={self.chunk_keys} must be a multiple of "
                             f"block_kv={self.block_kv}")


LANES = LANE_SUM_LANES  # partial sums per dot product, summed by a tree of 4 halvings
# Byte products: q as integers n = round(q / step), step = max|q| / Q_LEVELS, in DIGITS signed-byte digits (base 256,
# each in -128..127): n is exact in them, and rounding q costs at most step / 2 = max|q| 2^-23 per dimension, the
# float32 rounding of max|q| itself.
DIGITS = 3
Q_LEVELS = 2 ** 22
DIGIT_BIAS = 128 * (1 + 256 + 256 ** 2)  # n + DIGIT_BIAS in 0..2^24: its unsigned base-256 digits are the digits + 128
WORD = 4  # dimensions of one key per int32 lane of a byte product
MAX_BYTE_HEAD_DIM = 512  # digit sums stay within int32
BYTE_VALUE_DIMS = 16  # P V in byte products interleaves V's codes 16 dimensions at a time


def default_config(kspec: KernelSpec) -> DecodeConfig:
    """The split the decode kernel of ``kspec`` takes unless given one: DecodeConfig() for float K and V (512-key chunks
    for a tree mask's). Integer K and V, measured here (Zen 5, 2 cores, int8 caches rotated through memory, head_dim
    128, one process): one query row per KV head takes 64-key tiles (0.89 -> 0.60 ms at 4k keys, 3.96 -> 3.21 ms at
    16k against 128-key ones); grouped rows 1024-key tiles (GQA 32/8 at 16k keys: 1.54 ms with 128-key tiles, 1.23
    with 256, 1.12 with 512, 1.03 with 1024, 1.01 with 2048; at 4k 0.297 ms with 512, 0.283 with 1024). A tile's
    keys past the cache's end are computed and masked: a 1024-key tile costs short caches up to 1023 keys of work."""
    if kspec.tree:
        # A draft tree's rows walk each chunk once per node: half the keys keep a chunk's K and V (128-dim float32)
        # in a 1 MB L2. Measured here (Zen 4), a 16-node tree over 8192 keys: MHA 32 D128 36.3 -> 32.5 ms, GQA 32/8
        # 19.0 -> 18.4 ms against 1024-key chunks (256 keys: the same as 512).
        return DecodeConfig(chunk_keys=512)
    if kspec.kv_dtype is None:
        return DecodeConfig()
    return DecodeConfig(block_kv=64 if kspec.group_size == 1 else 1024, chunk_keys=2048)


def compute(kspec: KernelSpec, config: DecodeConfig | None = None, pairs: bool = False,
            float16_products: bool = False, byte_products: bool = False):
    """The decode PrimFunc for ``kspec`` (dense attention; any seq_q, organized for a few), split by ``config``
    (None: ``default_config(kspec)``). ``pairs`` (bfloat16, head_dim a multiple of 2 x LANES): QK^T in bfloat16
    pair products, each partial lane summing a pair of head dims. ``float16_products`` (float16, head_dim a multiple
    of LANES): QK^T in float16 products (NEON fmlal). Either way q is kept in 16 bits, unscaled (the scale applied to
    the scores), and P V widens V as without. ``byte_products`` (integer K and V, head_dim a multiple of WORD): q . K's
    codes in int32 byte products (NEON sdot), q in DIGITS signed-byte digits."""
    if pairs and (kspec.dtype != "bfloat16" or kspec.head_dim % (2 * LANES)):
        raise ValueError(f"pair products need bfloat16 inputs and a head_dim multiple of {2 * LANES}, got "
                         f"{kspec.dtype} head_dim={kspec.head_dim}")
    if float16_products and (kspec.dtype != "float16" or kspec.head_dim % LANES or pairs):
        raise ValueError(f"float16 products need float16 inputs, a head_dim multiple of {LANES} and no pairs, got "
                         f"{kspec.dtype} head_dim={kspec.head_dim} pairs={pairs}")
    config = config if config is not None else default_config(kspec)
    quantized = kspec.kv_dtype is not None
    if quantized and (pairs or float16_products):
        raise ValueError(f"{kspec.kv_dtype} K and V are read as codes: no pair or float16 products")
    if byte_products and (not quantized or kspec.head_dim % WORD or kspec.head_dim > MAX_BYTE_HEAD_DIM):
        raise ValueError(f"byte products need integer K and V and a head_dim multiple of {WORD} up to "
                         f"{MAX_BYTE_HEAD_DIM}, got kv_dtype={kspec.kv_dtype} head_dim={kspec.head_dim}")
    KB = KEY_BLOCK
    # P V in byte products too where head_dim is whole interleaves of V's codes (else V is widened)
    byte_values_too = byte_products and kspec.head_dim % BYTE_VALUE_DIMS == 0
    if quantized and config.block_kv % KB:
        raise ValueError(f"integer K is read in blocks of {KB} keys: DecodeConfig.block_kv={config.block_kv} must be a "
                         f"multiple of {KB}")
    fresh_block_names()
    H, KVH, D = kspec.heads, kspec.kv_heads, kspec.head_dim
    G = kspec.group_size
    BK = config.block_kv
    NSMAX = config.max_splits
    CHUNK_TILES = config.chunk_keys // BK
    DP = ceil_div(D, LANES) * LANES  # head_dim padded to whole partial vectors (q zero there)
    STEP = 2 * LANES if pairs else LANES  # head dims one partial vector covers per step
    Q_ROWS = BF16_BITS if pairs else "float16" if float16_products else ACC
    q_exact = pairs or float16_products  # q kept as given (16 bits), the scale applied to the scores

    def score(dot):
        """A score from its dot product: 16-bit products take q unscaled (exact)."""
        return dot * T.float32(kspec.scale) if q_exact else dot

    def score_terms(kh, i, t):
        """(s, g, j) -> score s of row g (query head kh * G + g, query i) against key j of tile t as the softmax
        takes it (common.adjusted)."""
        return lambda s, g, j: adjusted(kspec, s, kh * G + g, vis.distance(i, t * BK + j))

    def adjusted_dot(kh, i, t):
        """(dot, g, j) -> the score of a dot product, adjusted."""
        return lambda dot, g, j: score_terms(kh, i, t)(score(dot), g, j)

    def dim(d):
        """Index d of a K row, clamped into head_dim where the padding reaches past it."""
        return d if DP == D else T.min(d, D - 1)
    SCALE = T.float32(kspec.scale)
    NEG = T.min_value("float32")
    ZERO = T.float32(0)
    ONE = T.float32(1)
    dtype = kspec.dtype
    B, SQ, SKV = run_time_sizes()
    vis = Visibility(kspec, SQ, SKV)
    NK = ceil_div(SKV, BK)
    # Chunks of TPC whole tiles: chunk_keys worth, more when that would make over max_splits chunks. (Written
    # with one division each: TVM's lowering of nested symbolic divisions grows exponentially.)
    TPC = T.max(CHUNK_TILES, ceil_div(NK, NSMAX))
    NSR = ceil_div(NK, TPC)  # chunks

    def query_sees(i, g, j):
        """Every row g of a task is query position i."""
        return vis.sees(i, j)

    NKB = tirx.Var("key_blocks", "int32")  # integer K: blocks of KB keys, the last one partly filled

    def key_block(t, j):
        """The block of integer K's codes holding key j of tile t (past the last block: the last block)."""
        return T.min(t * (BK // KB) + j // KB, NKB - 1)

    def key_scale(scales, b, kh, t):
        """j -> the scale of key j of tile t in an integer cache's row scales (padded to whole key blocks)."""
        return lambda j: scales[b, kh, key_block(t, j) * KB + j % KB]

    def tile_range(s, i):
        """The KV tiles of chunk s that query i sees: range(first, end) (empty when none)."""
        first = T.max(s * TPC, vis.first_tile(i, BK))
        return first, T.max(first, T.min(T.min((s + 1) * TPC, NK), vis.end_tile(i, BK)))

    Q = T.float32(Q_LEVELS)

    def step_of(peak):
        """The step of a row's integers whose max |x| is ``peak`` (NaN when the row is not finite: what is computed
        from it is then NaN)."""
        return T.Select(peak < T.float32(INF), peak * T.float32(1 / Q_LEVELS), T.float32(float("nan")))

    def integer_of(x, peak):
        """round(x / step) for an element x of a row whose max |x| is ``peak`` (0 when it is not finite: what is
        computed from the row is NaN then, whatever its digits; and where peak is subnormal, 1 / peak overflowing:
        a row of elements below 2^-126 counts as zeros)."""
        scaled = x * T.Select(peak > ZERO, ONE / peak, ZERO) * Q
        return T.Cast("int32", T.round(T.Select(T.abs(scaled) <= Q, scaled, ZERO)))

    def digit(n, r):
        """Digit r of integer n."""
        return T.Cast("int8", T.bitwise_and(T.shift_right(n + DIGIT_BIAS, 8 * r), 255) - 128)

    def digit_sum(code_dots, g, j):
        """A dot product in units of its row's step, from its digits' int32 dot products (over head_dim or a key
        block): the top two combined exactly in int32 (|digit 2| <= 64: under 2^30 for head_dim <=
        MAX_BYTE_HEAD_DIM), then rounded once to float32."""
        top = code_dots[g, 2, j] * 256 + code_dots[g, 1, j]
        return T.Cast(ACC, top) * T.float32(256) + T.Cast(ACC, code_dots[g, 0, j])

    @T.macro
    def q_to_digits(q_rows, q_peak, q_digits):
        for g, d in T.grid(G, D):
            with T.sblock("q_peak"):
                vg, vd = T.axis.remap("SR", [g, d])
                with T.init():
                    q_peak[vg] = ZERO
                q_peak[vg] = T.max(q_peak[vg], poisoned(T.abs(q_rows[vg, vd])))
        for g, r, d in T.grid(G, DIGITS, D):
            with T.sblock("q_digits"):
                vg, vr, vd = T.axis.remap("SSS", [g, r, d])
                q_digits[vg, vr, vd] = digit(integer_of(q_rows[vg, vd], q_peak[vg]), vr)

    @T.macro
    def byte_dots(k, vb, vkh, vt, kb, words, q_digits, code_dots):
        """code_dots of key block kb of tile vt: its codes interleaved into words, then q's digits . codes."""
        with T.sblock("key_block"):
            vkb = T.axis.opaque(BK // KB, kb)
            for w, j, t in T.grid(D // WORD, KB, WORD):
                with T.sblock("k_words"):
                    vw, vj, vt4 = T.axis.remap("SSS", [w, j, t])
                    # Tiles past the last block read it again; tile_max and p mask them.
                    words[vw, vj, vt4] = k[vb, vkh, T.min(vt * (BK // KB) + vkb, NKB - 1), vw * WORD + vt4, vj]
            for g, r, j, d in T.grid(G, DIGITS, KB, D):
                with T.sblock("qk_bytes"):
                    vg, vr, vj, vd = T.axis.remap("SSSR", [g, r, j, d])
                    with T.init():
                        code_dots[vg, vr, vkb * KB + vj] = 0
                    code_dots[vg, vr, vkb * KB + vj] = code_dots[vg, vr, vkb * KB + vj] + T.Cast(
                        "int32", q_digits[vg, vr, vd]) * T.Cast("int32", words[vd // WORD, vj, vd % WORD])

    @T.macro
    def byte_values(O, weights, v, vb, vkh, key0, w_peak, w_digits, v_words, value_dots):
        """O = weights V over a tile whose keys are all below seq_kv, in byte products, per block of KB keys: V's
        codes interleaved by WORD keys, the block's weights in digits of their own step."""
        for kb in range(BK // KB):
            with T.sblock("value_block"):
                vkb = T.axis.opaque(BK // KB, kb)
                for w, d, t in T.grid(KB // WORD, D, WORD):
                    with T.sblock("v_words"):
                        vw, vd, vt4 = T.axis.remap("SSS", [w, d, t])
                        v_words[vw, vd, vt4] = v[vb, vkh, key0 + vkb * KB + vw * WORD + vt4, vd]
                for g, j in T.grid(G, KB):
                    with T.sblock("w_peak"):
                        vg, vj = T.axis.remap("SR", [g, j])
                        with T.init():
                            w_peak[vg] = NEG  # (the max's identity: rfactor recognizes it)
                        w_peak[vg] = T.max(w_peak[vg], poisoned(T.abs(weights[vg, vkb * KB + vj])))
                for g, r, j in T.grid(G, DIGITS, KB):
                    with T.sblock("w_digits"):
                        vg, vr, vj = T.axis.remap("SSS", [g, r, j])
                        w_digits[vg, vr, vj] = digit(integer_of(weights[vg, vkb * KB + vj], w_peak[vg]), vr)
                for g, r, d, j in T.grid(G, DIGITS, D, KB):
                    with T.sblock("pv_bytes"):
                        vg, vr, vd, vj = T.axis.remap("SSSR", [g, r, d, j])
                        with T.init():
                            value_dots[vg, vr, vd] = 0
                        value_dots[vg, vr, vd] = value_dots[vg, vr, vd] + T.Cast(
                            "int32", w_digits[vg, vr, vj]) * T.Cast("int32", v_words[vj // WORD, vd, vj % WORD])
                for g, d in T.grid(G, D):
                    with T.sblock("pv_scale"):
                        vg, vd = T.axis.remap("SS", [g, d])
                        O[vg, vd] = T.Select(vkb == 0, ZERO, O[vg, vd]) + \
                            digit_sum(value_dots, vg, vd) * step_of(w_peak[vg])

    def integer_arguments(q_h, k_h, v_h, k_scale_h, v_scale_h, out_h):
        """The buffers of the integer K and V kernel from their handles: q, K's codes (batch, kv_heads, key blocks,
        head_dim, KB), V's codes, their row scales and out."""
        return (bhsd(q_h, B, H, SQ, D, dtype),
                T.match_buffer(k_h, (B, KVH, NKB, D, KB), kspec.kv_dtype,
                               strides=(T.int32(), T.int32(), D * KB, KB, 1), align=1, offset_factor=1),
                bhsd(v_h, B, KVH, SKV, D, kspec.kv_dtype), row_scales(k_scale_h, B, KVH, NKB * KB),
                row_scales(v_scale_h, B, KVH, NKB * KB), bhsd(out_h, B, H, SQ, D, dtype))

    @T.macro
    def body(q, k, v, k_scale, v_scale, sinks, out):
        m_part = T.sblock_alloc_buffer((B, KVH, NSR, SQ, G), ACC)
        l_part = T.sblock_alloc_buffer((B, KVH, NSR, SQ, G), ACC)
        o_part = T.sblock_alloc_buffer((B, KVH, NSR, SQ, G, D), ACC)
        merged_max = T.sblock_alloc_buffer((B, H, SQ), ACC)
        weight = T.sblock_alloc_buffer((B, H, SQ, NSR), ACC)
        merged_sum = T.sblock_alloc_buffer((B, H, SQ), ACC)
        merged_acc = T.sblock_alloc_buffer((B, H, SQ, D), ACC)
        for b, kh, s in T.grid(B, KVH, NSR):
            with T.sblock("split"):
                vb, vkh, vs = T.axis.remap("SSS", [b, kh, s])
                if quantized:
                    T.reads(q[vb, vkh * G:vkh * G + G, 0:SQ, 0:D], k[vb, vkh, 0:NKB, 0:D, 0:KB],
                            v[vb, vkh, 0:SKV, 0:D], k_scale[vb, vkh, 0:NKB * KB], v_scale[vb, vkh, 0:NKB * KB])
                else:
                    T.reads(q[vb, vkh * G:vkh * G + G, 0:SQ, 0:D], k[vb, vkh, 0:SKV, 0:D], v[vb, vkh, 0:SKV, 0:D])
                T.writes(m_part[vb, vkh, vs, 0:SQ, 0:G], l_part[vb, vkh, vs, 0:SQ, 0:G],
                         o_part[vb, vkh, vs, 0:SQ, 0:G, 0:D])
                q_rows = T.sblock_alloc_buffer((G, DP), Q_ROWS)
                if not quantized:  # the partial dot products and their tree (integer K needs neither)
                    part = T.sblock_alloc_buffer((G, BK, LANES), ACC)
                    half8 = T.sblock_alloc_buffer((G, BK, 8), ACC)
                    half4 = T.sblock_alloc_buffer((G, BK, 4), ACC)
                    half2 = T.sblock_alloc_buffer((G, BK, 2), ACC)
                S = T.sblock_alloc_buffer((G, BK), ACC)
                P = T.sblock_alloc_buffer((G, BK), ACC)
                O, m, t_max, t_sum, alpha, l, acc = online_softmax_state(G, D)
                if quantized:  # (only then: a float kernel's workload, the key of its tuning records, is unchanged)
                    if byte_products:
                        q_peak = T.sblock_alloc_buffer((G,), ACC)  # max |q|, +Inf when q is not finite
                        q_digits = T.sblock_alloc_buffer((G, DIGITS, D), "int8")
                        words = T.sblock_alloc_buffer((D // WORD, KB, WORD), "int8")  # a key block's codes by key
                        code_dots = T.sblock_alloc_buffer((G, DIGITS, BK), "int32")  # q's digits . codes
                    else:
                        code_dots = T.sblock_alloc_buffer((G, BK), ACC)  # q . codes, before the keys' scales
                    weights = T.sblock_alloc_buffer((G, BK), ACC)  # the softmax's weights times V's scales
                    if byte_values_too:
                        w_peak = T.sblock_alloc_buffer((G,), ACC)  # a key block's max weight
                        w_digits = T.sblock_alloc_buffer((G, DIGITS, KB), "int8")
                        v_words = T.sblock_alloc_buffer((KB // WORD, D, WORD), "int8")  # V's codes by WORD keys
                        value_dots = T.sblock_alloc_buffer((G, DIGITS, D), "int32")  # the weights' digits . codes
                        O_bytes = T.sblock_alloc_buffer((G, D), ACC)  # O of a tile in byte products
                for i in range(SQ):
                    with T.sblock("query"):
                        vi = T.axis.opaque(SQ, i)
                        for g, d in T.grid(G, DP):
                            with T.sblock("q_rows"):
                                vg, vd = T.axis.remap("SS", [g, d])
                                if pairs:  # DP == D
                                    q_rows[vg, vd] = bits_of(q[vb, vkh * G + vg, vi, vd])
                                elif float16_products:  # DP == D
                                    q_rows[vg, vd] = q[vb, vkh * G + vg, vi, vd]
                                else:
                                    q_rows[vg, vd] = T.if_then_else(
                                        vd < D, widen(q[vb, vkh * G + vg, vi, T.min(vd, D - 1)]) * SCALE, ZERO)
                        if byte_products:
                            q_to_digits(q_rows, q_peak, q_digits)
                        init_online_softmax(m, l, acc, G, D, NEG, ZERO)
                        for t in range(tile_range(vs, vi)[0], tile_range(vs, vi)[1]):
                            with T.sblock("kv_tile"):
                                vt = T.axis.opaque(NK, t)
                                if byte_products:
                                    for kb in range(BK // KB):
                                        byte_dots(k, vb, vkh, vt, kb, words, q_digits, code_dots)
                                    for g, jj in T.grid(G, BK):
                                        with T.sblock("qk_scale"):
                                            vg, j = T.axis.remap("SS", [g, jj])
                                            S[vg, j] = score_terms(vkh, vi, vt)(
                                                digit_sum(code_dots, vg, j) * step_of(q_peak[vg]) *
                                                key_scale(k_scale, vb, vkh, vt)(j), vg, j)
                                elif quantized:  # codes in blocks of keys: q . k for a vector of keys at once
                                    for g, jj, d in T.grid(G, BK, D):
                                        with T.sblock("qk_codes"):
                                            vg, j, vd = T.axis.remap("SSR", [g, jj, d])
                                            with T.init():
                                                code_dots[vg, j] = ZERO
                                            # Tiles past the last block read it again; tile_max and p mask them.
                                            code_dots[vg, j] = code_dots[vg, j] + q_rows[vg, vd] * widen(
                                                k[vb, vkh, key_block(vt, j), vd, j % KB])
                                    for g, jj in T.grid(G, BK):
                                        with T.sblock("qk_scale"):
                                            vg, j = T.axis.remap("SS", [g, jj])
                                            S[vg, j] = score_terms(vkh, vi, vt)(
                                                code_dots[vg, j] * key_scale(k_scale, vb, vkh, vt)(j), vg, j)
                                elif pairs:
                                    for g, jj, c, lane, t2 in T.grid(G, BK, DP // STEP, LANES, 2):
                                        with T.sblock("qk_part"):
                                            vg, j, vc, vl, vt2 = T.axis.remap("SSRSR", [g, jj, c, lane, t2])
                                            with T.init():
                                                part[vg, j, vl] = ZERO
                                            part[vg, j, vl] = part[vg, j, vl] + widen(
                                                q_rows[vg, vc * STEP + vl * 2 + vt2]) * widen(
                                                k[vb, vkh, T.min(vt * BK + j, SKV - 1), vc * STEP + vl * 2 + vt2])
                                elif float16_products:
                                    for g, jj, c, lane in T.grid(G, BK, DP // LANES, LANES):
                                        with T.sblock("qk_part"):
                                            vg, j, vc, vl = T.axis.remap("SSRS", [g, jj, c, lane])
                                            with T.init():
                                                part[vg, j, vl] = ZERO
                                            part[vg, j, vl] = part[vg, j, vl] + widen(
                                                q_rows[vg, vc * LANES + vl]) * widen(
                                                k[vb, vkh, T.min(vt * BK + j, SKV - 1), vc * LANES + vl])
                                else:
                                    for g, jj, c, lane in T.grid(G, BK, DP // LANES, LANES):
                                        with T.sblock("qk_part"):
                                            vg, j, vc, vl = T.axis.remap("SSRS", [g, jj, c, lane])
                                            with T.init():
                                                part[vg, j, vl] = ZERO
                                            # Keys past seq_kv read the last key; tile_max and p mask them.
                                            part[vg, j, vl] = part[vg, j, vl] + q_rows[vg, vc * LANES + vl] * \
                                                widen(k[vb, vkh, T.min(vt * BK + j, SKV - 1), dim(vc * LANES + vl)])
                                if not quantized:
                                    sum_lanes(part, half8, half4, half2, S, G, BK, adjusted_dot(vkh, vi, vt))
                                if byte_values_too:  # but in the tile reaching past seq_kv: V widened
                                    softmax_weights(S, P, m, t_max, t_sum, alpha, vt * BK, G, BK, vi, query_sees,
                                                    vis.all_see(vi, vi, vt * BK, vt * BK + BK), NEG, ZERO, ONE,
                                                    softmax_exp)
                                    value_weights(weights, P, key_scale(v_scale, vb, vkh, vt), G, BK)
                                    if vt * BK + BK <= SKV:
                                        byte_values(O_bytes, weights, v, vb, vkh, vt * BK, w_peak, w_digits,
                                                    v_words, value_dots)
                                    else:
                                        weighted_values(O, weights, v, vb, vkh, vt * BK, G, BK, D, SKV, ZERO)
                                    update_output(acc, O, alpha, l, t_sum, G, D, O_bytes, vt * BK + BK <= SKV)
                                elif quantized:
                                    online_softmax_tile(S, P, O, m, t_max, t_sum, alpha, l, acc, v, vb, vkh, vt * BK,
                                                        G, BK, D, SKV, vi, query_sees,
                                                        vis.all_see(vi, vi, vt * BK, vt * BK + BK), NEG, ZERO, ONE,
                                                        key_scale(v_scale, vb, vkh, vt), weights)
                                else:
                                    online_softmax_tile(S, P, O, m, t_max, t_sum, alpha, l, acc, v, vb, vkh, vt * BK,
                                                        G, BK, D, SKV, vi, query_sees,
                                                        vis.all_see(vi, vi, vt * BK, vt * BK + BK), NEG, ZERO, ONE)
                        for g, d in T.grid(G, D):
                            with T.sblock("save_acc"):
                                vg, vd = T.axis.remap("SS", [g, d])
                                o_part[vb, vkh, vs, vi, vg, vd] = acc[vg, vd]
                        for g in range(G):
                            with T.sblock("save_stats"):
                                vg = T.axis.spatial(G, g)
                                m_part[vb, vkh, vs, vi, vg] = m[vg]
                                l_part[vb, vkh, vs, vi, vg] = l[vg]
        merge_chunks(m_part, l_part, o_part, merged_max, weight, merged_sum, merged_acc, sinks, out, B, H, SQ, NSR, G,
                     D, dtype, NEG, ZERO)

    if quantized:
        optional = OptionalArguments(kspec, (SQ, SQ), vis)

        @T.prim_func(s_tir=True)
        def decode_integer_kv(q_h: T.handle, k_h: T.handle, v_h: T.handle, k_scale_h: T.handle, v_scale_h: T.handle,
                              sinks_h: T.handle, tree_h: T.handle, out_h: T.handle):
            T.func_attr({"global_symbol": "main", "tirx.noalias": True})
            q, k, v, k_scale, v_scale, out = integer_arguments(q_h, k_h, v_h, k_scale_h, v_scale_h, out_h)
            optional.declare(sinks_h, tree_h)
            with T.sblock("root"):
                body(q, k, v, k_scale, v_scale, optional.sinks, out)

        return optional.signature(decode_integer_kv)

    @T.macro
    def float_body(q, k, v, sinks, out):
        body(q, k, v, None, None, sinks, out)

    return bhsd_kernel(float_body, kspec, B, SQ, SKV, vis)
