"""Hand schedule of the BLAS-backed prefill (tvm_attn/variants/blas_prefill.py): row tiles in parallel (each task
calls sgemm on one thread), the online softmax's row reductions rfactored over vector lanes, its element-wise blocks
vectorized. The matmuls are the library's."""

from __future__ import annotations

from tvm import s_tir

from .common import schedule_target, vectorize_last, vectorized_row_reduction


def schedule(sch: s_tir.Schedule, target=None) -> None:
    _, lanes = schedule_target(target)
    sch.parallel(sch.fuse(*sch.get_loops(sch.get_sblock("tile"))))
    vectorized_row_reduction(sch, "tile_max", lanes)
    vectorized_row_reduction(sch, "tile_sum", lanes)
    for name in ("p", "init_acc", "out"):
        vectorize_last(sch, name, lanes)
