"""Hand schedule of the paged kernel (tvm_attn/variants/paged.py): (chunk, KV head) tasks in parallel, QK^T as the
decode kernel's dot-product micro-kernel over partial vectors per page, P V register-blocked along head_dim, the row
reductions rfactored over vector lanes, the element-wise blocks vectorized; the merge parallel over (row, head)."""

from __future__ import annotations

from tvm import s_tir

from .common import schedule_target, vectorize_last, vectorized_row_reduction
from .decode import dot_product_micro_kernel, value_rows_micro_kernel


def schedule(sch: s_tir.Schedule, target=None) -> None:
    caps, lanes = schedule_target(target)
    sch.parallel(sch.fuse(*sch.get_loops(sch.get_sblock("task"))))
    # Page by page: each page's run of slots is the decode micro-kernel's keys (its rows' addresses from one lookup).
    rows, page = sch.get_loops(sch.get_sblock("qk_part"))[-5:-3]
    sch.reorder(page, rows)
    dot_product_micro_kernel(sch, "qk_part", caps)
    value_rows_micro_kernel(sch, "pv", caps, lanes, row=-4)  # loops (row, page, slot, d): accumulators over pages
    for name in ("tile_max", "tile_sum"):
        vectorized_row_reduction(sch, name, lanes)
    for name in ("qk_half8", "qk_half4", "qk_half2", "q_rows", "p", "init_acc", "save_acc"):
        vectorize_last(sch, name, lanes)
    schedule_merge(sch, lanes)


def schedule_merge(sch: s_tir.Schedule, lanes: int) -> None:
    """The paged kernels' merge (variants/paged.PagedLayout.kernel): (row, head) in parallel, head_dim vectorized."""
    sch.parallel(sch.fuse(*sch.get_loops(sch.get_sblock("merge"))))
    for name in ("merge_acc", "out"):
        vectorize_last(sch, name, lanes)
