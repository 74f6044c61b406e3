"""Bounded attention in TensorIR: softmax over a set of keys certified, from the int8 shadow of K, to hold at least
1 - eps of each row's mass (``tvm_attn.certificate`` states the bounds and the cut). Full K and V rows are read only
for the kept keys. The same kernel with ``top_k`` or ``threshold`` set is that variant, exact, over a cache: the bounds
rule most keys out, the rest get exact scores (``shadow`` states the rules).

Two kernels share the body: ``compute_shadow`` reads the shadow a KVCache keeps (arguments q, k, v, codes, lo,
step, [sinks,] [tree,] out), ``compute`` quantizes K itself first (q, k, v, [sinks,] [tree,] out: the registry's
signature, for ``attention``; it reads all of K once more, so it is no faster than dense). Batch, seq_q and seq_kv
are run-time sizes. Softcapping and ALiBi adjust the upper bounds as the exact scores (``certificate`` says why the
bounds hold); the sink logit is an exact term of the certificate, the threshold's sum and the output; a tree mask
(``Visibility``) decides which keys each row sees, as in the other kernels.

Blocks (the contract with schedules/bounded.py):
  shadow_min, shadow_max, shadow_step, shadow_codes    (compute only) the shadow of K, as certificate.quantize
  split      one per (batch, KV head, chunk of shadow blocks), as in the decode kernel; per query position:
    q_rows                 the group's query rows, pre-scaled
    init_max
    shadow_tile            one per shadow block of the chunk that the position sees; inside it:
      scaled_step, offset_dot, radius   per row: q_d t_d, sum_d q_d lo_d and the bounds' radius
      shadow_dot             per (row, key): sum_d q_d t_d c_jd (codes are stored (block, d, key): keys along lanes)
      upper                  the upper bounds u_j (NEG for keys not seen)
      save_upper, save_radius, chunk_max
    save_max   the chunk's largest upper bound per row
  row        one per (batch, head, query position): the cut (a bisection over the bins, vectorized masked sums or
             counts), the kept keys (top-k, threshold: candidates) compacted, their exact scores from K (top-k: the
             top k of them selected; threshold: each weight placed against tau, scoring more keys while the bounds
             on the sum cannot), the softmax over them times V, the output
"""

from __future__ import annotations

import dataclasses

from tvm.script import tirx as T

from .. import certificate
from ..fast_exp import softmax_exp
from ..spec import KernelSpec
from .common import (ACC, ELEMENT_BYTES, INF, OptionalArguments, Visibility, adjusted, bhsd, bhsd_kernel, ceil_div,
                     fresh_block_names, macro_state, poisoned, row_output, run_time_sizes, sink_logit, widen,
                     with_sink)
from .pruned import INT32_MIN, order_key

LANES = 16
SB = certificate.BLOCK
PREFETCH = 8  # kept keys ahead whose K and V rows are prefetched
FAR_ROUNDS = 48  # at most this many halvings find a top-k cut past the bins (float32 has 24 bits per octave)
EXTEND = 16  # bins (2 logits) scored exactly in the first round while a threshold weight is undecided (doubling)


@dataclasses.dataclass(frozen=True)
class BoundedConfig:
    """How the shadow scan splits the KV sequence: chunks of at least ``chunk_keys`` keys (whole shadow blocks),
    at most ``max_splits`` chunks per (batch, KV head)."""

    chunk_keys: int = 2048
    max_splits: int = 64

    def __post_init__(self):
        for name in ("chunk_keys", "max_splits"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BoundedConfig.{name} must be an int >= 1, got {value!r}")
        if self.chunk_keys % SB:
            raise ValueError(f"BoundedConfig.chunk_keys={self.chunk_keys} must be a multiple of the shadow block "
                             f"({SB})")


def _add(a, b):
    return a + b


@T.macro
def halve_to_two(scratch, x, start, combine):
    """Combine x[start:start + SB] pairwise (``combine``: +, T.min, T.max) into scratch[0] and scratch[1] (scratch: SB
    elements; may be x itself with start 0): vector halvings, not a chain of SB dependent scalar steps."""
    for lane in T.vectorized(SB // 2):
        scratch[lane] = combine(x[start + lane], x[start + SB // 2 + lane])
    for lane in T.vectorized(SB // 4):
        scratch[lane] = combine(scratch[lane], scratch[lane + SB // 4])
    for lane in T.vectorized(SB // 8):
        scratch[lane] = combine(scratch[lane], scratch[lane + SB // 8])
    for lane in T.vectorized(SB // 16):
        scratch[lane] = combine(scratch[lane], scratch[lane + SB // 16])


def _kernel(kspec: KernelSpec, config: BoundedConfig, reads_shadow: bool):
    """The PrimFunc reading a cache's shadow (``reads_shadow``) or the one quantizing K itself, for ``kspec``. (Only
    one is parsed per call: a macro's second use in a parse suffixes its block names.)"""
    if sum(x is not None for x in (kspec.eps, kspec.top_k, kspec.threshold)) != 1:
        raise ValueError("the shadow kernels need one of eps (bounded), top_k or threshold")
    IS_TOPK = kspec.top_k is not None
    IS_THRESHOLD = kspec.threshold is not None
    TOP_K = kspec.top_k or 0
    TAU = T.float32(kspec.threshold or 0.0)
    fresh_block_names()
    _QUANTIZE_MACRO.call_count = 0
    H, KVH, D = kspec.heads, kspec.kv_heads, kspec.head_dim
    G = kspec.group_size
    DP = ceil_div(D, LANES) * LANES
    SCALE = T.float32(kspec.scale)
    NEG = T.min_value("float32")
    ZERO = T.float32(0)
    ONE = T.float32(1)
    HALF = T.float32(0.5)
    LEVELS = T.float32(certificate.LEVELS)
    MARGIN = T.float32(certificate.margin(D))
    BUDGET = T.float32(certificate.CERTIFY * kspec.eps / (1.0 - kspec.eps) if kspec.eps is not None else 0.0)
    SLACK = T.float32(certificate.THRESHOLD_SLACK)
    INV_STEP = T.float32(1.0 / certificate.CUT_STEP)
    CUTS = certificate.CUT_STEPS
    FAR = T.float32(certificate.CUT_STEPS)
    dtype = kspec.dtype
    B, SQ, SKV = run_time_sizes()
    vis = Visibility(kspec, SQ, SKV)
    NB = ceil_div(SKV, SB)
    SKVP = NB * SB
    BPC = T.max(config.chunk_keys // SB, ceil_div(NB, config.max_splits))  # shadow blocks per chunk
    NSR = ceil_div(NB, BPC)

    LINE_ELEMENTS = 64 // ELEMENT_BYTES[dtype]  # elements per 64-byte cache line
    ROW_LINES = ceil_div(D, LINE_ELEMENTS)

    def dim(d):
        """Index d of a K row, clamped into head_dim where the padding to whole LANES vectors reaches past it (q is
        zero there)."""
        return d if DP == D else T.min(d, D - 1)

    def block_range(s, i):
        """The shadow blocks of chunk s that query i sees: range(first, end) (empty when none)."""
        first = T.max(s * BPC, vis.first_tile(i, SB))
        return first, T.max(first, T.min(T.min((s + 1) * BPC, NB), vis.end_tile(i, SB)))

    def score_terms(s, head, i, j):
        """Score s of query i (of query ``head``) against key j as the softmax takes it: softcapped, then with the
        ALiBi bias (``adjusted``). Of an upper bound it makes an upper bound of the adjusted score, and that minus
        twice the radius stays a lower bound: softcapping moves no two scores farther apart."""
        return adjusted(kspec, s, head, vis.distance(i, j))

    # Top-k without ALiBi cuts on the uncapped bounds: softcapping is monotone, so the top k of the capped scores are
    # those of the uncapped ones, and every key's bound skips the tanh; only the candidates' exact scores take it.
    BOUNDS_CAPPED = not (IS_TOPK and kspec.alibi_slopes is None)

    def bound_terms(u, head, i, j):
        """The upper bound u of key j's score as the cut compares it: as score_terms maps scores, uncapped for
        top-k without ALiBi."""
        return score_terms(u, head, i, j) if BOUNDS_CAPPED else u

    @T.macro
    def exact_score(pd, qr, k, b, kh, j):
        """q . k[b, kh, j] (q pre-scaled in qr, zero-padded to DP) as pd[0] + pd[1]: LANES partial sums, then
        summed pairwise (a sequential sum is a chain of LANES dependent adds)."""
        for lane in T.vectorized(LANES):
            pd[lane] = ZERO
        for cc in range(DP // LANES):
            for lane in T.vectorized(LANES):
                pd[lane] = pd[lane] + qr[cc * LANES + lane] * widen(k[b, kh, j, dim(cc * LANES + lane)])
        for lane in T.vectorized(8):
            pd[lane] = pd[lane] + pd[lane + 8]
        for lane in T.vectorized(4):
            pd[lane] = pd[lane] + pd[lane + 4]
        for lane in T.vectorized(2):
            pd[lane] = pd[lane] + pd[lane + 2]

    @T.macro
    def prefetch_row(x, b, kh, j):
        """Ask for the cache lines of row x[b, kh, j] (K or V), to be read a few keys later."""
        for line in range(ROW_LINES):
            T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(x[b, kh, j, line * LINE_ELEMENTS]),
                                          0, 3, 1))

    @T.macro
    def rest_bounds(rest_hi, rest_lo, pd, pk, bins, e, e_sum, shrink, bin_min, bin_max, first):
        """Of the keys of bins >= first (visible ones: bins <= CUTS; e is 0 for the others): rest_hi = sum e^(u - top),
        rest_lo = sum e^(l - top), whole blocks from their sums."""
        rest_hi[0] = ZERO
        rest_lo[0] = ZERO
        for lane in T.vectorized(SB):
            pd[lane] = ZERO
            pk[lane] = ZERO
        for t in range(NB):
            if bin_min[t] >= first:
                rest_hi[0] = rest_hi[0] + e_sum[t]
                rest_lo[0] = rest_lo[0] + e_sum[t] * shrink[t]
            elif bin_max[t] >= first:
                for lane in T.vectorized(SB):
                    pd[lane] = pd[lane] + T.Select(bins[t * SB + lane] >= first, e[t * SB + lane], ZERO)
                    pk[lane] = pk[lane] + T.Select(bins[t * SB + lane] >= first, e[t * SB + lane] * shrink[t], ZERO)
        halve_to_two(pd, pd, 0, _add)
        halve_to_two(pk, pk, 0, _add)
        rest_hi[0] = rest_hi[0] + (pd[0] + pd[1])
        rest_lo[0] = rest_lo[0] + (pk[0] + pk[1])

    class BinsBelow:
        """Keys seen in bins < cut (blocks: bin_min, bin_max) as count_keys asks."""

        def __init__(self, bins, bin_min, bin_max, cut):
            self.bins, self.bin_min, self.bin_max, self.cut = bins, bin_min, bin_max, cut

        def all_in(self, t):
            return self.bin_max[t] < self.cut

        def some_in(self, t):
            return self.bin_min[t] < self.cut

        def key_in(self, t, lane):
            return self.bins[t * SB + lane] < self.cut

    class BoundsAbove:
        """Keys seen whose upper bound (of row b, h, i) is >= cut (blocks: u_min, u_max) as count_keys asks."""

        def __init__(self, upper, bins, u_min, u_max, cut, b, h, i):
            self.upper, self.bins, self.u_min, self.u_max, self.cut = upper, bins, u_min, u_max, cut
            self.b, self.h, self.i = b, h, i

        def all_in(self, t):
            return self.u_min[t] >= self.cut

        def some_in(self, t):
            return self.u_max[t] >= self.cut

        def key_in(self, t, lane):
            return T.And(self.bins[t * SB + lane] <= CUTS,
                         self.upper[self.b, self.h, self.i, t * SB + lane] >= self.cut)

    @T.macro
    def count_keys(count, pc, seen, rule):
        """count[0] = the keys seen that ``rule`` (BinsBelow, BoundsAbove) takes: a block it takes all of adds its
        count, one it may take some of a vectorized count."""
        count[0] = 0
        for lane in T.vectorized(SB):
            pc[lane] = 0
        for t in range(NB):
            if rule.all_in(t):
                count[0] = count[0] + seen[t]
            elif rule.some_in(t):
                for lane in T.vectorized(SB):
                    pc[lane] = pc[lane] + T.Cast("int32", rule.key_in(t, lane))
        for lane in range(SB):
            count[0] = count[0] + pc[lane]

    @T.macro
    def far_cut(pc, upper, bins, bin_min, seen, count, kk, widest, top, b, h, i):
        """Top-k when fewer than kk keys lie in the bins (16 logits below the top: steep ALiBi slopes, huge logits):
        a bisection on the upper bounds themselves for a value cut_lo that at least kk keys reach, to within
        CUT_STEP (at most FAR_ROUNDS rounds; blocks wholly above or below a cut count at once). The candidates, keys
        with u >= cut_lo - 2 widest (less CUT_STEP and 2^-20 of its magnitude, for float32 rounding), get bin 0 and
        the other keys seen bin CUTS: bins < 1 are the candidates."""
        u_min = T.sblock_alloc_buffer((NB,), ACC)  # per block, of the keys seen
        u_max = T.sblock_alloc_buffer((NB,), ACC)
        pu = T.sblock_alloc_buffer((SB,), ACC)
        cut_lo = T.sblock_alloc_buffer((1,), ACC)
        cut_hi = T.sblock_alloc_buffer((1,), ACC)
        cut_mid = T.sblock_alloc_buffer((1,), ACC)
        rounds = T.sblock_alloc_buffer((1,), "int32")
        for t in range(NB):
            for lane in T.vectorized(SB):
                pu[lane] = T.Select(bins[t * SB + lane] <= CUTS, upper[b, h, i, t * SB + lane], T.float32(INF))
            halve_to_two(pu, pu, 0, T.min)
            u_min[t] = T.min(pu[0], pu[1])
            for lane in T.vectorized(SB):
                pu[lane] = T.Select(bins[t * SB + lane] <= CUTS, upper[b, h, i, t * SB + lane], T.float32(-INF))
            halve_to_two(pu, pu, 0, T.max)
            u_max[t] = T.max(pu[0], pu[1])
        cut_lo[0] = T.float32(INF)
        for t in range(NB):
            cut_lo[0] = T.min(cut_lo[0], u_min[t])  # every key seen reaches it
        cut_hi[0] = top[0]
        rounds[0] = 0
        while T.And(cut_hi[0] - cut_lo[0] > T.float32(certificate.CUT_STEP), rounds[0] < FAR_ROUNDS):
            cut_mid[0] = cut_lo[0] + (cut_hi[0] - cut_lo[0]) * HALF
            count_keys(count, pc, seen, BoundsAbove(upper, bins, u_min, u_max, cut_mid[0], b, h, i))
            if count[0] >= kk[0]:
                cut_lo[0] = cut_mid[0]
            else:
                cut_hi[0] = cut_mid[0]
            rounds[0] = rounds[0] + 1
        cut_lo[0] = cut_lo[0] - T.float32(2) * widest[0]
        cut_lo[0] = cut_lo[0] - (T.float32(certificate.CUT_STEP) + T.fabs(cut_lo[0]) * T.float32(2.0**-20))
        for t in range(NB):
            for lane in T.vectorized(SB):
                bins[t * SB + lane] = T.Select(bins[t * SB + lane] <= CUTS, T.Select(
                    upper[b, h, i, t * SB + lane] >= cut_lo[0], 0, CUTS), bins[t * SB + lane])
            bin_min[t] = T.Select(u_max[t] >= cut_lo[0], 0, CUTS)

    @T.macro
    def body(q, k, v, codes, lo, step, sinks, out):
        upper = T.sblock_alloc_buffer((B, H, SQ, SKVP), ACC)
        radius = T.sblock_alloc_buffer((B, H, SQ, NB), ACC)
        m_part = T.sblock_alloc_buffer((B, KVH, NSR, SQ, G), ACC)
        for b, kh, s in T.grid(B, KVH, NSR):
            with T.sblock("split"):
                vb, vkh, vs = T.axis.remap("SSS", [b, kh, s])
                T.reads(q[vb, vkh * G:vkh * G + G, 0:SQ, 0:D], codes[vb, vkh, 0:NB, 0:D, 0:SB], lo[vb, vkh, 0:NB, 0:D],
                        step[vb, vkh, 0:NB, 0:D])
                T.writes(upper[vb, vkh * G:vkh * G + G, 0:SQ, 0:SKVP], radius[vb, vkh * G:vkh * G + G, 0:SQ, 0:NB],
                         m_part[vb, vkh, vs, 0:SQ, 0:G])
                q_rows = T.sblock_alloc_buffer((G, D), ACC)
                qt = T.sblock_alloc_buffer((G, D), ACC)
                qo = T.sblock_alloc_buffer((G,), ACC)
                rad = T.sblock_alloc_buffer((G,), ACC)
                s_hat = T.sblock_alloc_buffer((G, SB), ACC)
                u = T.sblock_alloc_buffer((G, SB), ACC)
                cmax = T.sblock_alloc_buffer((G,), ACC)
                for i in range(SQ):
                    with T.sblock("query"):
                        vi = T.axis.opaque(SQ, i)
                        for g, d in T.grid(G, D):
                            with T.sblock("q_rows"):
                                vg, vd = T.axis.remap("SS", [g, d])
                                q_rows[vg, vd] = widen(q[vb, vkh * G + vg, vi, vd]) * SCALE
                        for g in range(G):
                            with T.sblock("init_max"):
                                vg = T.axis.spatial(G, g)
                                cmax[vg] = NEG
                        for t in range(block_range(vs, vi)[0], block_range(vs, vi)[1]):
                            with T.sblock("shadow_tile"):
                                vt = T.axis.opaque(NB, t)
                                for g, d in T.grid(G, D):
                                    with T.sblock("scaled_step"):
                                        vg, vd = T.axis.remap("SS", [g, d])
                                        qt[vg, vd] = q_rows[vg, vd] * step[vb, vkh, vt, vd]
                                for g, d in T.grid(G, D):
                                    with T.sblock("offset_dot"):
                                        vg, vd = T.axis.remap("SR", [g, d])
                                        with T.init():
                                            qo[vg] = ZERO
                                        qo[vg] = qo[vg] + q_rows[vg, vd] * lo[vb, vkh, vt, vd]
                                for g, d in T.grid(G, D):
                                    with T.sblock("radius"):
                                        vg, vd = T.axis.remap("SR", [g, d])
                                        with T.init():
                                            rad[vg] = ZERO
                                        rad[vg] = rad[vg] + T.fabs(q_rows[vg, vd]) * (
                                            HALF * step[vb, vkh, vt, vd]
                                            + MARGIN * (T.fabs(lo[vb, vkh, vt, vd]) + LEVELS * step[vb, vkh, vt, vd]))
                                for g, jj, d in T.grid(G, SB, D):
                                    with T.sblock("shadow_dot"):
                                        vg, j, vd = T.axis.remap("SSR", [g, jj, d])
                                        with T.init():
                                            s_hat[vg, j] = ZERO
                                        s_hat[vg, j] = s_hat[vg, j] + qt[vg, vd] * T.Cast(ACC,
                                                                                          codes[vb, vkh, vt, vd, j])
                                for g, jj in T.grid(G, SB):
                                    with T.sblock("upper"):
                                        vg, j = T.axis.remap("SS", [g, jj])
                                        # Keys past seq_kv hold stale codes: masked here.
                                        u[vg, j] = T.Select(vis.sees(vi, vt * SB + j), bound_terms(
                                            qo[vg] + s_hat[vg, j] + rad[vg], vkh * G + vg, vi, vt * SB + j), NEG)
                                for g, jj in T.grid(G, SB):
                                    with T.sblock("save_upper"):
                                        vg, j = T.axis.remap("SS", [g, jj])
                                        upper[vb, vkh * G + vg, vi, vt * SB + j] = u[vg, j]
                                for g in range(G):
                                    with T.sblock("save_radius"):
                                        vg = T.axis.spatial(G, g)
                                        radius[vb, vkh * G + vg, vi, vt] = rad[vg]
                                for g, jj in T.grid(G, SB):
                                    with T.sblock("chunk_max"):
                                        vg, j = T.axis.remap("SR", [g, jj])
                                        cmax[vg] = T.max(cmax[vg], poisoned(u[vg, j]))
                        for g in range(G):
                            with T.sblock("save_max"):
                                vg = T.axis.spatial(G, g)
                                m_part[vb, vkh, vs, vi, vg] = cmax[vg]
        for b, h, i in T.grid(B, H, SQ):
            with T.sblock("row"):
                vb, vh, vi = T.axis.remap("SSS", [b, h, i])
                T.reads(upper[vb, vh, vi, 0:SKVP], radius[vb, vh, vi, 0:NB], m_part[vb, vh // G, 0:NSR, vi, vh % G],
                        q[vb, vh, vi, 0:D], k[vb, vh // G, 0:SKV, 0:D], v[vb, vh // G, 0:SKV, 0:D])
                T.writes(out[vb, vh, vi, 0:D])
                e = T.sblock_alloc_buffer((SKVP,), ACC)
                bins = T.sblock_alloc_buffer((SKVP,), "int32")
                bin_min = T.sblock_alloc_buffer((NB,), "int32")
                bin_max = T.sblock_alloc_buffer((NB,), "int32")
                e_sum = T.sblock_alloc_buffer((NB,), ACC)
                shrink = T.sblock_alloc_buffer((NB,), ACC)
                idx = T.sblock_alloc_buffer((SKVP + 1,), "int32")  # + 1: the branchless compactions' last write
                sc = T.sblock_alloc_buffer((SKVP,), ACC)
                qr = T.sblock_alloc_buffer((DP,), ACC)
                acc = T.sblock_alloc_buffer((D,), ACC)
                pd = T.sblock_alloc_buffer((SB,), ACC)
                pk = T.sblock_alloc_buffer((SB,), ACC)
                top = T.sblock_alloc_buffer((1,), ACC)
                dropped = T.sblock_alloc_buffer((1,), ACC)
                held = T.sblock_alloc_buffer((1,), ACC)
                m = T.sblock_alloc_buffer((1,), ACC)
                l = T.sblock_alloc_buffer((1,), ACC)
                w = T.sblock_alloc_buffer((1,), ACC)
                lo_n = T.sblock_alloc_buffer((1,), "int32")
                hi_n = T.sblock_alloc_buffer((1,), "int32")
                mid = T.sblock_alloc_buffer((1,), "int32")
                cnt = T.sblock_alloc_buffer((1,), "int32")
                seen = T.sblock_alloc_buffer((NB,), "int32")
                pa = T.sblock_alloc_buffer((SB,), "int32")
                pb = T.sblock_alloc_buffer((SB,), "int32")
                pc = T.sblock_alloc_buffer((SB,), "int32")
                count = T.sblock_alloc_buffer((1,), "int32")
                kk = T.sblock_alloc_buffer((1,), "int32")
                widest = T.sblock_alloc_buffer((1,), ACC)
                okey = T.sblock_alloc_buffer((SKVP,), "int32")
                klo = T.sblock_alloc_buffer((1,), "int32")
                khi = T.sblock_alloc_buffer((1,), "int64")
                kmid = T.sblock_alloc_buffer((1,), "int32")
                found = T.sblock_alloc_buffer((1,), "int32")
                cut_key = T.sblock_alloc_buffer((1,), "int32")
                cut_index = T.sblock_alloc_buffer((1,), "int32")
                rest_hi = T.sblock_alloc_buffer((1,), ACC)
                rest_lo = T.sblock_alloc_buffer((1,), ACC)
                sum_lo = T.sblock_alloc_buffer((1,), ACC)
                sum_hi = T.sblock_alloc_buffer((1,), ACC)
                sum_c = T.sblock_alloc_buffer((1,), ACC)
                scored = T.sblock_alloc_buffer((1,), "int32")
                floor_w = T.sblock_alloc_buffer((1,), ACC)
                undecided = T.sblock_alloc_buffer((1,), "int32")
                width = T.sblock_alloc_buffer((1,), "int32")
                extended = T.sblock_alloc_buffer((1,), "int32")
                top[0] = NEG
                for s in range(NSR):
                    top[0] = T.max(top[0], m_part[vb, vh // G, s, vi, vh % G])
                # Per key e^(u - top) and its bin, floor((top - u) / CUT_STEP) capped at CUTS; keys not seen: bin
                # CUTS + 1 and e = 0. Blocks no chunk visited for this row hold stale values: the visibility test
                # drops them. Per block: its lowest and highest bin (of keys seen), sum of e, and e^(-2 radius),
                # which turns e^(u - top) into e^(l - top). top is +Inf when a bound is NaN or +Inf (a NaN or Inf in
                # q or in a block of K): then nothing is certified, every key seen is in bin 0 and gets scored.
                for t in range(NB):
                    for lane in T.vectorized(SB):
                        e[t * SB + lane] = T.Select(vis.sees(vi, t * SB + lane),
                                                    softmax_exp(upper[vb, vh, vi, t * SB + lane] - top[0]), ZERO)
                        bins[t * SB + lane] = T.Select(
                            vis.sees(vi, t * SB + lane),
                            T.Select(top[0] < T.float32(INF), T.Cast(
                                "int32", T.min((top[0] - upper[vb, vh, vi, t * SB + lane]) * INV_STEP, FAR)), 0),
                            CUTS + 1)
                    for lane in T.vectorized(SB):
                        pb[lane] = T.Select(bins[t * SB + lane] <= CUTS, bins[t * SB + lane], -1)
                        pc[lane] = T.Cast("int32", bins[t * SB + lane] <= CUTS)
                    halve_to_two(pa, bins, t * SB, T.min)
                    halve_to_two(pb, pb, 0, T.max)
                    halve_to_two(pc, pc, 0, _add)
                    bin_min[t] = T.min(pa[0], pa[1])
                    bin_max[t] = T.max(pb[0], pb[1])
                    seen[t] = pc[0] + pc[1]
                    halve_to_two(pd, e, t * SB, _add)
                    e_sum[t] = pd[0] + pd[1]
                    shrink[t] = softmax_exp(T.float32(-2) * radius[vb, vh, vi, t])
                if IS_TOPK or IS_THRESHOLD:
                    # widest: the row's largest radius; held: sum_j e^(l_j - top) over the row.
                    widest[0] = ZERO
                    held[0] = ZERO
                    for t in range(NB):
                        if seen[t] > 0:
                            widest[0] = T.max(widest[0], radius[vb, vh, vi, t])
                        held[0] = held[0] + e_sum[t] * shrink[t]
                if IS_THRESHOLD:
                    if sinks is not None:
                        held[0] = with_sink(sinks, vh, held[0], top[0])  # the sink's weight is known exactly
                    # Candidates: keys that may hold weight >= tau (e^(u - top) >= tau sum_j e^(l_j - top)), keys that
                    # may be the row's largest (u >= top - 2 widest), and enough more that the bounds on the rest's
                    # sum are within THRESHOLD_SLACK of the row's: the smallest n whose bins >= n have
                    # sum e^(u - top) (1 - e^(-2 radius)) <= SLACK held. Each bin edge +1 for the rounding of bins.
                    lo_n[0] = 0
                    hi_n[0] = CUTS + 1
                    while hi_n[0] - lo_n[0] > 1:
                        mid[0] = (lo_n[0] + hi_n[0]) // 2
                        rest_bounds(rest_hi, rest_lo, pd, pk, bins, e, e_sum, shrink, bin_min, bin_max, mid[0])
                        if rest_hi[0] - rest_lo[0] <= SLACK * held[0]:
                            hi_n[0] = mid[0]
                        else:
                            lo_n[0] = mid[0]
                    hi_n[0] = T.max(hi_n[0], T.Cast("int32", T.float32(2) * widest[0] * INV_STEP) + 2)
                    hi_n[0] = T.max(hi_n[0], T.Cast("int32", T.min(-T.log(TAU * held[0]), FAR) * INV_STEP) + 2)
                    hi_n[0] = T.min(hi_n[0], CUTS + 1)
                elif IS_TOPK:
                    # The smallest n whose bins < n hold kk keys: they all score above top - n CUT_STEP - 2 widest
                    # (widest: the row's largest radius), so no key whose upper bound is below that is in the top
                    # kk; the candidates are the bins up to there (+1 for the rounding of bins).
                    kk[0] = 0
                    for t in range(NB):
                        kk[0] = kk[0] + seen[t]
                    kk[0] = T.min(kk[0], TOP_K)
                    lo_n[0] = 0
                    hi_n[0] = CUTS + 1
                    while hi_n[0] - lo_n[0] > 1:
                        mid[0] = (lo_n[0] + hi_n[0]) // 2
                        count_keys(count, pc, seen, BinsBelow(bins, bin_min, bin_max, mid[0]))
                        if count[0] >= kk[0]:
                            hi_n[0] = mid[0]
                        else:
                            lo_n[0] = mid[0]
                    if T.And(hi_n[0] > CUTS, top[0] < T.float32(INF)):
                        far_cut(pc, upper, bins, bin_min, seen, count, kk, widest, top, vb, vh, vi)
                        hi_n[0] = 1
                    else:
                        hi_n[0] = T.min(hi_n[0] + T.Cast("int32", T.float32(2) * widest[0] * INV_STEP) + 2, CUTS + 1)
                else:
                    # Bisection for the smallest n whose bins < n certify (n = CUTS + 1: every key). Invariant: lo_n
                    # does not certify (0 keeps nothing), hi_n does. A block wholly on one side of a cut adds its
                    # sum.
                    lo_n[0] = 0
                    hi_n[0] = CUTS + 1
                    while hi_n[0] - lo_n[0] > 1:
                        mid[0] = (lo_n[0] + hi_n[0]) // 2
                        dropped[0] = ZERO
                        held[0] = ZERO
                        for lane in T.vectorized(SB):
                            pd[lane] = ZERO
                            pk[lane] = ZERO
                        for t in range(NB):
                            if bin_min[t] >= mid[0]:
                                dropped[0] = dropped[0] + e_sum[t]
                            elif bin_max[t] < mid[0]:
                                held[0] = held[0] + e_sum[t] * shrink[t]
                            else:
                                for lane in T.vectorized(SB):
                                    pd[lane] = pd[lane] + T.Select(bins[t * SB + lane] < mid[0], ZERO,
                                                                   e[t * SB + lane])
                                    pk[lane] = pk[lane] + T.Select(bins[t * SB + lane] < mid[0],
                                                                   e[t * SB + lane] * shrink[t], ZERO)
                        halve_to_two(pd, pd, 0, _add)
                        halve_to_two(pk, pk, 0, _add)
                        dropped[0] = dropped[0] + (pd[0] + pd[1])
                        held[0] = held[0] + (pk[0] + pk[1])
                        if dropped[0] <= BUDGET * with_sink(sinks, vh, held[0], top[0]):
                            hi_n[0] = mid[0]
                        else:
                            lo_n[0] = mid[0]
                if top[0] == T.float32(INF):
                    hi_n[0] = CUTS + 1  # the bisections above read NaN bounds: every key seen is kept
                if IS_THRESHOLD:
                    rest_bounds(rest_hi, rest_lo, pd, pk, bins, e, e_sum, shrink, bin_min, bin_max, hi_n[0])
                cnt[0] = 0
                for t in range(NB):
                    if bin_min[t] < hi_n[0]:
                        for lane in range(SB):
                            # Branchless: always write, advance only past kept keys.
                            idx[cnt[0]] = t * SB + lane
                            cnt[0] = cnt[0] + T.Cast("int32", bins[t * SB + lane] < hi_n[0])
                for d in range(DP):
                    qr[d] = T.if_then_else(d < D, widen(q[vb, vh, vi, T.min(d, D - 1)]) * SCALE, ZERO)
                m[0] = NEG
                for c in range(cnt[0]):
                    # The kept keys' rows are scattered over memory: ask for those PREFETCH keys ahead (K and V)
                    # so that many are in flight, not one at a time.
                    prefetch_row(k, vb, vh // G, idx[T.min(c + PREFETCH, cnt[0] - 1)])
                    prefetch_row(v, vb, vh // G, idx[T.min(c + PREFETCH, cnt[0] - 1)])
                    exact_score(pd, qr, k, vb, vh // G, idx[c])
                    sc[c] = score_terms(pd[0] + pd[1], vh, vi, idx[c])
                    okey[c] = order_key(sc[c])
                    m[0] = T.max(m[0], poisoned(sc[c]))
                # Top-k: the kk largest exact scores among the candidates (which hold every key of the top kk), ties
                # to the lower key index as in the pruned kernels (order keys, bisection until exactly kk are above
                # the midpoint, else the ties straddling the cut filled by index). Bounded: every candidate.
                cut_key[0] = INT32_MIN
                cut_index[0] = cnt[0]
                floor_w[0] = ZERO
                if IS_THRESHOLD:
                    # Weights e^(s - max) >= min(tau sum, 1) are kept (the pruned kernels' rule: p >= tau, or the
                    # row's largest). The sum is known within [sum_lo, sum_hi]; a candidate whose weight falls between
                    # tau sum_lo and tau sum_hi is undecided, and then more keys are scored (below).
                    sum_c[0] = ZERO
                    for c in range(cnt[0]):
                        sum_c[0] = sum_c[0] + softmax_exp(sc[c] - m[0])
                    # Keys of bins < scored have their exact terms in sum_c. While a weight is undecided, score the
                    # next ``width`` bins too (their keys are certainly dropped; their terms narrow the sum's bounds),
                    # twice as many each round. Their indices go to idx past the candidates', to be prefetched.
                    scored[0] = hi_n[0]
                    width[0] = EXTEND
                    undecided[0] = 1
                    while undecided[0] > 0:
                        sum_hi[0] = with_sink(sinks, vh, sum_c[0], m[0]) + rest_hi[0] * softmax_exp(top[0] - m[0])
                        sum_lo[0] = with_sink(sinks, vh, sum_c[0], m[0]) + rest_lo[0] * softmax_exp(top[0] - m[0])
                        undecided[0] = 0
                        for c in range(cnt[0]):
                            undecided[0] = undecided[0] + T.Cast("int32", T.And(
                                softmax_exp(sc[c] - m[0]) >= T.min(TAU * sum_lo[0], ONE),
                                softmax_exp(sc[c] - m[0]) < T.min(TAU * sum_hi[0], ONE)))
                        if scored[0] > CUTS:
                            undecided[0] = 0  # every key seen is scored: the bounds are the exact sum
                        if undecided[0] > 0:
                            # Bins past CUTS hold the keys not seen: never scored.
                            width[0] = T.min(width[0], CUTS + 1 - scored[0])
                            extended[0] = cnt[0]
                            for t in range(NB):
                                if T.And(bin_max[t] >= scored[0], bin_min[t] < scored[0] + width[0]):
                                    for lane in range(SB):
                                        idx[extended[0]] = t * SB + lane
                                        extended[0] = extended[0] + T.Cast("int32", T.And(
                                            bins[t * SB + lane] >= scored[0],
                                            bins[t * SB + lane] < scored[0] + width[0]))
                            for c in range(cnt[0], extended[0]):
                                prefetch_row(k, vb, vh // G, idx[T.min(c + PREFETCH, extended[0] - 1)])
                                exact_score(pd, qr, k, vb, vh // G, idx[c])
                                sum_c[0] = sum_c[0] + softmax_exp(score_terms(pd[0] + pd[1], vh, vi, idx[c]) - m[0])
                            scored[0] = scored[0] + width[0]
                            width[0] = width[0] * 2
                            rest_bounds(rest_hi, rest_lo, pd, pk, bins, e, e_sum, shrink, bin_min, bin_max, scored[0])
                    floor_w[0] = T.min(TAU * sum_hi[0], ONE)
                if IS_TOPK:
                    if kk[0] < cnt[0]:
                        klo[0] = T.int32(2**31 - 1)
                        khi[0] = T.int64(-(2**31))
                        for c in range(cnt[0]):
                            klo[0] = T.min(klo[0], okey[c])
                            khi[0] = T.max(khi[0], T.Cast("int64", okey[c]) + T.int64(1))
                        found[0] = 0
                        while found[0] == 0 and khi[0] - T.Cast("int64", klo[0]) > T.int64(1):
                            kmid[0] = T.Cast("int32", T.shift_right(T.Cast("int64", klo[0]) + khi[0], T.int64(1)))
                            count[0] = 0
                            for c in range(cnt[0]):
                                count[0] = count[0] + T.Cast("int32", okey[c] >= kmid[0])
                            if count[0] == kk[0]:
                                found[0] = 1
                            if count[0] >= kk[0]:
                                klo[0] = kmid[0]
                            else:
                                khi[0] = T.Cast("int64", kmid[0])
                        cut_index[0] = -1
                        if found[0] == 1:
                            cut_key[0] = klo[0] - 1
                        else:
                            cut_key[0] = klo[0]
                            count[0] = 0
                            for c in range(cnt[0]):
                                count[0] = count[0] + T.Cast("int32", okey[c] > cut_key[0])
                            count[0] = kk[0] - count[0]
                            for c in range(cnt[0]):
                                if count[0] > 0 and okey[c] == cut_key[0]:
                                    count[0] = count[0] - 1
                                    cut_index[0] = c
                l[0] = ZERO
                for d in range(D):
                    acc[d] = ZERO
                for c in range(cnt[0]):
                    if T.And(softmax_exp(sc[c] - m[0]) >= floor_w[0],
                             okey[c] > cut_key[0] or (okey[c] == cut_key[0] and c <= cut_index[0])):
                        w[0] = softmax_exp(sc[c] - m[0])
                        l[0] = l[0] + w[0]
                        for d in range(D):
                            acc[d] = acc[d] + w[0] * widen(v[vb, vh // G, idx[c], d])
                for d in range(D):
                    out[vb, vh, vi, d] = row_output(acc[d], l[0], m[0], dtype, sink_logit(sinks, vh))

    if reads_shadow:
        return _with_shadow_arguments(kspec, body, B, SQ, SKV, NB, vis)
    return _quantizing(kspec, body, B, SQ, SKV, NB, vis)


def _with_shadow_arguments(kspec, body, B, SQ, SKV, NB, vis):
    """The PrimFunc taking (q, k, v, codes, lo, step, [sinks,] [tree,] out) (common.OptionalArguments)."""
    H, KVH, D, dtype = kspec.heads, kspec.kv_heads, kspec.head_dim, kspec.dtype
    optional = OptionalArguments(kspec, (SQ, SQ), vis)

    def arguments(q_h, k_h, v_h, codes_h, lo_h, step_h, out_h):
        """The q, k, v, shadow (codes, lo, step) and out buffers from their handles, declared in that order."""
        qkv = [bhsd(h, B, heads, seq, D, dtype) for h, heads, seq in ((q_h, H, SQ), (k_h, KVH, SKV), (v_h, KVH, SKV))]
        codes = T.match_buffer(codes_h, (B, KVH, NB, D, SB), "uint8",
                               strides=(T.int32(), T.int32(), T.int32(), T.int32(), 1), align=1, offset_factor=1)
        lo, step = [T.match_buffer(h, (B, KVH, NB, D), ACC, strides=(T.int32(), T.int32(), T.int32(), 1), align=4,
                                   offset_factor=1) for h in (lo_h, step_h)]
        return (*qkv, codes, lo, step, bhsd(out_h, B, H, SQ, D, dtype))

    @T.prim_func(s_tir=True)
    def bounded_shadow(q_h: T.handle, k_h: T.handle, v_h: T.handle, codes_h: T.handle, lo_h: T.handle,
                       step_h: T.handle, sinks_h: T.handle, tree_h: T.handle, out_h: T.handle):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        q, k, v, codes, lo, step, out = arguments(q_h, k_h, v_h, codes_h, lo_h, step_h, out_h)
        optional.declare(sinks_h, tree_h)
        with T.sblock("root"):
            body(q, k, v, codes, lo, step, optional.sinks, out)

    return optional.signature(bounded_shadow)


@T.macro
def quantize_keys(k, codes, lo, hi, step, batch, kv_heads, blocks, head_dim, seq_kv):
    """The shadow of k (batch, kv_heads, seq_kv, head_dim) as certificate.quantize makes it (blocks padded with the
    last key, float32 arithmetic, round half to even): codes (batch, kv_heads, blocks, head_dim, SB), lo and step
    (batch, kv_heads, blocks, head_dim); hi is scratch of lo's shape. A NaN in a block makes its lo -Inf and its hi
    +Inf (so every bound from it is NaN or +Inf), and a block with an infinite step gets codes 0."""
    for b, kh, t, d, jj in T.grid(batch, kv_heads, blocks, head_dim, SB):
        with T.sblock("shadow_min"):
            vb, vkh, vt, vd, j = T.axis.remap("SSSSR", [b, kh, t, d, jj])
            with T.init():
                lo[vb, vkh, vt, vd] = T.max_value(ACC)
            # -poisoned(-x): x, or -Inf where x is NaN
            lo[vb, vkh, vt, vd] = T.min(lo[vb, vkh, vt, vd],
                                        -poisoned(-widen(k[vb, vkh, T.min(vt * SB + j, seq_kv - 1), vd])))
    for b, kh, t, d, jj in T.grid(batch, kv_heads, blocks, head_dim, SB):
        with T.sblock("shadow_max"):
            vb, vkh, vt, vd, j = T.axis.remap("SSSSR", [b, kh, t, d, jj])
            with T.init():
                hi[vb, vkh, vt, vd] = T.min_value(ACC)
            hi[vb, vkh, vt, vd] = T.max(hi[vb, vkh, vt, vd],
                                        poisoned(widen(k[vb, vkh, T.min(vt * SB + j, seq_kv - 1), vd])))
    for b, kh, t, d in T.grid(batch, kv_heads, blocks, head_dim):
        with T.sblock("shadow_step"):
            vb, vkh, vt, vd = T.axis.remap("SSSS", [b, kh, t, d])
            step[vb, vkh, vt, vd] = (hi[vb, vkh, vt, vd] - lo[vb, vkh, vt, vd]) / T.float32(certificate.LEVELS)
    for b, kh, t, d, jj in T.grid(batch, kv_heads, blocks, head_dim, SB):
        with T.sblock("shadow_codes"):
            vb, vkh, vt, vd, j = T.axis.remap("SSSSS", [b, kh, t, d, jj])
            codes[vb, vkh, vt, vd, j] = T.Cast("uint8", T.Select(
                T.And(step[vb, vkh, vt, vd] > T.float32(0), step[vb, vkh, vt, vd] < T.float32(INF)),
                T.max(T.min(T.nearbyint((widen(k[vb, vkh, T.min(vt * SB + j, seq_kv - 1), vd]) - lo[vb, vkh, vt, vd])
                                        / step[vb, vkh, vt, vd]), T.float32(certificate.LEVELS)), T.float32(0)),
                T.float32(0)))


_QUANTIZE_MACRO = macro_state(quantize_keys)


def _quantizing(kspec, body, B, SQ, SKV, NB, vis):
    KVH, D = kspec.kv_heads, kspec.head_dim

    @T.macro
    def quantizing_body(q, k, v, sinks, out):
        codes = T.sblock_alloc_buffer((B, KVH, NB, D, SB), "uint8")
        lo = T.sblock_alloc_buffer((B, KVH, NB, D), ACC)
        hi = T.sblock_alloc_buffer((B, KVH, NB, D), ACC)
        step = T.sblock_alloc_buffer((B, KVH, NB, D), ACC)
        quantize_keys(k, codes, lo, hi, step, B, KVH, NB, D, SKV)
        body(q, k, v, codes, lo, step, sinks, out)

    return bhsd_kernel(quantizing_body, kspec, B, SQ, SKV, vis)


def compute_quantize(kv_heads: int, head_dim: int, dtype: str):
    """A PrimFunc (k, codes, lo, step) writing the shadow of k (batch, kv_heads, n, head_dim), its blocks from key 0,
    into codes, lo and step (the blocks(n) blocks of a KVCache's shadow buffers): what KVCache.append runs."""
    _QUANTIZE_MACRO.call_count = 0
    B, _, SKV = run_time_sizes()
    NB = ceil_div(SKV, SB)

    @T.prim_func(s_tir=True)
    def quantize(k_h: T.handle, codes_h: T.handle, lo_h: T.handle, step_h: T.handle):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        k = bhsd(k_h, B, kv_heads, SKV, head_dim, dtype)
        codes = T.match_buffer(codes_h, (B, kv_heads, NB, head_dim, SB), "uint8",
                               strides=(T.int32(), T.int32(), T.int32(), T.int32(), 1), align=1, offset_factor=1)
        lo = T.match_buffer(lo_h, (B, kv_heads, NB, head_dim), ACC, strides=(T.int32(), T.int32(), T.int32(), 1),
                            align=4, offset_factor=1)
        step = T.match_buffer(step_h, (B, kv_heads, NB, head_dim), ACC,
                              strides=(T.int32(), T.int32(), T.int32(), 1), align=4, offset_factor=1)
        with T.sblock("root"):
            hi = T.sblock_alloc_buffer((B, kv_heads, NB, head_dim), ACC)
            quantize_keys(k, codes, lo, hi, step, B, kv_heads, NB, head_dim, SKV)

    return quantize


def compute(kspec: KernelSpec, config: BoundedConfig = BoundedConfig()):
    """The bounded PrimFunc for ``kspec`` taking (q, k, v, out): it builds the shadow of k itself."""
    return _kernel(kspec, config, reads_shadow=False)


def compute_shadow(kspec: KernelSpec, config: BoundedConfig = BoundedConfig()):
    """The PrimFunc for ``kspec`` taking (q, k, v, codes, lo, step, out), the shadow a KVCache keeps: bounded
    (kspec.eps) or exact top-k (kspec.top_k)."""
    return _kernel(kspec, config, reads_shadow=True)
