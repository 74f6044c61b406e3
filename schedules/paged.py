"""Hand schedule of the paged kernel (tvm_attn/variants/paged.py): (chunk, KV head) tasks in parallel, QK^T as the
decode kernel's dot-product micro-kernel over partial vectors, P V register-blocked along head_dim, the row
reductions rfactored over vector lanes, the element-wise blocks vectorized; the merge parallel over (row, head)."""

from __future__ import annotations

from tvm import s_tir

from .common import schedule_target, vectorize_last, vectorized_row_reduction
from .decode import dot_product_micro_kernel, value_rows_micro_kernel


def schedule(sch: s_tir.Schedule, target=None) -> None:
    caps, lanes = schedule_target(target)
    sch.parallel(sch.fuse(*sch.get_loops(sch.get_sblock("task"))))
    dot_product_micro_kernel(sch, "qk_part", caps)
    value_rows_micro_kernel(sch, "pv", caps, lanes)
    for name in ("tile_max", "tile_sum"):
        vectorized_row_reduction(sch, name, lanes)
    for name in ("qk_half8", "qk_half4", "qk_half2", "q_rows", "p", "init_acc", "save_acc"):
        vectorize_last(sch, name, lanes)
    sch.parallel(sch.fuse(*sch.get_loops(sch.get_sblock("merge"))))
    for name in ("merge_acc", "out"):
        vectorize_last(sch, name, lanes)
