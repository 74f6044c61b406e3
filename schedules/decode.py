"""Hand schedule of the decode kernel: (batch, KV head, chunk) tasks in parallel; the dot products of QK^T as a
register-blocked micro-kernel over LANES-wide partial vectors (keys x lanes accumulators, head_dim streamed), P V as
the flash micro-kernel (rows x head_dim accumulators, keys streamed), row reductions and the merge vectorized."""

from __future__ import annotations

from tvm import s_tir

from tvm_attn.targets import CpuCapabilities

from .byte_products import INTERLEAVE_KEYS, WORD, byte_dot_intrin, interleave_intrin
from .byte_products import LANES as BYTE_DOT_LANES
from .common import (RegisterBlock, has_block, largest_divisor, register_blocked_matmul, schedule_target,
                     vectorize_last, vectorized_row_reduction)
from .float16_products import LANES as FLOAT16_PRODUCT_LANES
from .float16_products import float16_product_intrin, in_float16_products
from .pair_products import in_pair_products, pair_dot, pair_product_intrin


def dot_product_micro_kernel(sch: s_tir.Schedule, name: str, caps: CpuCapabilities) -> None:
    """Block ``name`` has loops (row, key, step, lane) accumulating partial dot products over steps: keep a
    rows x keys block of partial vectors in registers while the steps stream through, so each K vector loaded serves
    several query rows and each q vector several keys. Both counts are sampled up to the largest block that fits the
    target's registers (a partial vector of 16 lanes takes 1 AVX-512, 2 AVX2 or 4 NEON registers): 2 x 4 on
    AVX-512, 1 x 2 on AVX2 and NEON, the default decisions. In pair products (loops (row, key, step, lane, pair))
    each partial vector is one tensor intrinsic; in float16 products, each 8 lanes of it."""
    block = sch.get_sblock(name)
    pairs = in_pair_products(sch, name)
    halves = in_float16_products(sch, name)
    g, j, c, lane = sch.get_loops(block)[-5:-1] if pairs else sch.get_loops(block)[-4:]
    n_rows, n_keys = sch.get(g).extent.value, sch.get(j).extent.value
    per_partial = max(1, sch.get(lane).extent.value // caps.lanes())
    # accumulators, the rows' q vectors and the keys' K vectors of one step (LLVM loads a step's K rows together)
    max_rows, max_keys = next(((r, k) for r, k in ((2, 4), (1, 4), (1, 2)) if (r * k + r + k) * per_partial
                               <= caps.vector_registers), (1, 1))
    rows, keys = largest_divisor(n_rows, max_rows), largest_divisor(n_keys, max_keys)
    g_o, g_i = sch.split(g, sch.sample_perfect_tile(g, n=2, max_innermost_factor=max_rows,
                                                    decision=[n_rows // rows, rows]))
    j_o, j_i = sch.split(j, sch.sample_perfect_tile(j, n=2, max_innermost_factor=max_keys,
                                                    decision=[n_keys // keys, keys]))
    sch.reorder(g_o, j_o, g_i, j_i, c, lane)  # each K row read whole, in memory order
    local = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(local, j_o, preserve_unit_loops=True)
    sch.unroll(g_i)
    sch.unroll(j_i)
    if not (pairs or halves):
        sch.vectorize(lane)
    init = sch.decompose_reduction(block, c)
    if pairs or halves:  # the partial vector in instructions of the target's width
        width = pair_dot(caps).lanes if pairs else FLOAT16_PRODUCT_LANES
        if width < sch.get(lane).extent.value:
            lane_o, lane = sch.split(lane, [None, width])
            sch.unroll(lane_o)
        sch.tensorize(lane, pair_product_intrin(caps, "lanewise") if pairs else float16_product_intrin(caps))
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(local)[-1])


def value_rows_micro_kernel(sch: s_tir.Schedule, name: str, caps: CpuCapabilities, lanes: int,
                            row: int = -3, integer: bool = False) -> None:
    """Block ``name`` (loops (row, key, d), key the reduction; ``row`` indexes the row loop when more reduction
    loops precede the key's) accumulates P V for a few query rows: whole V rows per key (up to 8 vectors, as the
    registers allow) keep the reads in memory order; fewer rows then keep the accumulators within the vector
    registers. Integer V, measured on Zen 5 (GQA 32/8, int8 caches): with 32 registers, 2 rows over 8 vectors beat
    all 4 rows over fewer (1.27x at head_dim 128, 16k keys; 1.07x against 4 x 4 at head_dim 256); with 16 (AVX2),
    where 2 rows hold 4 vectors at most, as many rows as leave two vectors, each code vector widened once for all of
    them, beat 1 row over 8 vectors (4 x 2: 1.17x at head_dim 128; float16 V is slower that way: float V keeps the
    first rule)."""
    loops = sch.get_loops(sch.get_sblock(name))
    n_rows, row_vectors = sch.get(loops[row]).extent.value, max(1, sch.get(loops[-1]).extent.value // lanes)
    if integer and n_rows > 1 and RegisterBlock(2, 8).registers > caps.vector_registers:
        rows = min(n_rows, (caps.vector_registers - 3) // 2)
        vectors = min(row_vectors, max(1, (caps.vector_registers - 1) // (rows + 1)))
    else:
        vectors = min(8, row_vectors)
        rows = max(1, 16 // vectors)
    while RegisterBlock(rows, vectors).registers > caps.vector_registers and (rows > 1 or vectors > 1):
        rows, vectors = (rows // 2, vectors) if rows > 1 else (rows, vectors // 2)
    register_blocked_matmul(sch, name, row=row, col=-1, red=-2, lanes=lanes, limit=RegisterBlock(rows, vectors))


def key_vectors_micro_kernel(sch: s_tir.Schedule, name: str, caps: CpuCapabilities, lanes: int) -> None:
    """Block ``name`` (loops (row, key, d), d the reduction) computes q . k with the keys along the lanes: every row
    of the group (up to 8) in registers, so each vector of K's codes is widened once for all of them, and as many
    key vectors as the registers then hold."""
    loops = sch.get_loops(sch.get_sblock(name))
    rows = min(8, sch.get(loops[-3]).extent.value)
    vectors = min(8, max(1, sch.get(loops[-2]).extent.value // lanes))
    while RegisterBlock(rows, vectors).registers > caps.vector_registers and (rows > 1 or vectors > 1):
        rows, vectors = (rows, vectors // 2) if vectors > 1 else (rows // 2, vectors)
    register_blocked_matmul(sch, name, row=-3, col=-2, red=-1, lanes=lanes, limit=RegisterBlock(rows, vectors))


def interleave(sch: s_tir.Schedule, name: str) -> None:
    """Block ``name`` (loops (word, lane, byte)) gathers WORD rows of codes into words: INTERLEAVE_KEYS lanes at a
    time, one st4."""
    lane = sch.get_loops(sch.get_sblock(name))[-2]
    sch.tensorize(sch.split(lane, [None, INTERLEAVE_KEYS])[1], interleave_intrin())


def byte_dots_micro_kernel(sch: s_tir.Schedule, name: str, caps: CpuCapabilities, vectors: int = 4) -> None:
    """Block ``name`` (loops (row, digit, lane, reduction), int32 byte products of digits and words) as a
    micro-kernel: every digit of a few rows times ``vectors`` x BYTE_DOT_LANES lanes in registers while the
    reduction streams through, WORD at a time; each word vector loaded serves rows x digits products. A row is
    digits x vectors accumulators: two rows of 3 x 4 keep 29 of NEON's 32 registers live."""
    block = sch.get_sblock(name)
    g, r, lane, red = sch.get_loops(block)[-4:]
    per_row = sch.get(r).extent.value * vectors
    rows = largest_divisor(sch.get(g).extent.value, max(1, (caps.vector_registers - vectors - 1) // per_row))
    g_o, g_i = sch.split(g, [None, rows])
    l_o, l_v, l_i = sch.split(lane, [None, vectors, BYTE_DOT_LANES])
    red_o, red_i = sch.split(red, [None, WORD])
    sch.reorder(l_o, g_o, red_o, g_i, r, l_v, l_i, red_i)
    local = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(local, g_o, preserve_unit_loops=True)
    init = sch.decompose_reduction(block, red_o)
    for loop in (g_i, r, l_v):
        sch.unroll(loop)
    sch.tensorize(l_i, byte_dot_intrin(caps))
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(local)[-1])


def schedule_byte_products(sch: s_tir.Schedule, caps: CpuCapabilities, lanes: int) -> None:
    """The blocks of integer K and V in byte products: q's digits, the words of K and V, both micro-kernels, the
    weights' digits and the conversions back to float32."""
    interleave(sch, "k_words")
    byte_dots_micro_kernel(sch, "qk_bytes", caps)
    vectorize_last(sch, "q_digits", lanes)
    if has_block(sch, "pv_bytes"):  # (head_dim whole interleaves of V)
        interleave(sch, "v_words")
        byte_dots_micro_kernel(sch, "pv_bytes", caps)
        vectorized_row_reduction(sch, "w_peak", lanes)
        vectorize_last(sch, "w_digits", lanes)  # (pv_scale adds to O in place, which TVM does not vectorize)


def schedule(sch: s_tir.Schedule, target=None) -> None:
    caps, lanes = schedule_target(target)
    sch.parallel(sch.fuse(*sch.get_loops(sch.get_sblock("split"))))
    integer = has_block(sch, "qk_codes") or has_block(sch, "qk_bytes")
    if has_block(sch, "qk_bytes"):  # integer K and V in byte products
        schedule_byte_products(sch, caps, lanes)
    elif integer:  # integer K: keys along the lanes
        key_vectors_micro_kernel(sch, "qk_codes", caps, lanes)
    else:
        dot_product_micro_kernel(sch, "qk_part", caps)
    value_rows_micro_kernel(sch, "pv", caps, lanes, integer=integer)
    vectorized_row_reduction(sch, "tile_max", lanes)
    vectorized_row_reduction(sch, "tile_sum", lanes)
    for name in ("qk_scale", "value_weight") if integer else ("qk_half8", "qk_half4", "qk_half2"):
        vectorize_last(sch, name, lanes)
    vectorize_last(sch, "p", lanes)
    for name in ("q_rows", "init_acc", "save_acc"):
        vectorize_last(sch, name, lanes)
    schedule_merge(sch, lanes)


def schedule_merge(sch: s_tir.Schedule, lanes: int) -> None:
    """The blocks of split-KV's merge (common.merge_chunks): (batch, head, query) in parallel, head_dim vectorized."""
    b, h, i, d, s = sch.get_loops(sch.get_sblock("merge_acc"))
    sch.parallel(sch.fuse(b, h, i))
    # At most 8 vectors of a row summed over the chunks at a time: a whole 128-wide row is 32 NEON registers.
    d_o, d_i = sch.split(d, [None, largest_divisor(sch.get(d).extent.value, 8 * lanes)])
    sch.reorder(d_o, s, d_i)
    vectorize_last(sch, "merge_acc", lanes)
    b, h, i, d = sch.get_loops(sch.get_sblock("out"))
    sch.parallel(sch.fuse(b, h, i))
    vectorize_last(sch, "out", lanes)
