"""Standard attention: the score rows are materialized, then softmax, then P V.

Per tile of query rows of one head (block names, the contract with schedules/standard.py):
  k_t        K transposed to (d, key), zero-padded to whole KV tiles (as in flash)
  tile       one per row tile, owning its scratch: the tile's whole score rows S and weights E; inside it:
    q_tile, kv_tile/qk                 S = q k^T over the KV tiles the rows can see
    score_terms                        (kspec.softcap, kspec.alibi_slopes) S_adjusted: S softcapped, then with the
                                       ALiBi bias (common.adjusted), read from here on
    row_max_part, row_max              per-row max over visible keys (lane-wise partials, then their max)
    exp, row_sum_part, row_sum         E = exp(S - max) where visible, else 0, and its row sums
    init_acc, pv_tile/pv, update      acc = E V, one KV tile at a time (tiles no row sees are skipped)
    out                                acc / row_sum (0 for rows that see no key; with sinks, the row's sink
                                       logit joins row_sum)
Batch, seq_q and seq_kv are run-time sizes: one compiled kernel serves every length.
"""

from __future__ import annotations

from tvm.script import tirx as T

from ..spec import KernelSpec
from .common import (ACC, LANES, Visibility, adjust_scores, adjusts_by_position, adjusts_scores, bhsd_kernel, ceil_div,
                     computed_tiles, fresh_block_names, load_q_rows, row_max_of_scores, row_output, row_score_terms,
                     run_time_sizes, score_scales, scores_of_rows, sink_logit, softmax_numerators, transpose_k, widen)

BLOCK_Q = 16
BLOCK_KV = 64


def compute(kspec: KernelSpec, *, block_q: int = BLOCK_Q, block_kv: int = BLOCK_KV):
    H, KVH, D = kspec.heads, kspec.kv_heads, kspec.head_dim
    G = kspec.group_size
    BQ = block_q
    BK = block_kv
    q_scale, PRESCALE = score_scales(kspec)
    SCALE = T.float32(q_scale)
    NEG = T.min_value("float32")
    ZERO = T.float32(0)
    dtype = kspec.dtype
    fresh_block_names()
    B, SQ, SKV = run_time_sizes()
    vis = Visibility(kspec, SQ, SKV)
    NK = ceil_div(SKV, BK)
    SKVP = NK * BK

    @T.macro
    def body(q, k, v, sinks, out):
        k_t = T.sblock_alloc_buffer((B, KVH, D, SKVP), ACC)
        transpose_k(k, k_t, B, KVH, D, SKV, SKVP, ZERO)
        for b, h, rt in T.grid(B, H, ceil_div(SQ, BQ)):
            with T.sblock("tile"):
                vb, vh, vrt = T.axis.remap("SSS", [b, h, rt])
                q_tile = T.sblock_alloc_buffer((BQ, D), ACC)
                S = T.sblock_alloc_buffer((BQ, SKVP), ACC)
                E = T.sblock_alloc_buffer((BQ, SKVP), ACC)
                max_part = T.sblock_alloc_buffer((BQ, LANES), ACC)
                row_max = T.sblock_alloc_buffer((BQ,), ACC)
                sum_part = T.sblock_alloc_buffer((BQ, LANES), ACC)
                row_sum = T.sblock_alloc_buffer((BQ,), ACC)
                O = T.sblock_alloc_buffer((BQ, D), ACC)
                acc = T.sblock_alloc_buffer((BQ, D), ACC)
                load_q_rows(q_tile, q, vb, vh, vrt * BQ, BQ, SQ, D, SCALE, ZERO)
                scores_of_rows(S, q_tile, k_t, vb, vh // G, vrt * BQ, BQ, SQ, NK, BK, D, vis, ZERO)
                if adjusts_scores(kspec):
                    S_adjusted = T.sblock_alloc_buffer((BQ, SKVP), ACC)
                    adjust_scores(S, S_adjusted, BQ, NK, BK, row_score_terms(kspec, vh, vrt * BQ, vis, PRESCALE),
                                  adjusts_by_position(kspec), computed_tiles(vis, vrt * BQ, BQ, SQ, NK, BK))
                    row_max_of_scores(S_adjusted, max_part, row_max, vrt * BQ, BQ, SKVP, vis, NEG)
                    softmax_numerators(S_adjusted, E, row_max, sum_part, row_sum, vrt * BQ, BQ, SKVP, vis, ZERO)
                else:
                    row_max_of_scores(S, max_part, row_max, vrt * BQ, BQ, SKVP, vis, NEG)
                    softmax_numerators(S, E, row_max, sum_part, row_sum, vrt * BQ, BQ, SKVP, vis, ZERO)
                for ri, d in T.grid(BQ, D):
                    with T.sblock("init_acc"):
                        r, dd = T.axis.remap("SS", [ri, d])
                        acc[r, dd] = ZERO
                for t in range(T.min(vis.end_tile(T.min(vrt * BQ + BQ, SQ) - 1, BK), NK)):
                    with T.sblock("pv_tile"):
                        vt = T.axis.opaque(NK, t)
                        if vt >= vis.first_tile(vrt * BQ, BK):
                            for ri, jj, d in T.grid(BQ, BK, D):
                                with T.sblock("pv"):
                                    r, j, dd = T.axis.remap("SRS", [ri, jj, d])
                                    with T.init():
                                        O[r, dd] = ZERO
                                    # Keys past seq_kv have weight 0 and read the last row of v.
                                    O[r, dd] = O[r, dd] + \
                                        E[r, vt * BK + j] * widen(v[vb, vh // G, T.min(vt * BK + j, SKV - 1), dd])
                            for ri, d in T.grid(BQ, D):
                                with T.sblock("update"):
                                    r, dd = T.axis.remap("SS", [ri, d])
                                    acc[r, dd] = acc[r, dd] + O[r, dd]
                for ri, d in T.grid(BQ, D):
                    with T.sblock("out"):
                        r, dd = T.axis.remap("SS", [ri, d])
                        T.where(vrt * BQ + ri < SQ)
                        out[vb, vh, vrt * BQ + r, dd] = row_output(acc[r, dd], row_sum[r], row_max[r], dtype,
                                                            sink_logit(sinks, vh))

    return bhsd_kernel(body, kspec, B, SQ, SKV, vis)
