"""Hand schedule of the paged tree kernel (tvm_attn/variants/paged_tree.py): (chunk, KV head) tasks in parallel,
the tree kernel's register-blocked micro-kernels for both matmuls (QK^T with the rows along the lanes, each K
element broadcast; P V as flash's), the page loop outside both so that each page is looked up once, the row
reductions along the rows' lanes; the merge as the paged kernel's."""

from __future__ import annotations

from tvm import s_tir

from .common import has_block, register_block, register_blocked_matmul, schedule_target, vectorize_last
from .paged import schedule_merge


def schedule(sch: s_tir.Schedule, target=None) -> None:
    caps, lanes = schedule_target(target)
    limit = register_block(caps)
    sch.parallel(sch.fuse(*sch.get_loops(sch.get_sblock("task"))))
    # qk: (page, slot, row, d), blocks of a page's slots x the rows' vectors; pv: (row, page, slot, d), the
    # accumulators kept over the tile's pages.
    register_blocked_matmul(sch, "qk", row=-3, col=-2, red=-1, lanes=lanes, limit=limit)
    register_blocked_matmul(sch, "pv", row=-4, col=-1, red=-2, lanes=lanes, limit=limit)
    for name in ("tile_max", "tile_sum", "p", "q_tile", "init_acc", "save_acc"):
        vectorize_last(sch, name, lanes)
    for name in ("score_terms", "k_wide", "v_wide"):
        if has_block(sch, name):
            vectorize_last(sch, name, lanes)
    schedule_merge(sch, lanes)
