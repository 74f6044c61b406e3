"""The shape-and-knob spec every kernel is built for, and the checks on user input."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import numbers

import numpy as np

DTYPE = "float32"  # the default
# The dtypes of q, k, v and the output; 16-bit ones are converted to float32 on load, and scores, softmax statistics
# and accumulators are float32 for every dtype.
DTYPES = ("float32", "float16", "bfloat16")
DTYPE_TAGS = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
KV_DTYPES = ("int8",)  # integer K and V (tvm_attn/quantized_kv.py), read by the kernels of an integer KVCache
KNOBS = ("threshold", "top_k", "eps")  # the pruning knobs: at most one is set, by the variant that uses it
INT32_MAX = 2**31 - 1  # kernels index and count in int32: sizes, top_k and each argument's element count


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """Shapes (layout BHSD) and semantic knobs of one attention call.

    q is (batch, heads, seq_q, head_dim); k and v are (batch, kv_heads, seq_kv, head_dim). Query head h reads
    KV head h // (heads // kv_heads). ``causal`` aligns the mask bottom-right: query i sees keys
    j <= i + (seq_kv - seq_q). ``window`` (needs causal) also hides keys j <= i + (seq_kv - seq_q) - window, so
    each query sees at most ``window`` keys, as in Mistral's sliding window. ``scale`` None means 1/sqrt(head_dim).
    ``threshold`` and ``top_k`` are the pruning knobs of the variants of the same names, ``eps`` the mass
    variant's, and are None elsewhere. ``dtype`` (one of DTYPES) is that of q, k, v and the output; computation is
    float32 for every dtype. ``kv_dtype`` "int8": K and V are int8 codes with a float32 scale per row (an integer
    KVCache's, ``tvm_attn.quantized_kv``). ``softcap`` (logit softcapping, Gemma 2): each score s = scale q.k
    becomes softcap * tanh(s / softcap) before the mask and the softmax. ``sinks`` (gpt-oss' learned attention
    sinks): the call passes one logit per query head, which joins each row's softmax denominator as a key that has no
    value (the logits are a run-time argument, ``sink_logits``). ``alibi_slopes`` (ALiBi: BLOOM, MPT): one slope per
    query head (any sequence of floats, kept as float32-rounded floats); each score of query i and key j, after
    softcapping, gains -slope * (i + seq_kv - seq_q - j), the slope times the distance from the query's position
    back to the key. ``tree_parents`` (needs causal; speculative decoding's draft trees): the seq_q query rows are the
    nodes of a tree whose keys are the last seq_q keys, in the same order; entry i is the parent of node i, an earlier
    node (< i) or -1 for a node whose parent is the last key before the tree. Row i then sees the keys before the tree
    and the keys of its ancestors and itself (``tree_mask``); a chain (parent i - 1) is the causal mask. A node's
    position is seq_kv - seq_q plus its depth (``positions``): windows and ALiBi distances count in positions, as
    for the node's root-to-node path run as its own sequence. The kernels take the mask as a run-time argument
    (KernelSpec.tree). A compiled kernel serves every batch, seq_q and seq_kv of its ``kernel``.
    """

    batch: int = 2
    heads: int = 8
    kv_heads: int | None = None
    seq_q: int = 512
    seq_kv: int | None = None
    head_dim: int = 64
    causal: bool = False
    window: int | None = None
    scale: float | None = None
    threshold: float | None = None
    top_k: int | None = None
    eps: float | None = None
    dtype: str = DTYPE
    kv_dtype: str | None = None
    softcap: float | None = None
    sinks: bool = False
    alibi_slopes: tuple | None = None
    tree_parents: tuple | None = None

    def __post_init__(self):
        # Fill the derived defaults so equal specs hash equal (kernels are cached on the spec).
        if self.kv_heads is None:
            object.__setattr__(self, "kv_heads", self.heads)
        if self.seq_kv is None:
            object.__setattr__(self, "seq_kv", self.seq_q)
        for name in ("batch", "heads", "kv_heads", "seq_q", "seq_kv", "head_dim"):
            object.__setattr__(self, name, positive_int(name, getattr(self, name)))
        for name, shape in (("q", self.q_shape), ("k and v", self.kv_shape)):
            if math.prod(shape) > INT32_MAX:
                raise ValueError(f"{name} would have {math.prod(shape)} elements {shape}: the kernels index in "
                                 f"int32, at most {INT32_MAX} elements per argument (split the batch)")
        if self.heads % self.kv_heads:
            raise ValueError(
                f"heads={self.heads} is not a multiple of kv_heads={self.kv_heads}"
            )
        if not isinstance(self.causal, (bool, np.bool_)):
            raise TypeError(f"causal must be a bool, got {self.causal!r}")
        object.__setattr__(self, "causal", bool(self.causal))
        if self.window is not None:
            if isinstance(self.window, bool) or not isinstance(self.window, numbers.Integral):
                raise TypeError(f"window must be an int or None, got {self.window!r}")
            if self.window < 1:
                raise ValueError(f"window must be >= 1, got {self.window}")
            if not self.causal:
                raise ValueError(f"window={self.window} needs causal=True (a sliding window looks back from each "
                                 f"query)")
            object.__setattr__(self, "window", int(self.window))
        if self.dtype not in DTYPES:
            raise TypeError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.kv_dtype is not None and self.kv_dtype not in KV_DTYPES:
            raise TypeError(f"kv_dtype must be None (K and V of dtype) or one of {', '.join(KV_DTYPES)}, got "
                            f"{self.kv_dtype!r}")
        if self.scale is None:
            object.__setattr__(self, "scale", 1.0 / math.sqrt(self.head_dim))
        elif not _is_real(self.scale) or not math.isfinite(self.scale) or self.scale == 0:
            raise ValueError(f"scale must be a finite non-zero number, got {self.scale!r}")
        object.__setattr__(self, "scale", float(self.scale))
        if self.softcap is not None:
            if not _is_real(self.softcap) or not math.isfinite(self.softcap) or self.softcap <= 0:
                raise ValueError(f"softcap must be a finite number > 0 (or None), got {self.softcap!r}")
            object.__setattr__(self, "softcap", float(self.softcap))
        if not isinstance(self.sinks, (bool, np.bool_)):
            raise TypeError(f"sinks must be a bool (whether the call passes sink logits), got {self.sinks!r}")
        object.__setattr__(self, "sinks", bool(self.sinks))
        if self.alibi_slopes is not None:
            object.__setattr__(self, "alibi_slopes", alibi_slopes(self.alibi_slopes, self.heads))
        if self.tree_parents is not None:
            object.__setattr__(self, "tree_parents", tree_parents(self.tree_parents, self.seq_q))
            if not self.causal:
                raise ValueError("tree_parents needs causal=True (a tree mask narrows the causal mask: each node sees "
                                 "the keys before the tree and its ancestors)")
            if self.seq_kv < self.seq_q:
                raise ValueError(f"tree_parents: the tree's {self.seq_q} nodes are the last keys, but there are only "
                                 f"seq_kv={self.seq_kv} keys (pass the tree's own k and v after the cached ones)")
        given = {k: getattr(self, k) for k in KNOBS if getattr(self, k) is not None}
        if len(given) > 1:
            raise ValueError(f"give at most one pruning knob, got {', '.join(f'{k}={v!r}' for k, v in given.items())}")
        if self.threshold is not None:
            if not _is_real(self.threshold) or not 0.0 < self.threshold < 1.0:
                raise ValueError(f"threshold must be in (0, 1), got {self.threshold!r}")
            object.__setattr__(self, "threshold", float(self.threshold))
        if self.top_k is not None:
            if isinstance(self.top_k, bool) or not isinstance(self.top_k, numbers.Integral):
                raise TypeError(f"top_k must be an int, got {self.top_k!r}")
            if self.top_k < 1:
                raise ValueError(f"top_k must be >= 1, got {self.top_k}")
            if self.top_k > INT32_MAX:
                raise ValueError(f"top_k must be at most {INT32_MAX} (the kernels count in int32), got {self.top_k}")
            object.__setattr__(self, "top_k", int(self.top_k))
        if self.eps is not None:
            if not _is_real(self.eps) or not 0.0 < self.eps < 1.0:
                raise ValueError(f"eps must be in (0, 1), got {self.eps!r}")
            object.__setattr__(self, "eps", float(self.eps))

    @property
    def kernel(self) -> "KernelSpec":
        """What a compiled kernel is specialized for: everything but batch, seq_q and seq_kv."""
        return KernelSpec(self.heads, self.kv_heads, self.head_dim, self.causal, self.window, self.scale,
                          self.threshold, self.top_k, self.eps, self.dtype, self.kv_dtype, self.softcap, self.sinks,
                          self.alibi_slopes, self.tree_parents is not None)

    def knobs(self) -> dict:
        """The pruning knob that is set, as {name: value} (empty for dense variants)."""
        return {k: getattr(self, k) for k in KNOBS if getattr(self, k) is not None}

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.heads // self.kv_heads

    @property
    def causal_offset(self) -> int:
        """Query i sees keys j <= i + causal_offset when causal."""
        return self.seq_kv - self.seq_q

    @property
    def q_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.heads, self.seq_q, self.head_dim)

    @property
    def kv_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.kv_heads, self.seq_kv, self.head_dim)

    @property
    def tree_mask(self) -> np.ndarray | None:
        """(seq_q, seq_q) int32, read-only: 1 + the depth of node j where tree node i sees it (j is i or one of its
        ancestors), else 0; None without a tree: what the kernels of KernelSpec.tree take, after q, k, v (and the
        sink logits)."""
        return None if self.tree_parents is None else ancestor_mask(self.tree_parents)

    def positions(self) -> tuple[np.ndarray, np.ndarray]:
        """(the position of each query row, of each key): i + seq_kv - seq_q and j, bottom-right aligned; a tree
        node's is seq_kv - seq_q plus its depth (as a query and as a key)."""
        queries, keys = np.arange(self.seq_q) + self.causal_offset, np.arange(self.seq_kv)
        if self.tree_parents is not None:
            queries = self.causal_offset + self.tree_mask.diagonal().astype(np.int64) - 1
            keys = np.concatenate([keys[:self.causal_offset], queries])
        return queries, keys

    def visible_range(self, i: int) -> tuple[int, int]:
        """The keys lo..hi-1 query row i sees (lo = hi when none; a tree mask hides some of them)."""
        if not self.causal:
            return 0, self.seq_kv
        hi = min(self.seq_kv, max(0, i + self.causal_offset + 1))
        lo = 0 if self.window is None else min(hi, max(0, i + self.causal_offset + 1 - self.window))
        return lo, hi

    def visible_mask(self) -> np.ndarray:
        """(seq_q, seq_kv) bool: which keys each query row sees (by ``positions``: causal, window; a tree node sees
        the keys before the tree and its ancestors, itself included)."""
        if not self.causal:
            return np.ones((self.seq_q, self.seq_kv), dtype=bool)
        queries, keys = self.positions()
        visible = keys[None, :] <= queries[:, None]
        if self.tree_parents is not None:
            visible[:, self.causal_offset:] = self.tree_mask > 0
        if self.window is not None:
            visible &= keys[None, :] > queries[:, None] - self.window
        return visible

    def visible_keys(self, i: int) -> int:
        """How many keys query row i sees."""
        if self.tree_parents is not None:
            return int(self.visible_mask()[i].sum())
        lo, hi = self.visible_range(i)
        return hi - lo

    def dense_flops(self) -> int:
        """FLOPs of the two matmuls of dense attention, 4*B*H*Sq*Skv*D (the peers' convention)."""
        return 4 * self.batch * self.heads * self.seq_q * self.seq_kv * self.head_dim

    @property
    def name(self) -> str:
        """A short readable id, e.g. b2_h8_kv8_q512_k512_d64_causal."""
        parts = [
            f"b{self.batch}", f"h{self.heads}", f"kv{self.kv_heads}",
            f"q{self.seq_q}", f"k{self.seq_kv}", f"d{self.head_dim}",
        ]
        if self.causal:
            parts.append("causal")
        if self.window is not None:
            parts.append(f"win{self.window}")
        if self.threshold is not None:
            parts.append(f"tau{self.threshold:g}")
        if self.top_k is not None:
            parts.append(f"top{self.top_k}")
        if self.eps is not None:
            parts.append(f"eps{self.eps:g}")
        if self.dtype != DTYPE:
            parts.append(DTYPE_TAGS[self.dtype])
        if self.kv_dtype is not None:
            parts.append(f"kv{self.kv_dtype}")
        if self.softcap is not None:
            parts.append(f"cap{self.softcap:g}")
        if self.sinks:
            parts.append("sinks")
        if self.alibi_slopes is not None:
            parts.append(alibi_tag(self.alibi_slopes))
        if self.tree_parents is not None:
            parts.append("tree")
        return "_".join(parts)

    @classmethod
    def from_arrays(cls, q, k, v, **knobs) -> "AttentionSpec":
        """The spec of numpy-like arrays q, k, v (one dtype of DTYPES for all three); raises ValueError/TypeError
        naming what is wrong."""
        for name, arr in (("q", q), ("k", k), ("v", v)):
            if not hasattr(arr, "shape") or not hasattr(arr, "dtype"):
                raise TypeError(f"{name} must be an array with shape and dtype, got {type(arr).__name__}")
            if len(arr.shape) != 4:
                raise ValueError(
                    f"{name} must have rank 4 (batch, heads, seq, head_dim), got shape {tuple(arr.shape)}"
                )
        dtype = array_dtype("q", q)
        for name, arr in (("k", k), ("v", v)):
            if array_dtype(name, arr) != dtype:
                raise TypeError(f"{name} is {array_dtype(name, arr)} but q is {dtype}: q, k and v must have one dtype "
                                f"(convert one side, e.g. q.astype(k.dtype))")
        if tuple(k.shape) != tuple(v.shape):
            raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
        b, h, sq, d = q.shape
        kb, kvh, skv, kd = k.shape
        if kb != b:
            raise ValueError(f"batch of q ({b}) and k/v ({kb}) differ")
        if kd != d:
            raise ValueError(f"head_dim of q ({d}) and k/v ({kd}) differ")
        for name, value in (("seq_q", sq), ("seq_kv", skv), ("batch", b), ("heads", h),
                            ("kv_heads", kvh), ("head_dim", d)):
            if value == 0:
                raise ValueError(f"{name} must be >= 1, got 0 (empty input)")
        return cls(batch=b, heads=h, kv_heads=kvh, seq_q=sq, seq_kv=skv, head_dim=d, dtype=dtype, **knobs)


def array_dtype(name: str, arr) -> str:
    """The name of ``arr``'s dtype, one of DTYPES (bfloat16: ml_dtypes.bfloat16 numpy arrays); TypeError naming
    ``name`` otherwise."""
    dtype = _dtype_name(arr.dtype)
    if dtype not in DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {dtype}")
    return dtype


@functools.lru_cache(maxsize=64)
def _dtype_name(dtype) -> str:
    """numpy's name of a dtype (cached: numpy computes .name in Python, slow next to a decode step's kernel)."""
    try:
        return np.dtype(dtype).name
    except TypeError:
        return str(dtype)


def alibi_slopes(slopes, heads: int) -> tuple[float, ...]:
    """``slopes`` (a sequence or array of floats, one per query head) as a spec keeps them: a tuple of heads
    float32-rounded finite floats; TypeError/ValueError naming what is wrong."""
    if isinstance(slopes, (str, bytes)) or not hasattr(slopes, "__len__"):
        raise TypeError(f"alibi_slopes must be a sequence or array of {heads} floats, got {type(slopes).__name__}")
    try:
        array = np.asarray(slopes, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"alibi_slopes must hold floats, got {slopes!r}") from None
    if array.shape != (heads,):
        raise ValueError(f"alibi_slopes must have shape (heads,) = ({heads},), one slope per query head, got "
                         f"{array.shape}")
    if not np.isfinite(array).all():
        bad = int(np.flatnonzero(~np.isfinite(array))[0])
        raise ValueError(f"alibi_slopes must be finite, got {array[bad]!r} for head {bad}")
    return tuple(float(x) for x in array.astype(np.float32))


def alibi_tag(slopes: tuple) -> str:
    """The kernel-name part of a set of ALiBi slopes: alibi and a digest of them."""
    return "alibi" + hashlib.sha256(np.asarray(slopes, np.float32).tobytes()).hexdigest()[:8]


def tree_parents(parents, nodes: int) -> tuple[int, ...]:
    """``parents`` (a sequence or array of ints, one per tree node) as a spec keeps them: a tuple of ``nodes`` ints,
    each -1 (the node hangs from the keys before the tree) or an earlier node's index, so the nodes form a tree
    (no cycle, parents before children); TypeError/ValueError naming the bad entry otherwise."""
    if isinstance(parents, (str, bytes)) or not hasattr(parents, "__len__"):
        raise TypeError(f"tree_parents must be a sequence or array of {nodes} ints, got {type(parents).__name__}")
    array = np.asarray(parents)
    if array.ndim != 1 or array.shape[0] != nodes:
        raise ValueError(f"tree_parents must have shape (seq_q,) = ({nodes},), one parent per query row, got "
                         f"{array.shape}")
    if array.dtype == bool or not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"tree_parents must hold ints, got {array.dtype}")
    bad = np.flatnonzero((array < -1) | (array >= np.arange(nodes)))
    if bad.size:
        i = int(bad[0])
        why = "is not a node" if not -1 <= array[i] < nodes else "is not before it (a tree lists parents first)"
        raise ValueError(f"tree_parents[{i}] = {int(array[i])}: the parent of node {i} must be -1 or an earlier node "
                         f"(0..{i - 1}); {int(array[i])} {why}")
    return tuple(int(p) for p in array)


@functools.lru_cache(maxsize=256)
def ancestor_mask(parents: tuple) -> np.ndarray:
    """(n, n) int32, read-only (cached: one per tree): mask[i, j] = 1 + the depth of node j where j is node i or one
    of its ancestors in the tree ``parents`` (a tuple; roots have depth 0), else 0; the diagonal holds 1 + each
    node's depth."""
    n = len(parents)
    mask = np.zeros((n, n), np.int32)
    for i, p in enumerate(parents):  # parents come first: row p is complete
        if p >= 0:
            mask[i, :p + 1] = mask[p, :p + 1]
        mask[i, i] = 1 if p < 0 else mask[p, p] + 1
    mask.flags.writeable = False
    return mask


def sink_logits(sinks, heads: int) -> np.ndarray:
    """``sinks`` (a numpy array of floats, one logit per query head) as the kernels take it: float32, contiguous, of
    shape (heads,), every logit finite; TypeError/ValueError naming what is wrong."""
    if not hasattr(sinks, "shape") or not hasattr(sinks, "dtype"):
        raise TypeError(f"sinks must be an array of {heads} floats (one logit per query head), got "
                        f"{type(sinks).__name__}")
    if tuple(sinks.shape) != (heads,):
        raise ValueError(f"sinks must have shape (heads,) = ({heads},), one logit per query head, got "
                         f"{tuple(sinks.shape)}")
    if _dtype_name(sinks.dtype) not in ("float64", *DTYPES):
        raise TypeError(f"sinks must hold floats (float32, float64, float16 or bfloat16), got "
                        f"{_dtype_name(sinks.dtype)}")
    logits = np.ascontiguousarray(sinks, dtype=np.float32)
    if not np.isfinite(logits).all():
        bad = int(np.flatnonzero(~np.isfinite(logits))[0])
        raise ValueError(f"sinks must be finite, got {sinks[bad]!r} for head {bad}")
    return logits


def positive_int(name: str, value) -> int:
    """``value`` as an int >= 1; TypeError/ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    if value > INT32_MAX:
        raise ValueError(f"{name} must be at most {INT32_MAX} (the kernels' sizes are int32), got {value}")
    return int(value)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """The fields of an AttentionSpec that a compiled kernel is specialized for (see AttentionSpec for their
    meaning); batch, seq_q and seq_kv are run-time sizes of the kernel's arguments. Build one with
    ``AttentionSpec(...).kernel``, which checks the values."""

    heads: int
    kv_heads: int
    head_dim: int
    causal: bool
    window: int | None
    scale: float
    threshold: float | None
    top_k: int | None
    eps: float | None
    dtype: str
    kv_dtype: str | None = None
    softcap: float | None = None
    sinks: bool = False  # the kernel takes a (heads,) float32 argument of sink logits before out
    alibi_slopes: tuple | None = None  # float32-rounded, one per query head (compile-time constants)
    tree: bool = False  # the kernel takes a (seq_q, seq_q) int32 tree mask (AttentionSpec.tree_mask) before out

    @property
    def group_size(self) -> int:
        return self.heads // self.kv_heads

    def knobs(self) -> dict:
        return {k: getattr(self, k) for k in KNOBS if getattr(self, k) is not None}

    @property
    def name(self) -> str:
        """e.g. h8_kv2_d64_causal_win256_top64."""
        parts = [f"h{self.heads}", f"kv{self.kv_heads}", f"d{self.head_dim}"]
        if self.causal:
            parts.append("causal")
        if self.window is not None:
            parts.append(f"win{self.window}")
        for knob, tag in (("threshold", "tau"), ("top_k", "top"), ("eps", "eps")):
            if getattr(self, knob) is not None:
                parts.append(f"{tag}{getattr(self, knob):g}")
        if self.dtype != DTYPE:
            parts.append(DTYPE_TAGS[self.dtype])
        if self.kv_dtype is not None:
            parts.append(f"kv{self.kv_dtype}")
        if self.softcap is not None:
            parts.append(f"cap{self.softcap:g}")
        if self.sinks:
            parts.append("sinks")
        if self.alibi_slopes is not None:
            parts.append(alibi_tag(self.alibi_slopes))
        if self.tree:
            parts.append("tree")
        return "_".join(parts)
