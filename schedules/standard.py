"""Hand schedule of standard attention: parallel query-row tiles (each owns its score rows), the two matmuls as
register-blocked micro-kernels, row max/sum lane partials and exp vectorized."""

from __future__ import annotations

from tvm import s_tir

from tvm_attn.targets import vector_lanes

from .common import register_blocked_matmul, vectorize_last


def schedule(sch: s_tir.Schedule, target=None) -> None:
    lanes = vector_lanes(target) if target is not None else 16
    sch.parallel(sch.fuse(*sch.get_loops(sch.get_sblock("tile"))))
    sch.parallel(sch.fuse(*sch.get_loops(sch.get_sblock("k_t"))[:3]))
    # Loops: (row, key, d) for qk and pv, d the reduction of qk, key that of pv.
    register_blocked_matmul(sch, "qk", row=-3, col=-2, red=-1, lanes=lanes)
    register_blocked_matmul(sch, "pv", row=-3, col=-1, red=-2, lanes=lanes)
    for name in ("row_max_part", "row_sum_part", "exp", "q_tile", "init_acc", "out"):
        vectorize_last(sch, name, lanes)
