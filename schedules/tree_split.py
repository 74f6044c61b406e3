"""Hand schedule of the draft-tree kernel (tvm_attn/variants/tree_split.py): (batch, KV head, chunk, row tile)
tasks in parallel, flash's register-blocked micro-kernels for both matmuls (QK^T with the rows along the lanes; in
bfloat16 pair products, tensorized with the target's pair-product instruction), the row reductions along the rows'
lanes, and the merge vectorized as the decode kernel's."""

from __future__ import annotations

from tvm import s_tir

from .common import (has_block, register_block, register_blocked_matmul, schedule_score_terms, schedule_target,
                     vectorize_last)
from .decode import schedule_merge
from .pair_products import in_pair_products, pair_dot, pair_product_intrin


def schedule(sch: s_tir.Schedule, target=None) -> None:
    caps, lanes = schedule_target(target)
    limit = register_block(caps)
    sch.parallel(sch.fuse(*sch.get_loops(sch.get_sblock("tile"))))
    if in_pair_products(sch, "qk"):  # tree_split.compute(pairs=True)
        # qk: (key, row, d / 2, pair), each pair of K broadcast against q's pairs; pv: (row, key / 2, d, pair),
        # each pair of P broadcast against V's.
        pair_lanes = pair_dot(caps).lanes
        register_blocked_matmul(sch, "qk", row=-4, col=-3, red=-2, pair=-1, lanes=pair_lanes, limit=limit,
                                intrin=pair_product_intrin(caps, "bfloat16_word"))
        register_blocked_matmul(sch, "pv", row=-4, col=-2, red=-3, pair=-1, lanes=pair_lanes, limit=limit,
                                intrin=pair_product_intrin(caps, "word"))
        vectorize_last(sch, "v_pairs", lanes)
    else:
        # qk: (key, row, d), the rows along the lanes and each K element broadcast; pv: (row, key, d) as flash's.
        register_blocked_matmul(sch, "qk", row=-3, col=-2, red=-1, lanes=lanes, limit=limit)
        register_blocked_matmul(sch, "pv", row=-3, col=-1, red=-2, lanes=lanes, limit=limit)
    for name in ("k_wide", "v_wide"):  # 16-bit KV tiles widened to float32
        if has_block(sch, name):
            vectorize_last(sch, name, lanes)
    for name in ("tile_max", "tile_sum"):  # (key, row): the reduction over keys outside, rows along the lanes
        vectorize_last(sch, name, lanes)
    vectorize_last(sch, "p", lanes)
    schedule_score_terms(sch, lanes)
    for name in ("q_tile", "init_acc", "save_acc"):
        vectorize_last(sch, name, lanes)
    schedule_merge(sch, lanes)
