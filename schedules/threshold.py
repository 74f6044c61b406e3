"""Hand schedule of threshold attention: the standard row tiling, with the keep mask fused under each tile."""

from __future__ import annotations

from tvm import s_tir

from .common import fused_row_tiles, vectorize_reduction_output


def schedule(sch: s_tir.Schedule, target=None) -> None:
    sch.compute_inline(sch.get_sblock("kept"))
    fused_row_tiles(sch, ["pv", "row_sum", "exp_max", "softmax_sum", "exp", "row_max", "qk"])
    vectorize_reduction_output(sch, "pv")
