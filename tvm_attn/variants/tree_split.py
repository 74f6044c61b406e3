"""Draft-tree verification in one call (Variant.tree_compute, path "tree"): the split-KV decode kernel's tasks
(batch, KV head, chunk of keys) with all of a tree's rows in a row tile. The nodes times the group's query heads
are the rows of a KV head (row r: query r // G, head kh * G + r % G), in row tiles of block_q rows (16 nodes' rows,
at most MAX_BLOCK_Q); each (batch, KV head, chunk, row tile) task runs the online softmax over the chunk's KV tiles
with both matmuls register-blocked, so each K and V element loaded serves every row of the tile (the decode kernel
walks a chunk once per node). Scores are kept keys x rows, the rows along the vector lanes: S = K q^T takes K as
stored, each element broadcast (a transposed copy of each K tile, tried first, took MHA 32 D128 26 ms against 24);
O = P V as flash's. A second step merges each row's chunks by their maxes, as the decode kernel's.

In bfloat16 pair products (``pairs``; schedules/pair_products.py) the operands along the lanes are BF16_PAIR words:
q^T as (d / 2, row), P as (key / 2, row) and each KV tile's V as (key / 2, d) (block v_pairs); K is read in place,
a pair of head dims broadcast. Row tiles are then whole vectors of rows (PAIR_ROWS), the rows past the tile's nodes
padding. Measured here (Zen 4, a 16-node tree over 8192 positions, bfloat16, one interleaved round): GQA 32/8 D128
7.9 ms against 13.0 widened to float32, MHA 32 D128 13.1 against 20.9. Without pair products, 16-bit KV tiles are
widened to float32 once per tile: on a Zen 1 (AVX2), bfloat16 GQA 34.1 ms against 49.1 widened per use, MHA 40.7
against 47.8; float16 GQA 37.4 against 56.7 (runs a few minutes apart; the same copy of float32 tiles gained 2-11%
there, not taken: a 128 x 128 float32 tile passes L1).

Blocks (the contract with schedules/tree_split.py):
  tile       one per (batch, KV head, chunk, row tile):
    q_tile     q^T of the tile's rows, pre-scaled, float32 (zero past the last row); pairs: unscaled words
    init_stats, init_acc
    kv_tile    one per KV tile of the chunk some row of the tile sees:
      k_wide     (16-bit without pairs) the tile's K in float32
      qk         S[j, r] = k_j . q_r                    (loops key, row, d; pairs: key, row, d / 2, pair)
      score_terms                                       (softcap, ALiBi: common.adjusted)
      tile_max, rescale, p, tile_sum                    (common.softmax_weights_by_key: loops key, row)
      v_pairs    (pairs) the tile's V in words of two keys' elements; v_wide (16-bit without pairs) in float32
      pv         O = P V                                (loops row, key, d; pairs: row, key / 2, d, pair)
      update, update_sum                                (common.update_output)
    save_acc, save_stats   the chunk's (output, max, sum) per row
  merge_max, merge_weight, merge_sum, merge_acc, out   per (batch, head, query): common.merge_chunks
"""

from __future__ import annotations

from tvm.script import tirx as T

from ..fast_exp import softmax_exp
from ..spec import KernelSpec
from .common import (ACC, BF16_PAIR, Visibility, adjusted, adjusts_by_position, adjusts_scores, bhsd_kernel, ceil_div,
                     fresh_block_names, init_online_softmax, online_softmax_state, merge_chunks, pair_half, pair_of,
                     run_time_sizes, softmax_weights_by_key, update_output, widen)
from .decode import DecodeConfig

NODES_PER_TILE = 16  # a row tile holds this many nodes' rows (variants.TREE_DECODE_MAX_ROWS)
MAX_BLOCK_Q = 64
# In pair products the rows lie along the lanes of both operands' words: row tiles are padded to whole vectors of
# every ISA's pair-product lanes (vdpbf16ps 16, bfdot 4).
PAIR_ROWS = 16


def compute(kspec: KernelSpec, config: DecodeConfig = DecodeConfig(), block_q: int | None = None,
            pairs: bool = False):
    """The PrimFunc for ``kspec`` (dense attention; any seq_q, organized for a draft tree of up to 16 nodes), keys
    split as ``config`` says, ``block_q`` rows per row tile (a multiple of the group size; default: 16 nodes' rows,
    fewer nodes where that passes MAX_BLOCK_Q). ``pairs`` (bfloat16): both matmuls in bfloat16 pair products
    accumulating in float32 (q kept as given with the scale applied to the scores, P rounded to bfloat16, each KV
    tile's V packed in pairs of keys).
    Measured here (Zen 4, a 16-node tree over 8192 positions, float32): GQA 32/8 D128 13.8 ms with 64-row tiles, 15.8
    with 32; 128-key tiles in 1024-key chunks 13.8 ms, 64 in 512 15.1; MHA 32 D128 the same 24 ms either way."""
    if pairs and (kspec.dtype != "bfloat16" or kspec.head_dim % 2 or config.block_kv % 2):
        raise ValueError(f"pair products need bfloat16 inputs, an even head_dim and an even block_kv, got "
                         f"{kspec.dtype} head_dim={kspec.head_dim} block_kv={config.block_kv}")
    fresh_block_names()
    H, KVH, D = kspec.heads, kspec.kv_heads, kspec.head_dim
    G = kspec.group_size
    NPT = block_q // G if block_q else max(1, min(NODES_PER_TILE, MAX_BLOCK_Q // G))  # nodes per row tile
    RPT = NPT * G  # rows per tile
    BQ = ceil_div(RPT, PAIR_ROWS) * PAIR_ROWS if pairs else RPT  # the tile's width: rows past RPT are padding
    BK = config.block_kv
    PACK, OPERAND = (2, BF16_PAIR) if pairs else (1, ACC)  # q^T and P: pairs in words, or float32
    CHUNK_TILES = config.chunk_keys // BK
    SCALE = T.float32(kspec.scale)
    NEG = T.min_value("float32")
    ZERO = T.float32(0)
    ONE = T.float32(1)
    ADJUST = adjusts_scores(kspec)
    BY_POSITION = adjusts_by_position(kspec)
    # 16-bit K and V without pair products: each KV tile widened to float32 once (k_wide, v_wide), not once per use.
    WIDE_TILES = kspec.dtype != "float32" and not pairs
    # Pair products take q as given (negated for a negative scale, which is exact) and the scale in the exp, or in
    # the adjusted scores: the running max is then unscaled, and scaled when saved for the merge.
    SIGN_BITS = T.uint32(0 if kspec.scale > 0 else 0x80008000)
    PRESCALE = abs(kspec.scale) if pairs else 1.0
    MAX_SCALE = PRESCALE if not ADJUST else 1.0
    score_exp = (lambda x: softmax_exp(x * T.float32(MAX_SCALE))) if MAX_SCALE != 1.0 else softmax_exp
    dtype = kspec.dtype
    B, SQ, SKV = run_time_sizes()
    vis = Visibility(kspec, SQ, SKV)
    R = SQ * G
    NRT = ceil_div(R, RPT)
    NK = ceil_div(SKV, BK)
    TPC = T.max(CHUNK_TILES, ceil_div(NK, config.max_splits))
    NSR = ceil_div(NK, TPC)

    def query(row):
        """The query of row ``row`` (rows past the last one: the last query)."""
        return T.min(row, R - 1) // G

    def tile_row(rt, r):
        """The row that row r of row tile rt computes (padding rows: the tile's last)."""
        return rt * RPT + (T.min(r, RPT - 1) if BQ > RPT else r)

    def in_tile(rt, r):
        """Whether row r of row tile rt is a row of the result."""
        return T.And(r < RPT, rt * RPT + r < R) if BQ > RPT else rt * RPT + r < R

    def q_of(q, b, kh, rt, r, d):
        """Element d of the query row that row r of row tile rt computes (KV head kh)."""
        row = tile_row(rt, r)
        return q[b, kh * G + T.min(row, R - 1) % G, query(row), d]

    def row_sees(rt, r, j):
        return vis.sees(query(tile_row(rt, r)), j)

    def tile_queries(rt):
        return query(rt * RPT), query(rt * RPT + RPT - 1)

    def tile_range(s, rt):
        """The KV tiles of chunk s that some row of row tile rt sees: range(first, end)."""
        first_q, last_q = tile_queries(rt)
        first = T.max(s * TPC, vis.first_tile(first_q, BK))
        return first, T.max(first, T.min(T.min((s + 1) * TPC, NK), vis.end_tile(last_q, BK)))

    def tile_sees_all(rt, t):
        first_q, last_q = tile_queries(rt)
        return vis.all_see(first_q, last_q, t * BK, t * BK + BK)

    def score_terms(kh, rt, t):
        def adjust(r, j, s):
            row = T.min(tile_row(rt, r), R - 1)
            return adjusted(kspec, s, kh * G + row % G, vis.distance(row // G, t * BK + j), PRESCALE)
        return adjust

    def key(t, j):
        return T.min(t * BK + j, SKV - 1)

    def in_place(x, b, kh, t):
        """(j, d) -> element d of key j of KV tile t of x (K or V), widened to float32."""
        return lambda j, d: widen(x[b, kh, key(t, j), d])

    def from_tile(tile):
        """(j, d) -> tile[j, d]: a KV tile widened once."""
        return lambda j, d: tile[j, d]

    @T.macro
    def scores(S, q_t, k_at):
        """S[j, r] = k_j . q_r in float32, k_j's elements k_at(j, d)."""
        for jj, ri, d in T.grid(BK, BQ, D):
            with T.sblock("qk"):
                j, r, dd = T.axis.remap("SSR", [jj, ri, d])
                with T.init():
                    S[j, r] = ZERO
                S[j, r] = S[j, r] + k_at(j, dd) * q_t[dd, r]

    @T.macro
    def weighted_values(O, P, v_at):
        """O = P V in float32, V's elements v_at(j, d)."""
        for ri, jj, d in T.grid(BQ, BK, D):
            with T.sblock("pv"):
                r, j, dd = T.axis.remap("SRS", [ri, jj, d])
                with T.init():
                    O[r, dd] = ZERO
                O[r, dd] = O[r, dd] + P[j, r] * v_at(j, dd)

    @T.macro
    def scores_to_output(S, P, O, m, t_max, t_sum, alpha, l, acc, v, vb, vkh, vt, vrt):
        """The online softmax of one KV tile whose scores S (keys x rows: the rows along the vector lanes) are
        computed, and its P V added to the running output."""
        softmax_weights_by_key(S, P, m, t_max, t_sum, alpha, vt * BK, BQ, BK, vrt, row_sees, tile_sees_all(vrt, vt),
                               NEG, ZERO, ONE, score_exp, pairs)
        if pairs:
            v_w = T.sblock_alloc_buffer((BK // 2, D), BF16_PAIR)
            for ii, d in T.grid(BK // 2, D):
                with T.sblock("v_pairs"):
                    i, dd = T.axis.remap("SS", [ii, d])
                    v_w[i, dd] = pair_of(v[vb, vkh, key(vt, 2 * i), dd], v[vb, vkh, key(vt, 2 * i + 1), dd])
            for ri, ii, d, t in T.grid(BQ, BK // 2, D, 2):
                with T.sblock("pv"):
                    r, i, dd, vpair = T.axis.remap("SRSR", [ri, ii, d, t])
                    with T.init():
                        O[r, dd] = ZERO
                    O[r, dd] = O[r, dd] + pair_half(P[i, r], vpair) * pair_half(v_w[i, dd], vpair)
        elif WIDE_TILES:
            v_w = T.sblock_alloc_buffer((BK, D), ACC)
            for jj, d in T.grid(BK, D):
                with T.sblock("v_wide"):
                    j, dd = T.axis.remap("SS", [jj, d])
                    v_w[j, dd] = in_place(v, vb, vkh, vt)(j, dd)
            weighted_values(O, P, from_tile(v_w))
        else:
            weighted_values(O, P, in_place(v, vb, vkh, vt))
        update_output(acc, O, alpha, l, t_sum, BQ, D)

    @T.macro
    def body(q, k, v, sinks, out):
        m_part = T.sblock_alloc_buffer((B, KVH, NSR, NRT * NPT, G), ACC)  # (a node's rows: its G heads)
        l_part = T.sblock_alloc_buffer((B, KVH, NSR, NRT * NPT, G), ACC)
        o_part = T.sblock_alloc_buffer((B, KVH, NSR, NRT * NPT, G, D), ACC)
        merged_max = T.sblock_alloc_buffer((B, H, SQ), ACC)
        weight = T.sblock_alloc_buffer((B, H, SQ, NSR), ACC)
        merged_sum = T.sblock_alloc_buffer((B, H, SQ), ACC)
        merged_acc = T.sblock_alloc_buffer((B, H, SQ, D), ACC)
        for b, kh, s, rt in T.grid(B, KVH, NSR, NRT):
            with T.sblock("tile"):
                vb, vkh, vs, vrt = T.axis.remap("SSSS", [b, kh, s, rt])
                q_t = T.sblock_alloc_buffer((D // PACK, BQ), OPERAND)
                S = T.sblock_alloc_buffer((BK, BQ), ACC)
                if ADJUST:
                    S_adjusted = T.sblock_alloc_buffer((BK, BQ), ACC)
                P = T.sblock_alloc_buffer((BK // PACK, BQ), OPERAND)
                O, m, t_max, t_sum, alpha, l, acc = online_softmax_state(BQ, D)
                if pairs:
                    for p, ri in T.grid(D // 2, BQ):
                        with T.sblock("q_tile"):
                            vp, r = T.axis.remap("SS", [p, ri])
                            q_t[vp, r] = T.if_then_else(
                                in_tile(vrt, r),
                                pair_of(q_of(q, vb, vkh, vrt, r, 2 * vp), q_of(q, vb, vkh, vrt, r, 2 * vp + 1))
                                ^ SIGN_BITS,
                                T.uint32(0))
                else:
                    for d, ri in T.grid(D, BQ):
                        with T.sblock("q_tile"):
                            dd, r = T.axis.remap("SS", [d, ri])
                            q_t[dd, r] = T.if_then_else(in_tile(vrt, r), widen(q_of(q, vb, vkh, vrt, r, dd)) * SCALE,
                                                        ZERO)
                init_online_softmax(m, l, acc, BQ, D, NEG, ZERO)
                for t in range(tile_range(vs, vrt)[0], tile_range(vs, vrt)[1]):
                    with T.sblock("kv_tile"):
                        vt = T.axis.opaque(NK, t)
                        if pairs:
                            for jj, ri, p, tt in T.grid(BK, BQ, D // 2, 2):
                                with T.sblock("qk"):
                                    j, r, vp, vpair = T.axis.remap("SSRR", [jj, ri, p, tt])
                                    with T.init():
                                        S[j, r] = ZERO
                                    S[j, r] = S[j, r] + widen(k[vb, vkh, key(vt, j), 2 * vp + vpair]) * pair_half(
                                        q_t[vp, r], vpair)
                        elif WIDE_TILES:
                            k_w = T.sblock_alloc_buffer((BK, D), ACC)
                            for jj, d in T.grid(BK, D):  # (a macro's second call would rename its block)
                                with T.sblock("k_wide"):
                                    j, dd = T.axis.remap("SS", [jj, d])
                                    k_w[j, dd] = in_place(k, vb, vkh, vt)(j, dd)
                            scores(S, q_t, from_tile(k_w))
                        else:
                            scores(S, q_t, in_place(k, vb, vkh, vt))
                        if ADJUST:
                            for jj, ri in T.grid(BK, BQ):
                                with T.sblock("score_terms"):
                                    j, r = T.axis.remap("SS", [jj, ri])
                                    T.sblock_attr({"position_terms": BY_POSITION})
                                    S_adjusted[j, r] = score_terms(vkh, vrt, vt)(r, j, S[j, r])
                            scores_to_output(S_adjusted, P, O, m, t_max, t_sum, alpha, l, acc, v, vb, vkh, vt, vrt)
                        else:
                            scores_to_output(S, P, O, m, t_max, t_sum, alpha, l, acc, v, vb, vkh, vt, vrt)
                for ri, d in T.grid(RPT, D):
                    with T.sblock("save_acc"):
                        r, dd = T.axis.remap("SS", [ri, d])
                        o_part[vb, vkh, vs, vrt * NPT + r // G, r % G, dd] = acc[r, dd]
                for ri in range(RPT):
                    with T.sblock("save_stats"):
                        r = T.axis.spatial(RPT, ri)
                        # in score units (pair products without score terms keep the max unscaled)
                        m_part[vb, vkh, vs, vrt * NPT + r // G, r % G] = (
                            T.Select(m[r] > NEG, m[r] * T.float32(MAX_SCALE), NEG) if MAX_SCALE != 1.0 else m[r])
                        l_part[vb, vkh, vs, vrt * NPT + r // G, r % G] = l[r]
        merge_chunks(m_part, l_part, o_part, merged_max, weight, merged_sum, merged_acc, sinks, out, B, H, SQ, NSR, G,
                     D, dtype, NEG, ZERO)

    return bhsd_kernel(body, kspec, B, SQ, SKV, vis)
