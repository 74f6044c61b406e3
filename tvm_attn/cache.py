"""A KV cache the kernels read in place: what an inference loop keeps between steps.

    cache = tvm_attn.KVCache(batch=1, kv_heads=8, head_dim=128, capacity=16384)
    cache.append(k, v)                              # (batch, kv_heads, n, head_dim), written in place
    out = cache.attend(q, variant="flash")          # q: (batch, heads, n_q, head_dim), the n_q newest positions

K and V live in two 64-byte aligned (batch, kv_heads, capacity, head_dim) buffers of the cache's dtype (float32,
float16 or bfloat16: a 16-bit cache halves the bytes a decode step reads); ``attend`` passes the filled part to a
length-generic kernel as a strided view (no copy, no compile per length). q, k and v have the cache's dtype:
numpy arrays or torch CPU tensors (a torch q gets a torch output).

For ``attend(q, variant="bounded", eps=...)`` and decode calls of ``variant="topk"`` and ``"threshold"`` the cache
keeps an int8 shadow of K (``tvm_attn.shadow``, its format in ``tvm_attn.certificate``: a byte per element plus 1/4
byte of block offsets and steps per key and dimension), whose bounds on every score let the kernel read full K and V
rows only for the keys they cannot rule out (top-k and threshold stay exact). It is built at the first attend that
needs it (or at construction with ``shadow=True``) and then updated by every ``append`` (~10 us a position). With
``shadow=False``, bounded is refused and top-k and threshold take their own (every-key) kernels.

``KVCache(..., dtype="int8")`` stores K and V as int8 codes with a float32 scale per row (``tvm_attn.quantized_kv``):
head_dim + 4 bytes a row, quantized on ``append`` (q, k, v and the output are float32). Decode calls of the dense
variants (flash, standard, mqa) run a kernel that reads the codes; the other calls (prefill-sized, pruned variants)
dequantize the keys they need and run the float32 kernel. Its results are those of attention over the dequantized K
and V (``cache.dequantized()``). It has no shadow of K yet: bounded is refused.
"""

from __future__ import annotations

import numbers

import numpy as np

from . import quantized_kv
from .kernel import (SCHEDULES, Kernel, as_kernel_argument, build, build_shadow, checked_out, first_visible_key,
                     host_array)
from .runtime import aligned_empty, dlpack_argument, numpy_dtype
from .shadow import ShadowKeys
from .spec import DTYPE, DTYPES, KNOBS, KV_DTYPES, AttentionSpec, ancestor_mask, array_dtype, positive_int
from .spec import alibi_slopes as alibi_slopes_of
from .spec import tree_parents as tree_parents_of
from .variants import get_variant, path_for

ALIGNMENT = 64


def aligned_zeros(shape: tuple, dtype) -> np.ndarray:
    """A zero-filled array of ``shape`` whose data is ALIGNMENT-byte aligned."""
    array = aligned_empty(shape, dtype, ALIGNMENT)
    array.fill(0)
    return array


def padded_groups(runs: list[tuple[int, int]], n_q: int,
                  length: int) -> list[tuple[int, int, int, int, slice]]:
    """Padded batch rows grouped for kernel calls: (first row, end row, lo, hi, query rows) per run of consecutive
    rows whose keys are positions lo..hi-1 of ``length``, with ``rows`` the slice of their n_q newest query rows
    at those positions."""
    offset = length - n_q
    groups = []
    b = 0
    while b < len(runs):
        lo, hi = runs[b]
        end = next((e for e in range(b + 1, len(runs)) if runs[e] != runs[b]), len(runs))
        groups.append((b, end, lo, hi, slice(max(0, lo - offset), max(0, hi - offset))))
        b = end
    return groups


def accepted_path(tree_parents, path, length: int) -> tuple[tuple[int, ...], list[int]]:
    """(parents, path) of ``keep_tree_path``, checked: a tree of at most ``length`` nodes (the newest of a
    sequence's ``length`` positions) and a path of its nodes from a root (parent -1) down, each the parent of the
    next; TypeError/ValueError naming what is wrong."""
    parents = tree_parents_of(host_array("tree_parents", tree_parents), len(tree_parents)
                              if hasattr(tree_parents, "__len__") else 0)
    if len(parents) > length:
        raise ValueError(f"tree_parents has {len(parents)} nodes but the cache holds {length} positions: the tree's "
                         f"nodes are the newest positions (append them, then attend)")
    path = np.asarray(host_array("path", path))
    if path.ndim != 1 or (path.size and (path.dtype == bool or not np.issubdtype(path.dtype, np.integer))):
        raise TypeError(f"path must be a sequence of node indices (ints), got {path!r}")
    path = [int(node) for node in path]
    for n, node in enumerate(path):
        if not 0 <= node < len(parents):
            raise ValueError(f"path[{n}] = {node} is not a node of the {len(parents)}-node tree")
        parent = path[n - 1] if n else -1
        if parents[node] != parent:
            raise ValueError(f"path[{n}] = {node}: its parent is {parents[node]}, not {parent} (a path runs from a "
                             f"root, parent -1, down through children)")
    return parents, path


def cache_array(name: str, x, dtype: str, axes: tuple[str, ...] = ("batch", "heads", "seq", "head_dim")
                ) -> np.ndarray:
    """x (numpy or torch) as a numpy array of ``dtype`` with one axis per name in ``axes``; TypeError/ValueError
    naming ``name`` otherwise."""
    x = host_array(name, x)
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array with shape and dtype, got {type(x).__name__}")
    if len(x.shape) != len(axes):
        raise ValueError(f"{name} must have rank {len(axes)} ({', '.join(axes)}), got shape {tuple(x.shape)}")
    if array_dtype(name, x) != dtype:
        raise TypeError(f"{name} must be {dtype} like the cache, got {array_dtype(name, x)} "
                        f"(convert it, e.g. {name}.astype(cache.k.dtype))")
    return np.asarray(x)


class KVCache:
    """Keys and values of ``batch`` sequences, ``kv_heads`` heads of ``head_dim``, up to ``capacity`` positions,
    stored as ``dtype`` (float32, float16 or bfloat16; or int8: codes and row scales, with float32 q, k, v)."""

    def __init__(self, batch: int, kv_heads: int, head_dim: int, capacity: int, dtype: str = DTYPE,
                 shadow: bool | None = None):
        self.batch = positive_int("batch", batch)
        self.kv_heads = positive_int("kv_heads", kv_heads)
        self.head_dim = positive_int("head_dim", head_dim)
        self.capacity = positive_int("capacity", capacity)
        if dtype not in DTYPES + KV_DTYPES:
            raise TypeError(f"dtype must be one of {', '.join(DTYPES + KV_DTYPES)}, got {dtype!r}")
        self.dtype = dtype
        self.integer = dtype in KV_DTYPES
        # What q, k, v and the output are: the cache's own dtype, float32 for an integer cache.
        self.input_dtype = DTYPE if self.integer else dtype
        shape = (self.batch, self.kv_heads, self.capacity, self.head_dim)
        if self.integer:  # K's codes in blocks of positions (quantized_kv), zeros past the filled part
            blocks = quantized_kv.key_blocks(self.capacity)
            self._k = aligned_zeros((*shape[:2], blocks, self.head_dim, quantized_kv.KEY_BLOCK),
                                    quantized_kv.CODE_DTYPE[dtype])
            self._v = aligned_zeros(shape, quantized_kv.CODE_DTYPE[dtype])
            self._k_scale = aligned_zeros((*shape[:2], blocks * quantized_kv.KEY_BLOCK), np.float32)
            self._v_scale = aligned_zeros((*shape[:2], blocks * quantized_kv.KEY_BLOCK), np.float32)
        else:
            self._k = aligned_empty(shape, numpy_dtype(dtype), ALIGNMENT)
            self._v = aligned_empty(shape, numpy_dtype(dtype), ALIGNMENT)
        if shadow is not None and not isinstance(shadow, (bool, np.bool_)):
            raise TypeError(f"shadow must be True, False or None (built when first needed), got {shadow!r}")
        if shadow and self.integer:
            raise ValueError(f"shadow=True: a {dtype} cache has no shadow of K (its kernels read the codes)")
        self._length = 0
        self._shadow_allowed = shadow is not False and not self.integer
        self.shadow: ShadowKeys | None = None  # the int8 shadow of K, once built
        if shadow:
            self._build_shadow()
        self._kernels: dict = {}

    @property
    def length(self) -> int:
        """Positions filled so far."""
        return self._length

    @property
    def k(self) -> np.ndarray:
        """The filled part of K, (batch, kv_heads, length, head_dim): a view, not a copy (an integer cache's codes,
        a copy: they are stored in blocks of positions)."""
        if self.integer:
            return quantized_kv.key_codes(self._k, 0, self._length)
        return self._k[:, :, : self._length]

    @property
    def v(self) -> np.ndarray:
        """The filled part of V: a view (an integer cache's codes)."""
        return self._v[:, :, : self._length]

    @property
    def scales(self) -> tuple[np.ndarray, np.ndarray]:
        """An integer cache's row scales of the filled part of K and of V, (batch, kv_heads, length) float32 each:
        views."""
        if not self.integer:
            raise AttributeError(f"a {self.dtype} cache stores K and V as they are: it has no scales")
        return self._k_scale[:, :, : self._length], self._v_scale[:, :, : self._length]

    def dequantized(self) -> tuple[np.ndarray, np.ndarray]:
        """The filled part of K and V as float32 (for an integer cache, what its codes and scales stand for: what
        attend computes with; a copy)."""
        if not self.integer:
            return self.k.astype(np.float32), self.v.astype(np.float32)
        k_scale, v_scale = self.scales
        return quantized_kv.dequantize(self.k, k_scale), quantized_kv.dequantize(self.v, v_scale)

    @property
    def buffers(self) -> tuple[np.ndarray, np.ndarray]:
        """The whole K and V buffers, (batch, kv_heads, capacity, head_dim): positions from ``length`` on are
        unfilled. For wrappers that keep their own views of the memory (e.g. torch tensors). (An integer cache's
        codes: K's in blocks, (batch, kv_heads, blocks, head_dim, quantized_kv.KEY_BLOCK).)"""
        return self._k, self._v

    def __repr__(self) -> str:
        return (f"KVCache(batch={self.batch}, kv_heads={self.kv_heads}, head_dim={self.head_dim}, "
                f"capacity={self.capacity}, length={self._length}, dtype={self.dtype!r}, "
                f"shadow={self.shadow is not None})")

    def append(self, k, v) -> None:
        """Write ``n`` new positions, k and v of shape (batch, kv_heads, n, head_dim), after the filled part (an
        integer cache quantizes them). The cache is unchanged when this raises (wrong shape or dtype, or more
        positions than the capacity left)."""
        k = cache_array("k", k, self.input_dtype)
        v = cache_array("v", v, self.input_dtype)
        if k.shape != v.shape:
            raise ValueError(f"k and v must have the same shape, got k {k.shape} and v {v.shape}")
        b, kvh, n, d = k.shape
        if (b, kvh, d) != (self.batch, self.kv_heads, self.head_dim):
            raise ValueError(f"k and v must have shape (batch={self.batch}, kv_heads={self.kv_heads}, n, "
                             f"head_dim={self.head_dim}), got {k.shape}")
        if self._length + n > self.capacity:
            raise ValueError(f"cannot append {n} positions to a cache holding {self._length} of capacity "
                             f"{self.capacity} ({self.capacity - self._length} left); nothing was written")
        end = self._length + n
        if self.integer:
            k_codes, self._k_scale[:, :, self._length:end] = quantized_kv.quantize(k, self.dtype)
            quantized_kv.write_key_codes(self._k, k_codes, self._length)
            self._v[:, :, self._length:end], self._v_scale[:, :, self._length:end] = quantized_kv.quantize(v,
                                                                                                         self.dtype)
        else:
            self._k[:, :, self._length:end] = k
            self._v[:, :, self._length:end] = v
        if self.shadow is not None:
            self.shadow.update(self._k, self._length, end)
        self._length = end

    def _build_shadow(self) -> ShadowKeys:
        self.shadow = ShadowKeys(self.batch, self.kv_heads, self.capacity, self.head_dim,
                                 lambda shape, dt: aligned_empty(shape, dt, ALIGNMENT))
        self.shadow.update(self._k, 0, self._length)
        return self.shadow

    def truncate(self, length: int) -> None:
        """Forget every position from ``length`` on (e.g. rejected speculative tokens); 0 empties the cache."""
        if isinstance(length, bool) or not isinstance(length, numbers.Integral) or not 0 <= length <= self._length:
            raise ValueError(f"length must be an int in [0, {self._length}], got {length!r}")
        self._length = int(length)
        if self.shadow is not None:
            self.shadow.update(self._k, self._length, self._length)  # the last block's range, of the keys left

    def keep_tree_path(self, tree_parents, path) -> None:
        """After verifying a draft tree (``attend(q, tree_parents=...)`` over the tree's nodes, the cache's newest
        len(tree_parents) positions), keep the accepted ``path`` and forget the tree's other nodes: ``path`` lists
        nodes from a root (parent -1) down, each the parent of the next (empty: none accepted); their keys and
        values move, in order, to the tree's first positions, and the length becomes the tree's start plus
        len(path). The cache is unchanged when this raises."""
        parents, path = accepted_path(tree_parents, path, self._length)
        start = self._length - len(parents)
        positions = [start + node for node in path]  # (increasing: parents come before their children)
        end = start + len(path)
        if self.integer:
            quantized_kv.write_key_codes(self._k, quantized_kv.key_codes(self._k, start, self._length)[:, :, path],
                                         start)
            for scales in (self._k_scale, self._v_scale):
                scales[:, :, start:end] = scales[:, :, positions]
        else:
            self._k[:, :, start:end] = self._k[:, :, positions]
        self._v[:, :, start:end] = self._v[:, :, positions]
        self._length = end
        if self.shadow is not None:
            self.shadow.update(self._k, start, end)

    def attend(self, q, variant: str = "flash", causal: bool = True, scale: float | None = None,
               window: int | None = None, schedule: str = "best", out=None, attention_mask=None, sinks=None,
               alibi_slopes=None, tree_parents=None, **knob) -> np.ndarray:
        """Attention of q (batch, heads, n_q, head_dim), the n_q newest positions, over the cache's ``length``
        positions; causal masks align bottom-right (query i is position length - n_q + i). ``knob`` is the
        variant's pruning knob (threshold=, top_k= or eps=) and softcap= (AttentionSpec.softcap).
        ``attention_mask`` (batch, length) of 0 and 1 (numpy or torch) pads a batch of sequences of different
        lengths: each row's ones are one run (padding on the left, the right or both), its other positions are
        neither keys nor queries (their rows of the output are 0). ``sinks``: one logit per query head;
        ``alibi_slopes``: one ALiBi slope per query head (``tvm_attn.attention``'s). ``tree_parents``: the n_q
        newest positions are a draft tree's nodes (AttentionSpec.tree_parents), verified in one call; then
        ``keep_tree_path`` keeps the accepted ones.
        Returns a new array (a torch tensor when q is one), or fills ``out``."""
        like = q
        q = cache_array("q", q, self.input_dtype)
        b, heads, n_q, d = q.shape
        if b != self.batch:
            raise ValueError(f"q has batch {b}, the cache {self.batch}")
        if d != self.head_dim:
            raise ValueError(f"q has head_dim {d}, the cache {self.head_dim}")
        if self._length == 0:
            raise ValueError("the cache is empty: append keys and values before attend")
        if n_q < 1:
            raise ValueError("q must have at least one position, got n_q=0")
        if causal and n_q > self._length:
            raise ValueError(f"n_q={n_q} query positions but the cache holds {self._length}: with causal=True the "
                             f"queries must be the newest cached positions (append their keys first)")
        knob = {**knob, "sinks": sinks is not None}
        if alibi_slopes is not None:  # (as a tuple: kernels are cached on the knobs)
            knob["alibi_slopes"] = alibi_slopes_of(host_array("alibi_slopes", alibi_slopes), heads)
        tree = None
        if tree_parents is not None:
            knob["tree_parents"] = tree_parents_of(host_array("tree_parents", tree_parents), n_q)
            tree = ancestor_mask(knob["tree_parents"])
        kernel = self._kernel(variant, heads, n_q, causal, scale, window, schedule, knob)
        logits = kernel.sink_logits(sinks)
        out, result = checked_out(out, q.shape, self.input_dtype, like, inputs=dict(q=q, k=self._k, v=self._v))
        if attention_mask is not None:
            self._attend_padded(q, out, self._runs(attention_mask), variant, causal, scale, window, schedule, knob,
                                logits, tree)
            return result
        self._launch(kernel, as_kernel_argument(q), slice(None), 0, self._length, out, logits, tree)
        return result

    def _launch(self, kernel: Kernel, q, rows: slice, first: int, end: int, out, sinks=None, tree=None) -> None:
        """Run ``kernel`` for q of batch rows ``rows`` over their positions first..end-1: K and V as stored (with
        the shadow or the row scales the kernel reads), or dequantized, from the first key a query sees, for a
        float kernel on an integer cache."""
        k, v, extra = self.kernel_inputs(kernel, q.shape[2], rows, first, end)
        kernel.launch(q, k, v, out, extra, sinks, tree)

    def kernel_inputs(self, kernel: Kernel, n_q: int, rows: slice = slice(None), first: int = 0,
                      end: int | None = None) -> tuple:
        """(k, v, extra) as ``kernel.launch`` takes them for n_q query rows of batch rows ``rows`` over positions
        first..end-1 (default: the filled part): K and V as stored, with the shadow of K or the row scales the
        kernel reads (an integer cache's codes from position 0 only: K is stored in blocks), or, for a float kernel
        on an integer cache, K and V dequantized from the first key a query sees."""
        end = self._length if end is None else end
        if not self.integer:
            k, v = self._k[rows, :, first:end], self._v[rows, :, first:end]
            if kernel.path != "shadow":
                return k, v, ()
            keys = self.shadow or self._build_shadow()
            return k, v, tuple(dlpack_argument(x) for x in keys.views(self._length))
        if kernel.kernel_spec.kv_dtype is not None:
            if first:
                raise ValueError(f"an integer kernel reads K's codes from position 0, got first={first}")
            blocks = quantized_kv.key_blocks(end)
            return (self._k[rows, :, :blocks], self._v[rows, :, :end],
                    tuple(s[rows, :, :blocks * quantized_kv.KEY_BLOCK] for s in (self._k_scale, self._v_scale)))
        if not get_variant(kernel.variant).blocks_from_key0:
            first += first_visible_key(kernel.kernel_spec, n_q, end - first)
        return (quantized_kv.dequantize(quantized_kv.key_codes(self._k[rows], first, end),
                                        self._k_scale[rows, :, first:end]),
                quantized_kv.dequantize(self._v[rows, :, first:end], self._v_scale[rows, :, first:end]), ())

    def _runs(self, attention_mask) -> list[tuple[int, int]]:
        """(first, end) of each row's run of ones in ``attention_mask``; ValueError naming the row otherwise."""
        mask = np.asarray(host_array("attention_mask", attention_mask))
        if mask.shape != (self.batch, self._length):
            raise ValueError(f"attention_mask must have shape (batch={self.batch}, length={self._length}), got "
                             f"{tuple(mask.shape)}")
        if not (mask.dtype == np.bool_ or np.issubdtype(mask.dtype, np.integer)) or not np.isin(mask, (0, 1)).all():
            raise ValueError(f"attention_mask must hold 0 and 1 (or booleans), got dtype {mask.dtype}")
        runs = []
        for row, ones in enumerate(mask.astype(bool)):
            where = np.flatnonzero(ones)
            first, end = (int(where[0]), int(where[-1]) + 1) if len(where) else (0, 0)
            if end - first != len(where):
                raise ValueError(f"attention_mask row {row} has zeros between its ones: padding must be a run at the "
                                 f"start or the end of a row")
            runs.append((first, end))
        return runs

    def _attend_padded(self, q, out, runs, variant, causal, scale, window, schedule, knob, sinks, tree=None) -> None:
        """attend's padded batch: rows that see the same run of positions in one call, over the views of their
        queries and keys (no copies). With a draft tree (``tree``: its mask) each sequence's n_q newest positions
        are its nodes, so they must all be real."""
        heads, n_q = q.shape[1], q.shape[2]
        groups = padded_groups(runs, n_q, self._length)
        kernels = []
        for b, _, _, _, rows in groups:  # every kernel first: a refusal computes nothing
            kernel = None
            if tree is not None and rows.start < rows.stop and rows != slice(0, n_q):
                raise ValueError(f"attention_mask row {b} marks {rows.stop - rows.start} of the {n_q} newest "
                                 f"positions real: a draft tree's nodes (tree_parents) must all be, in every row "
                                 f"that has any")
            if rows.stop > rows.start:
                # (an integer cache's codes are read from position 0 on: padded rows get dequantized K and V)
                kernel = self._kernel(variant, heads, rows.stop - rows.start, causal, scale, window, schedule, knob,
                                      codes=False)
                if kernel.path == "shadow":
                    raise ValueError(f"variant {variant!r} reads the cache's shadow of K, which does not take "
                                     f"attention_mask: make the cache with shadow=False for padded batches")
            kernels.append(kernel)
        for (b, last, first, end, rows), kernel in zip(groups, kernels):
            out[b:last, :, :rows.start] = 0
            out[b:last, :, rows.stop:] = 0
            if kernel is not None:
                self._launch(kernel, as_kernel_argument(q[b:last, :, rows]), slice(b, last), first, end,
                             out[b:last, :, rows], sinks, tree)

    def _kernel(self, variant, heads, n_q, causal, scale, window, schedule, knob, codes: bool = True) -> Kernel:
        # (A float cache has no codes: padded and unpadded calls share its kernels. The kernels of tree masks take
        # them at run time: one kernel serves every tree; an integer cache dequantizes for them.)
        tree = "tree_parents" in knob
        codes = codes and self.integer and not tree
        key = (variant, heads, get_variant(variant).path_for_rows(n_q, tree), causal, scale, window, schedule,
               tuple(sorted((name, name == "tree_parents" or value) for name, value in knob.items())), codes)
        kernel = self._kernels.get(key)
        if kernel is None:
            unknown = set(knob) - set(KNOBS) - {"softcap", "sinks", "alibi_slopes", "tree_parents"}
            if unknown:
                raise TypeError(f"attend() got unexpected keyword arguments {sorted(unknown)}: the pruning knobs "
                                f"are {', '.join(KNOBS)}, and softcap")
            if schedule not in SCHEDULES:
                raise ValueError(f"unknown schedule {schedule!r}: use one of {', '.join(SCHEDULES)}")
            if heads % self.kv_heads:
                raise ValueError(f"q has heads={heads}, not a multiple of the cache's kv_heads={self.kv_heads}")
            v = get_variant(variant)
            # An integer cache's decode calls of the variants that read its codes do; the others get dequantized K
            # and V.
            reads_codes = self.integer and codes and path_for(n_q) in v.integer_kv_paths
            spec = AttentionSpec(batch=self.batch, heads=heads, kv_heads=self.kv_heads, seq_q=n_q,
                                 seq_kv=self._length, head_dim=self.head_dim, causal=causal, window=window,
                                 scale=scale, dtype=self.input_dtype, kv_dtype=self.dtype if reads_codes else None,
                                 **knob)
            # The shadow's kernel serves every call of a variant the shadow defines (bounded), and decode calls of
            # the others that have one (top-k, threshold: exact, reading fewer rows); their prefill-sized calls, and
            # calls on a cache made with shadow=False, take their own kernels.
            shadowed = v.shadow_compute is not None and (v.blocks_from_key0 or path_for(n_q) == "decode")
            if shadowed and not self._shadow_allowed:
                if v.blocks_from_key0:
                    why = f"an {self.dtype} cache has none" if self.integer else "this cache was made with shadow=False"
                    raise ValueError(f"variant {variant!r} reads the cache's shadow of K, and {why}")
                shadowed = False
            kernel = build_shadow(v, spec, schedule=schedule) if shadowed else build(v, spec, schedule=schedule)
            self._kernels[key] = kernel
        return kernel
