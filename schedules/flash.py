"""Hand schedule of flash attention (and mqa, the same blocks).

The row/KV tiling (block_q x block_kv) is part of the compute definition in tvm_attn/variants/flash.py; this
schedule runs row tiles in parallel and turns the two matmuls of each KV tile into register-blocked micro-kernels:
a (rows x vectors) block of accumulators stays in registers while the reduction loop streams through
(cache_write to a "local" tile, reduction loop outside the unrolled register block, lanes vectorized). Row max and
row sum are rfactored over the vector lanes so they vectorize too.
"""

from __future__ import annotations

from tvm import s_tir

from .common import (register_block, register_blocked_matmul, schedule_score_terms, schedule_target,
                     vectorize_last, vectorized_row_reduction)
from .pair_products import in_pair_products, pair_dot, pair_product_intrin


def schedule(sch: s_tir.Schedule, target=None) -> None:
    caps, lanes = schedule_target(target)
    limit = register_block(caps)
    sch.parallel(sch.fuse(*sch.get_loops(sch.get_sblock("k_t"))[:3]))  # on one thread it took ~4% of a 1024-key prefill
    sch.parallel(sch.fuse(*sch.get_loops(sch.get_sblock("tile"))))
    if in_pair_products(sch, "qk"):  # flash.compute(pairs=True)
        sch.parallel(sch.fuse(*sch.get_loops(sch.get_sblock("v_p"))[:3]))
        intrin, pair_lanes = pair_product_intrin(caps, "broadcast"), pair_dot(caps).lanes
        # Loops: (row, key, d / 2, pair) for qk, (row, key / 2, d, pair) for pv.
        register_blocked_matmul(sch, "qk", row=-4, col=-3, red=-2, pair=-1, intrin=intrin, lanes=pair_lanes,
                                limit=limit)
        register_blocked_matmul(sch, "pv", row=-4, col=-2, red=-3, pair=-1, intrin=intrin, lanes=pair_lanes,
                                limit=limit)
    else:
        # Loops: (row, key, d) for qk, (row, key, d) for pv with key the reduction.
        register_blocked_matmul(sch, "qk", row=-3, col=-2, red=-1, lanes=lanes, limit=limit)
        register_blocked_matmul(sch, "pv", row=-3, col=-1, red=-2, lanes=lanes, limit=limit)
    vectorized_row_reduction(sch, "tile_max", lanes)
    vectorized_row_reduction(sch, "tile_sum", lanes)
    vectorize_last(sch, "p", lanes)
    schedule_score_terms(sch, lanes)
    for name in ("q_tile", "init_acc", "out"):
        sch.vectorize(sch.get_loops(sch.get_sblock(name))[-1])
