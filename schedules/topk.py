"""Hand schedule of top-k attention: the standard row tiling, with the per-row selection fused under each tile."""

from __future__ import annotations

from tvm import s_tir

from .common import fused_row_tiles, vectorize_reduction_output


def schedule(sch: s_tir.Schedule, target=None) -> None:
    fused_row_tiles(sch, ["pv", "row_sum", "exp", "select", "row_max", "qk"])
    vectorize_reduction_output(sch, "pv")
