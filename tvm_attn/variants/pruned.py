"""Pruned attention in TensorIR: threshold, top-k and mass, whose P V product touches only the kept keys.

Per tile of query rows (rows of one head), with block names (the contract with schedules/pruned.py):
  k_t        K transposed to (d, key), zero-padded to whole KV tiles (as in flash)
  tile       one per row tile, owning its scratch; inside it:
    q_tile     the rows, pre-scaled, zero-padded
    kv_tile/qk S = q k^T for the KV tiles the rows can see (causal: tiles past the diagonal are skipped)
    row_max_part, row_max        per-row max over visible keys (16 lane-wise partials, then their max)
    exp, row_sum_part, row_sum   (threshold, mass) e_j = exp(s_j - max) and its full sum, which decide who passes
    keys       (topk, mass) order-preserving int32 keys of the scores
    select     per row: the cut. threshold: keep e_j >= min(tau * sum, 1), i.e. p_j >= tau or the row's largest
               (e = 1 exactly there). topk: the k-th largest score, found by bisection over order-preserving int32
               keys from the row's [min, max] bracket, stopping as soon as exactly k keys are above the midpoint
               (about 16 passes instead of a sort); on ties, the first keys by index fill the quota.
               mass: the key of the score where the descending cumulative weight reaches (1 - eps) * sum, found
               by the same bisection with vectorized masked sums of e_j (up to 32 passes); keys above it are
               kept, then ties by index until the mass is reached.
    compact    per row: the kept key indices, written branchless
    pv         per row: sum over kept keys of w_j v_j and of w_j, v rows gathered
    out        acc / l (0 for rows that see no key)
"""

from __future__ import annotations

from tvm.script import tirx as T

from ..fast_exp import softmax_exp
from ..spec import AttentionSpec
from .common import ceil_div

BLOCK_Q = 32
BLOCK_KV = 64
INT32_MIN = -(2**31)
LANES = 16  # partial results per row reduction; BLOCK_KV is a multiple


def order_key(x):
    """int32 whose signed order is the float order of x (with -0.0 folded onto +0.0)."""
    bits = T.reinterpret("int32", x)
    flipped = T.bitwise_xor(bits, T.bitwise_and(T.shift_right(bits, 31), T.int32(0x7FFFFFFF)))
    return T.Select(x == T.float32(0), T.int32(0), flipped)


def compute(spec: AttentionSpec, *, block_q: int = BLOCK_Q, block_kv: int = BLOCK_KV):
    """The threshold, topk or mass PrimFunc for ``spec`` (whichever knob it sets)."""
    if sum(x is not None for x in (spec.threshold, spec.top_k, spec.eps)) != 1:
        raise ValueError("pruned attention needs exactly one of threshold, top_k, eps")
    B, H, KVH, SQ, SKV, D = spec.batch, spec.heads, spec.kv_heads, spec.seq_q, spec.seq_kv, spec.head_dim
    G = spec.group_size
    IS_TOPK = spec.top_k is not None
    IS_MASS = spec.eps is not None
    KEYS = IS_TOPK or IS_MASS  # keep by the order of the scores (else by weight against the threshold)
    MASS = T.float32(1.0 - (spec.eps or 0.0))
    TOP_K = spec.top_k or 0
    TAU = T.float32(spec.threshold or 0.0)
    KMAX = min(TOP_K, SKV) if IS_TOPK else SKV  # most keys a row can keep
    BQ = min(block_q, SQ)
    BK = block_kv
    NT = ceil_div(SQ, BQ)
    NK = ceil_div(SKV, BK)
    SKVP = NK * BK
    OFF = spec.causal_offset
    CAUSAL = spec.causal
    SCALE = T.float32(spec.scale)
    NEG = T.min_value("float32")
    ZERO = T.float32(0)
    ONE = T.float32(1)
    dtype = spec.dtype

    def n_visible(i):
        return T.min(SKV, T.max(0, i + OFF + 1)) if CAUSAL else SKV

    def kv_tiles(rt):
        if not CAUSAL:
            return NK
        return (n_visible(T.min(rt * BQ + BQ, SQ) - 1) + BK - 1) // BK

    @T.prim_func(s_tir=True)
    def pruned(
        q: T.Buffer((B, H, SQ, D), dtype),
        k: T.Buffer((B, KVH, SKV, D), dtype),
        v: T.Buffer((B, KVH, SKV, D), dtype),
        out: T.Buffer((B, H, SQ, D), dtype),
    ):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        with T.sblock("root"):
            k_t = T.sblock_alloc_buffer((B, KVH, D, SKVP), dtype)
            for b, kh, d, j in T.grid(B, KVH, D, SKVP):
                with T.sblock("k_t"):
                    vb, vkh, vd, vj = T.axis.remap("SSSS", [b, kh, d, j])
                    k_t[vb, vkh, vd, vj] = T.if_then_else(vj < SKV, k[vb, vkh, T.min(vj, SKV - 1), vd], ZERO)
            for b, h, rt in T.grid(B, H, NT):
                with T.sblock("tile"):
                    vb, vh, vrt = T.axis.remap("SSS", [b, h, rt])
                    q_tile = T.sblock_alloc_buffer((BQ, D), dtype)
                    S = T.sblock_alloc_buffer((BQ, SKVP), dtype)
                    max_part = T.sblock_alloc_buffer((BQ, LANES), dtype)
                    row_max = T.sblock_alloc_buffer((BQ,), dtype)
                    sum_part = T.sblock_alloc_buffer((BQ, LANES), dtype)
                    E = T.sblock_alloc_buffer((BQ, SKVP), dtype)
                    row_sum = T.sblock_alloc_buffer((BQ,), dtype)
                    cut = T.sblock_alloc_buffer((BQ,), dtype)
                    keys = T.sblock_alloc_buffer((BQ, SKVP), "int32")
                    cut_key = T.sblock_alloc_buffer((BQ,), "int32")
                    cut_index = T.sblock_alloc_buffer((BQ,), "int32")
                    idx = T.sblock_alloc_buffer((BQ, KMAX + 1), "int32")
                    cnt = T.sblock_alloc_buffer((BQ,), "int32")
                    acc = T.sblock_alloc_buffer((BQ, D), dtype)
                    l = T.sblock_alloc_buffer((BQ,), dtype)
                    for ri, d in T.grid(BQ, D):
                        with T.sblock("q_tile"):
                            r, dd = T.axis.remap("SS", [ri, d])
                            q_tile[r, dd] = T.if_then_else(
                                vrt * BQ + r < SQ, q[vb, vh, T.min(vrt * BQ + r, SQ - 1), dd] * SCALE, ZERO
                            )
                    for t in range(kv_tiles(vrt)):
                        with T.sblock("kv_tile"):
                            vt = T.axis.opaque(NK, t)
                            for ri, jj, d in T.grid(BQ, BK, D):
                                with T.sblock("qk"):
                                    r, j, dd = T.axis.remap("SSR", [ri, jj, d])
                                    with T.init():
                                        S[r, vt * BK + j] = ZERO
                                    S[r, vt * BK + j] = S[r, vt * BK + j] + q_tile[r, dd] * k_t[vb, vh // G, dd, vt * BK + j]
                    # Row reductions keep LANES partial results (lane l sums keys l, l + LANES, ...), so they
                    # vectorize: LLVM will not reassociate a scalar float reduction.
                    for ri, c, lane in T.grid(BQ, SKVP // LANES, LANES):
                        with T.sblock("row_max_part"):
                            r, vc, vl = T.axis.remap("SRS", [ri, c, lane])
                            with T.init():
                                max_part[r, vl] = NEG
                            max_part[r, vl] = T.max(
                                max_part[r, vl],
                                T.Select(vc * LANES + vl < n_visible(vrt * BQ + r), S[r, vc * LANES + vl], NEG),
                            )
                    for ri, lane in T.grid(BQ, LANES):
                        with T.sblock("row_max"):
                            r, vl = T.axis.remap("SR", [ri, lane])
                            with T.init():
                                row_max[r] = NEG
                            row_max[r] = T.max(row_max[r], max_part[r, vl])
                    if not IS_TOPK:
                        for ri, j in T.grid(BQ, SKVP):
                            with T.sblock("exp"):
                                r, vj = T.axis.remap("SS", [ri, j])
                                E[r, vj] = T.Select(vj < n_visible(vrt * BQ + r), softmax_exp(S[r, vj] - row_max[r]), ZERO)
                        for ri, c, lane in T.grid(BQ, SKVP // LANES, LANES):
                            with T.sblock("row_sum_part"):
                                r, vc, vl = T.axis.remap("SRS", [ri, c, lane])
                                with T.init():
                                    sum_part[r, vl] = ZERO
                                sum_part[r, vl] = sum_part[r, vl] + E[r, vc * LANES + vl]
                        for ri, lane in T.grid(BQ, LANES):
                            with T.sblock("row_sum"):
                                r, vl = T.axis.remap("SR", [ri, lane])
                                with T.init():
                                    row_sum[r] = ZERO
                                row_sum[r] = row_sum[r] + sum_part[r, vl]
                    if KEYS:
                        for ri, j in T.grid(BQ, SKVP):
                            with T.sblock("keys"):
                                r, vj = T.axis.remap("SS", [ri, j])
                                keys[r, vj] = order_key(S[r, vj])
                    for ri in range(BQ):
                        with T.sblock("select"):
                            r = T.axis.spatial(BQ, ri)
                            T.where(vrt * BQ + ri < SQ)
                            T.reads(keys[r, 0:SKVP], row_sum[r], E[r, 0:SKVP])
                            T.writes(cut[r], cut_key[r], cut_index[r])
                            lo = T.sblock_alloc_buffer((1,), "int32")
                            hi = T.sblock_alloc_buffer((1,), "int64")
                            mid = T.sblock_alloc_buffer((1,), "int32")
                            count = T.sblock_alloc_buffer((1,), "int32")
                            found = T.sblock_alloc_buffer((1,), "int32")
                            part = T.sblock_alloc_buffer((LANES,), dtype)
                            need = T.sblock_alloc_buffer((1,), dtype)
                            above = T.sblock_alloc_buffer((1,), dtype)
                            n: T.let[T.int32] = n_visible(vrt * BQ + r)
                            if not KEYS:
                                cut[r] = T.min(TAU * row_sum[r], ONE)
                            elif IS_MASS:
                                # Bisection over the order keys, as for top-k, on the mass above the midpoint: each
                                # pass is a masked sum over the whole (zero-weight padded) row in LANES partial sums,
                                # which vectorizes. Invariant: the keys >= lo hold >= need, the keys >= hi less.
                                need[0] = MASS * row_sum[r]
                                lo[0] = T.int32(2**31 - 1)
                                hi[0] = T.int64(-(2**31))
                                for j in range(n):
                                    lo[0] = T.min(lo[0], keys[r, j])
                                    hi[0] = T.max(hi[0], T.Cast("int64", keys[r, j]) + T.int64(1))
                                while hi[0] - T.Cast("int64", lo[0]) > T.int64(1):
                                    mid[0] = T.Cast("int32", T.shift_right(T.Cast("int64", lo[0]) + hi[0], T.int64(1)))
                                    for lane in T.vectorized(LANES):
                                        part[lane] = ZERO
                                    for c in range(SKVP // LANES):
                                        for lane in T.vectorized(LANES):
                                            part[lane] = part[lane] + T.Select(
                                                keys[r, c * LANES + lane] >= mid[0], E[r, c * LANES + lane], ZERO)
                                    above[0] = ZERO
                                    for lane in range(LANES):
                                        above[0] = above[0] + part[lane]
                                    if above[0] >= need[0]:
                                        lo[0] = mid[0]
                                    else:
                                        hi[0] = T.Cast("int64", mid[0])
                                cut_key[r] = lo[0]
                                for lane in T.vectorized(LANES):
                                    part[lane] = ZERO
                                for c in range(SKVP // LANES):
                                    for lane in T.vectorized(LANES):
                                        part[lane] = part[lane] + T.Select(
                                            keys[r, c * LANES + lane] > cut_key[r], E[r, c * LANES + lane], ZERO)
                                above[0] = ZERO
                                for lane in range(LANES):
                                    above[0] = above[0] + part[lane]
                                need[0] = need[0] - above[0]
                                # Keys above the cut hold less than the mass needed; ties fill the rest by index.
                                above[0] = ZERO
                                cut_index[r] = -1
                                for j in range(n):
                                    if above[0] < need[0] and keys[r, j] == cut_key[r]:
                                        above[0] = above[0] + E[r, j]
                                        cut_index[r] = j
                            else:
                                kk: T.let[T.int32] = T.min(TOP_K, n)
                                cut_key[r] = INT32_MIN
                                cut_index[r] = SKV
                                if kk < n:
                                    lo[0] = T.int32(2**31 - 1)
                                    hi[0] = T.int64(-(2**31))
                                    for j in range(n):
                                        lo[0] = T.min(lo[0], keys[r, j])
                                        hi[0] = T.max(hi[0], T.Cast("int64", keys[r, j]) + T.int64(1))
                                    # Invariant: at least kk keys are >= lo, fewer than kk are >= hi. (hi may be
                                    # 2^31, hence int64; every midpoint fits int32, so the counting pass is int32.)
                                    found[0] = 0
                                    while found[0] == 0 and hi[0] - T.Cast("int64", lo[0]) > T.int64(1):
                                        mid[0] = T.Cast("int32", T.shift_right(T.Cast("int64", lo[0]) + hi[0], T.int64(1)))
                                        count[0] = 0
                                        for j in range(n):
                                            count[0] = count[0] + T.Cast("int32", keys[r, j] >= mid[0])
                                        if count[0] == kk:
                                            found[0] = 1
                                        if count[0] >= kk:
                                            lo[0] = mid[0]
                                        else:
                                            hi[0] = T.Cast("int64", mid[0])
                                    if found[0] == 1:
                                        cut_key[r] = lo[0] - 1  # keep keys >= lo; lo > key_min >= INT32_MIN here
                                        cut_index[r] = -1
                                    else:
                                        # lo is the k-th largest key and ties straddle the cut: the first ties fill
                                        # what the keys above lo leave of the quota.
                                        cut_key[r] = lo[0]
                                        count[0] = 0
                                        for j in range(n):
                                            count[0] = count[0] + T.Cast("int32", keys[r, j] > cut_key[r])
                                        count[0] = kk - count[0]
                                        cut_index[r] = -1
                                        for j in range(n):
                                            if count[0] > 0 and keys[r, j] == cut_key[r]:
                                                count[0] = count[0] - 1
                                                cut_index[r] = j
                    for ri in range(BQ):
                        with T.sblock("compact"):
                            r = T.axis.spatial(BQ, ri)
                            T.where(vrt * BQ + ri < SQ)
                            T.reads(keys[r, 0:SKVP], E[r, 0:SKVP], cut[r], cut_key[r], cut_index[r])
                            T.writes(idx[r, 0 : KMAX + 1], cnt[r])
                            cnt[r] = 0
                            for j in range(n_visible(vrt * BQ + r)):
                                # Branchless: always write, advance only past kept keys (idx has KMAX + 1 slots).
                                idx[r, cnt[r]] = j
                                if KEYS:
                                    cnt[r] = cnt[r] + T.Cast(
                                        "int32",
                                        T.Or(
                                            keys[r, j] > cut_key[r],
                                            T.And(keys[r, j] == cut_key[r], j <= cut_index[r]),
                                        ),
                                    )
                                else:
                                    cnt[r] = cnt[r] + T.Cast("int32", E[r, j] >= cut[r])
                    for ri in range(BQ):
                        with T.sblock("pv"):
                            r = T.axis.spatial(BQ, ri)
                            T.where(vrt * BQ + ri < SQ)
                            T.reads(cnt[r], idx[r, 0 : KMAX + 1], S[r, 0:SKVP], E[r, 0:SKVP], row_max[r],
                                    v[vb, vh // G, 0:SKV, 0:D])
                            T.writes(acc[r, 0:D], l[r])
                            w = T.sblock_alloc_buffer((1,), dtype)
                            l[r] = ZERO
                            for d in range(D):
                                acc[r, d] = ZERO
                            for c in range(cnt[r]):
                                if IS_TOPK:
                                    w[0] = softmax_exp(S[r, idx[r, c]] - row_max[r])
                                else:
                                    w[0] = E[r, idx[r, c]]
                                l[r] = l[r] + w[0]
                                for d in range(D):
                                    acc[r, d] = acc[r, d] + w[0] * v[vb, vh // G, idx[r, c], d]
                    for ri, d in T.grid(BQ, D):
                        with T.sblock("out"):
                            r, dd = T.axis.remap("SS", [ri, d])
                            T.where(vrt * BQ + ri < SQ)
                            out[vb, vh, vrt * BQ + r, dd] = T.Select(l[r] > ZERO, acc[r, dd] / l[r], ZERO)

    return pruned
