"""Flash attention in TensorIR: KV tiles with an online softmax (FlashAttention-2), no score matrix.

For each tile of query rows, KV tiles are visited in order; per row the running max ``m``, running sum ``l`` and
the unnormalized output ``acc`` are rescaled by alpha = exp(m_old - m_new) whenever a tile raises the max. Only one
(rows x block_kv) score tile exists at a time. With ``group_rows`` (the ``mqa`` variant) a row tile spans the query
heads of one KV group, so every K/V tile loaded serves the whole group: multi-query and grouped-query attention.

Block names (the contract with schedules/flash.py): a "tile" block per row tile owns the scratch buffers; inside it
init_stats, init_acc, then per KV tile a "kv_tile" block holding qk, tile_max, rescale, p, tile_sum, pv; then out.
The reductions' inits do the rescaling (m_new = m, l *= alpha, acc *= alpha). Their predicates only cut tails
(j < seq_kv holds at j = 0), never the causal mask, which is a Select, so an init can never be skipped.
"""

from __future__ import annotations

from tvm.script import tirx as T

from ..spec import AttentionSpec

BLOCK_Q = 32
BLOCK_KV = 64


def _ceil_div(a, b):
    return (a + b - 1) // b


def compute(spec: AttentionSpec, *, group_rows: bool = False, block_q: int = BLOCK_Q, block_kv: int = BLOCK_KV):
    """The flash PrimFunc for ``spec``; ``group_rows`` stacks a KV group's query heads in one row tile."""
    B, KVH, SQ, SKV, D = spec.batch, spec.kv_heads, spec.seq_q, spec.seq_kv, spec.head_dim
    G = spec.group_size
    GI = G if group_rows else 1  # query heads stacked inside one row tile
    GO = G // GI  # query heads of a group handled by separate tiles
    R = GI * SQ  # rows of one (batch, kv head, outer group) slice: row r is head (r // SQ), query (r % SQ)
    BQ = min(block_q, R)
    BK = min(block_kv, SKV)
    NT = _ceil_div(R, BQ)
    NK = _ceil_div(SKV, BK)
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

    def visible(r, j):
        return j <= query(r) + OFF if CAUSAL else True

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

    def row_ok(rt, r):
        return rt * BQ + r < R

    @T.prim_func(s_tir=True)
    def flash(
        q: T.Buffer((B, KVH * G, SQ, D), dtype),
        k: T.Buffer((B, KVH, SKV, D), dtype),
        v: T.Buffer((B, KVH, SKV, D), dtype),
        out: T.Buffer((B, KVH * G, SQ, D), dtype),
    ):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        for b, kh, go, rt in T.grid(B, KVH, GO, NT):
            with T.sblock("tile"):
                vb, vkh, vgo, vrt = T.axis.remap("SSSS", [b, kh, go, rt])
                S = T.sblock_alloc_buffer((BQ, BK), dtype)
                P = T.sblock_alloc_buffer((BQ, BK), dtype)
                m = T.sblock_alloc_buffer((BQ,), dtype)
                m_new = T.sblock_alloc_buffer((BQ,), dtype)
                alpha = T.sblock_alloc_buffer((BQ,), dtype)
                l = T.sblock_alloc_buffer((BQ,), dtype)
                acc = T.sblock_alloc_buffer((BQ, D), dtype)
                for ri in range(BQ):
                    with T.sblock("init_stats"):
                        r = T.axis.spatial(BQ, ri)
                        T.where(row_ok(vrt, ri))
                        m[r] = NEG
                        l[r] = ZERO
                for ri, d in T.grid(BQ, D):
                    with T.sblock("init_acc"):
                        r, dd = T.axis.remap("SS", [ri, d])
                        T.where(row_ok(vrt, ri))
                        acc[r, dd] = ZERO
                for t in range(kv_tiles(vrt)):
                    with T.sblock("kv_tile"):
                        vt = T.axis.opaque(NK, t)
                        for ri, jj, d in T.grid(BQ, BK, D):
                            with T.sblock("qk"):
                                r, j, dd = T.axis.remap("SSR", [ri, jj, d])
                                T.where(row_ok(vrt, ri) and vt * BK + jj < SKV)
                                with T.init():
                                    S[r, j] = ZERO
                                S[r, j] = S[r, j] + (
                                    q[vb, head(vkh, vgo, vrt * BQ + r), query(vrt * BQ + r), dd]
                                    * k[vb, vkh, vt * BK + j, dd]
                                )
                        for ri, jj in T.grid(BQ, BK):
                            with T.sblock("tile_max"):
                                r, j = T.axis.remap("SR", [ri, jj])
                                T.where(row_ok(vrt, ri) and vt * BK + jj < SKV)
                                with T.init():
                                    m_new[r] = m[r]
                                m_new[r] = T.max(
                                    m_new[r], T.Select(visible(vrt * BQ + r, vt * BK + j), S[r, j] * SCALE, NEG)
                                )
                        for ri in range(BQ):
                            with T.sblock("rescale"):
                                r = T.axis.spatial(BQ, ri)
                                T.where(row_ok(vrt, ri))
                                alpha[r] = T.Select(m[r] == m_new[r], ONE, T.exp(m[r] - m_new[r]))
                                m[r] = m_new[r]
                        for ri, jj in T.grid(BQ, BK):
                            with T.sblock("p"):
                                r, j = T.axis.remap("SS", [ri, jj])
                                T.where(row_ok(vrt, ri) and vt * BK + jj < SKV)
                                P[r, j] = T.Select(
                                    visible(vrt * BQ + r, vt * BK + j), T.exp(S[r, j] * SCALE - m[r]), ZERO
                                )
                        for ri, jj in T.grid(BQ, BK):
                            with T.sblock("tile_sum"):
                                r, j = T.axis.remap("SR", [ri, jj])
                                T.where(row_ok(vrt, ri) and vt * BK + jj < SKV)
                                with T.init():
                                    l[r] = l[r] * alpha[r]
                                l[r] = l[r] + P[r, j]
                        for ri, jj, d in T.grid(BQ, BK, D):
                            with T.sblock("pv"):
                                r, j, dd = T.axis.remap("SRS", [ri, jj, d])
                                T.where(row_ok(vrt, ri) and vt * BK + jj < SKV)
                                with T.init():
                                    acc[r, dd] = acc[r, dd] * alpha[r]
                                acc[r, dd] = acc[r, dd] + P[r, j] * v[vb, vkh, vt * BK + j, dd]
                for ri, d in T.grid(BQ, D):
                    with T.sblock("out"):
                        r, dd = T.axis.remap("SS", [ri, d])
                        T.where(row_ok(vrt, ri))
                        out[vb, head(vkh, vgo, vrt * BQ + r), query(vrt * BQ + r), dd] = T.Select(
                            l[r] > ZERO, acc[r, dd] / l[r], ZERO
                        )

    return flash


def compute_grouped(spec: AttentionSpec):
    """The mqa variant: flash whose row tiles stack the query heads sharing one KV head."""
    return compute(spec, group_rows=True)
