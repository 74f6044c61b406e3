"""Dense attention of a ragged batch over a paged KV cache (tvm_attn/paged_cache.py): sequences of their own
lengths, each with its own number of new query rows (1 for decode, more for a chunk of prefill or draft tokens to
verify), K and V read in place from pages of ``page_size`` positions through a page table. One compiled kernel
serves every batch composition: the sequences, their lengths, query counts, page tables and how the work is split
are run-time data.

Split-KV (flash-decoding over pages): each sequence's keys are cut into chunks of whole tiles, planned by the caller
(paged_cache.plan_chunks: a long sequence into many, a short one whole), and every (chunk, KV head) is a parallel
task keeping, per query row, a running max, sum and unnormalized output over its chunk; a second step merges each
row's chunks by their maxes. Equal chunks keep the threads' static shares of the task loop even when one sequence
is 100 times another.

Arguments (main):
  q           (rows, heads, head_dim): the new rows of every sequence, concatenated in the order of the sequences
  k_pages     (kv_heads, pages, page_size, head_dim), v_pages the same: a head's pages one after another, so
              the consecutive pages of a sequence (as a prompt's are) are one stream
  page_table  (sequences, max_pages) int32: the page holding positions p * page_size .. of each sequence, then
              the index of a page of zeros up to PageTiling.table_columns
  seq_lens    (sequences,) int32: positions cached per sequence, its new rows' own keys the last of them
  row_start   (sequences + 1,) int32: sequence s owns rows row_start[s] .. row_start[s + 1] - 1
  row_seq     (rows,) int32: the sequence of each row
  chunks      (chunks, 4) int32: (sequence, first tile, end tile, first partial row), in sequence order
  seq_chunks  (sequences + 1,) int32: sequence s's chunks are seq_chunks[s] .. seq_chunks[s + 1] - 1
  o_part      (partial rows, heads, head_dim) float32, m_part and l_part (partial rows, heads) float32: scratch,
              a chunk's row i at partial row chunks[c, 3] + i
  sinks       (heads,) float32, where kspec.sinks: one logit per query head
  tree        (rows, tree_nodes) int32, where kspec.tree (draft trees): row i of sequence s, at row_start[s] + i,
              as AttentionSpec.tree_mask's row i of that sequence's tree (a chain: its causal mask), zeros past
              its n nodes; its n rows are the tree's nodes, the last n of its positions
  out         like q
Causal masks align bottom-right per sequence: its i-th of n rows is position seq_lens[s] - n + i. Keys are taken
in tiles of whole pages (or whole parts of a page, PageTiling), found through the page table once per page. A
tile's keys past the sequence's end get weight 0 and read zeros: the cache keeps a sequence's last page zero past
its length and points the table past its pages at a page of zeros (0 weight times a stale NaN would be NaN).

Blocks (the contract with schedules/paged.py):
  task       one per (chunk, KV head); inside it, per query row of the chunk's sequence (row):
    q_rows     the group's query heads at that row, pre-scaled, float32
    init_stats, init_acc
    kv_tile    one per tile of the chunk the row sees; inside it, per page of the tile:
      qk_part, qk_half8, qk_half4, qk_half2, qk
                 S = q k^T by partial dot products over 16 lanes, summed pairwise (decode's, common.sum_lanes)
      tile_max, rescale, p, tile_sum                    (common.softmax_weights)
      pv         O = P v
      update, update_sum                                (common.update_output)
    save_acc, save_stats   the chunk's (output, max, sum) per row
  merge      one per (row, head), over the row's chunks c: merge_init, merge_max (M = max m_c), merge_weight
             (w_c = e^(m_c - M), and the total sum_c w_c l_c), merge_acc
             (sum_c w_c o_c), out (that over the total)
"""

from __future__ import annotations

import dataclasses

from tvm.script import tirx as T
from tvm import tirx

from ..fast_exp import softmax_exp
from ..spec import KernelSpec
from .common import (ACC, ELEMENT_BYTES, LANE_SUM_LANES as LANES, OptionalArguments, Visibility, adjusted, ceil_div,
                     fresh_block_names, init_online_softmax, online_softmax_state, row_output, sink_logit,
                     softmax_weights, sum_lanes, update_output, widen)
from .decode import DecodeConfig


def _rows_buffer(handle, rows, heads: int, head_dim: int, dtype: str):
    """q or out: (rows, heads, head_dim), any strides but a contiguous last axis."""
    return T.match_buffer(handle, (rows, heads, head_dim), dtype, strides=(T.int32(), T.int32(), 1),
                          align=ELEMENT_BYTES[dtype], offset_factor=1)


def _pages_buffer(handle, kv_heads: int, pages, page_size: int, head_dim: int, dtype: str):
    return T.match_buffer(handle, (kv_heads, pages, page_size, head_dim), dtype,
                          strides=(T.int32(), T.int32(), T.int32(), 1), align=ELEMENT_BYTES[dtype], offset_factor=1)


@dataclasses.dataclass(frozen=True)
class PageTiling:
    """How the kernel's KV tiles lie on pages: ``pages`` whole pages of ``page_size`` positions per tile when pages
    are at most block_kv long (page_size x (block_kv // page_size) keys), else ``tiles_per_page`` tiles of
    block_kv keys per page (page_size a multiple of block_kv). Either way a tile's keys are runs of consecutive
    slots of a page, so the kernel looks up the page table once per page, never per key."""

    page_size: int
    block_kv: int

    def __post_init__(self):
        if self.page_size > self.block_kv and self.page_size % self.block_kv:
            raise ValueError(f"page_size={self.page_size} is above block_kv={self.block_kv} and not a multiple of "
                             f"it: use a page_size that divides into or is a multiple of block_kv")

    @property
    def pages(self) -> int:
        return max(1, self.block_kv // self.page_size)

    @property
    def tiles_per_page(self) -> int:
        return max(1, self.page_size // self.block_kv)

    @property
    def slots(self) -> int:
        """Consecutive slots of one page in a tile."""
        return min(self.page_size, self.block_kv)

    @property
    def keys(self) -> int:
        return self.pages * self.slots

    def table_columns(self, pages: int) -> int:
        """Page-table columns a sequence of ``pages`` pages needs: its last tile's pages, even past its end."""
        return ceil_div(pages, self.pages) * self.pages


class PagedLayout:
    """What every paged kernel shares: its arguments and their run-time sizes (rows, sequences, pages, max_pages,
    chunks, partial_rows, tree_nodes), how its KV tiles lie on pages (``tiling``), each sequence's mask, and the
    second step merging each row's chunks (``kernel``)."""

    def __init__(self, kspec: KernelSpec, page_size: int, config: DecodeConfig):
        if kspec.knobs():
            raise ValueError(f"the paged kernels compute dense attention; got the knob {kspec.knobs()}")
        self.kspec, self.config = kspec, config
        self.tiling = PageTiling(page_size, config.block_kv)
        (self.rows, self.sequences, self.pages, self.max_pages, self.chunks, self.partial_rows,
         self.tree_nodes) = (tirx.Var(name, "int32") for name in
                             ("rows", "sequences", "pages", "max_pages", "chunks", "partial_rows", "tree_nodes"))
        self.optional = OptionalArguments(kspec, (self.rows, self.tree_nodes))  # visibility binds the tree mask

    def visibility(self, row_start, seq_lens, s) -> Visibility:
        """The mask of sequence s: its rows are the last of its seq_lens[s] positions (a tree's nodes)."""
        vis = Visibility(self.kspec, row_start[s + 1] - row_start[s], seq_lens[s])
        if self.kspec.tree:
            vis.bind_tree(self.optional.tree, row_start[s])
        return vis

    def page(self, page_table, s, t, p):
        """The page holding page p of tile t of sequence s (past its end: the cache's zero page)."""
        return page_table[s, (t * self.tiling.pages + p) // self.tiling.tiles_per_page]

    def slot(self, t, j):
        """Slot j of a tile's run of a page (tile t)."""
        return (t % self.tiling.tiles_per_page) * self.tiling.slots + j

    def tile_range(self, chunks, row_start, seq_lens, c, first_row, last_row):
        """The tiles of chunk c that rows first_row..last_row of its sequence see: range(first, end) (empty when
        none)."""
        vis = self.visibility(row_start, seq_lens, chunks[c, 0])
        block = self.tiling.keys
        first = T.max(chunks[c, 1], vis.first(first_row) // block)
        return first, T.max(first, T.min(chunks[c, 2], ceil_div(vis.end(last_row), block)))

    def task_reads_writes(self, q, k_pages, v_pages, page_table, seq_lens, row_start, chunks, o_part, m_part,
                          l_part, vc, vkh):
        """T.reads and T.writes of a (chunk c, KV head kh) task."""
        G, D, page_size = self.kspec.group_size, self.kspec.head_dim, self.tiling.page_size
        T.reads(q[0:self.rows, vkh * G:vkh * G + G, 0:D], k_pages[vkh, 0:self.pages, 0:page_size, 0:D],
                v_pages[vkh, 0:self.pages, 0:page_size, 0:D], page_table[0:self.sequences, 0:self.max_pages],
                seq_lens[0:self.sequences], row_start[0:self.sequences + 1], chunks[vc, 0:4])
        T.writes(o_part[0:self.partial_rows, vkh * G:vkh * G + G, 0:D],
                 m_part[0:self.partial_rows, vkh * G:vkh * G + G], l_part[0:self.partial_rows, vkh * G:vkh * G + G])

    def kernel(self, tasks):
        """The PrimFunc: the ``@T.macro`` ``tasks(q, k_pages, v_pages, page_table, seq_lens, row_start, chunks,
        o_part, m_part, l_part)`` writing every chunk's partial rows, then the merge (blocks merge, merge_init,
        merge_max, merge_weight, merge_acc, out)."""
        kspec, page_size, max_splits = self.kspec, self.tiling.page_size, self.config.max_splits
        H, KVH, D, dtype = kspec.heads, kspec.kv_heads, kspec.head_dim, kspec.dtype
        NR, NS, NP, MP, NC, PR = (self.rows, self.sequences, self.pages, self.max_pages, self.chunks,
                                  self.partial_rows)
        NEG = T.min_value("float32")
        ZERO = T.float32(0)
        optional = self.optional

        @T.macro
        def merge(o_part, m_part, l_part, chunks, row_start, row_seq, seq_chunks, sinks, out):
            for r, h in T.grid(NR, H):
                with T.sblock("merge"):
                    vr, vh = T.axis.remap("SS", [r, h])
                    if sinks is None:
                        T.reads(m_part[0:PR, vh], l_part[0:PR, vh], o_part[0:PR, vh, 0:D], chunks[0:NC, 0:4],
                                row_seq[vr], row_start[0:NS + 1], seq_chunks[0:NS + 1])
                    else:
                        T.reads(m_part[0:PR, vh], l_part[0:PR, vh], o_part[0:PR, vh, 0:D], chunks[0:NC, 0:4],
                                row_seq[vr], row_start[0:NS + 1], seq_chunks[0:NS + 1], sinks[vh])
                    T.writes(out[vr, vh, 0:D])
                    row_max = T.sblock_alloc_buffer((1,), ACC)
                    total = T.sblock_alloc_buffer((1,), ACC)
                    weight = T.sblock_alloc_buffer((max_splits,), ACC)
                    merged = T.sblock_alloc_buffer((D,), ACC)
                    with T.sblock("merge_init"):
                        row_max[0] = NEG
                        total[0] = ZERO
                    for c in range(seq_chunks[row_seq[vr]], seq_chunks[row_seq[vr] + 1]):
                        with T.sblock("merge_max"):
                            vc = T.axis.opaque(NC, c)
                            row_max[0] = T.max(row_max[0], m_part[chunks[vc, 3] + vr - row_start[row_seq[vr]], vh])
                    for c in range(seq_chunks[row_seq[vr]], seq_chunks[row_seq[vr] + 1]):
                        with T.sblock("merge_weight"):
                            vc = T.axis.opaque(NC, c)
                            weight[vc - seq_chunks[row_seq[vr]]] = softmax_exp(
                                m_part[chunks[vc, 3] + vr - row_start[row_seq[vr]], vh] - row_max[0])
                            total[0] = total[0] + weight[vc - seq_chunks[row_seq[vr]]] * \
                                l_part[chunks[vc, 3] + vr - row_start[row_seq[vr]], vh]
                    for c, d in T.grid(seq_chunks[row_seq[vr] + 1] - seq_chunks[row_seq[vr]], D):
                        with T.sblock("merge_acc"):
                            vc, vd = T.axis.remap("RS", [c, d])
                            with T.init():
                                merged[vd] = ZERO
                            merged[vd] = merged[vd] + weight[vc] * o_part[
                                chunks[seq_chunks[row_seq[vr]] + vc, 3] + vr - row_start[row_seq[vr]], vh, vd]
                    for d in range(D):
                        with T.sblock("out"):
                            vd = T.axis.spatial(D, d)
                            out[vr, vh, vd] = row_output(merged[vd], total[0], row_max[0], dtype,
                                                         sink_logit(sinks, vh))

        def arguments(q_h, k_h, v_h, table_h, lens_h, start_h, row_seq_h, chunks_h, seq_chunks_h, o_part_h,
                      m_part_h, l_part_h, out_h):
            """The kernel's argument buffers (the sinks' aside) from their handles."""
            return (_rows_buffer(q_h, NR, H, D, dtype), _pages_buffer(k_h, KVH, NP, page_size, D, dtype),
                    _pages_buffer(v_h, KVH, NP, page_size, D, dtype), T.match_buffer(table_h, (NS, MP), "int32"),
                    T.match_buffer(lens_h, (NS,), "int32"), T.match_buffer(start_h, (NS + 1,), "int32"),
                    T.match_buffer(row_seq_h, (NR,), "int32"), T.match_buffer(chunks_h, (NC, 4), "int32"),
                    T.match_buffer(seq_chunks_h, (NS + 1,), "int32"), T.match_buffer(o_part_h, (PR, H, D), ACC),
                    T.match_buffer(m_part_h, (PR, H), ACC), T.match_buffer(l_part_h, (PR, H), ACC),
                    _rows_buffer(out_h, NR, H, D, dtype))

        @T.prim_func(s_tir=True)
        def paged(q_h: T.handle, k_h: T.handle, v_h: T.handle, table_h: T.handle, lens_h: T.handle,
                  start_h: T.handle, row_seq_h: T.handle, chunks_h: T.handle, seq_chunks_h: T.handle,
                  o_part_h: T.handle, m_part_h: T.handle, l_part_h: T.handle, sinks_h: T.handle, tree_h: T.handle,
                  out_h: T.handle):
            T.func_attr({"global_symbol": "main", "tirx.noalias": True})
            (q, k_pages, v_pages, page_table, seq_lens, row_start, row_seq, chunks, seq_chunks, o_part, m_part,
             l_part, out) = arguments(q_h, k_h, v_h, table_h, lens_h, start_h, row_seq_h, chunks_h, seq_chunks_h,
                                      o_part_h, m_part_h, l_part_h, out_h)
            optional.declare(sinks_h, tree_h)
            with T.sblock("root"):
                tasks(q, k_pages, v_pages, page_table, seq_lens, row_start, chunks, o_part, m_part, l_part)
                merge(o_part, m_part, l_part, chunks, row_start, row_seq, seq_chunks, optional.sinks, out)

        return optional.signature(paged)


def compute(kspec: KernelSpec, page_size: int, config: DecodeConfig = DecodeConfig()):
    """The paged PrimFunc for ``kspec`` (dense attention: heads, kv_heads, head_dim, causal, window, scale, dtype,
    softcap, sinks, ALiBi, tree) over pages of ``page_size`` positions, keys in tiles of whole pages or whole parts
    of a page (PageTiling(page_size, config.block_kv)); the chunks are the caller's plan."""
    layout = PagedLayout(kspec, page_size, config)
    fresh_block_names()
    KVH, D = kspec.kv_heads, kspec.head_dim
    G = kspec.group_size
    tiling = layout.tiling
    BK, NPT, SPT, TPP = tiling.keys, tiling.pages, tiling.slots, tiling.tiles_per_page
    DP = ceil_div(D, LANES) * LANES  # head_dim padded to whole partial vectors (q zero there)
    SCALE = T.float32(kspec.scale)
    NEG = T.min_value("float32")
    ZERO = T.float32(0)
    ONE = T.float32(1)
    NR, MP, NC = layout.rows, layout.max_pages, layout.chunks

    def dim(d):
        """Index d of a K row, clamped into head_dim where the padding reaches past it."""
        return d if DP == D else T.min(d, D - 1)

    def score_terms(kh, vis, i, t):
        """(dot, g, j) -> the score of row g (query head kh * G + g, row i of a sequence of visibility ``vis``) against
        key j of tile t from its dot product (q was scaled), adjusted (common.adjusted)."""
        return lambda dot, g, j: adjusted(kspec, dot, kh * G + g, vis.distance(i, t * BK + j))

    def row_sees(row_start, seq_lens, s):
        """sees(row0, r, j) for softmax_weights: every head r of a task's row is the same query, row0."""
        vis = layout.visibility(row_start, seq_lens, s)
        return lambda row0, r, j: vis.sees(row0, j)

    @T.macro
    def tasks(q, k_pages, v_pages, page_table, seq_lens, row_start, chunks, o_part, m_part, l_part):
        for c, kh in T.grid(NC, KVH):
            with T.sblock("task"):
                vc, vkh = T.axis.remap("SS", [c, kh])
                layout.task_reads_writes(q, k_pages, v_pages, page_table, seq_lens, row_start, chunks, o_part,
                                         m_part, l_part, vc, vkh)
                q_rows = T.sblock_alloc_buffer((G, DP), ACC)
                part = T.sblock_alloc_buffer((G, BK, LANES), ACC)
                half8 = T.sblock_alloc_buffer((G, BK, 8), ACC)
                half4 = T.sblock_alloc_buffer((G, BK, 4), ACC)
                half2 = T.sblock_alloc_buffer((G, BK, 2), ACC)
                S = T.sblock_alloc_buffer((G, BK), ACC)
                P = T.sblock_alloc_buffer((G, BK), ACC)
                O, m, t_max, t_sum, alpha, l, acc = online_softmax_state(G, D)
                for i in range(row_start[chunks[vc, 0] + 1] - row_start[chunks[vc, 0]]):
                    with T.sblock("row"):
                        vi = T.axis.opaque(NR, i)
                        for g, d in T.grid(G, DP):
                            with T.sblock("q_rows"):
                                vg, vd = T.axis.remap("SS", [g, d])
                                q_rows[vg, vd] = T.if_then_else(
                                    vd < D, widen(q[row_start[chunks[vc, 0]] + vi, vkh * G + vg,
                                                    T.min(vd, D - 1)]) * SCALE, ZERO)
                        init_online_softmax(m, l, acc, G, D, NEG, ZERO)
                        for t in range(layout.tile_range(chunks, row_start, seq_lens, vc, vi, vi)[0],
                                       layout.tile_range(chunks, row_start, seq_lens, vc, vi, vi)[1]):
                            with T.sblock("kv_tile"):
                                vt = T.axis.opaque(MP * TPP, t)
                                for g, p, jj, dc, lane in T.grid(G, NPT, SPT, DP // LANES, LANES):
                                    with T.sblock("qk_part"):
                                        vg, vp, j, vdc, vl = T.axis.remap("SSSRS", [g, p, jj, dc, lane])
                                        with T.init():
                                            part[vg, vp * SPT + j, vl] = ZERO
                                        part[vg, vp * SPT + j, vl] = part[vg, vp * SPT + j, vl] + q_rows[
                                            vg, vdc * LANES + vl] * widen(k_pages[
                                                vkh, layout.page(page_table, chunks[vc, 0], vt, vp),
                                                layout.slot(vt, j), dim(vdc * LANES + vl)])
                                sum_lanes(part, half8, half4, half2, S, G, BK, score_terms(
                                    vkh, layout.visibility(row_start, seq_lens, chunks[vc, 0]), vi, vt))
                                softmax_weights(
                                    S, P, m, t_max, t_sum, alpha, vt * BK, G, BK, vi,
                                    row_sees(row_start, seq_lens, chunks[vc, 0]),
                                    layout.visibility(row_start, seq_lens, chunks[vc, 0]).all_see(
                                        vi, vi, vt * BK, vt * BK + BK),
                                    NEG, ZERO, ONE, softmax_exp)
                                for g, p, jj, d in T.grid(G, NPT, SPT, D):
                                    with T.sblock("pv"):
                                        vg, vp, j, vd = T.axis.remap("SRRS", [g, p, jj, d])
                                        with T.init():
                                            O[vg, vd] = ZERO
                                        O[vg, vd] = O[vg, vd] + P[vg, vp * SPT + j] * widen(v_pages[
                                            vkh, layout.page(page_table, chunks[vc, 0], vt, vp),
                                            layout.slot(vt, j), vd])
                                update_output(acc, O, alpha, l, t_sum, G, D)
                        for g, d in T.grid(G, D):
                            with T.sblock("save_acc"):
                                vg, vd = T.axis.remap("SS", [g, d])
                                o_part[chunks[vc, 3] + vi, vkh * G + vg, vd] = acc[vg, vd]
                        for g in range(G):
                            with T.sblock("save_stats"):
                                vg = T.axis.spatial(G, g)
                                m_part[chunks[vc, 3] + vi, vkh * G + vg] = m[vg]
                                l_part[chunks[vc, 3] + vi, vkh * G + vg] = l[vg]

    return layout.kernel(tasks)
