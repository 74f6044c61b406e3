"""Hand schedule of the pruned variants (threshold, topk): row tiles in parallel, QK^T as the flash micro-kernel,
the row reductions' lane partials and exp vectorized, softcap and ALiBi as every dense schedule takes them
(common.schedule_score_terms; a tuned record's replay does the same). The per-row selection, compaction and
gathered P V are plain loops that LLVM vectorizes (integer counting passes, head_dim FMAs)."""

from __future__ import annotations

from tvm import s_tir

from .common import (register_block, register_blocked_matmul, schedule_score_terms, schedule_target,
                     vectorize_last)


def schedule(sch: s_tir.Schedule, target=None) -> None:
    caps, lanes = schedule_target(target)
    limit = register_block(caps)
    sch.parallel(sch.fuse(*sch.get_loops(sch.get_sblock("tile"))))
    sch.parallel(sch.fuse(*sch.get_loops(sch.get_sblock("k_t"))[:3]))
    register_blocked_matmul(sch, "qk", row=-3, col=-2, red=-1, lanes=lanes, limit=limit)
    names = {sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("tile"))}
    for name in ("row_max_part", "row_sum_part", "exp", "keys", "q_tile", "out"):
        if name in names:
            vectorize_last(sch, name, lanes)
    schedule_score_terms(sch, lanes)
