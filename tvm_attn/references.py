"""Float64 numpy references: the definition of every variant's output.

Rows with no visible key (causal with seq_q > seq_kv) output 0, as in FlashAttention.
Sinks (``sinks``, one finite logit per query head, gpt-oss'): each row's softmax has one more term, e^sink, in its
denominator, a key every row sees that has no value; it is not softcapped. A row with no visible key still outputs 0.
The pruned variants keep the sink as a key that is never dropped: threshold compares the weights of the softmax with
the sink, top-k keeps top_k keys besides it, mass counts its weight first (keeping no key when it alone holds
1 - eps), bounded counts it on the kept side of its certificate, and each renormalizes over the kept keys and the
sink.
A sliding window (``spec.window``) and a tree mask (``spec.tree_parents``: a tree node sees the keys before the tree,
its ancestors and itself) only narrow the visible keys: every variant prunes within them.

NaN and Inf, for kernels and references alike (IEEE arithmetic's answer, and torch SDPA's): a row that reads a NaN
or +Inf score among its visible keys is NaN in every element, whatever a pruned variant would have kept; a -Inf
score is a masked key (a row of only -Inf scores outputs 0). A NaN or Inf in v reaches the output elements of the
rows that give its key a weight > 0; the dense kernels also multiply the values of keys a row does not weigh by 0
(0 x NaN = NaN, as torch's math SDPA does), so such elements may be NaN where this reference is finite, never the
other way round. Scores are float64 here and float32 in the kernels: finite inputs whose scores overflow float32 are
outside the rule.
"""

from __future__ import annotations

import numpy as np

from . import certificate
from .spec import AttentionSpec


def scores(spec: AttentionSpec, q, k) -> np.ndarray:
    """scale * q k^T in float64, shape (batch, heads, seq_q, seq_kv), KV heads broadcast over their group; with
    ``spec.softcap``, softcap * tanh(that / softcap) (+-Inf scores become +-softcap); with ``spec.alibi_slopes``,
    then minus each head's slope times the query's position minus the key's (``spec.positions``: i + seq_kv - seq_q
    and j; a tree node's by its depth)."""
    q64 = np.asarray(q, dtype=np.float64)
    k64 = np.repeat(np.asarray(k, dtype=np.float64), spec.group_size, axis=1)
    return _adjusted(spec, spec.scale * (q64 @ k64.swapaxes(-1, -2)))


def _adjusted(spec: AttentionSpec, s: np.ndarray) -> np.ndarray:
    """Scaled scores s (batch, heads, seq_q, seq_kv) softcapped, then with the ALiBi biases, as ``spec`` says."""
    if spec.softcap is not None:
        s = spec.softcap * np.tanh(s / spec.softcap)
    if spec.alibi_slopes is not None:
        queries, keys = spec.positions()
        s = s - np.asarray(spec.alibi_slopes, np.float64)[:, None, None] * (queries[:, None] - keys[None, :])
    return s


def visible_mask(spec: AttentionSpec) -> np.ndarray:
    """(seq_q, seq_kv) bool: which keys each query row sees."""
    return spec.visible_mask()


def poisoned_rows(spec: AttentionSpec, s: np.ndarray) -> np.ndarray:
    """(..., seq_q, 1) bool: rows that read a NaN or +Inf score among their visible keys (NaN rows, by the rule)."""
    return (visible_mask(spec) & ~(s < np.inf)).any(axis=-1, keepdims=True)


def softmax_weights(spec: AttentionSpec, s: np.ndarray, sinks=None) -> np.ndarray:
    """Row softmax over the visible keys (and the row's head's sink logit, ``sinks``, in the denominator); masked
    keys (-Inf scores too) and empty rows get weight 0, rows that read a NaN or +Inf score NaN."""
    return _softmax(spec, s, sinks)[0]


def _softmax(spec: AttentionSpec, s: np.ndarray, sinks) -> tuple[np.ndarray, np.ndarray]:
    live = visible_mask(spec) & (s > -np.inf)
    masked = np.where(live & (s < np.inf), s, -np.inf)
    row_max = masked.max(axis=-1, keepdims=True)
    sink = None if sinks is None else np.asarray(sinks, np.float64)[:, None, None]  # (heads, 1, 1)
    if sink is not None:
        row_max = np.maximum(row_max, sink)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    e = np.where(live, np.exp(masked - row_max), 0.0)
    e_sink = np.zeros_like(row_max) if sink is None else np.exp(sink - row_max)
    total = e.sum(axis=-1, keepdims=True) + e_sink
    w = np.divide(e, total, out=np.zeros_like(e), where=total > 0)
    w_sink = np.divide(e_sink, total, out=np.zeros_like(e_sink), where=total > 0)
    poisoned = poisoned_rows(spec, s)
    return np.where(poisoned, np.nan, w), np.where(poisoned, np.nan, w_sink)


def _weighted_sum(spec: AttentionSpec, w: np.ndarray, v, sink_weight=0.0) -> np.ndarray:
    """Renormalize w over each row, with the row's sink weighing ``sink_weight`` (NaN rows stay NaN), and sum the
    values of the keys weighing > 0."""
    total = w.sum(axis=-1, keepdims=True) + sink_weight
    w = np.divide(w, total, out=np.where(np.isnan(total), np.nan, np.zeros_like(w)), where=total > 0)
    v64 = np.repeat(np.asarray(v, dtype=np.float64), spec.group_size, axis=1)
    finite = np.isfinite(v64)
    if finite.all():
        return w @ v64
    # Keys of weight 0 are not read: the non-finite values reach only the rows that weigh their keys.
    out = w @ np.where(finite, v64, 0.0)
    weighs = np.where(w > 0, 1.0, 0.0)
    nan_in = (weighs @ np.isnan(v64) > 0) | ((weighs @ (v64 == np.inf) > 0) & (weighs @ (v64 == -np.inf) > 0))
    out = np.where(weighs @ (v64 == np.inf) > 0, np.inf, out)
    out = np.where(weighs @ (v64 == -np.inf) > 0, -np.inf, out)
    return np.where(nan_in | np.isnan(w).any(axis=-1, keepdims=True), np.nan, out)


def dense(spec: AttentionSpec, q, k, v, sinks=None) -> np.ndarray:
    """softmax(scale * q k^T) v over the visible keys (standard, flash and mqa); ``sinks``: (heads,) logits."""
    w, w_sink = _softmax(spec, scores(spec, q, k), sinks)
    return _weighted_sum(spec, w, v, w_sink)


def threshold_keep(spec: AttentionSpec, s: np.ndarray, sinks=None) -> np.ndarray:
    """Keys kept by threshold pruning: weight >= threshold (in the softmax with the sinks), plus every key holding
    the row's largest weight."""
    vis = visible_mask(spec)
    p = softmax_weights(spec, s, sinks)
    row_max = np.where(vis, s, -np.inf).max(axis=-1, keepdims=True)
    return vis & ((p >= spec.threshold) | (s == row_max))


def threshold(spec: AttentionSpec, q, k, v, sinks=None) -> np.ndarray:
    """Softmax weights below the threshold dropped (the row's largest always kept), then renormalized."""
    s = scores(spec, q, k)
    w, w_sink = _softmax(spec, s, sinks)
    return _weighted_sum(spec, w * threshold_keep(spec, s, sinks), v, w_sink)


def topk_keep(spec: AttentionSpec, s: np.ndarray) -> np.ndarray:
    """Keys kept by top-k: the top_k largest visible scores of each row, ties to the lower key index."""
    vis = visible_mask(spec)
    # A stable sort of -s orders equal scores by key index; masked keys sort last and are dropped below.
    order = np.argsort(np.where(vis, -s, np.inf), axis=-1, kind="stable")[..., : spec.top_k]
    keep = np.zeros(s.shape, dtype=bool)
    np.put_along_axis(keep, order, True, axis=-1)
    return keep & vis


def topk(spec: AttentionSpec, q, k, v, sinks=None) -> np.ndarray:
    """Softmax over the top_k largest scores of each row (dense when top_k >= the visible keys)."""
    s = scores(spec, q, k)
    w, w_sink = _softmax(spec, s, sinks)
    return _weighted_sum(spec, w * topk_keep(spec, s), v, w_sink)


def mass_keep(spec: AttentionSpec, s: np.ndarray, sinks=None) -> np.ndarray:
    """Keys kept by mass pruning: the shortest prefix of the row's weights in descending order (ties to the lower
    key index) whose sum, with the sink's weight, is >= 1 - eps."""
    vis = visible_mask(spec)
    p, p_sink = _softmax(spec, s, sinks)
    order = np.argsort(np.where(vis, -s, np.inf), axis=-1, kind="stable")
    cumulative = np.cumsum(np.take_along_axis(p, order, axis=-1), axis=-1)
    # Key number n of the order is kept when the keys before it hold less than 1 - eps.
    before = cumulative - np.take_along_axis(p, order, axis=-1) + p_sink
    keep = np.zeros(s.shape, dtype=bool)
    np.put_along_axis(keep, order, before < 1.0 - spec.eps, axis=-1)
    return keep & vis


def mass(spec: AttentionSpec, q, k, v, sinks=None) -> np.ndarray:
    """Softmax restricted to the fewest largest weights holding 1 - eps of the row's mass, renormalized.

    Error bound: with P >= 1 - eps the kept mass, dense = P a + (1 - P) b where a (this output) and b are the
    weighted means of v over the kept and the dropped keys, so |a - dense| = (1 - P) |a - b| <= 2 eps max_j |v_j|
    per element.
    """
    s = scores(spec, q, k)
    w, w_sink = _softmax(spec, s, sinks)
    return _weighted_sum(spec, w * mass_keep(spec, s, sinks), v, w_sink)


def shadow_bounds(spec: AttentionSpec, q, k) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) bounds of every score (``scores``) from the int8 shadow of k (``shadow``), in float64, each
    (batch, heads, seq_q, seq_kv): the upper bound s^ + radius softcapped and biased as the score is (``scores``),
    and the lower bound that minus 2 radius (s^ - radius without either; softcapping moves no two scores farther
    apart), as the kernels take them."""
    codes, lo, step = certificate.quantize(k)
    block = np.arange(spec.seq_kv) // certificate.BLOCK
    k_hat = lo[:, :, block].astype(np.float64) + step[:, :, block].astype(np.float64) * codes
    q64 = spec.scale * np.asarray(q, dtype=np.float64)
    s_hat = q64 @ np.repeat(k_hat, spec.group_size, axis=1).swapaxes(-1, -2)
    lo64, step64 = (np.repeat(x.astype(np.float64), spec.group_size, axis=1) for x in (lo, step))
    width = 0.5 * step64 + certificate.margin(spec.head_dim) * (np.abs(lo64) + certificate.LEVELS * step64)
    radius = (np.abs(q64) @ width.swapaxes(-1, -2))[..., block]
    upper = _adjusted(spec, s_hat + radius)
    return upper - 2 * radius, upper


def bounded_keep(spec: AttentionSpec, q, k, sinks=None) -> np.ndarray:
    """Keys kept by the bounded variant: those whose shadow upper bound lies within the fewest CUT_STEP bins below
    the row's top bound that certify the rest hold at most eps of the row's softmax mass, the sink's (``sinks``:
    the (heads,) logits) included (``shadow``'s rule)."""
    vis = visible_mask(spec)
    lower, upper = shadow_bounds(spec, q, k)
    # A NaN or +Inf bound (a NaN or Inf in q or in a block of k): nothing is certified, every visible key is kept.
    unbounded = (vis & ~(upper < np.inf)).any(axis=-1, keepdims=True)
    top = np.where(vis & ~unbounded, upper, -np.inf).max(axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    bins = np.where(vis, np.where(unbounded, 0, np.minimum(np.floor((top - upper) / certificate.CUT_STEP),
                                                           certificate.CUT_STEPS)), certificate.CUT_STEPS + 1)
    e_upper = np.where(vis, np.exp(upper - top), 0.0)
    e_lower = np.where(vis, np.exp(lower - top), 0.0)
    e_sink = 0.0 if sinks is None else np.exp(np.asarray(sinks, np.float64)[:, None, None] - top)
    budget = certificate.CERTIFY * spec.eps / (1.0 - spec.eps)
    chosen = np.full(top.shape, certificate.CUT_STEPS + 1)  # none certifies: every visible key
    for n in range(certificate.CUT_STEPS, 0, -1):
        kept = bins < n
        certified = (np.where(kept, 0.0, e_upper).sum(axis=-1, keepdims=True)
                     <= budget * (np.where(kept, e_lower, 0.0).sum(axis=-1, keepdims=True) + e_sink))
        chosen = np.where(certified, n, chosen)
    return bins < chosen


def bounded(spec: AttentionSpec, q, k, v, sinks=None) -> np.ndarray:
    """Softmax over a set of keys certified from the int8 shadow of K to hold >= 1 - eps of the row's mass (with the
    sink's), renormalized with the sink, with exact scores; |out - dense| <= 2 eps max|v| per element (as for
    mass)."""
    w, w_sink = _softmax(spec, scores(spec, q, k), sinks)
    return _weighted_sum(spec, w * bounded_keep(spec, q, k, sinks), v, w_sink)
