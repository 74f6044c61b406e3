"""Hand schedule of flash attention (and mqa, the same blocks): row tiles in parallel, head_dim loops vectorized.

The tiling itself (block_q x block_kv) is part of the compute definition in tvm_attn/variants/flash.py.
"""

from __future__ import annotations

from tvm import s_tir


def schedule(sch: s_tir.Schedule, target=None) -> None:
    tiles = sch.get_loops(sch.get_sblock("tile"))  # (batch, kv head, outer group, row tile)
    sch.parallel(sch.fuse(*tiles))
    for name in ("init_acc", "pv", "out"):
        sch.vectorize(sch.get_loops(sch.get_sblock(name))[-1])  # the head_dim loop
    pv = sch.get_sblock("pv")
    sch.decompose_reduction(pv, sch.get_loops(pv)[-2])
    sch.vectorize(sch.get_loops(sch.get_sblock("pv_init"))[-1])
