"""Flash attention in TensorIR: KV tiles with an online softmax (FlashAttention-2), no score matrix.

For each tile of query rows, KV tiles are visited in order; per row the running max ``m``, running sum ``l`` and
the unnormalized output ``acc`` are rescaled by alpha = exp(m_old - m_new) whenever a tile raises the max. Only one
(rows x block_kv) score tile exists at a time. With ``group_rows`` (the ``mqa`` variant) a row tile spans the query
heads of one KV group, so every K/V tile loaded serves the whole group: multi-query and grouped-query attention.

Batch, seq_q and seq_kv are run-time sizes: one compiled kernel serves every length. Causal and windowed row tiles
visit only the KV tiles some of their rows can see.

Blocks (the contract with schedules/flash.py):
  k_t          K transposed to (d, key), zero-padded to whole KV tiles: keys lie along vector lanes in qk
  tile         one per row tile, owning the scratch buffers; inside it:
    q_tile     the tile's query rows, pre-scaled (by scale / softcap where common.score_scales says), zero-padded past
               the last row
    init_stats, init_acc
    kv_tile    one per KV tile (causal: only tiles some row of the tile can see); inside it:
      qk         S = q_tile k_t                               (a BQ x BK x D matmul)
      score_terms  (kspec.softcap, kspec.alibi_slopes) S_adjusted = S softcapped, then with the ALiBi bias:
                   what the softmax then reads (common.adjusted); with softcap alone, S and S_adjusted are the KV
                   tile's own buffers (not the row tile's), so that the schedule may inline score_terms into the
                   write-back of qk's register tiles
      tile_max   the tile's row max over visible keys         (pure reductions, so rfactor/cache_write apply)
      rescale    m_new = max(m, tile_max), alpha = exp(m - m_new)
      p          P = exp(S - m_new), 0 where masked
      tile_sum   row sums of P
      pv         O = P v                                      (a BQ x BK x D matmul)
      update     acc = alpha acc + O, l = alpha l + tile_sum
    out        acc / l (0 for rows that see no key; with sinks, the row's sink logit joins l: common.row_output)
In bfloat16 pair products (``pairs``; schedules/pair_products.py): k_t packs K as (d / 2, key, 2) and v_p packs V
as (key / 2, d, 2), q_tile and P hold bfloat16 bits, and qk and pv reduce over pairs (their last loop).
"""

from __future__ import annotations

from tvm.script import tirx as T

from ..spec import KernelSpec
from ..fast_exp import softmax_exp
from .common import (ACC, BF16_BITS, Visibility, adjust_scores, adjusted, adjusts_by_position, adjusts_scores,
                     bhsd_kernel, bits_of, ceil_div, fresh_block_names, init_online_softmax, online_softmax_state,
                     online_softmax_tile, pack_k_pairs, pack_v_pairs, pv_tile_pairs, qk_tile, qk_tile_pairs,
                     row_output, run_time_sizes, score_scales, sink_logit, softmax_weights, transpose_k, update_output,
                     widen)

# 48 rows: a multiple of the 6-row register block (schedules/common.py). Measured here against 32 rows (4-row blocks),
# B2 H8 D64: AVX-512 (znver4 code on Zen 5) 1024 keys 17.2 -> 14.4 ms, causal 2048 48.1 -> 34.5 ms; AVX2
# (x86-64-v3 code) 1024 keys 36-46 -> 29.8 ms, causal 2048 71.8 -> 58.7 ms; seq 256 unchanged within the noise.
BLOCK_Q = 48
# Measured here (B2 H8 D64, hand schedule): 128 keys per KV tile against 64 took 1024 keys 26.8 -> 25.2 ms and causal
# 2048 54.4 -> 53.1 ms (the per-tile work of the online softmax amortized over twice the keys); 256 was faster
# still on long unmasked rows (24.3 ms) but computes up to 255 padding keys per row (seq 128: 0.51 -> 0.91 ms).
BLOCK_KV = 128


def compute(kspec: KernelSpec, *, group_rows: bool = False, pairs: bool = False, block_q: int = BLOCK_Q,
            block_kv: int = BLOCK_KV):
    """The flash PrimFunc for ``kspec``; ``group_rows`` stacks a KV group's query heads in one row tile. ``pairs``
    (bfloat16 kernels): both matmuls in bfloat16 pair products accumulating in float32 (K and V packed in pairs, q
    kept in bfloat16 with the scale applied to the scores, P rounded to bfloat16)."""
    if pairs and (kspec.dtype != "bfloat16" or kspec.head_dim % 2):
        raise ValueError(f"pair products need bfloat16 inputs and an even head_dim, got {kspec.dtype} "
                         f"head_dim={kspec.head_dim}")
    KVH, D = kspec.kv_heads, kspec.head_dim
    G = kspec.group_size
    GI = G if group_rows else 1  # query heads stacked inside one row tile
    GO = G // GI  # query heads of a group handled by separate tiles
    BQ = block_q
    BK = block_kv
    q_scale, score_prescale = score_scales(kspec)
    SCALE = T.float32(q_scale)
    NEG = T.min_value("float32")
    ZERO = T.float32(0)
    ONE = T.float32(1)
    dtype = kspec.dtype
    # Pair products take q as given (bfloat16, exact) and the scale in the exp: exp(scale (s - m)) with m the max of
    # the unscaled scores s (q negated for a negative scale, which is exact, so the max stays the max).
    SIGN_BIT = T.uint16(0 if kspec.scale > 0 else 0x8000)
    score_exp = (lambda x: softmax_exp(x * T.float32(abs(kspec.scale)))) if pairs else softmax_exp
    # Softcap and ALiBi: the adjusted scores (scaled first where pairs left them unscaled) in S_adjusted
    ADJUST = adjusts_scores(kspec)
    BY_POSITION = adjusts_by_position(kspec)
    # Terms of the score alone (softcap): S and S_adjusted belong to the KV tile, so that the schedule may compute
    # the terms in the write-back of the register tiles (schedule_score_terms; S then disappears)
    SCORES_PER_KV_TILE = ADJUST and not BY_POSITION
    PRESCALE = abs(kspec.scale) if pairs else score_prescale
    OPERAND = BF16_BITS if pairs else ACC  # q_tile and P
    # The running max in score units, for the sink's term (pairs without softcap keep it unscaled).
    MAX_SCALE = abs(kspec.scale) if pairs and not ADJUST else 1.0

    def output_max(m, sinks):
        """The running max as row_output takes it: in score units where a sink logit is compared with it."""
        return m if sinks is None or MAX_SCALE == 1.0 else m * T.float32(MAX_SCALE)

    # Rows of one (batch, kv head, outer group) slice: row r is head r // SQ of the tile's group, query r % SQ.
    def head(kh, go, r, SQ):
        return kh * G + go * GI + (r // SQ if GI > 1 else 0)

    def query(r, SQ):
        return r % SQ if GI > 1 else r

    def tile_queries(rt, SQ):
        """(first, last, wraps): row tile rt's rows are queries first..last of one head, or, where the tile wraps
        into the next head (wraps; then last >= SQ), every query index occurs. Callers combine the two cases in
        boolean conditions and min/max, not in a Select of the bounds: TVM's analyzer took seconds over such a
        Select (a causal GQA prefill kernel compiled in 5.7 s against 1.0 s, a windowed one in 12.8 s against
        1.5 s)."""
        r0 = rt * BQ
        r_last = T.min(r0 + BQ, GI * SQ) - 1
        if GI == 1:
            return r0, r_last, False
        first = r0 % SQ
        last = first + (r_last - r0)
        return first, last, last >= SQ

    fresh_block_names()
    B, SQ, SKV = run_time_sizes()
    vis = Visibility(kspec, SQ, SKV)
    R = GI * SQ

    def row_sees(row0, r, j):
        """Row r of the tile starting at row row0 sees key j."""
        return vis.sees(query(row0 + r, SQ), j)

    def kv_tiles(rt):
        """One past the last KV tile row tile rt needs."""
        _, last_q, _ = tile_queries(rt, SQ)
        return vis.end_tile(last_q if GI == 1 else T.min(last_q, SQ - 1), BK)

    def needs_tile(rt, t):
        """Row tile rt needs KV tile t (t before kv_tiles(rt)); only a window's first tiles are not needed."""
        first_q, _, wraps = tile_queries(rt, SQ)
        if GI == 1:
            return t >= vis.first_tile(first_q, BK)
        return T.And(t >= vis.first_tile(0, BK), T.Or(wraps, t >= vis.first_tile(first_q, BK)))

    def score_terms(kh, go, rt, t):
        """(r, j, s) -> score s of row r of row tile rt against key j of KV tile t, adjusted."""
        def adjust(r, j, s):
            row = T.min(rt * BQ + r, R - 1)
            return adjusted(kspec, s, head(kh, go, row, SQ), vis.distance(query(row, SQ), t * BK + j), PRESCALE)
        return adjust

    def tile_sees_all(rt, t):
        """Every row of row tile rt sees every key of KV tile t."""
        first_q, last_q, wraps = tile_queries(rt, SQ)
        if GI == 1 or not vis.causal and vis.window is None:  # (the bounds only matter to a causal mask or window)
            return vis.all_see(first_q, last_q, t * BK, t * BK + BK)
        # every query index seeing the tile implies queries first_q..last_q do
        return T.Or(T.And(T.Not(wraps), vis.all_see(first_q, last_q, t * BK, t * BK + BK)),
                    vis.all_see(0, SQ - 1, t * BK, t * BK + BK))

    @T.macro
    def body(q, k, v, sinks, out):
        if pairs:
            k_p = T.sblock_alloc_buffer((B, KVH, D // 2, ceil_div(SKV, BK) * BK, 2), BF16_BITS)
            v_p = T.sblock_alloc_buffer((B, KVH, ceil_div(SKV, BK) * BK // 2, D, 2), BF16_BITS)
            pack_k_pairs(k, k_p, B, KVH, D, SKV, ceil_div(SKV, BK) * BK)
            pack_v_pairs(v, v_p, B, KVH, D, SKV, ceil_div(SKV, BK) * BK)
        else:
            k_t = T.sblock_alloc_buffer((B, KVH, D, ceil_div(SKV, BK) * BK), ACC)
            transpose_k(k, k_t, B, KVH, D, SKV, ceil_div(SKV, BK) * BK, ZERO)
        for b, kh, go, rt in T.grid(B, KVH, GO, ceil_div(GI * SQ, BQ)):
            with T.sblock("tile"):
                vb, vkh, vgo, vrt = T.axis.remap("SSSS", [b, kh, go, rt])
                q_tile = T.sblock_alloc_buffer((BQ, D), OPERAND)
                if not SCORES_PER_KV_TILE:
                    S = T.sblock_alloc_buffer((BQ, BK), ACC)
                    if ADJUST:
                        S_adjusted = T.sblock_alloc_buffer((BQ, BK), ACC)
                P = T.sblock_alloc_buffer((BQ, BK), OPERAND)
                O, m, t_max, t_sum, alpha, l, acc = online_softmax_state(BQ, D)
                for ri, d in T.grid(BQ, D):
                    with T.sblock("q_tile"):
                        r, dd = T.axis.remap("SS", [ri, d])
                        if pairs:
                            q_tile[r, dd] = T.if_then_else(
                                vrt * BQ + r < R,
                                bits_of(q[vb, head(vkh, vgo, T.min(vrt * BQ + r, R - 1), SQ),
                                          query(T.min(vrt * BQ + r, R - 1), SQ), dd]) ^ SIGN_BIT,
                                T.uint16(0),
                            )
                        else:
                            q_tile[r, dd] = T.if_then_else(
                                vrt * BQ + r < R,
                                widen(q[vb, head(vkh, vgo, T.min(vrt * BQ + r, R - 1), SQ),
                                        query(T.min(vrt * BQ + r, R - 1), SQ), dd]) * SCALE,
                                ZERO,
                            )
                init_online_softmax(m, l, acc, BQ, D, NEG, ZERO)
                for t in range(kv_tiles(vrt)):
                    with T.sblock("kv_tile"):
                        vt = T.axis.opaque(ceil_div(SKV, BK), t)
                        # A window's first tile (floordiv and floormod terms) as the loop's start would be
                        # substituted into every index: a windowed mqa kernel (h4 kv1 d40) took 13 s to compile.
                        if kspec.window is not None:
                            T.where(needs_tile(vrt, t))
                        if SCORES_PER_KV_TILE:
                            S = T.sblock_alloc_buffer((BQ, BK), ACC)
                            S_adjusted = T.sblock_alloc_buffer((BQ, BK), ACC)
                        if pairs:
                            qk_tile_pairs(S, q_tile, k_p, vb, vkh, vt * BK, BQ, BK, D, ZERO)
                            if ADJUST:
                                adjust_scores(S, S_adjusted, BQ, 1, BK, score_terms(vkh, vgo, vrt, vt), BY_POSITION)
                                softmax_weights(S_adjusted, P, m, t_max, t_sum, alpha, vt * BK, BQ, BK, vrt * BQ,
                                                row_sees, tile_sees_all(vrt, vt), NEG, ZERO, ONE, softmax_exp)
                            else:
                                softmax_weights(S, P, m, t_max, t_sum, alpha, vt * BK, BQ, BK, vrt * BQ, row_sees,
                                                tile_sees_all(vrt, vt), NEG, ZERO, ONE, score_exp)
                            pv_tile_pairs(O, P, v_p, vb, vkh, vt * BK, BQ, BK, D, ZERO)
                            update_output(acc, O, alpha, l, t_sum, BQ, D)
                        elif ADJUST:
                            qk_tile(S, 0, q_tile, k_t, vb, vkh, vt * BK, BQ, BK, D, ZERO)
                            adjust_scores(S, S_adjusted, BQ, 1, BK, score_terms(vkh, vgo, vrt, vt), BY_POSITION)
                            online_softmax_tile(S_adjusted, P, O, m, t_max, t_sum, alpha, l, acc, v, vb, vkh,
                                                vt * BK, BQ, BK, D, SKV, vrt * BQ, row_sees,
                                                tile_sees_all(vrt, vt), NEG, ZERO, ONE)
                        else:
                            qk_tile(S, 0, q_tile, k_t, vb, vkh, vt * BK, BQ, BK, D, ZERO)
                            online_softmax_tile(S, P, O, m, t_max, t_sum, alpha, l, acc, v, vb, vkh, vt * BK, BQ,
                                                BK, D, SKV, vrt * BQ, row_sees, tile_sees_all(vrt, vt), NEG, ZERO,
                                                ONE)
                for ri, d in T.grid(BQ, D):
                    with T.sblock("out"):
                        r, dd = T.axis.remap("SS", [ri, d])
                        T.where(vrt * BQ + ri < R)
                        out[vb, head(vkh, vgo, vrt * BQ + r, SQ), query(vrt * BQ + r, SQ), dd] = row_output(
                            acc[r, dd], l[r], output_max(m[r], sinks), dtype,
                            sink_logit(sinks, head(vkh, vgo, vrt * BQ + r, SQ)))

    return bhsd_kernel(body, kspec, B, SQ, SKV, vis)


def compute_grouped(kspec: KernelSpec, pairs: bool = False):
    """The mqa variant: flash whose row tiles stack the query heads sharing one KV head."""
    return compute(kspec, group_rows=True, pairs=pairs)
