"""Hand schedule of the bounded kernels: (batch, KV head, chunk) tasks of the shadow scan in parallel, its dot
products over int8 codes (stored dimension-major per block, keys along the lanes) a register-blocked micro-kernel;
the per-row selection and exact attention over the kept keys (explicitly vectorized loops in the compute) one task
per row; the quantization of K (the kernel for ``attention`` only) parallel over blocks."""

from __future__ import annotations

from tvm import s_tir

from .common import (RegisterBlock, register_blocked_matmul, schedule_target, vectorize_last,
                     vectorized_row_reduction)


def schedule(sch: s_tir.Schedule, target=None) -> None:
    _, lanes = schedule_target(target)
    names = {sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))}
    if "shadow_codes" in names:
        schedule_quantize(sch, target)
    sch.parallel(sch.fuse(*sch.get_loops(sch.get_sblock("split"))))
    # Rows x keys accumulators, head_dim streamed: each code vector converted once serves the group's query heads.
    register_blocked_matmul(sch, "shadow_dot", row=-3, col=-2, red=-1, lanes=lanes,
                            limit=RegisterBlock(rows=4, vectors=2))
    vectorized_row_reduction(sch, "offset_dot", lanes)
    vectorized_row_reduction(sch, "radius", lanes)
    for name in ("q_rows", "scaled_step", "upper", "save_upper"):
        vectorize_last(sch, name, lanes)
    sch.parallel(sch.fuse(*sch.get_loops(sch.get_sblock("row"))))


def schedule_quantize(sch: s_tir.Schedule, target=None, parallel: bool = True) -> None:
    """The quantization of K into its shadow (blocks shadow_min, shadow_max, shadow_step, shadow_codes): parallel
    over (batch, KV head, block) unless ``parallel`` is False (a KVCache's appends: one new position touches one
    block per head, and waking the thread pool costs more than quantizing it)."""
    _, lanes = schedule_target(target)

    def outer(loops):
        fused = sch.fuse(*loops)
        if parallel:
            sch.parallel(fused)

    for name in ("shadow_min", "shadow_max"):
        b, kh, t, d, j = sch.get_loops(sch.get_sblock(name))
        outer((b, kh, t))
        sch.reorder(j, d)  # whole K rows in turn (LLVM vectorizes the d loop)
    b, kh, t, d = sch.get_loops(sch.get_sblock("shadow_step"))
    outer((b, kh, t))
    vectorize_last(sch, "shadow_step", lanes)
    b, kh, t, d, j = sch.get_loops(sch.get_sblock("shadow_codes"))
    outer((b, kh, t))
    vectorize_last(sch, "shadow_codes", lanes)
