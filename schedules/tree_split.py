"""Hand schedule of the draft-tree kernel (tvm_attn/variants/tree_split.py): (batch, KV head, chunk, row tile)
tasks in parallel, flash's register-blocked micro-kernels for both matmuls (QK^T with the rows along the lanes),
the row reductions along the rows' lanes, and the merge vectorized as the decode kernel's."""

from __future__ import annotations

from tvm import s_tir

from .common import has_block, register_block, register_blocked_matmul, schedule_target, vectorize_last
from .decode import schedule_merge


def schedule(sch: s_tir.Schedule, target=None) -> None:
    caps, lanes = schedule_target(target)
    limit = register_block(caps)
    sch.parallel(sch.fuse(*sch.get_loops(sch.get_sblock("tile"))))
    # qk: (key, row, d), the rows along the lanes and each K element broadcast; pv: (row, key, d) as flash's.
    register_blocked_matmul(sch, "qk", row=-3, col=-2, red=-1, lanes=lanes, limit=limit)
    register_blocked_matmul(sch, "pv", row=-3, col=-1, red=-2, lanes=lanes, limit=limit)
    for name in ("tile_max", "tile_sum"):  # (key, row): the reduction over keys outside, rows along the lanes
        vectorize_last(sch, name, lanes)
    vectorize_last(sch, "p", lanes)
    if has_block(sch, "score_terms"):
        vectorize_last(sch, "score_terms", lanes)
    for name in ("q_tile", "init_acc", "save_acc"):
        vectorize_last(sch, name, lanes)
    schedule_merge(sch, lanes)
