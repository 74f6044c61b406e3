"""Pieces the TensorIR computes share: argument buffers of any length and layout, the visibility rule (causal,
window, tree mask), and the statement blocks several variants write the same way (``@T.macro``: the K transpose, the
QK^T tile, and the row-tile blocks of the materialized-score variants).

Block names are the contract with schedules/: k_t, q_tile, qk, ... (each compute's docstring lists its own).
"""

from __future__ import annotations

import inspect

from tvm import tirx
from tvm.script import tirx as T
from tvm.script.ir_builder import IRBuilder
from tvm.script.parser.core.parser import ScriptMacro

# The computes import the element types from here.
from ..element_types import ACC, BF16_BITS, BF16_PAIR, bits_of, narrow, pair_half, pair_of, widen  # noqa: F401
from ..fast_exp import softmax_exp
from ..spec import KernelSpec

# The kernels assume only element alignment of their arguments (the element's bytes): numpy and torch tensors,
# strided views into a KV cache and slices at any offset are passed without a copy (unaligned vector loads cost
# nothing on aligned data).
ELEMENT_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}


def ceil_div(a, b: int):
    """Tiles of size b covering a (an int or a PrimExpr)."""
    return (a + (b - 1)) // b


# The rule for NaN and Inf (references.py states it): a row that reads a NaN or +Inf score is NaN in every element;
# -Inf scores are masked keys. The kernels take every row max over poisoned(score), so the max is +Inf exactly when
# the row read such a score (NaN itself would not survive: T.max(a, b) is a > b ? a : b), and row_output turns that
# max into a NaN row, whatever the softmax and the selections did with the NaN meanwhile.
INF = float("inf")


# tanh(x) = x p(x^2) / q(x^2) on |x| <= TANH_CLAMP (float32 tanh is +-1 beyond, to 2.3 ulps), p of degree 3 and q
# monic of degree 4: a minimax fit of the relative error (1.3e-7) made here, its coefficients then moved a few float32
# ulps each to the least error of the float32 evaluation. Against Eigen's fast tanh (degree 13 over 6, whose form
# this was) it takes three multiply-adds fewer: flash prefill D64 with softcap went from 1.15x to 1.11x the kernel
# without on a Zen 1, for 3.3-3.5 ulps of the cap with FMA (Eigen's: 2.3-2.9) and 3.4-4.5 without (2.7-3.2).
TANH_CLAMP = 7.90531110763549805
_TANH_NUMERATOR = (4014758.25, 519267.46875, 11883.6240234375, 46.275978088378906)  # x^1, x^3, x^5, x^7
_TANH_DENOMINATOR = (4014757.75, 1857516.0, 95760.3984375, 963.31103515625)  # x^0, x^2, x^4, x^6 (and 1 x^8)


def softcapped(s, cap: float, prescale: float = 1.0):
    """cap * tanh(prescale * s / cap) (logit softcapping) in vectorizable float32 arithmetic (one division, no exp):
    x = s * (prescale / cap) (no multiply where that is 1: a kernel that scaled q by 1 / cap passes prescale = cap)
    clamped to +-TANH_CLAMP, then x p(x^2) / q(x^2) with cap folded into p (caps below 2^64); NaN stays NaN (each
    clamp returns its second operand when the comparison fails, and the constant is the first), +-Inf become +-cap."""
    factor = prescale / cap
    x = T.max(T.float32(-TANH_CLAMP), T.min(T.float32(TANH_CLAMP), s * T.float32(factor) if factor != 1.0 else s))
    x2 = x * x
    fold = cap < 2.0**64  # x p(x^2) reaches 7.4e8 cap: finite in float32 for such caps
    p_scale = cap if fold else 1.0
    p = T.float32(_TANH_NUMERATOR[-1] * p_scale)
    for c in _TANH_NUMERATOR[-2::-1]:
        p = p * x2 + T.float32(c * p_scale)
    q = x2 + T.float32(_TANH_DENOMINATOR[-1])
    for c in _TANH_DENOMINATOR[-2::-1]:
        q = q * x2 + T.float32(c)
    return x * p / q if fold else x * p / q * T.float32(cap)


def constant_of(values: tuple, i, first: int = 0):
    """values[i - first] for a run-time index i, as a tree of selects over float32 constants (no memory access; i
    past the end gives the last value)."""
    if len(values) == 1:
        return T.float32(values[0])
    half = len(values) // 2
    return T.Select(i < first + half, constant_of(values[:half], i, first), constant_of(values[half:], i, first + half))


def adjusted(kspec: KernelSpec, s, head, distance, prescale: float = 1.0):
    """Score s as the softmax takes it: times ``prescale`` (the scale of scores computed unscaled, the softcap of
    scores computed divided by it: ``score_scales``, else 1), softcapped where kspec.softcap is set, then minus
    kspec's ALiBi slope of query ``head`` times ``distance`` (the query's position minus the key's, an int) where
    kspec.alibi_slopes is set."""
    if kspec.softcap is not None:
        x = softcapped(s, kspec.softcap, prescale)
    else:
        x = s * T.float32(prescale) if prescale != 1.0 else s
    if kspec.alibi_slopes is not None:
        x = x - constant_of(kspec.alibi_slopes, head) * T.Cast(ACC, distance)
    return x


def adjusts_scores(kspec: KernelSpec) -> bool:
    """Whether kspec's scores take terms before the softmax (softcap, ALiBi): the computes then add a block
    "score_terms" writing the adjusted scores to a buffer of their own."""
    return kspec.softcap is not None or kspec.alibi_slopes is not None


def row_score_terms(kspec: KernelSpec, head, row0, vis, prescale: float = 1.0):
    """(r, j, s) -> score s of query row0 + r (of query ``head``) against key j, adjusted (``adjusted``, with
    ``prescale``, at the distance ``vis`` says; rows past seq_q count as its last)."""
    return lambda r, j, s: adjusted(kspec, s, head, vis.distance(T.min(row0 + r, vis.seq_q - 1), j), prescale)


def score_scales(kspec: KernelSpec) -> tuple[float, float]:
    """(what a kernel computing scaled scores multiplies q by, the prescale ``adjusted`` then takes): with a softcap
    of 1 to 2^64, scale / softcap and softcap, so that the scores come as the tanh's argument (one multiply per score
    fewer; such a q neither overflows nor, at any useful size, underflows); else scale and 1."""
    if kspec.softcap is not None and 1.0 <= kspec.softcap < 2.0**64:
        return kspec.scale / kspec.softcap, kspec.softcap
    return kspec.scale, 1.0


def adjusts_by_position(kspec: KernelSpec) -> bool:
    """Whether kspec's score terms depend on the query's and the key's positions (ALiBi), not on the score alone
    (softcap): the "score_terms" blocks carry it as their annotation "position_terms", for the schedules."""
    return kspec.alibi_slopes is not None


@T.macro
def adjust_scores(S, adjusted_scores, rows, tiles, block_kv, adjust, by_position, computed=None):
    """adjusted_scores = adjust(r, key, S[r, key]) (block "score_terms", annotated with ``by_position``:
    adjusts_by_position) for rows x (tiles x block_kv) scores; with ``computed`` (computed_tiles), of the tiles
    scores_of_rows computed only (past a causal tile's diagonal, half of them on average, the rest are never read)."""
    if computed is not None:
        # the bound read from a buffer: as an expression in the predicate it made TVM's buffer compaction overflow
        # int32
        n_computed = T.sblock_alloc_buffer((1,), "int32")
        n_computed[0] = computed
    for ri, t, jj in T.grid(rows, tiles, block_kv):
        with T.sblock("score_terms"):
            r, vt, j = T.axis.remap("SSS", [ri, t, jj])
            if computed is not None:
                T.where(t < n_computed[0])
            T.sblock_attr({"position_terms": by_position})
            adjusted_scores[r, vt * block_kv + j] = adjust(r, vt * block_kv + j, S[r, vt * block_kv + j])


def poisoned(x):
    """x, or +Inf where x is NaN (or +Inf): what a row max takes of each score."""
    return T.Select(x < T.float32(INF), x, T.float32(INF))


def row_output(acc, total, row_max, dtype: str, sink=None):
    """An output element from the row's weighted sum ``acc``, sum of weights ``total`` (both relative to e^row_max)
    and max of poisoned scores ``row_max``: NaN when row_max is +Inf, 0 when the row has no weight (no visible
    key), else acc / total; with a ``sink`` logit, acc / (total + e^(sink - row_max)), both terms taken relative
    to the larger of row_max and sink (neither exp overflows)."""
    if sink is None:
        normalized = T.Select(total > T.float32(0), acc / total, T.float32(0))
    else:
        top = T.max(row_max, sink)
        keys = softmax_exp(row_max - top)
        normalized = acc * keys / (total * keys + softmax_exp(sink - top))
    return narrow(T.Select(row_max == T.float32(INF), T.float32(float("nan")), normalized), dtype)


def sink_logit(sinks, head):
    """The sink logit of query ``head`` from the kernel's (heads,) ``sinks`` argument (None for kernels without)."""
    return None if sinks is None else sinks[head]


def with_sink(sinks, head, row_sum, row_max):
    """A row's sum of weights (relative to e^row_max) with the sink's of query ``head``, e^(sink - row_max);
    ``row_sum`` itself for kernels without sinks (``sinks`` None)."""
    return row_sum if sinks is None else row_sum + softmax_exp(sinks[head] - row_max)


def sink_argument(handle, heads: int):
    """The (heads,) float32 sink logits argument of kernels with sinks (KernelSpec.sinks)."""
    return T.match_buffer(handle, (heads,), ACC, align=4, offset_factor=1)


class OptionalArguments:
    """The arguments a kernel spec adds before ``out``, in this order: the (heads,) float32 sink logits
    (KernelSpec.sinks) and the int32 tree mask (KernelSpec.tree; AttentionSpec.tree_mask: 1 + the depth of node j
    where j is node i or an ancestor of it, else 0) of ``tree_shape``, bound to ``vis`` (the Visibility whose tests
    read it) where given. A kernel's one TVMScript signature takes both handles, ``sinks_h`` and ``tree_h``: its
    body calls ``declare(sinks_h, tree_h)``, after which ``sinks`` and ``tree`` are the buffers (None without), and
    ``signature`` drops the handles the spec does not take."""

    def __init__(self, kspec: KernelSpec, tree_shape: tuple, vis=None):
        self.kspec, self.tree_shape, self.vis = kspec, tree_shape, vis
        self.sinks = self.tree = None

    def declare(self, sinks_h, tree_h) -> None:
        if self.kspec.sinks:
            self.sinks = IRBuilder.name("sinks", sink_argument(sinks_h, self.kspec.heads))
        if self.kspec.tree:
            self.tree = IRBuilder.name("tree", T.match_buffer(tree_h, self.tree_shape, "int32", align=4,
                                                              offset_factor=1))
            if self.vis is not None:
                self.vis.bind_tree(self.tree)

    def signature(self, func):
        """``func`` (parsed with both handles) without the handles its spec does not take."""
        unused = [name for name, taken in (("sinks_h", self.kspec.sinks), ("tree_h", self.kspec.tree)) if not taken]
        kept = [param for param in func.params if param.name not in unused]
        return tirx.PrimFunc(kept, func.body, func.ret_type, func.attrs, func.span)


def bhsd_kernel(body, kspec: KernelSpec, batch, seq_q, seq_kv, vis=None):
    """The PrimFunc of a kernel taking (q, k, v, [sinks,] [tree,] out) (OptionalArguments; ``vis``: the Visibility
    the body tests keys with, for the tree mask), all of kspec's dtype but the float32 sinks and the int32 tree: the
    ``@T.macro`` ``body(q, k, v, sinks, out)`` (sinks None without) in its root block."""
    H, KVH, D, dtype = kspec.heads, kspec.kv_heads, kspec.head_dim, kspec.dtype
    optional = OptionalArguments(kspec, (seq_q, seq_q), vis)

    @T.prim_func(s_tir=True)
    def kernel(q_h: T.handle, k_h: T.handle, v_h: T.handle, sinks_h: T.handle, tree_h: T.handle, out_h: T.handle):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        q, k, v, out = (bhsd(q_h, batch, H, seq_q, D, dtype), bhsd(k_h, batch, KVH, seq_kv, D, dtype),
                        bhsd(v_h, batch, KVH, seq_kv, D, dtype), bhsd(out_h, batch, H, seq_q, D, dtype))
        optional.declare(sinks_h, tree_h)
        with T.sblock("root"):
            body(q, k, v, optional.sinks, out)

    return optional.signature(kernel)


def run_time_sizes():
    """The size variables of a kernel's arguments: (batch, seq_q, seq_kv), bound from the tensors at each call."""
    return tirx.Var("batch", "int32"), tirx.Var("seq_q", "int32"), tirx.Var("seq_kv", "int32")


def bhsd(handle, batch, heads, seq, head_dim: int, dtype: str):
    """A (batch, heads, seq, head_dim) argument: any strides but a contiguous last axis, element alignment."""
    return T.match_buffer(handle, (batch, heads, seq, head_dim), dtype,
                          strides=(T.int32(), T.int32(), T.int32(), 1), align=ELEMENT_BYTES[dtype], offset_factor=1)


def row_scales(handle, batch, kv_heads, seq):
    """The float32 scale of each row of integer K or V (tvm_attn/quantized_kv.py): (batch, kv_heads, seq), any
    strides but a contiguous last axis."""
    return T.match_buffer(handle, (batch, kv_heads, seq), ACC, strides=(T.int32(), T.int32(), 1), align=4,
                          offset_factor=1)


class Visibility:
    """Which keys query i sees for a kernel spec and run-time lengths: j < seq_kv; causal: j <= i + off
    (off = seq_kv - seq_q, bottom-right aligned); window: also j > i + off - window. With a tree (KernelSpec.tree;
    the mask ``bind_tree`` binds, tree[i, n] = 1 + depth of node n where n is i or an ancestor of i, else 0) query i
    is at position off + depth(i) and key j >= off at off + depth(j - off): it sees the keys j < off in its window
    and the ancestors (itself included) in it. A tree narrows the causal mask, so the ranges below (end, tiles) hold
    for it too; its first key is bounded below by off + 1 - window, for any depth."""

    def __init__(self, kspec: KernelSpec, seq_q, seq_kv):
        self.causal = kspec.causal
        self.window = kspec.window
        self.seq_q = seq_q
        self.seq_kv = seq_kv
        self.off = seq_kv - seq_q
        self.needs_tree = kspec.tree
        self.tree = None
        self.tree_row = None

    def bind_tree(self, tree, first_row=None) -> None:
        """Test keys against the tree mask buffer ``tree`` (the kernel's argument, declared by OptionalArguments):
        query i's row of it is ``first_row`` + i (a ragged batch's rows of many sequences; None: i)."""
        self.tree = tree
        self.tree_row = first_row

    def _tree_bound(self) -> bool:
        """Whether keys are tested against a tree mask; ValueError for a kernel spec with one that no mask was bound
        to (a compute that does not take it would silently ignore it)."""
        if self.needs_tree and self.tree is None:
            raise ValueError("this compute takes no tree mask (KernelSpec.tree): its kernel would ignore the tree")
        return self.tree is not None

    def _last(self, i):
        """The last key position query i may see (before clamping to the keys that exist)."""
        return i + self.off

    def first(self, i):
        """The first key query i sees (0 unless windowed; with a tree, a lower bound: depth 0's)."""
        if self.window is None:
            return 0
        last = self.off if self.needs_tree else self._last(i)
        return T.min(self.seq_kv, T.max(0, last + 1 - self.window))

    def end(self, i):
        """One past the last key query i sees."""
        if not self.causal:
            return self.seq_kv
        return T.min(self.seq_kv, T.max(0, self._last(i) + 1))

    def _tree_entries(self, i, j):
        """(1 + depth of query i's node, tree[i, j - off]) with both indices clamped: rows past seq_q (padding of a
        row tile) and keys before the tree or hidden by the causal test are tested too, lane by lane."""
        row = T.min(i, self.seq_q - 1)
        at = row if self.tree_row is None else self.tree_row + row
        return self.tree[at, row], self.tree[at, T.min(T.max(j - self.off, 0), self.seq_q - 1)]

    def sees(self, i, j):
        """Query i sees key j (j < seq_kv included)."""
        cond = j < self.seq_kv
        if self.causal:
            cond = T.And(cond, j <= self._last(i))
        if self._tree_bound():
            own, entry = self._tree_entries(i, j)
            cached, node = j < self.off, entry != 0
            if self.window is not None:  # by position: the query's is off + own - 1, a node's off + entry - 1
                cached = T.And(cached, j > self.off + own - 1 - self.window)
                node = T.And(node, own - entry < self.window)
            return T.And(cond, T.Or(cached, T.And(j >= self.off, node)))
        if self.window is not None:
            cond = T.And(cond, j > self._last(i) - self.window)
        return cond

    def distance(self, i, j):
        """Query i's position minus key j's (ALiBi's distance; by depth in a tree, for the keys query i sees)."""
        if self._tree_bound():
            own, entry = self._tree_entries(i, j)
            return T.Select(j < self.off, self.off + own - 1 - j, own - entry)
        return i + self.seq_kv - self.seq_q - j

    def all_see(self, first_q, last_q, key0, key_end):
        """Queries first_q..last_q all see keys key0..key_end - 1 (a KV tile that needs no mask)."""
        cond = key_end <= self.seq_kv
        if self.causal:
            cond = T.And(cond, key_end - 1 <= self._last(first_q))
        if self.window is not None:
            cond = T.And(cond, key0 > self._last(last_q) - self.window)
        if self._tree_bound():
            cond = T.And(cond, key_end <= self.off)
        return cond

    def first_tile(self, first_q, block: int):
        """The first KV tile (of ``block`` keys) that queries first_q.. need."""
        if self.window is None:
            return 0
        return self.first(first_q) // block

    def end_tile(self, last_q, block: int):
        """One past the last KV tile (of ``block`` keys) that queries ..last_q need."""
        if not self.causal:
            return ceil_div(self.seq_kv, block)
        return ceil_div(self.end(last_q), block)


@T.macro
def transpose_k(k, k_t, batch, kv_heads, head_dim, seq_kv, padded, zero):
    """k_t[b, kh, d, j] = k[b, kh, j, d] as float32, zero past seq_kv: keys lie along vector lanes in the QK^T
    tiles."""
    for b, kh, d, j in T.grid(batch, kv_heads, head_dim, padded):
        with T.sblock("k_t"):
            vb, vkh, vd, vj = T.axis.remap("SSSS", [b, kh, d, j])
            k_t[vb, vkh, vd, vj] = T.if_then_else(vj < seq_kv, widen(k[vb, vkh, T.min(vj, seq_kv - 1), vd]), zero)


@T.macro
def qk_tile(S, s_col, q_tile, k_t, vb, vkh, key0, rows, block_kv, head_dim, zero):
    """S[r, s_col + j] = q_tile[r] . k[key0 + j] for the tile's rows and block_kv keys (k read from k_t)."""
    for ri, jj, d in T.grid(rows, block_kv, head_dim):
        with T.sblock("qk"):
            r, j, dd = T.axis.remap("SSR", [ri, jj, d])
            with T.init():
                S[r, s_col + j] = zero
            S[r, s_col + j] = S[r, s_col + j] + q_tile[r, dd] * k_t[vb, vkh, dd, key0 + j]


@T.macro
def softmax_weights(S, P, m, t_max, t_sum, alpha, key0, rows, block_kv, row0, sees, all_see, neg, zero, one, exp):
    """The online softmax's statistics for one KV tile of ``rows`` rows whose scores S against keys key0.. are
    computed: the tile's max, the running max m and the factor alpha = exp(m_old - m_new) that rescales what was
    summed so far, the weights P = exp(S - m_new) (in P's dtype) and their sum. ``exp`` is the exp of a score
    difference (scores computed unscaled take the scale there). ``sees(row0, r, j)`` says whether row r sees key
    j; ``all_see`` (a condition on the tile) that every row sees every key of the tile: such tiles (all but the
    diagonal, window-edge and last ones) skip the per-key test."""
    # all_see is one test per tile: T.if_then_else with a scalar condition branches around the per-key test
    # instead of selecting lane by lane.
    for ri, jj in T.grid(rows, block_kv):
        with T.sblock("tile_max"):
            r, j = T.axis.remap("SR", [ri, jj])
            with T.init():
                t_max[r] = neg
            t_max[r] = T.max(t_max[r], T.if_then_else(
                all_see, poisoned(S[r, j]), T.Select(sees(row0, r, key0 + j), poisoned(S[r, j]), neg)))
    for ri in range(rows):
        with T.sblock("rescale"):
            r = T.axis.spatial(rows, ri)
            alpha[r] = T.Select(m[r] >= t_max[r], one, exp(m[r] - t_max[r]))
            m[r] = T.max(m[r], t_max[r])
    for ri, jj in T.grid(rows, block_kv):
        with T.sblock("p"):
            r, j = T.axis.remap("SS", [ri, jj])
            P[r, j] = narrow(T.if_then_else(all_see, exp(S[r, j] - m[r]),
                                            T.Select(sees(row0, r, key0 + j), exp(S[r, j] - m[r]), zero)), P.dtype)
    for ri, jj in T.grid(rows, block_kv):
        with T.sblock("tile_sum"):
            r, j = T.axis.remap("SR", [ri, jj])
            with T.init():
                t_sum[r] = zero
            t_sum[r] = t_sum[r] + widen(P[r, j])


@T.macro
def softmax_weights_by_key(s_t, p_t, m, t_max, t_sum, alpha, key0, rows, block_kv, row0, sees, all_see, neg, zero,
                           one, exp, paired):
    """``softmax_weights`` on transposed scores s_t (key, row) into transposed weights p_t: the reductions over keys
    run down the columns, each row a vector lane. ``paired``: p_t holds (key / 2, row) BF16_PAIR words of the
    weights of keys 2i and 2i + 1 rounded to bfloat16, and the sum adds the rounded weights."""
    for jj, ri in T.grid(block_kv, rows):
        with T.sblock("tile_max"):
            j, r = T.axis.remap("RS", [jj, ri])
            with T.init():
                t_max[r] = neg
            t_max[r] = T.max(t_max[r], T.if_then_else(
                all_see, poisoned(s_t[j, r]), T.Select(sees(row0, r, key0 + j), poisoned(s_t[j, r]), neg)))
    for ri in range(rows):
        with T.sblock("rescale"):
            r = T.axis.spatial(rows, ri)
            alpha[r] = T.Select(m[r] >= t_max[r], one, exp(m[r] - t_max[r]))
            m[r] = T.max(m[r], t_max[r])
    if paired:
        for ii, ri in T.grid(block_kv // 2, rows):
            with T.sblock("p"):
                i, r = T.axis.remap("SS", [ii, ri])
                p_t[i, r] = T.if_then_else(
                    all_see, pair_of(exp(s_t[2 * i, r] - m[r]), exp(s_t[2 * i + 1, r] - m[r])),
                    pair_of(T.Select(sees(row0, r, key0 + 2 * i), exp(s_t[2 * i, r] - m[r]), zero),
                            T.Select(sees(row0, r, key0 + 2 * i + 1), exp(s_t[2 * i + 1, r] - m[r]), zero)))
        for ii, t, ri in T.grid(block_kv // 2, 2, rows):
            with T.sblock("tile_sum"):
                i, vt, r = T.axis.remap("RRS", [ii, t, ri])
                with T.init():
                    t_sum[r] = zero
                t_sum[r] = t_sum[r] + pair_half(p_t[i, r], vt)
    else:
        for jj, ri in T.grid(block_kv, rows):
            with T.sblock("p"):
                j, r = T.axis.remap("SS", [jj, ri])
                p_t[j, r] = T.if_then_else(all_see, exp(s_t[j, r] - m[r]),
                                           T.Select(sees(row0, r, key0 + j), exp(s_t[j, r] - m[r]), zero))
        for jj, ri in T.grid(block_kv, rows):
            with T.sblock("tile_sum"):
                j, r = T.axis.remap("RS", [jj, ri])
                with T.init():
                    t_sum[r] = zero
                t_sum[r] = t_sum[r] + p_t[j, r]


def online_softmax_state(rows, head_dim: int):
    """The online softmax's buffers, allocated in the enclosing block: (O: a tile's P V, m: the running max, t_max,
    t_sum: the tile's max and sum, alpha: the rescale factor, l: the running sum, acc: the running output)."""
    return (T.sblock_alloc_buffer((rows, head_dim), ACC), *(T.sblock_alloc_buffer((rows,), ACC) for _ in range(5)),
            T.sblock_alloc_buffer((rows, head_dim), ACC))


@T.macro
def init_online_softmax(m, l, acc, rows, head_dim, neg, zero):
    """The online softmax's state before the first KV tile: running max m = neg, running sum l = 0, acc = 0."""
    for ri in range(rows):
        with T.sblock("init_stats"):
            r = T.axis.spatial(rows, ri)
            m[r] = neg
            l[r] = zero
    for ri, d in T.grid(rows, head_dim):
        with T.sblock("init_acc"):
            r, dd = T.axis.remap("SS", [ri, d])
            acc[r, dd] = zero


@T.macro
def update_output(acc, O, alpha, l, t_sum, rows, head_dim, other=None, in_other=None):
    """acc = alpha acc + O and l = alpha l + the tile's sum: the tile's P V and weights added to the running ones.
    ``other``: a second buffer of the tile's P V, taken where the condition ``in_other`` holds (computed one of two
    ways, each into its own buffer)."""
    if other is None:
        for ri, d in T.grid(rows, head_dim):
            with T.sblock("update"):
                r, dd = T.axis.remap("SS", [ri, d])
                acc[r, dd] = acc[r, dd] * alpha[r] + O[r, dd]
    else:
        for ri, d in T.grid(rows, head_dim):
            with T.sblock("update"):
                r, dd = T.axis.remap("SS", [ri, d])
                acc[r, dd] = acc[r, dd] * alpha[r] + T.Select(in_other, other[r, dd], O[r, dd])
    for ri in range(rows):
        with T.sblock("update_sum"):
            r = T.axis.spatial(rows, ri)
            l[r] = l[r] * alpha[r] + t_sum[r]


@T.macro
def weighted_values(O, W, v, vb, vkh, key0, rows, block_kv, head_dim, seq_kv, zero):
    """O = W V over one KV tile (block "pv"): keys past seq_kv read the last row of v (their weight is 0)."""
    for ri, jj, d in T.grid(rows, block_kv, head_dim):
        with T.sblock("pv"):
            r, j, dd = T.axis.remap("SRS", [ri, jj, d])
            with T.init():
                O[r, dd] = zero
            O[r, dd] = O[r, dd] + W[r, j] * widen(v[vb, vkh, T.min(key0 + j, seq_kv - 1), dd])


@T.macro
def value_weights(weights, P, value_scale, rows, block_kv):
    """weights = P times the scale of each key's V row (integer V: value_scale, j -> the scale of key j)."""
    for ri, jj in T.grid(rows, block_kv):
        with T.sblock("value_weight"):
            r, j = T.axis.remap("SS", [ri, jj])
            weights[r, j] = P[r, j] * value_scale(j)


@T.macro
def online_softmax_tile(S, P, O, m, t_max, t_sum, alpha, l, acc, v, vb, vkh, key0, rows, block_kv, head_dim, seq_kv,
                        row0, sees, all_see, neg, zero, one, value_scale=None, weights=None):
    """One KV tile of the online softmax (FlashAttention-2) for ``rows`` rows whose scores S against keys key0..
    are computed: m (running max), l (running sum) and acc (unnormalized output) are rescaled by alpha =
    exp(m_old - m_new) and the tile's P = exp(S - m_new) and P V added (``softmax_weights`` says what sees and
    all_see are). Keys past seq_kv have P = 0 and read the last row of v (a predicate in pv, seq_kv being a
    run-time size, would stay in the micro-kernel's inner loop). ``value_scale`` (integer V: codes with a scale per
    key): j -> the scale of key key0 + j; P V then weighs each key by its weight times its scale, computed into
    ``weights`` (rows, block_kv) first."""
    softmax_weights(S, P, m, t_max, t_sum, alpha, key0, rows, block_kv, row0, sees, all_see, neg, zero, one,
                    softmax_exp)
    if value_scale is None:
        weighted_values(O, P, v, vb, vkh, key0, rows, block_kv, head_dim, seq_kv, zero)
    else:
        value_weights(weights, P, value_scale, rows, block_kv)
        weighted_values(O, weights, v, vb, vkh, key0, rows, block_kv, head_dim, seq_kv, zero)
    update_output(acc, O, alpha, l, t_sum, rows, head_dim)



# Pair products (AVX512-BF16 vdpbf16ps, NEON bfdot): a float32 lane accumulates a[2i] b[2i] + a[2i+1] b[2i+1] of
# two bfloat16 vectors, so each operand that lies along the lanes is stored with the pair of its reduction index
# adjacent: (reduction / 2, lanes, 2). The kernels computing this way pack K and V once per call.
@T.macro
def pack_k_pairs(k, k_p, batch, kv_heads, head_dim, seq_kv, padded):
    """k_p[b, kh, p, j, t] = k[b, kh, j, 2p + t] (BF16_BITS), zero past seq_kv: keys along the lanes of the QK^T
    tiles, each with a pair of head dims."""
    for b, kh, p, j, t in T.grid(batch, kv_heads, head_dim // 2, padded, 2):
        with T.sblock("k_t"):
            vb, vkh, vp, vj, vt = T.axis.remap("SSSSS", [b, kh, p, j, t])
            k_p[vb, vkh, vp, vj, vt] = T.if_then_else(
                vj < seq_kv, bits_of(k[vb, vkh, T.min(vj, seq_kv - 1), vp * 2 + vt]), T.uint16(0))


@T.macro
def pack_v_pairs(v, v_p, batch, kv_heads, head_dim, seq_kv, padded):
    """v_p[b, kh, i, d, t] = v[b, kh, 2i + t, d] (BF16_BITS), zero past seq_kv: head dims along the lanes of the
    P V tiles, each with a pair of keys."""
    for b, kh, i, t, d in T.grid(batch, kv_heads, padded // 2, 2, head_dim):
        with T.sblock("v_p"):
            vb, vkh, vi, vt, vd = T.axis.remap("SSSSS", [b, kh, i, t, d])
            v_p[vb, vkh, vi, vd, vt] = T.if_then_else(
                vi * 2 + vt < seq_kv, bits_of(v[vb, vkh, T.min(vi * 2 + vt, seq_kv - 1), vd]), T.uint16(0))


@T.macro
def qk_tile_pairs(S, q_tile, k_p, vb, vkh, key0, rows, block_kv, head_dim, zero):
    """S[r, j] = q_tile[r] . k[key0 + j] with k read from k_p (pack_k_pairs), in pair products."""
    for ri, jj, p, t in T.grid(rows, block_kv, head_dim // 2, 2):
        with T.sblock("qk"):
            r, j, vp, vt = T.axis.remap("SSRR", [ri, jj, p, t])
            with T.init():
                S[r, j] = zero
            S[r, j] = S[r, j] + widen(q_tile[r, vp * 2 + vt]) * widen(k_p[vb, vkh, vp, key0 + j, vt])


@T.macro
def pv_tile_pairs(O, P, v_p, vb, vkh, key0, rows, block_kv, head_dim, zero):
    """O = P v for keys key0.. (key0 even) with v read from v_p (pack_v_pairs), in pair products."""
    for ri, ii, d, t in T.grid(rows, block_kv // 2, head_dim, 2):
        with T.sblock("pv"):
            r, i, dd, vt = T.axis.remap("SRSR", [ri, ii, d, t])
            with T.init():
                O[r, dd] = zero
            O[r, dd] = O[r, dd] + widen(P[r, i * 2 + vt]) * widen(v_p[vb, vkh, key0 // 2 + i, dd, vt])


# The row-tile blocks of the materialized-score variants (standard, threshold, topk, mass): one tile of query rows
# of one head, its scores S over the whole (padded) key range in a (rows, padded) buffer.
LANES = 16  # partial results per row reduction; BLOCK_KV is a multiple


@T.macro
def load_q_rows(q_tile, q, vb, vh, row0, rows, seq_q, head_dim, scale, zero):
    """q_tile[r] = scale * q[row0 + r] as float32, zero past seq_q."""
    for ri, d in T.grid(rows, head_dim):
        with T.sblock("q_tile"):
            r, dd = T.axis.remap("SS", [ri, d])
            q_tile[r, dd] = T.if_then_else(row0 + r < seq_q, widen(q[vb, vh, T.min(row0 + r, seq_q - 1), dd]) * scale,
                                            zero)


def computed_tiles(vis, row0, rows, seq_q, n_tiles, block_kv):
    """One past the last KV tile scores_of_rows computes for rows row0.. (the tiles after it are never read)."""
    return T.min(vis.end_tile(T.min(row0 + rows, seq_q) - 1, block_kv), n_tiles)


@T.macro
def scores_of_rows(S, q_tile, k_t, vb, vkh, row0, rows, seq_q, n_tiles, block_kv, head_dim, vis, zero):
    """S = q_tile k^T over the KV tiles some row of the tile sees; other tiles of S are left unwritten."""
    # Tiles before the window are skipped by a test rather than a loop start: TVM's buffer compaction cannot bound
    # S's region when the loop starts at a run-time tile.
    for t in range(computed_tiles(vis, row0, rows, seq_q, n_tiles, block_kv)):
        with T.sblock("kv_tile"):
            vt = T.axis.opaque(n_tiles, t)
            if vt >= vis.first_tile(row0, block_kv):
                qk_tile(S, vt * block_kv, q_tile, k_t, vb, vkh, vt * block_kv, rows, block_kv, head_dim, zero)


@T.macro
def row_max_of_scores(S, max_part, row_max, row0, rows, padded, vis, neg):
    """row_max[r] = max of poisoned S[r, j] over the keys row0 + r sees (neg when none), in LANES lane-wise partials
    (lane l covers keys l, l + LANES, ...) so it vectorizes: LLVM will not reassociate a scalar float reduction."""
    for ri, c, lane in T.grid(rows, padded // LANES, LANES):
        with T.sblock("row_max_part"):
            r, vc, vl = T.axis.remap("SRS", [ri, c, lane])
            with T.init():
                max_part[r, vl] = neg
            max_part[r, vl] = T.max(max_part[r, vl], T.Select(vis.sees(row0 + r, vc * LANES + vl),
                                                              poisoned(S[r, vc * LANES + vl]), neg))
    for ri, lane in T.grid(rows, LANES):
        with T.sblock("row_max"):
            r, vl = T.axis.remap("SR", [ri, lane])
            with T.init():
                row_max[r] = neg
            row_max[r] = T.max(row_max[r], max_part[r, vl])


@T.macro
def softmax_numerators(S, E, row_max, sum_part, row_sum, row0, rows, padded, vis, zero):
    """E[r, j] = exp(S[r, j] - row_max[r]) where row0 + r sees key j, else 0; row_sum[r] = sum_j E[r, j]."""
    for ri, c, lane in T.grid(rows, padded // LANES, LANES):
        with T.sblock("exp"):
            r, vc, vl = T.axis.remap("SSS", [ri, c, lane])
            E[r, vc * LANES + vl] = T.Select(vis.sees(row0 + r, vc * LANES + vl),
                                             softmax_exp(S[r, vc * LANES + vl] - row_max[r]), zero)
    for ri, c, lane in T.grid(rows, padded // LANES, LANES):
        with T.sblock("row_sum_part"):
            r, vc, vl = T.axis.remap("SRS", [ri, c, lane])
            with T.init():
                sum_part[r, vl] = zero
            sum_part[r, vl] = sum_part[r, vl] + E[r, vc * LANES + vl]
    for ri, lane in T.grid(rows, LANES):
        with T.sblock("row_sum"):
            r, vl = T.axis.remap("SR", [ri, lane])
            with T.init():
                row_sum[r] = zero
            row_sum[r] = row_sum[r] + sum_part[r, vl]


LANE_SUM_LANES = 16  # the partial sums of a dot product that sum_lanes adds up


@T.macro
def sum_lanes(part, half8, half4, half2, S, rows, keys, score):
    """S[r, j] = score(the sum of part[r, j, 0:16], r, j), the 16 partial sums of a dot product added pairwise (a
    tree: LLVM will not reorder a float sum) through half8, half4 and half2."""
    for g, jj, lane in T.grid(rows, keys, 8):
        with T.sblock("qk_half8"):
            vg, j, vl = T.axis.remap("SSS", [g, jj, lane])
            half8[vg, j, vl] = part[vg, j, vl] + part[vg, j, vl + 8]
    for g, jj, lane in T.grid(rows, keys, 4):
        with T.sblock("qk_half4"):
            vg, j, vl = T.axis.remap("SSS", [g, jj, lane])
            half4[vg, j, vl] = half8[vg, j, vl] + half8[vg, j, vl + 4]
    for g, jj, lane in T.grid(rows, keys, 2):
        with T.sblock("qk_half2"):
            vg, j, vl = T.axis.remap("SSS", [g, jj, lane])
            half2[vg, j, vl] = half4[vg, j, vl] + half4[vg, j, vl + 2]
    for g, jj in T.grid(rows, keys):
        with T.sblock("qk"):
            vg, j = T.axis.remap("SS", [g, jj])
            S[vg, j] = score(half2[vg, j, 0] + half2[vg, j, 1], vg, j)


@T.macro
def merge_chunks(m_part, l_part, o_part, merged_max, weight, merged_sum, merged_acc, sinks, out, batch, heads,
                 seq_q, chunks, group, head_dim, dtype, neg, zero):
    """Split-KV's second step: out[b, h, i] from the chunks' running max, sum and unnormalized output of query i
    of head h (m_part, l_part: (batch, kv_heads, chunks, seq_q, group), o_part the same by head_dim), each chunk
    weighted by e^(its max - the largest); merged_max, weight, merged_sum and merged_acc are scratch."""
    for b, h, i, s in T.grid(batch, heads, seq_q, chunks):
        with T.sblock("merge_max"):
            vb, vh, vi, vs = T.axis.remap("SSSR", [b, h, i, s])
            with T.init():
                merged_max[vb, vh, vi] = neg
            merged_max[vb, vh, vi] = T.max(merged_max[vb, vh, vi], m_part[vb, vh // group, vs, vi, vh % group])
    for b, h, i, s in T.grid(batch, heads, seq_q, chunks):
        with T.sblock("merge_weight"):
            vb, vh, vi, vs = T.axis.remap("SSSS", [b, h, i, s])
            weight[vb, vh, vi, vs] = softmax_exp(m_part[vb, vh // group, vs, vi, vh % group] - merged_max[vb, vh, vi])
    for b, h, i, s in T.grid(batch, heads, seq_q, chunks):
        with T.sblock("merge_sum"):
            vb, vh, vi, vs = T.axis.remap("SSSR", [b, h, i, s])
            with T.init():
                merged_sum[vb, vh, vi] = zero
            merged_sum[vb, vh, vi] = merged_sum[vb, vh, vi] + \
                l_part[vb, vh // group, vs, vi, vh % group] * weight[vb, vh, vi, vs]
    for b, h, i, d, s in T.grid(batch, heads, seq_q, head_dim, chunks):
        with T.sblock("merge_acc"):
            vb, vh, vi, vd, vs = T.axis.remap("SSSSR", [b, h, i, d, s])
            with T.init():
                merged_acc[vb, vh, vi, vd] = zero
            merged_acc[vb, vh, vi, vd] = merged_acc[vb, vh, vi, vd] + \
                o_part[vb, vh // group, vs, vi, vh % group, vd] * weight[vb, vh, vi, vs]
    for b, h, i, d in T.grid(batch, heads, seq_q, head_dim):
        with T.sblock("out"):
            vb, vh, vi, vd = T.axis.remap("SSSS", [b, h, i, d])
            out[vb, vh, vi, vd] = row_output(merged_acc[vb, vh, vi, vd], merged_sum[vb, vh, vi],
                                             merged_max[vb, vh, vi], dtype, sink_logit(sinks, vh))


def macro_state(wrapper):
    """The TVMScript macro object behind a ``@T.macro`` function (the decorator returns a closure over it)."""
    for cell in wrapper.__closure__ or ():
        if hasattr(cell.cell_contents, "call_count"):
            return cell.cell_contents
    raise RuntimeError(f"{wrapper.__name__}: this TVM's T.macro keeps no call_count; see fresh_block_names")


MACROS = tuple(macro_state(m) for m in (transpose_k, qk_tile, softmax_weights, init_online_softmax, update_output,
                                         online_softmax_tile, pack_k_pairs, pack_v_pairs, qk_tile_pairs, pv_tile_pairs,
                                         load_q_rows, scores_of_rows, row_max_of_scores, softmax_numerators, sum_lanes,
                                         weighted_values, value_weights, adjust_scores, merge_chunks,
                                         softmax_weights_by_key))


def _find_parser_def(self):
    """ScriptMacro._find_parser_def (the parser a macro call expands into: the first outer frame whose globals hold
    it) without inspect.getouterframes, which reads the source lines of every outer frame at each macro call: with
    torch imported, 26.7 s of the 38 s that parsing 32 kernels took (TVM 0.27)."""
    frame = inspect.currentframe()
    while frame is not None:
        parser = frame.f_globals.get(ScriptMacro.parser_object_name)
        if parser is not None:
            return parser
        frame = frame.f_back
    raise RuntimeError(f"{ScriptMacro.parser_object_name} not available")


ScriptMacro._find_parser_def = _find_parser_def


def fresh_block_names() -> None:
    """Call at the start of every compute: TVMScript suffixes the block names of a macro's second and later
    invocations (qk_1, qk_2, ...) with a counter that lives on the macro, across PrimFuncs. Each of our computes
    invokes each macro once, so its blocks keep the names the schedules look up."""
    for m in MACROS:
        m.call_count = 0
