"""Hand schedule of threshold attention: the standard schedule, with the keep mask inlined into its consumers and
its two extra row reductions (softmax sum, max weight) fused under each row tile."""

from __future__ import annotations

from tvm import s_tir

from .common import fused_softmax_schedule


def schedule(sch: s_tir.Schedule, target=None) -> None:
    sch.compute_inline(sch.get_sblock("kept"))
    fused_softmax_schedule(sch, target, ["pv", "row_sum", "exp_max", "softmax_sum", "exp", "row_max", "qk"],
                           ["row_max", "softmax_sum", "exp_max", "row_sum"])
