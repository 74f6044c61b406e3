"""Schedule steps shared by the variants: register-blocked matmuls, lane-wise row reductions, row tiling."""

from __future__ import annotations

from tvm import s_tir

ROW_TILES = (4, 8, 16, 32)


def largest_divisor(n: int, limit: int) -> int:
    """The largest factor of n that is <= limit (1 at worst): splits by it need no tail predicate."""
    return max(f for f in range(1, min(n, limit) + 1) if n % f == 0)


def register_blocked_matmul(sch: s_tir.Schedule, name: str, row, col, red, *, lanes: int, rows: int = 4,
                            vectors: int = 4) -> None:
    """Turn block ``name`` (loops row, col, red among its last three) into a micro-kernel: a rows x (vectors *
    lanes) tile of accumulators kept in registers ("local" cache, unrolled, lanes vectorized) while the reduction
    loop streams through. ``row``/``col``/``red`` index the block's loops. Rows and vectors are sampled perfect
    tiles (tunable), with ``rows`` and ``vectors`` as default decisions: 4 x 4 fits the 32 vector registers of
    both AVX-512 and NEON."""
    block = sch.get_sblock(name)
    loops = sch.get_loops(block)
    r, c, k = loops[row], loops[col], loops[red]
    row_extent = sch.get(r).extent.value
    col_extent = sch.get(c).extent.value
    vec = largest_divisor(col_extent, lanes)
    c_outer, c_i = sch.split(c, [None, vec])
    rows = largest_divisor(row_extent, rows)
    vectors = largest_divisor(col_extent // vec, vectors)
    r_o, r_i = sch.split(r, sch.sample_perfect_tile(r, n=2, max_innermost_factor=8,
                                                    decision=[row_extent // rows, rows]))
    c_o, c_m = sch.split(c_outer, sch.sample_perfect_tile(c_outer, n=2, max_innermost_factor=8,
                                                          decision=[col_extent // vec // vectors, vectors]))
    sch.reorder(r_o, c_o, k, r_i, c_m, c_i)
    local = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(local, c_o, preserve_unit_loops=True)  # loop counts must not depend on decisions
    sch.unroll(r_i)
    sch.unroll(c_m)
    if vec > 1:
        sch.vectorize(c_i)
    init = sch.decompose_reduction(block, k)
    if vec > 1:
        sch.vectorize(sch.get_loops(init)[-1])
        sch.vectorize(sch.get_loops(local)[-1])


def vectorized_row_reduction(sch: s_tir.Schedule, name: str, lanes: int):
    """Split a reduction over the block's last loop so each vector lane keeps a partial result (block
    ``<name>_rf``, lanes vectorized), then reduce the lanes. Call before compute_at: rfactor needs the reduction to
    own its loop nest. Returns the rf block, or None when the loop is not a multiple of a vector."""
    loops = sch.get_loops(sch.get_sblock(name))
    extent = sch.get(loops[-1]).extent.value
    vec = largest_divisor(extent, lanes)
    if vec == 1:
        return None
    _, inner = sch.split(loops[-1], [None, vec])
    return sch.rfactor(inner, len(loops) - 1)


def vectorize_lanes(sch: s_tir.Schedule, rf) -> None:
    """Vectorize an rf block's lane loop, moved inside its reduction loop."""
    if rf is None:
        return
    *_, lanes_loop, red = sch.get_loops(rf)
    sch.reorder(red, lanes_loop)
    sch.vectorize(lanes_loop)


def vectorize_last(sch: s_tir.Schedule, name: str, lanes: int) -> None:
    """Vectorize the block's last (spatial) loop by the widest vector that divides it."""
    loop = sch.get_loops(sch.get_sblock(name))[-1]
    vec = largest_divisor(sch.get(loop).extent.value, lanes)
    if vec > 1:
        _, inner = sch.split(loop, [None, vec])
        sch.vectorize(inner)


def sample_row_tile(sch: s_tir.Schedule, default: int = 16):
    """Query rows per parallel task, a sampled knob (default decision ``default``)."""
    return sch.sample_categorical(list(ROW_TILES), [1.0 / len(ROW_TILES)] * len(ROW_TILES),
                                  decision=ROW_TILES.index(default))


def fused_row_tiles(sch: s_tir.Schedule, producers: list[str], out: str = "out"):
    """Split ``out``'s query rows into tiles, run (batch, head, tile) in parallel, and compute each producer
    (given consumers first) under the tile, so every intermediate buffer holds one tile of rows. Returns the
    parallel loop."""
    block = sch.get_sblock(out)
    b, h, i, d = sch.get_loops(block)
    tile = sample_row_tile(sch)
    i_outer, _ = sch.split(i, factors=[None, tile])
    rows = sch.fuse(b, h, i_outer)
    sch.parallel(rows)
    sch.vectorize(d)
    for name in producers:
        sch.compute_at(sch.get_sblock(name), rows, preserve_unit_loops=True)
    return rows


def parallel_transpose(sch: s_tir.Schedule, name: str = "k_t") -> None:
    """The K transpose runs once per KV head, before the row tiles: parallel over (batch, kv head, d)."""
    b, kh, d, _ = sch.get_loops(sch.get_sblock(name))
    sch.parallel(sch.fuse(b, kh, d))


def fused_softmax_schedule(sch: s_tir.Schedule, target, chain: list[str], row_reductions: list[str]) -> None:
    """The schedule of the materialized-score variants. ``chain`` lists the blocks computed under each row tile,
    consumers first (from pv back to qk); ``row_reductions`` the reductions over keys to vectorize by lanes."""
    from tvm_attn.targets import vector_lanes

    lanes = vector_lanes(target) if target is not None else 16
    parallel_transpose(sch)
    rf_blocks = {name: vectorized_row_reduction(sch, name, lanes) for name in row_reductions}
    producers = []
    for name in chain:
        producers.append(name)
        if rf_blocks.get(name) is not None:
            producers.append(f"{name}_rf")
    fused_row_tiles(sch, producers)
    # Loops under the tile: (unit b, unit h, row, key, d) for qk; (unit b, unit h, row, d, key) for pv.
    register_blocked_matmul(sch, "qk", row=-3, col=-2, red=-1, lanes=lanes)
    register_blocked_matmul(sch, "pv", row=-3, col=-2, red=-1, lanes=lanes)
    for name, rf in rf_blocks.items():
        if rf is not None:
            vectorize_lanes(sch, sch.get_sblock(f"{name}_rf"))
    vectorize_last(sch, "exp", lanes)
