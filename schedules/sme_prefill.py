"""Hand schedule of the SME-backed prefill (tvm_attn/variants/sme_prefill.py): row tiles in parallel, the online
softmax's row reductions rfactored over NEON lanes, its element-wise and packing blocks vectorized. The matmuls
are the SME subroutine's (tvm_attn/variants/sme_matmul.py), which no schedule touches."""

from __future__ import annotations

from tvm import s_tir

from .common import schedule_target, vectorize_last, vectorized_row_reduction


def schedule(sch: s_tir.Schedule, target=None) -> None:
    _, lanes = schedule_target(target)
    sch.work_on("main")
    sch.parallel(sch.fuse(*sch.get_loops(sch.get_sblock("k_t"))[:3]))
    if str(sch.get(sch.get_sblock("k_t")).reads[0].source.dtype) != "float32":  # 16-bit inputs: V is widened
        sch.parallel(sch.fuse(*sch.get_loops(sch.get_sblock("v_f"))[:2]))
        sch.vectorize(sch.get_loops(sch.get_sblock("v_f"))[-1])
    sch.parallel(sch.fuse(*sch.get_loops(sch.get_sblock("tile"))))
    vectorized_row_reduction(sch, "tile_max", lanes)
    vectorized_row_reduction(sch, "tile_sum", lanes)
    for name in ("q_t", "p", "p_t", "init_acc", "out"):
        vectorize_last(sch, name, lanes)
