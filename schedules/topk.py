"""Hand schedule of top-k attention: the standard row tiling, with the per-row selection fused under each tile."""

from __future__ import annotations

from tvm import s_tir

from tvm_attn.targets import vector_lanes

from .common import fused_row_tiles, register_blocked_matmul


def schedule(sch: s_tir.Schedule, target=None) -> None:
    lanes = vector_lanes(target) if target is not None else 16
    fused_row_tiles(sch, ["pv", "row_sum", "exp", "select", "row_max", "qk"])
    register_blocked_matmul(sch, "pv", row=-3, col=-2, red=-1, lanes=lanes)
