"""Hand schedule of standard attention: parallel query-row tiles (each owns its score rows), the two matmuls as
register-blocked micro-kernels, row max/sum lane partials and exp vectorized."""

from __future__ import annotations

from tvm import s_tir

from .common import register_block, register_blocked_matmul, schedule_score_terms, schedule_target, vectorize_last


def schedule(sch: s_tir.Schedule, target=None) -> None:
    caps, lanes = schedule_target(target)
    limit = register_block(caps)
    sch.parallel(sch.fuse(*sch.get_loops(sch.get_sblock("tile"))))
    sch.parallel(sch.fuse(*sch.get_loops(sch.get_sblock("k_t"))[:3]))
    # Loops: (row, key, d) for qk and pv, d the reduction of qk, key that of pv.
    register_blocked_matmul(sch, "qk", row=-3, col=-2, red=-1, lanes=lanes, limit=limit)
    register_blocked_matmul(sch, "pv", row=-3, col=-1, red=-2, lanes=lanes, limit=limit)
    for name in ("row_max_part", "row_sum_part", "exp", "q_tile", "init_acc", "out"):
        vectorize_last(sch, name, lanes)
    schedule_score_terms(sch, lanes)
