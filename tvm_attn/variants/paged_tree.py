"""Draft trees over a paged KV cache in row tiles: the paged kernel's arguments, chunks and merge
(variants/paged.py), with the rows of each chunk's sequence taken as the tree kernel takes them
(variants/tree_split.py): the nodes times the group's query heads are the rows of a KV head (row r: node r // G,
head kh * G + r % G), in row tiles of 16 nodes' rows (at most MAX_BLOCK_Q), and each K and V element loaded from a
page serves every row of the tile. The paged kernel walks a chunk once per node; PagedKVCache.attend gives this one
the sequences whose draft trees have TREE_KERNEL_MIN_ROWS..TREE_DECODE_MAX_ROWS nodes.

Each (chunk, KV head) task runs its sequence's row tiles one after another (a tree of 16 nodes is one tile up to
groups of 4 heads), each the online softmax over the chunk's tiles of keys with both matmuls register-blocked:
scores kept keys x rows, the rows along the vector lanes, each K element broadcast; a tile's keys are runs of slots of
whole pages (PageTiling), so the page table is read once per page. float32 arithmetic for every dtype (16-bit
tiles widened once).

Blocks (the contract with schedules/paged_tree.py):
  task       one per (chunk, KV head); inside it, per row tile of the chunk's sequence (row_tile):
    q_tile     q^T of the tile's rows, pre-scaled, float32 (zero past the sequence's rows)
    init_stats, init_acc
    kv_tile    one per tile of the chunk some row of the row tile sees:
      k_wide     (16-bit) the tile's K in float32       (loops page, slot, d)
      qk         S[j, r] = k_j . q_r                    (loops page, slot, row, d)
      score_terms                                       (softcap, ALiBi: common.adjusted)
      tile_max, rescale, p, tile_sum                    (common.softmax_weights_by_key: loops key, row)
      v_wide     (16-bit) the tile's V in float32
      pv         O = P V                                (loops row, page, slot, d)
      update, update_sum                                (common.update_output)
    save_acc, save_stats   the chunk's (output, max, sum) per row of the sequence
  merge, merge_init, merge_max, merge_weight, merge_acc, out   as the paged kernel's
"""

from __future__ import annotations

from tvm.script import tirx as T

from ..fast_exp import softmax_exp
from ..spec import KernelSpec
from .common import (ACC, adjusted, adjusts_scores, ceil_div, fresh_block_names, init_online_softmax,
                     online_softmax_state, softmax_weights_by_key, update_output, widen)
from .decode import DecodeConfig
from .paged import PagedLayout
from .tree_split import MAX_BLOCK_Q, NODES_PER_TILE


def compute(kspec: KernelSpec, page_size: int, config: DecodeConfig = DecodeConfig(), block_q: int | None = None):
    """The paged tree PrimFunc for ``kspec`` (dense attention, as variants/paged.compute's, any number of rows per
    sequence) over pages of ``page_size`` positions, ``block_q`` rows per row tile (a multiple of the group size;
    default: 16 nodes' rows, fewer nodes where that passes MAX_BLOCK_Q)."""
    layout = PagedLayout(kspec, page_size, config)
    G = kspec.group_size
    if block_q is not None and (isinstance(block_q, bool) or not isinstance(block_q, int) or block_q < G
                                or block_q % G):
        raise ValueError(f"block_q must be a positive multiple of the group size {G}, got {block_q!r}")
    fresh_block_names()
    KVH, D = kspec.kv_heads, kspec.head_dim
    NPT = block_q // G if block_q else max(1, min(NODES_PER_TILE, MAX_BLOCK_Q // G))  # nodes per row tile
    BQ = NPT * G  # rows per row tile
    tiling = layout.tiling
    BK, PAGES, SLOTS, TPP = tiling.keys, tiling.pages, tiling.slots, tiling.tiles_per_page
    SCALE = T.float32(kspec.scale)
    NEG = T.min_value("float32")
    ZERO = T.float32(0)
    ONE = T.float32(1)
    ADJUST = adjusts_scores(kspec)
    WIDE_TILES = kspec.dtype != "float32"  # 16-bit KV tiles widened to float32 once, as the tree kernel's
    NR, MP, NC = layout.rows, layout.max_pages, layout.chunks

    class Rows:
        """The rows of a task's chunk's sequence. ``bind`` gives it the kernel's buffers and the chunk, at the top
        of the task: a macro cannot assign a Python object to a name."""

        def bind(self, row_start, seq_lens, chunks, c):
            self.seq = chunks[c, 0]
            self.first = row_start[self.seq]  # the sequence's first row of q
            self.count = (row_start[self.seq + 1] - row_start[self.seq]) * G  # its rows x the group's heads
            self.vis = layout.visibility(row_start, seq_lens, self.seq)

        def row(self, rt, r):
            """The row that row r of row tile rt computes (past the last: the last)."""
            return T.min(rt * BQ + r, self.count - 1)

        def node(self, rt, r):
            return self.row(rt, r) // G

        def sees(self, rt, r, j):
            return self.vis.sees(self.node(rt, r), j)

    def tile_sees_all(rows, rt, t):
        return rows.vis.all_see(rows.node(rt, 0), rows.node(rt, BQ - 1), t * BK, t * BK + BK)

    def score_terms(rows, kh, rt, t):
        def adjust(r, j, s):
            row = rows.row(rt, r)
            return adjusted(kspec, s, kh * G + row % G, rows.vis.distance(row // G, t * BK + j))
        return adjust

    def in_place(pages, page_table, rows, kh, t):
        """(p, j, d) -> element d of slot j of page p of tile t of ``pages`` (K or V), widened to float32."""
        return lambda p, j, d: widen(pages[kh, layout.page(page_table, rows.seq, t, p), layout.slot(t, j), d])

    def from_tile(tile):
        """(p, j, d) -> the element of a tile widened once (keys in order)."""
        return lambda p, j, d: tile[p * SLOTS + j, d]

    @T.macro
    def scores(S, q_t, k_at):
        """S[j, r] = k_j . q_r in float32, key p * SLOTS + j's elements k_at(p, j, d)."""
        for p, jj, ri, d in T.grid(PAGES, SLOTS, BQ, D):
            with T.sblock("qk"):
                vp, j, r, dd = T.axis.remap("SSSR", [p, jj, ri, d])
                with T.init():
                    S[vp * SLOTS + j, r] = ZERO
                S[vp * SLOTS + j, r] = S[vp * SLOTS + j, r] + k_at(vp, j, dd) * q_t[dd, r]

    @T.macro
    def weighted_values(O, P, v_at):
        """O = P V in float32, V's elements v_at(p, j, d)."""
        for ri, p, jj, d in T.grid(BQ, PAGES, SLOTS, D):
            with T.sblock("pv"):
                r, vp, j, dd = T.axis.remap("SRRS", [ri, p, jj, d])
                with T.init():
                    O[r, dd] = ZERO
                O[r, dd] = O[r, dd] + P[vp * SLOTS + j, r] * v_at(vp, j, dd)

    @T.macro
    def scores_to_output(S, P, O, m, t_max, t_sum, alpha, l, acc, v_pages, page_table, rows, vkh, vt, vrt):
        """The online softmax of one tile of keys whose scores S (keys x rows) are computed, and its P V added to
        the running output."""
        softmax_weights_by_key(S, P, m, t_max, t_sum, alpha, vt * BK, BQ, BK, vrt, rows.sees,
                               tile_sees_all(rows, vrt, vt), NEG, ZERO, ONE, softmax_exp, False)
        if WIDE_TILES:
            v_w = T.sblock_alloc_buffer((BK, D), ACC)
            for p, jj, d in T.grid(PAGES, SLOTS, D):
                with T.sblock("v_wide"):
                    vp, j, dd = T.axis.remap("SSS", [p, jj, d])
                    v_w[vp * SLOTS + j, dd] = in_place(v_pages, page_table, rows, vkh, vt)(vp, j, dd)
            weighted_values(O, P, from_tile(v_w))
        else:
            weighted_values(O, P, in_place(v_pages, page_table, rows, vkh, vt))
        update_output(acc, O, alpha, l, t_sum, BQ, D)

    rows = Rows()

    @T.macro
    def tasks(q, k_pages, v_pages, page_table, seq_lens, row_start, chunks, o_part, m_part, l_part):
        for c, kh in T.grid(NC, KVH):
            with T.sblock("task"):
                vc, vkh = T.axis.remap("SS", [c, kh])
                layout.task_reads_writes(q, k_pages, v_pages, page_table, seq_lens, row_start, chunks, o_part,
                                         m_part, l_part, vc, vkh)
                q_t = T.sblock_alloc_buffer((D, BQ), ACC)
                S = T.sblock_alloc_buffer((BK, BQ), ACC)
                if ADJUST:
                    S_adjusted = T.sblock_alloc_buffer((BK, BQ), ACC)
                P = T.sblock_alloc_buffer((BK, BQ), ACC)
                O, m, t_max, t_sum, alpha, l, acc = online_softmax_state(BQ, D)
                rows.bind(row_start, seq_lens, chunks, vc)
                for rt in range(ceil_div(rows.count, BQ)):
                    with T.sblock("row_tile"):
                        vrt = T.axis.opaque(NR, rt)
                        for d, ri in T.grid(D, BQ):
                            with T.sblock("q_tile"):
                                dd, r = T.axis.remap("SS", [d, ri])
                                q_t[dd, r] = T.if_then_else(
                                    vrt * BQ + r < rows.count,
                                    widen(q[rows.first + rows.node(vrt, r), vkh * G + rows.row(vrt, r) % G, dd])
                                    * SCALE, ZERO)
                        init_online_softmax(m, l, acc, BQ, D, NEG, ZERO)
                        for t in range(layout.tile_range(chunks, row_start, seq_lens, vc, rows.node(vrt, 0),
                                                         rows.node(vrt, BQ - 1))[0],
                                       layout.tile_range(chunks, row_start, seq_lens, vc, rows.node(vrt, 0),
                                                         rows.node(vrt, BQ - 1))[1]):
                            with T.sblock("kv_tile"):
                                vt = T.axis.opaque(MP * TPP, t)
                                if WIDE_TILES:  # (a macro's second call would rename its block: no shared one)
                                    k_w = T.sblock_alloc_buffer((BK, D), ACC)
                                    for p, jj, d in T.grid(PAGES, SLOTS, D):
                                        with T.sblock("k_wide"):
                                            vp, j, dd = T.axis.remap("SSS", [p, jj, d])
                                            k_w[vp * SLOTS + j, dd] = in_place(k_pages, page_table, rows, vkh,
                                                                               vt)(vp, j, dd)
                                    scores(S, q_t, from_tile(k_w))
                                else:
                                    scores(S, q_t, in_place(k_pages, page_table, rows, vkh, vt))
                                if ADJUST:
                                    for jj, ri in T.grid(BK, BQ):
                                        with T.sblock("score_terms"):
                                            j, r = T.axis.remap("SS", [jj, ri])
                                            S_adjusted[j, r] = score_terms(rows, vkh, vrt, vt)(r, j, S[j, r])
                                    scores_to_output(S_adjusted, P, O, m, t_max, t_sum, alpha, l, acc, v_pages,
                                                     page_table, rows, vkh, vt, vrt)
                                else:
                                    scores_to_output(S, P, O, m, t_max, t_sum, alpha, l, acc, v_pages, page_table,
                                                     rows, vkh, vt, vrt)
                        for ri, d in T.grid(BQ, D):
                            with T.sblock("save_acc"):
                                r, dd = T.axis.remap("SS", [ri, d])
                                if vrt * BQ + r < rows.count:
                                    o_part[chunks[vc, 3] + rows.node(vrt, r), vkh * G + rows.row(vrt, r) % G,
                                           dd] = acc[r, dd]
                        for ri in range(BQ):
                            with T.sblock("save_stats"):
                                r = T.axis.spatial(BQ, ri)
                                if vrt * BQ + r < rows.count:
                                    m_part[chunks[vc, 3] + rows.node(vrt, r), vkh * G + rows.row(vrt, r) % G] = m[r]
                                    l_part[chunks[vc, 3] + rows.node(vrt, r), vkh * G + rows.row(vrt, r) % G] = l[r]

    return layout.kernel(tasks)
