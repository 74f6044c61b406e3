"""Pruned attention in TensorIR: threshold, top-k and mass, whose P V product touches only the kept keys.

Batch, seq_q and seq_kv are run-time sizes: one compiled kernel serves every length. A sliding window narrows the
keys each row sees (and the KV tiles computed); selection happens among the visible keys only.

Per tile of query rows (rows of one head), with block names (the contract with schedules/pruned.py):
  k_t        K transposed to (d, key), zero-padded to whole KV tiles (as in flash)
  tile       one per row tile, owning its scratch; inside it:
    q_tile     the rows, pre-scaled, zero-padded
    kv_tile/qk S = q k^T for the KV tiles the rows can see (causal: tiles past the diagonal are skipped); with
               spec.softcap or spec.alibi_slopes, into S_raw, and score_terms: S = S_raw softcapped, then with the ALiBi
               bias (common.adjusted)
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
With sinks (spec.sinks), the row's sink logit is a key that is always kept: its weight joins the sum the threshold
compares with and counts first towards mass' 1 - eps, and out's denominator (common.row_output).
"""

from __future__ import annotations

from tvm.script import tirx as T

from ..fast_exp import softmax_exp
from ..spec import KernelSpec
from .common import (ACC, LANES, Visibility, adjust_scores, adjusts_by_position, adjusts_scores, bhsd_kernel, ceil_div,
                     computed_tiles, fresh_block_names, load_q_rows, row_max_of_scores, row_output, row_score_terms,
                     run_time_sizes, score_scales, scores_of_rows, sink_logit, softmax_numerators, transpose_k, widen,
                     with_sink)

BLOCK_Q = 32
BLOCK_KV = 64
INT32_MIN = -(2**31)


def order_key(x):
    """int32 whose signed order is the float order of x (with -0.0 folded onto +0.0)."""
    bits = T.reinterpret("int32", x)
    flipped = T.bitwise_xor(bits, T.bitwise_and(T.shift_right(bits, 31), T.int32(0x7FFFFFFF)))
    return T.Select(x == T.float32(0), T.int32(0), flipped)


def compute(spec: KernelSpec, *, block_q: int = BLOCK_Q, block_kv: int = BLOCK_KV):
    """The threshold, topk or mass PrimFunc for ``spec`` (whichever knob it sets)."""
    if sum(x is not None for x in (spec.threshold, spec.top_k, spec.eps)) != 1:
        raise ValueError("pruned attention needs exactly one of threshold, top_k, eps")
    H, KVH, D = spec.heads, spec.kv_heads, spec.head_dim
    G = spec.group_size
    IS_TOPK = spec.top_k is not None
    IS_MASS = spec.eps is not None
    KEYS = IS_TOPK or IS_MASS  # keep by the order of the scores (else by weight against the threshold)
    MASS = T.float32(1.0 - (spec.eps or 0.0))
    TOP_K = spec.top_k or 0
    TAU = T.float32(spec.threshold or 0.0)
    BQ = block_q
    BK = block_kv
    q_scale, PRESCALE = score_scales(spec)
    SCALE = T.float32(q_scale)
    NEG = T.min_value("float32")
    ZERO = T.float32(0)
    ONE = T.float32(1)
    dtype = spec.dtype

    fresh_block_names()
    B, SQ, SKV = run_time_sizes()
    vis = Visibility(spec, SQ, SKV)
    NK = ceil_div(SKV, BK)
    SKVP = NK * BK

    # A tree mask hides keys inside a row's range, which the cut may reach (a row seeing fewer than top_k keys, or
    # weights of 0 at a cut of 0): the compaction tests each key.
    TREE = spec.tree

    def seen(i, j):
        """Key j of the range row_end(i) counts: row i sees it (j from the row's first key, unless a tree mask)."""
        return vis.sees(i, j) if TREE else j >= vis.first(i)

    def row_end(i):
        """vis.end(i), with a bound TVM's buffer compaction can handle (it fails on int32 overflow otherwise)."""
        return T.min(vis.end(i), SKVP)

    SLOTS = T.min(TOP_K + 1, SKVP) if IS_TOPK else SKVP  # idx slots: the most keys a row keeps, + 1 spare (compact)

    def mass_needed(sinks, h, row_sum, row_max):
        """The weight the kept keys must hold: 1 - eps of the row's with the sink's, less the sink's own (<= 0: the
        sink alone holds enough, and no key is kept)."""
        if sinks is None:
            return MASS * row_sum
        return MASS * with_sink(sinks, h, row_sum, row_max) - softmax_exp(sinks[h] - row_max)

    @T.macro
    def body(q, k, v, sinks, out):
        k_t = T.sblock_alloc_buffer((B, KVH, D, SKVP), ACC)
        transpose_k(k, k_t, B, KVH, D, SKV, SKVP, ZERO)
        for b, h, rt in T.grid(B, H, ceil_div(SQ, BQ)):
            with T.sblock("tile"):
                vb, vh, vrt = T.axis.remap("SSS", [b, h, rt])
                q_tile = T.sblock_alloc_buffer((BQ, D), ACC)
                S = T.sblock_alloc_buffer((BQ, SKVP), ACC)
                max_part = T.sblock_alloc_buffer((BQ, LANES), ACC)
                row_max = T.sblock_alloc_buffer((BQ,), ACC)
                sum_part = T.sblock_alloc_buffer((BQ, LANES), ACC)
                E = T.sblock_alloc_buffer((BQ, SKVP), ACC)
                row_sum = T.sblock_alloc_buffer((BQ,), ACC)
                cut = T.sblock_alloc_buffer((BQ,), ACC)
                keys = T.sblock_alloc_buffer((BQ, SKVP), "int32")
                cut_key = T.sblock_alloc_buffer((BQ,), "int32")
                cut_index = T.sblock_alloc_buffer((BQ,), "int32")
                idx = T.sblock_alloc_buffer((BQ, SLOTS), "int32")
                cnt = T.sblock_alloc_buffer((BQ,), "int32")
                acc = T.sblock_alloc_buffer((BQ, D), ACC)
                l = T.sblock_alloc_buffer((BQ,), ACC)
                load_q_rows(q_tile, q, vb, vh, vrt * BQ, BQ, SQ, D, SCALE, ZERO)
                if adjusts_scores(spec):  # S the adjusted scores (softcap, ALiBi), from here on
                    S_raw = T.sblock_alloc_buffer((BQ, SKVP), ACC)
                    scores_of_rows(S_raw, q_tile, k_t, vb, vh // G, vrt * BQ, BQ, SQ, NK, BK, D, vis, ZERO)
                    adjust_scores(S_raw, S, BQ, NK, BK, row_score_terms(spec, vh, vrt * BQ, vis, PRESCALE),
                                  adjusts_by_position(spec), computed_tiles(vis, vrt * BQ, BQ, SQ, NK, BK))
                else:
                    scores_of_rows(S, q_tile, k_t, vb, vh // G, vrt * BQ, BQ, SQ, NK, BK, D, vis, ZERO)
                row_max_of_scores(S, max_part, row_max, vrt * BQ, BQ, SKVP, vis, NEG)
                if not IS_TOPK:
                    softmax_numerators(S, E, row_max, sum_part, row_sum, vrt * BQ, BQ, SKVP, vis, ZERO)
                if KEYS:
                    for ri, c, lane in T.grid(BQ, SKVP // LANES, LANES):
                        with T.sblock("keys"):
                            r, vc, vl = T.axis.remap("SSS", [ri, c, lane])
                            # Keys a row does not see (before its window) sort below every score.
                            keys[r, vc * LANES + vl] = T.Select(vis.sees(vrt * BQ + r, vc * LANES + vl),
                                                                order_key(S[r, vc * LANES + vl]), INT32_MIN)
                for ri in range(BQ):
                    with T.sblock("select"):
                        r = T.axis.spatial(BQ, ri)
                        T.where(vrt * BQ + ri < SQ)
                        if sinks is None:
                            T.reads(keys[r, 0:SKVP], row_sum[r], E[r, 0:SKVP])
                        else:
                            T.reads(keys[r, 0:SKVP], row_sum[r], row_max[r], E[r, 0:SKVP])
                        T.writes(cut[r], cut_key[r], cut_index[r])
                        lo = T.sblock_alloc_buffer((1,), "int32")
                        hi = T.sblock_alloc_buffer((1,), "int64")
                        mid = T.sblock_alloc_buffer((1,), "int32")
                        count = T.sblock_alloc_buffer((1,), "int32")
                        found = T.sblock_alloc_buffer((1,), "int32")
                        part = T.sblock_alloc_buffer((LANES,), ACC)
                        need = T.sblock_alloc_buffer((1,), ACC)
                        above = T.sblock_alloc_buffer((1,), ACC)
                        if not KEYS:
                            cut[r] = T.min(TAU * with_sink(sinks, vh, row_sum[r], row_max[r]), ONE)
                        elif IS_MASS:
                            # Bisection over the order keys, as for top-k, on the mass above the midpoint: each
                            # pass is a masked sum over the whole (zero-weight padded) row in LANES partial sums,
                            # which vectorizes. Invariant: the keys >= lo hold >= need, the keys >= hi less.
                            need[0] = mass_needed(sinks, vh, row_sum[r], row_max[r])
                            lo[0] = T.int32(2**31 - 1)
                            hi[0] = T.int64(-(2**31))
                            for j in range(row_end(vrt * BQ + r)):
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
                            for j in range(row_end(vrt * BQ + r)):
                                if above[0] < need[0] and keys[r, j] == cut_key[r]:
                                    above[0] = above[0] + E[r, j]
                                    cut_index[r] = j
                        else:
                            kk: T.let[T.int32] = T.min(TOP_K, vis.end(vrt * BQ + r) - vis.first(vrt * BQ + r))
                            cut_key[r] = INT32_MIN
                            cut_index[r] = SKV
                            if kk < vis.end(vrt * BQ + r) - vis.first(vrt * BQ + r):
                                lo[0] = T.int32(2**31 - 1)
                                hi[0] = T.int64(-(2**31))
                                for j in range(row_end(vrt * BQ + r)):
                                    lo[0] = T.min(lo[0], keys[r, j])
                                    hi[0] = T.max(hi[0], T.Cast("int64", keys[r, j]) + T.int64(1))
                                # Invariant: at least kk keys are >= lo, fewer than kk are >= hi. (hi may be
                                # 2^31, hence int64; every midpoint fits int32, so the counting pass is int32.)
                                found[0] = 0
                                while found[0] == 0 and hi[0] - T.Cast("int64", lo[0]) > T.int64(1):
                                    mid[0] = T.Cast("int32", T.shift_right(T.Cast("int64", lo[0]) + hi[0], T.int64(1)))
                                    count[0] = 0
                                    for j in range(row_end(vrt * BQ + r)):
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
                                    for j in range(row_end(vrt * BQ + r)):
                                        count[0] = count[0] + T.Cast("int32", keys[r, j] > cut_key[r])
                                    count[0] = kk - count[0]
                                    cut_index[r] = -1
                                    for j in range(row_end(vrt * BQ + r)):
                                        if count[0] > 0 and keys[r, j] == cut_key[r]:
                                            count[0] = count[0] - 1
                                            cut_index[r] = j
                for ri in range(BQ):
                    with T.sblock("compact"):
                        r = T.axis.spatial(BQ, ri)
                        T.where(vrt * BQ + ri < SQ)
                        if TREE:
                            T.reads(keys[r, 0:SKVP], E[r, 0:SKVP], cut[r], cut_key[r], cut_index[r],
                                    vis.tree[0:SQ, 0:SQ])
                        else:
                            T.reads(keys[r, 0:SKVP], E[r, 0:SKVP], cut[r], cut_key[r], cut_index[r])
                        T.writes(idx[r, 0:SLOTS], cnt[r])
                        cnt[r] = 0
                        for j in range(row_end(vrt * BQ + r)):
                            # Branchless: always write, advance only past kept keys (idx has a spare slot).
                            idx[r, cnt[r]] = j
                            if KEYS:
                                cnt[r] = cnt[r] + T.Cast(
                                    "int32",
                                    T.And(seen(vrt * BQ + r, j), T.Or(
                                        keys[r, j] > cut_key[r],
                                        T.And(keys[r, j] == cut_key[r], j <= cut_index[r]),
                                    )),
                                )
                            elif TREE:
                                cnt[r] = cnt[r] + T.Cast("int32", T.And(vis.sees(vrt * BQ + r, j), E[r, j] >= cut[r]))
                            else:
                                cnt[r] = cnt[r] + T.Cast("int32", E[r, j] >= cut[r])
                for ri in range(BQ):
                    with T.sblock("pv"):
                        r = T.axis.spatial(BQ, ri)
                        T.where(vrt * BQ + ri < SQ)
                        T.reads(cnt[r], idx[r, 0:SLOTS], S[r, 0:SKVP], E[r, 0:SKVP], row_max[r],
                                v[vb, vh // G, 0:SKV, 0:D])
                        T.writes(acc[r, 0:D], l[r])
                        w = T.sblock_alloc_buffer((1,), ACC)
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
                                acc[r, d] = acc[r, d] + w[0] * widen(v[vb, vh // G, idx[r, c], d])
                for ri, d in T.grid(BQ, D):
                    with T.sblock("out"):
                        r, dd = T.axis.remap("SS", [ri, d])
                        T.where(vrt * BQ + ri < SQ)
                        out[vb, vh, vrt * BQ + r, dd] = row_output(acc[r, dd], l[r], row_max[r], dtype,
                                                                   sink_logit(sinks, vh))

    return bhsd_kernel(body, spec, B, SQ, SKV, vis)


def compute_decode(spec: KernelSpec):
    """The pruned variants' decode kernel: tiles of one query row (a decode call has at most a few), so QK^T is not
    computed for 31 padding rows. Measured at B1 H32 KV8 D128, 4096 keys, top-k 64: 9.6 -> 4.4 ms."""
    return compute(spec, block_q=1)
