"""Schedule steps shared by the variants whose scores are materialized (standard, threshold, topk)."""

from __future__ import annotations

from tvm import s_tir

ROW_TILES = (4, 8, 16, 32)


def sample_row_tile(sch: s_tir.Schedule, default: int = 16):
    """Query rows per parallel task, a sampled knob (default decision ``default``)."""
    return sch.sample_categorical(list(ROW_TILES), [1.0 / len(ROW_TILES)] * len(ROW_TILES),
                                  decision=ROW_TILES.index(default))


def fused_row_tiles(sch: s_tir.Schedule, producers: list[str], out: str = "out") -> None:
    """Split ``out``'s query rows into tiles, run (batch, head, tile) in parallel, and compute each producer
    (given consumers first) under the tile, so every intermediate buffer holds one tile of rows."""
    block = sch.get_sblock(out)
    b, h, i, d = sch.get_loops(block)
    tile = sample_row_tile(sch)
    i_outer, _ = sch.split(i, factors=[None, tile])
    rows = sch.fuse(b, h, i_outer)
    sch.parallel(rows)
    sch.vectorize(d)
    for name in producers:
        sch.compute_at(sch.get_sblock(name), rows, preserve_unit_loops=True)


def vectorize_reduction_output(sch: s_tir.Schedule, name: str) -> None:
    """For a reduction whose last two loops are (spatial d, reduce j): put j outside d, vectorize d, then split
    off the init block and vectorize it too (vectorize before decompose, or the dataflow check fails)."""
    block = sch.get_sblock(name)
    *_, d, j = sch.get_loops(block)
    sch.reorder(j, d)
    sch.vectorize(d)
    init = sch.decompose_reduction(block, j)
    sch.vectorize(sch.get_loops(init)[-1])
