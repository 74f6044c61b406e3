"""Hand schedule of standard attention: parallel query-row tiles with the softmax chain fused under each."""

from __future__ import annotations

from tvm import s_tir

from .common import fused_row_tiles, vectorize_reduction_output


def schedule(sch: s_tir.Schedule, target=None) -> None:
    fused_row_tiles(sch, ["pv", "row_sum", "exp", "row_max", "qk"])
    vectorize_reduction_output(sch, "pv")
