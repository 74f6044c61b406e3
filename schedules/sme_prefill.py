"""Hand schedule of the SME-backed prefill (tvm_attn/variants/sme_prefill.py): row tiles in parallel, the softmax on
the transposed scores vectorized over rows (its reductions over keys run down the columns: no horizontal sums), the
packing blocks vectorized. The matmuls are the SME subroutine's (tvm_attn/variants/sme_matmul.py), which no schedule
touches."""

from __future__ import annotations

from tvm import s_tir

from .common import schedule_target, vectorize_last


def schedule(sch: s_tir.Schedule, target=None) -> None:
    _, lanes = schedule_target(target)
    sch.work_on("main")
    sch.parallel(sch.fuse(*sch.get_loops(sch.get_sblock("k_t"))[:3]))
    if str(sch.get(sch.get_sblock("k_t")).reads[0].source.dtype) != "float32":  # 16-bit inputs: V is widened
        sch.parallel(sch.fuse(*sch.get_loops(sch.get_sblock("v_f"))[:2]))
        sch.vectorize(sch.get_loops(sch.get_sblock("v_f"))[-1])
    sch.parallel(sch.fuse(*sch.get_loops(sch.get_sblock("tile"))))
    # tile_max, tile_sum: loops (key, row), rows in lanes; p: the same
    for name in ("tile_max", "tile_sum", "q_t", "p", "init_acc", "out"):
        vectorize_last(sch, name, lanes)
