"""Schedule steps shared by the variants: register-blocked matmuls, lane-wise row reductions, vectorized loops."""

from __future__ import annotations

import dataclasses

from tvm import s_tir

from tvm_attn.targets import CpuCapabilities, capabilities


@dataclasses.dataclass(frozen=True)
class RegisterBlock:
    """The largest accumulator tile of a register-blocked micro-kernel: up to ``rows`` x ``vectors`` accumulator
    vectors, while the reduction streams ``vectors`` operand vectors and one broadcast value through."""

    rows: int = 6
    vectors: int = 4

    def __post_init__(self):
        for name in ("rows", "vectors"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"RegisterBlock.{name} must be an int >= 1, got {value!r}")

    @property
    def registers(self) -> int:
        """Vector registers the micro-kernel keeps live: accumulators, operand vectors (one at a time for a single
        row: each is used once), the broadcast."""
        return self.rows * self.vectors + (self.vectors if self.rows > 1 else 1) + 1


def register_block(caps: CpuCapabilities, rows: int = 6) -> RegisterBlock:
    """The widest ``rows``-row block that fits the target's vector registers: 6 x 4 for AVX-512 and NEON (29 of 32
    registers), 6 x 2 for AVX2 (15 of 16). Six rows give each operand vector six FMAs and enough independent
    accumulators to cover the FMA latency of two pipes; measured on AVX2 (x86-64-v3 code on Zen 5), flash at 1024
    keys ran 92-116 GFLOP/s with 4 x 2 and 144 with 6 x 2, where 4 x 4 spilled (90)."""
    vectors = (caps.vector_registers - 1) // (rows + 1)
    if vectors < 1:
        raise ValueError(f"rows={rows} leaves no register for a vector on {caps.isa_class}")
    return RegisterBlock(rows, vectors)


def schedule_target(target) -> tuple[CpuCapabilities, int]:
    """(capabilities, float32 lanes) of the target a schedule is applied for (None: the host)."""
    caps = capabilities(target if target is not None else "host")
    return caps, caps.lanes()


def largest_divisor(n: int, limit: int) -> int:
    """The largest factor of n that is <= limit (1 at worst): splits by it need no tail predicate."""
    return max(f for f in range(1, min(n, limit) + 1) if n % f == 0)


def register_blocked_matmul(sch: s_tir.Schedule, name: str, row, col, red, *, lanes: int,
                            limit: RegisterBlock, pair=None, intrin: str | None = None) -> None:
    """Turn block ``name`` (loops row, col, red among its last three) into a micro-kernel: a rows x (vectors *
    lanes) tile of accumulators kept in registers ("local" cache, unrolled, lanes vectorized) while the reduction
    loop streams through. ``row``/``col``/``red`` index the block's loops. Rows and vectors are sampled perfect
    tiles (tunable) of at most ``limit``'s, so every shape in the design space fits the registers; the default
    decision is the largest that divides the loops. Pair products (schedules/pair_products.py): ``pair`` indexes
    the loop over a pair of the reduction and each vector of lanes is computed by the tensor intrinsic ``intrin``
    (lanes must be its width)."""
    block = sch.get_sblock(name)
    loops = sch.get_loops(block)
    r, c, k = loops[row], loops[col], loops[red]
    row_extent = sch.get(r).extent.value
    col_extent = sch.get(c).extent.value
    vec = largest_divisor(col_extent, lanes)
    if pair is not None and vec != lanes:
        raise ValueError(f"{name}: {col_extent} columns are not whole vectors of {lanes} pair-product lanes")
    c_outer, c_i = sch.split(c, [None, vec])
    rows = largest_divisor(row_extent, limit.rows)
    vectors = largest_divisor(col_extent // vec, limit.vectors)
    r_o, r_i = sch.split(r, sch.sample_perfect_tile(r, n=2, max_innermost_factor=limit.rows,
                                                    decision=[row_extent // rows, rows]))
    c_o, c_m = sch.split(c_outer, sch.sample_perfect_tile(c_outer, n=2, max_innermost_factor=limit.vectors,
                                                          decision=[col_extent // vec // vectors, vectors]))
    sch.reorder(r_o, c_o, k, r_i, c_m, c_i, *([] if pair is None else [loops[pair]]))
    local = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(local, c_o, preserve_unit_loops=True)  # loop counts must not depend on decisions
    sch.unroll(r_i)
    sch.unroll(c_m)
    if pair is None and vec > 1:
        sch.vectorize(c_i)
    # Initialized above the reduction loops: k, and any the block had between row and k (they stay above k).
    loops = [sch.get(loop) for loop in sch.get_loops(block)]
    init = sch.decompose_reduction(block, sch.get_loops(block)[loops.index(sch.get(c_o)) + 1])
    if pair is not None:
        sch.tensorize(c_i, intrin)
    if vec > 1:
        sch.vectorize(sch.get_loops(init)[-1])
        sch.vectorize(sch.get_loops(local)[-1])


def vectorized_row_reduction(sch: s_tir.Schedule, name: str, lanes: int):
    """Split a reduction over the block's last loop so each vector lane keeps a partial result (block
    ``<name>_rf``, its lane loop vectorized), then reduce the lanes. Returns the rf block, or None when the loop is
    not a multiple of a vector."""
    block = sch.get_sblock(name)
    loops = sch.get_loops(block)
    extent = sch.get(loops[-1]).extent.value
    vec = largest_divisor(extent, lanes)
    if vec == 1:
        return None
    _, inner = sch.split(loops[-1], [None, vec])
    rf = sch.rfactor(inner, len(sch.get(block).writes[0].region))  # lanes: the rf buffer's last axis
    # Explicitly: LLVM vectorizes the lane loop by itself only when no mask test guards the loads.
    sch.vectorize(sch.get_loops(rf)[-1])
    return rf


def has_block(sch: s_tir.Schedule, name: str) -> bool:
    """Whether the scheduled compute has a block called ``name`` (blocks some forms of a compute add)."""
    try:
        sch.get_sblock(name)
    except Exception:  # tvm raises its own error kinds for a missing block
        return False
    return True


def vectorize_last(sch: s_tir.Schedule, name: str, lanes: int):
    """Vectorize the block's last (spatial) loop by the widest vector that divides it; returns the loop over the
    vectors (None when no vector divides it)."""
    loop = sch.get_loops(sch.get_sblock(name))[-1]
    vec = largest_divisor(sch.get(loop).extent.value, lanes)
    if vec == 1:
        return None
    outer, inner = sch.split(loop, [None, vec])
    sch.vectorize(inner)
    return outer


def _scope_allocates(sch: s_tir.Schedule, block, buffers) -> bool:
    """Whether the block scope of ``block`` (its nearest enclosing block) allocates each of ``buffers``: then they
    are none of the scope's outputs, which reverse_compute_inline may not remove."""
    sref = sch.get_sref(block).parent
    while not isinstance(sref.stmt, s_tir.SBlock):
        sref = sref.parent
    return all(any(buffer.same_as(a) for a in sref.stmt.alloc_buffers) for buffer in buffers)


def schedule_score_terms(sch: s_tir.Schedule, lanes: int) -> None:
    """The block adjusting the scores (score_terms; absent without softcap and ALiBi). Terms of the score alone
    (softcap), where the scores come from a register-blocked matmul (``register_blocked_matmul``: its accumulators
    written back by a local-copy block), are computed by that write-back where the compute allocates both score
    buffers in the scope of score_terms (flash's KV tile: the raw scores then never reach memory), else run per
    register tile right after the write-back, rows and vectors unrolled as the micro-kernel's, rather than in a pass
    of its own over the score tile; elsewhere vectorized as a pass.
    Terms of the positions (ALiBi: the block's annotation "position_terms") stay a pass that LLVM vectorizes: per
    register tile their unrolled index arithmetic took 6-33 s to compile, not unrolled they ran slower.
    Measured here (Zen 1, flash prefill D64 1024 causal, tuned, against the kernel without, three interleaved rounds):
    softcap 30 1.114x as a pass, 1.096x per register tile, 1.064x-1.091x in the write-back with q scaled by
    1 / softcap (common.score_scales; 1.087x-1.123x per register tile, interleaved with it); ALiBi 1.055x as a pass
    vectorized by the schedule, 1.02x as one LLVM vectorized, 1.053x-1.070x per register tile not unrolled (D128,
    hand: 1.032x-1.035x vectorized by the schedule, 1.010x-1.019x by LLVM)."""
    if not has_block(sch, "score_terms"):
        return
    block = sch.get_sblock("score_terms")
    if bool(sch.get(block).annotations.get("position_terms", False)):
        return
    producers = sch.get_producers(block)
    in_register_tiles = len(producers) == 1 and sch.get(producers[0]).name_hint.endswith("_local")
    buffers = [region.source for region in (*sch.get(block).reads, *sch.get(block).writes)]
    if in_register_tiles and _scope_allocates(sch, block, buffers):
        # the write-back then writes the adjusted scores from the accumulators (no store and load of the raw ones)
        sch.reverse_compute_inline(block)
        return
    if in_register_tiles:
        write_back = producers[0]
        own_loops = len(sch.get(write_back).iter_vars)
        sch.reverse_compute_at(block, sch.get_loops(write_back)[-own_loops - 1], preserve_unit_loops=True)
        for loop in sch.get_loops(block)[-len(sch.get(block).iter_vars):-1]:
            sch.unroll(loop)
    vectors = vectorize_last(sch, "score_terms", lanes)
    if in_register_tiles and vectors is not None:
        sch.unroll(vectors)
