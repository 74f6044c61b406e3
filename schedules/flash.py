"""Hand schedule of flash attention (and mqa, the same blocks).

The row/KV tiling (block_q x block_kv) is part of the compute definition in tvm_attn/variants/flash.py; this
schedule runs row tiles in parallel and turns the two matmuls of each KV tile into register-blocked micro-kernels:
a (rows x vectors) block of accumulators stays in registers while the reduction loop streams through
(cache_write to a "local" tile, reduction loop outside the unrolled register block, lanes vectorized). Row max and
row sum are rfactored over the vector lanes so they vectorize too.
"""

from __future__ import annotations

from tvm import s_tir

from tvm_attn.targets import vector_lanes


def _largest_divisor(n: int, limit: int) -> int:
    return max(f for f in range(1, min(n, limit) + 1) if n % f == 0)


def register_blocked_matmul(sch: s_tir.Schedule, name: str, lanes: int, rows: int, vectors: int) -> None:
    """Block ``name`` (loops: row, spatial-or-reduce, ...; the output's last axis is vectorized) into a
    rows x (vectors * lanes) register tile."""
    block = sch.get_sblock(name)
    r, x, y = sch.get_loops(block)
    if name == "qk":  # S[r, j] += q[r, d] * k_t[d, j]: j is the output column, d the reduction
        col, red = x, y
    else:  # O[r, d] += P[r, j] * v[j, d]
        red, col = x, y
    col_extent = sch.get(col).extent.value
    row_extent = sch.get(r).extent.value
    rows = _largest_divisor(row_extent, rows)
    vec = lanes if col_extent % lanes == 0 else _largest_divisor(col_extent, lanes)
    vectors = _largest_divisor(col_extent // vec, vectors)
    r_o, r_i = sch.split(r, [None, rows])
    c_o, c_m, c_i = sch.split(col, [None, vectors, vec])
    sch.reorder(r_o, c_o, red, r_i, c_m, c_i)
    local = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(local, c_o)
    sch.vectorize(c_i)
    sch.unroll(r_i)
    sch.unroll(c_m)
    init = sch.decompose_reduction(block, red)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(local)[-1])


def vectorized_row_reduction(sch: s_tir.Schedule, name: str, lanes: int) -> None:
    """A row reduction over the KV tile, rfactored so each lane keeps a partial result."""
    block = sch.get_sblock(name)
    r, j = sch.get_loops(block)
    if sch.get(j).extent.value % lanes:
        return
    _, j_i = sch.split(j, [None, lanes])
    rf = sch.rfactor(j_i, 1)
    sch.vectorize(sch.get_loops(rf)[-1])


def schedule(sch: s_tir.Schedule, target=None) -> None:
    lanes = vector_lanes(target) if target is not None else 16
    sch.parallel(sch.fuse(*sch.get_loops(sch.get_sblock("tile"))))
    # NEON has 32 128-bit registers, AVX-512 32 512-bit ones: 4 rows x 4 vectors of accumulators fit both.
    register_blocked_matmul(sch, "qk", lanes, rows=4, vectors=4)
    register_blocked_matmul(sch, "pv", lanes, rows=4, vectors=4)
    vectorized_row_reduction(sch, "tile_max", lanes)
    vectorized_row_reduction(sch, "tile_sum", lanes)
    p_loops = sch.get_loops(sch.get_sblock("p"))
    _, p_i = sch.split(p_loops[-1], [None, lanes])
    sch.vectorize(p_i)
    for name in ("q_tile", "init_acc", "out"):
        sch.vectorize(sch.get_loops(sch.get_sblock(name))[-1])
