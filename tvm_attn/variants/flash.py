"""Flash attention in TensorIR: KV tiles with an online softmax (FlashAttention-2), no score matrix.

For each tile of query rows, KV tiles are visited in order; per row the running max ``m``, running sum ``l`` and
the unnormalized output ``acc`` are rescaled by alpha = exp(m_old - m_new) whenever a tile raises the max. Only one
(rows x block_kv) score tile exists at a time. With ``group_rows`` (the ``mqa`` variant) a row tile spans the query
heads of one KV group, so every K/V tile loaded serves the whole group: multi-query and grouped-query attention.

Blocks (the contract with schedules/flash.py):
  k_t          K transposed to (d, key), zero-padded to whole KV tiles: keys lie along vector lanes in qk
  tile         one per row tile, owning the scratch buffers; inside it:
    q_tile     the tile's query rows, pre-scaled, zero-padded past the last row
    init_stats, init_acc
    kv_tile    one per KV tile (causal: only tiles some row of the tile can see); inside it:
      qk         S = q_tile k_t                               (a BQ x BK x D matmul)
      tile_max   the tile's row max over visible keys         (pure reductions, so rfactor/cache_write apply)
      rescale    m_new = max(m, tile_max), alpha = exp(m - m_new)
      p          P = exp(S - m_new), 0 where masked
      tile_sum   row sums of P
      pv         O = P v                                      (a BQ x BK x D matmul)
      update     acc = alpha acc + O, l = alpha l + tile_sum
    out        acc / l (0 for rows that see no key)
"""

from __future__ import annotations

from tvm.script import tirx as T

from ..fast_exp import softmax_exp
from ..spec import AttentionSpec
from .common import ceil_div

BLOCK_Q = 32
BLOCK_KV = 64


def compute(spec: AttentionSpec, *, group_rows: bool = False, block_q: int = BLOCK_Q, block_kv: int = BLOCK_KV):
    """The flash PrimFunc for ``spec``; ``group_rows`` stacks a KV group's query heads in one row tile."""
    B, KVH, SQ, SKV, D = spec.batch, spec.kv_heads, spec.seq_q, spec.seq_kv, spec.head_dim
    G = spec.group_size
    GI = G if group_rows else 1  # query heads stacked inside one row tile
    GO = G // GI  # query heads of a group handled by separate tiles
    R = GI * SQ  # rows of one (batch, kv head, outer group) slice: row r is head (r // SQ), query (r % SQ)
    BQ = min(block_q, R)
    BK = block_kv  # not clamped to seq_kv: k_t is zero-padded, so tiles are whole vectors
    NT = ceil_div(R, BQ)
    NK = ceil_div(SKV, BK)
    OFF = spec.causal_offset
    CAUSAL = spec.causal
    SCALE = T.float32(spec.scale)
    NEG = T.min_value("float32")
    ZERO = T.float32(0)
    ONE = T.float32(1)
    dtype = spec.dtype

    def head(kh, go, r):
        return kh * G + go * GI + (r // SQ if GI > 1 else 0)

    def query(r):
        return r % SQ if GI > 1 else r

    def usable(rt, r, j):
        """Key j exists and row r of tile rt may see it."""
        if CAUSAL:
            return T.And(j < SKV, j <= query(rt * BQ + r) + OFF)
        return j < SKV

    def kv_tiles(rt):
        """KV tiles that row tile rt needs: all of them, or causal ones up to its last visible key."""
        if not CAUSAL:
            return NK
        r_last = T.min(rt * BQ + BQ, R) - 1
        if GI > 1:  # a tile may wrap from one head to the next: then its rows cover every query index
            last_q = T.Select((rt * BQ) // SQ == r_last // SQ, r_last % SQ, SQ - 1)
        else:
            last_q = r_last
        n_visible = T.min(SKV, T.max(0, last_q + OFF + 1))
        return (n_visible + BK - 1) // BK

    @T.prim_func(s_tir=True)
    def flash(
        q: T.Buffer((B, KVH * G, SQ, D), dtype),
        k: T.Buffer((B, KVH, SKV, D), dtype),
        v: T.Buffer((B, KVH, SKV, D), dtype),
        out: T.Buffer((B, KVH * G, SQ, D), dtype),
    ):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        with T.sblock("root"):
            k_t = T.sblock_alloc_buffer((B, KVH, D, NK * BK), dtype)
            for b, kh, d, j in T.grid(B, KVH, D, NK * BK):
                with T.sblock("k_t"):
                    vb, vkh, vd, vj = T.axis.remap("SSSS", [b, kh, d, j])
                    k_t[vb, vkh, vd, vj] = T.if_then_else(vj < SKV, k[vb, vkh, T.min(vj, SKV - 1), vd], ZERO)
            for b, kh, go, rt in T.grid(B, KVH, GO, NT):
                with T.sblock("tile"):
                    vb, vkh, vgo, vrt = T.axis.remap("SSSS", [b, kh, go, rt])
                    q_tile = T.sblock_alloc_buffer((BQ, D), dtype)
                    S = T.sblock_alloc_buffer((BQ, BK), dtype)
                    P = T.sblock_alloc_buffer((BQ, BK), dtype)
                    O = T.sblock_alloc_buffer((BQ, D), dtype)
                    m = T.sblock_alloc_buffer((BQ,), dtype)
                    t_max = T.sblock_alloc_buffer((BQ,), dtype)
                    t_sum = T.sblock_alloc_buffer((BQ,), dtype)
                    alpha = T.sblock_alloc_buffer((BQ,), dtype)
                    l = T.sblock_alloc_buffer((BQ,), dtype)
                    acc = T.sblock_alloc_buffer((BQ, D), dtype)
                    for ri, d in T.grid(BQ, D):
                        with T.sblock("q_tile"):
                            r, dd = T.axis.remap("SS", [ri, d])
                            q_tile[r, dd] = T.if_then_else(
                                vrt * BQ + r < R,
                                q[vb, head(vkh, vgo, T.min(vrt * BQ + r, R - 1)), query(T.min(vrt * BQ + r, R - 1)), dd]
                                * SCALE,
                                ZERO,
                            )
                    for ri in range(BQ):
                        with T.sblock("init_stats"):
                            r = T.axis.spatial(BQ, ri)
                            m[r] = NEG
                            l[r] = ZERO
                    for ri, d in T.grid(BQ, D):
                        with T.sblock("init_acc"):
                            r, dd = T.axis.remap("SS", [ri, d])
                            acc[r, dd] = ZERO
                    for t in range(kv_tiles(vrt)):
                        with T.sblock("kv_tile"):
                            vt = T.axis.opaque(NK, t)
                            for ri, jj, d in T.grid(BQ, BK, D):
                                with T.sblock("qk"):
                                    r, j, dd = T.axis.remap("SSR", [ri, jj, d])
                                    with T.init():
                                        S[r, j] = ZERO
                                    S[r, j] = S[r, j] + q_tile[r, dd] * k_t[vb, vkh, dd, vt * BK + j]
                            for ri, jj in T.grid(BQ, BK):
                                with T.sblock("tile_max"):
                                    r, j = T.axis.remap("SR", [ri, jj])
                                    with T.init():
                                        t_max[r] = NEG
                                    t_max[r] = T.max(t_max[r], T.Select(usable(vrt, r, vt * BK + j), S[r, j], NEG))
                            for ri in range(BQ):
                                with T.sblock("rescale"):
                                    r = T.axis.spatial(BQ, ri)
                                    alpha[r] = T.Select(m[r] >= t_max[r], ONE, softmax_exp(m[r] - t_max[r]))
                                    m[r] = T.max(m[r], t_max[r])
                            for ri, jj in T.grid(BQ, BK):
                                with T.sblock("p"):
                                    r, j = T.axis.remap("SS", [ri, jj])
                                    P[r, j] = T.Select(usable(vrt, r, vt * BK + j), softmax_exp(S[r, j] - m[r]), ZERO)
                            for ri, jj in T.grid(BQ, BK):
                                with T.sblock("tile_sum"):
                                    r, j = T.axis.remap("SR", [ri, jj])
                                    with T.init():
                                        t_sum[r] = ZERO
                                    t_sum[r] = t_sum[r] + P[r, j]
                            for ri, jj, d in T.grid(BQ, BK, D):
                                with T.sblock("pv"):
                                    r, j, dd = T.axis.remap("SRS", [ri, jj, d])
                                    T.where(vt * BK + jj < SKV)
                                    with T.init():
                                        O[r, dd] = ZERO
                                    O[r, dd] = O[r, dd] + P[r, j] * v[vb, vkh, vt * BK + j, dd]
                            for ri, d in T.grid(BQ, D):
                                with T.sblock("update"):
                                    r, dd = T.axis.remap("SS", [ri, d])
                                    acc[r, dd] = acc[r, dd] * alpha[r] + O[r, dd]
                            for ri in range(BQ):
                                with T.sblock("update_sum"):
                                    r = T.axis.spatial(BQ, ri)
                                    l[r] = l[r] * alpha[r] + t_sum[r]
                    for ri, d in T.grid(BQ, D):
                        with T.sblock("out"):
                            r, dd = T.axis.remap("SS", [ri, d])
                            T.where(vrt * BQ + ri < R)
                            out[vb, head(vkh, vgo, vrt * BQ + r), query(vrt * BQ + r), dd] = T.Select(
                                l[r] > ZERO, acc[r, dd] / l[r], ZERO
                            )

    return flash


def compute_grouped(spec: AttentionSpec):
    """The mqa variant: flash whose row tiles stack the query heads sharing one KV head."""
    return compute(spec, group_rows=True)
