"""Hand schedule of standard attention: parallel query-row tiles, the softmax chain fused under each tile, the two
matmuls as register-blocked micro-kernels, row max/sum rfactored over vector lanes, exp vectorized."""

from __future__ import annotations

from tvm import s_tir

from .common import fused_softmax_schedule


def schedule(sch: s_tir.Schedule, target=None) -> None:
    fused_softmax_schedule(sch, target, ["pv", "row_sum", "exp", "row_max", "qk"], ["row_max", "row_sum"])
