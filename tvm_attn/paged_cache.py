"""A paged KV cache for many sequences at once: each sequence has its own length, and one ``attend`` serves a ragged
batch in which every sequence brings its own number of new query rows (1 for decode, more for a chunk of prefill or
draft tokens to verify).

    cache = tvm_attn.PagedKVCache(num_pages=4096, page_size=16, kv_heads=8, head_dim=128)
    a, b = cache.add_sequence(), cache.add_sequence()
    cache.append(a, k_a, v_a)                          # (kv_heads, n, head_dim) each, written in place
    cache.append(b, k_b, v_b)
    out = cache.attend(q, [a, b], [1, 4])              # q: (5, heads, head_dim): a's row, then b's four
    c = cache.fork_sequence(a)                         # shares a's full pages; a partial last page is copied
    out = cache.attend(q, [a, b], [1, 4], tree_parents=[None, (-1, 0, 0, 1)])  # b's four rows: a draft tree
    cache.keep_tree_path(b, (-1, 0, 0, 1), [0, 2])     # b keeps the accepted nodes 0 and 2

K and V live in pages of ``page_size`` positions, two (kv_heads, num_pages + 1, page_size, head_dim) buffers
allocated once (a head's pages one after another, so a sequence's consecutive pages read as one stream; the extra
page holds zeros); a sequence is a list of pages. The kernel (tvm_attn/variants/paged.py) reads them in place
through a page table, with the sequences' lengths and query counts as run-time data: one compiled kernel per
(heads, mask, scale) serves every batch composition. Each call splits the sequences' keys into chunks
(plan_chunks: a long sequence into many, a short one whole) that the cores share, then merges each row's chunks.
A fork shares its parent's full pages by reference count (appends go to a sequence's own last page or to new
ones) and copies at most one partial page; the one write into full pages, keep_tree_path's, copies a shared page
before it writes (copy on write).
"""

from __future__ import annotations

import functools
import numbers

import numpy as np

import tvm
from tvm import s_tir

from .cache import accepted_path, cache_array
from .kernel import as_kernel_argument, checked_out, compile_counted, host_array
from .runtime import aligned_empty, dlpack_argument, numpy_dtype
from .schedules import paged as paged_schedule
from .schedules import paged_tree as paged_tree_schedule
from .spec import DTYPE, DTYPES, INT32_MAX, AttentionSpec, KernelSpec, ancestor_mask, positive_int, sink_logits
from .spec import alibi_slopes as alibi_slopes_of
from .spec import tree_parents as tree_parents_of
from .targets import resolve_target
from .variants import DECODE_MAX_ROWS, TREE_DECODE_MAX_ROWS, TREE_KERNEL_MIN_ROWS, paged, paged_tree
from .variants.decode import DecodeConfig

ALIGNMENT = 64
ROWS_OF_A_SEQUENCE = ("kv_heads", "n", "head_dim")  # what append takes


class PagedKVCache:
    """Keys and values of any number of sequences in ``num_pages`` pages of ``page_size`` positions, ``kv_heads``
    heads of ``head_dim``, stored as ``dtype`` (float32, float16 or bfloat16). ``config``: how ``attend`` splits
    the keys (tiles of about block_kv keys, whole pages; chunks of at least chunk_keys, at most max_splits per
    sequence). A page_size above block_kv must be a multiple of it."""

    def __init__(self, num_pages: int, page_size: int, kv_heads: int, head_dim: int, dtype: str = DTYPE,
                 config: DecodeConfig = DecodeConfig()):
        self.num_pages = positive_int("num_pages", num_pages)
        self.page_size = positive_int("page_size", page_size)
        self.kv_heads = positive_int("kv_heads", kv_heads)
        self.head_dim = positive_int("head_dim", head_dim)
        if dtype not in DTYPES:
            raise TypeError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if (self.num_pages + 1) * self.kv_heads * self.page_size * self.head_dim > INT32_MAX:
            raise ValueError(f"{num_pages} pages of {kv_heads} x {page_size} x {head_dim} elements exceed the "
                             f"kernels' int32 indexing ({INT32_MAX} elements per buffer): use fewer pages")
        if not isinstance(config, DecodeConfig):
            raise TypeError(f"config must be a tvm_attn.DecodeConfig, got {config!r}")
        self.dtype = dtype
        self.config = config
        self._tiling = paged.PageTiling(self.page_size, config.block_kv)
        # One more page than can be taken, of zeros: the page-table entries past a sequence's pages point at it.
        shape = (self.kv_heads, self.num_pages + 1, self.page_size, self.head_dim)
        self._k = aligned_empty(shape, numpy_dtype(dtype), ALIGNMENT)
        self._v = aligned_empty(shape, numpy_dtype(dtype), ALIGNMENT)
        self._k[:, self.num_pages] = 0
        self._v[:, self.num_pages] = 0
        self._free = list(range(self.num_pages - 1, -1, -1))  # popped from the end: page 0 first
        self._refs = np.zeros(self.num_pages, np.int64)
        self._pages: dict[int, list[int]] = {}  # sequence id -> its pages, in position order
        self._lengths: dict[int, int] = {}
        self._next_id = 0
        self._kernels: dict = {}
        self._scratch: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # heads -> (o, m, l) partials

    # -- sequences -----------------------------------------------------------------------------------------------
    @property
    def sequences(self) -> tuple[int, ...]:
        """The ids of the sequences held, in the order they were added."""
        return tuple(self._pages)

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def buffers(self) -> tuple[np.ndarray, np.ndarray]:
        """The K and V page buffers, (kv_heads, num_pages + 1, page_size, head_dim), page num_pages all zeros: the
        memory the kernel reads, for measuring and for wrappers that keep their own views of it."""
        return self._k, self._v

    def length(self, seq: int) -> int:
        """Positions cached for sequence ``seq``."""
        return self._lengths[self._check(seq)]

    def pages(self, seq: int) -> tuple[int, ...]:
        """The pages of sequence ``seq``, in position order."""
        return tuple(self._pages[self._check(seq)])

    def __repr__(self) -> str:
        return (f"PagedKVCache(num_pages={self.num_pages}, page_size={self.page_size}, kv_heads={self.kv_heads}, "
                f"head_dim={self.head_dim}, dtype={self.dtype!r}, sequences={len(self._pages)}, "
                f"free_pages={len(self._free)})")

    def _check(self, seq) -> int:
        if isinstance(seq, bool) or not isinstance(seq, numbers.Integral):
            raise TypeError(f"a sequence id must be an int, got {seq!r}")
        if int(seq) not in self._pages:
            raise ValueError(f"unknown sequence {seq!r} (never added, or removed): this cache holds "
                             f"{sorted(self._pages) or 'none'}")
        return int(seq)

    def add_sequence(self) -> int:
        """A new, empty sequence; returns its id."""
        seq = self._next_id
        self._next_id += 1
        self._pages[seq] = []
        self._lengths[seq] = 0
        return seq

    def remove_sequence(self, seq: int) -> None:
        """Forget sequence ``seq``; its pages no other sequence shares become free."""
        seq = self._check(seq)
        for page in self._pages.pop(seq):
            self._release(page)
        del self._lengths[seq]

    def fork_sequence(self, parent: int) -> int:
        """A new sequence holding ``parent``'s positions: its full pages shared (by reference count), a partial last
        page copied. Returns the new id; ValueError (nothing changed) when the copy needs a page and none is free."""
        parent = self._check(parent)
        pages, length = self._pages[parent], self._lengths[parent]
        partial = length % self.page_size
        if partial and not self._free:
            raise ValueError(f"forking sequence {parent} copies its partial last page and no page is free "
                             f"({self.num_pages} pages, all in use); nothing was changed")
        shared = pages[:-1] if partial else list(pages)
        for page in shared:
            self._refs[page] += 1
        own = list(shared)
        if partial:
            page = self._take()
            self._k[:, page, :partial] = self._k[:, pages[-1], :partial]
            self._v[:, page, :partial] = self._v[:, pages[-1], :partial]
            self._zero_past(page, partial)
            own.append(page)
        seq = self.add_sequence()
        self._pages[seq], self._lengths[seq] = own, length
        return seq

    def _take(self) -> int:
        page = self._free.pop()
        self._refs[page] = 1
        return page

    def _zero_past(self, page: int, used: int) -> None:
        """Zero the slots of ``page`` from ``used`` on: a sequence's last page holds zeros past its length, which
        the kernel reads with weight 0 in its last tile (stale values could be NaN, and 0 x NaN is NaN)."""
        self._k[:, page, used:] = 0
        self._v[:, page, used:] = 0

    def _release(self, page: int) -> None:
        self._refs[page] -= 1
        if self._refs[page] == 0:
            self._free.append(page)

    def append(self, seq: int, k, v) -> None:
        """Write ``n`` new positions of sequence ``seq``: k and v of shape (kv_heads, n, head_dim). The cache is
        unchanged when this raises (wrong shape or dtype, an unknown sequence, more pages needed than are free)."""
        seq = self._check(seq)
        k = cache_array("k", k, self.dtype, ROWS_OF_A_SEQUENCE)
        v = cache_array("v", v, self.dtype, ROWS_OF_A_SEQUENCE)
        if k.shape != v.shape:
            raise ValueError(f"k and v must have the same shape, got k {k.shape} and v {v.shape}")
        kvh, n, d = k.shape
        if (kvh, d) != (self.kv_heads, self.head_dim):
            raise ValueError(f"k and v must have shape (kv_heads={self.kv_heads}, n, head_dim={self.head_dim}), got "
                             f"{k.shape}")
        length, pages = self._lengths[seq], self._pages[seq]
        if length + n > INT32_MAX:
            raise ValueError(f"sequence {seq} would hold {length + n} positions, over the kernels' int32 range")
        needed = -(-(length + n) // self.page_size) - len(pages)
        if needed > len(self._free):
            raise ValueError(f"appending {n} positions to sequence {seq} (length {length}) needs {needed} new pages "
                             f"of {self.page_size} positions and {len(self._free)} are free; nothing was written")
        pages.extend(self._take() for _ in range(needed))
        done = 0
        while done < n:  # page by page: the last page's free slots first
            position = length + done
            page, slot = pages[position // self.page_size], position % self.page_size
            count = min(n - done, self.page_size - slot)
            self._k[:, page, slot:slot + count] = k[:, done:done + count]
            self._v[:, page, slot:slot + count] = v[:, done:done + count]
            done += count
        if needed and (length + n) % self.page_size:
            self._zero_past(pages[-1], (length + n) % self.page_size)
        self._lengths[seq] = length + n

    def gather(self, seq: int) -> tuple[np.ndarray, np.ndarray]:
        """Sequence ``seq``'s K and V as (kv_heads, length, head_dim) arrays: copies, for checks and references."""
        seq = self._check(seq)
        length, pages = self._lengths[seq], self._pages[seq]
        if not pages:
            empty = np.empty((self.kv_heads, 0, self.head_dim), numpy_dtype(self.dtype))
            return empty, empty.copy()
        k = self._k[:, pages].reshape(self.kv_heads, -1, self.head_dim)[:, :length]
        v = self._v[:, pages].reshape(self.kv_heads, -1, self.head_dim)[:, :length]
        return k, v

    # -- attention -----------------------------------------------------------------------------------------------
    def attend(self, q, seqs, query_counts, causal: bool = True, scale: float | None = None,
               window: int | None = None, out=None, softcap: float | None = None, sinks=None, alibi_slopes=None,
               tree_parents=None):
        """Dense attention of a ragged batch: q (rows, heads, head_dim) holds query_counts[0] rows of seqs[0], then
        query_counts[1] rows of seqs[1], ...; each sequence's rows are its newest positions (their keys appended
        already), attending to its own cached positions (causal masks align bottom-right per sequence; ``softcap``
        as AttentionSpec's; ``sinks``, ``alibi_slopes``: one logit, one slope per query head, as
        ``tvm_attn.attention``'s). ``tree_parents``: one entry per sequence, None or the parents of its rows
        (AttentionSpec.tree_parents): those rows are a draft tree's nodes, verified in the same call as the other
        sequences' rows; then ``keep_tree_path`` keeps the accepted ones. Returns (rows, heads, head_dim) (a torch
        tensor when q is one) or fills ``out``."""
        like = q
        q = cache_array("q", q, self.dtype, ("rows", "heads", "head_dim"))
        rows, heads, d = q.shape
        if d != self.head_dim:
            raise ValueError(f"q has head_dim {d}, the cache {self.head_dim}")
        if heads % self.kv_heads:
            raise ValueError(f"q has heads={heads}, not a multiple of the cache's kv_heads={self.kv_heads}")
        seqs = [self._check(s) for s in seqs]
        counts = list(query_counts)
        if len(counts) != len(seqs) or not seqs:
            raise ValueError(f"seqs and query_counts must be non-empty and of one length, got {len(seqs)} sequences "
                             f"and {len(counts)} counts")
        for seq, n in zip(seqs, counts, strict=True):
            if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
                raise ValueError(f"query count of sequence {seq} must be an int >= 1, got {n!r}")
            if self._lengths[seq] == 0:
                raise ValueError(f"sequence {seq} is empty: append its keys and values before attend")
            if causal and n > self._lengths[seq]:
                raise ValueError(f"sequence {seq} has {n} query rows but {self._lengths[seq]} cached positions: with "
                                 f"causal=True its rows are its newest positions (append their keys first)")
        if sum(counts) != rows:
            raise ValueError(f"query_counts add up to {sum(counts)} rows, q has {rows}")
        slopes = None if alibi_slopes is None else alibi_slopes_of(host_array("alibi_slopes", alibi_slopes), heads)
        mask = None if tree_parents is None else tree_rows(tree_parents, seqs, counts, causal)
        logits = () if sinks is None else (sink_logits(host_array("sinks", sinks), heads),)
        out, result = checked_out(out, q.shape, self.dtype, like, inputs=dict(q=q, k=self._k, v=self._v))
        starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        # Draft trees of TREE_KERNEL_MIN_ROWS.. nodes take the paged tree kernel (their rows in row tiles), the other
        # sequences the paged kernel (row by row): one call each, over the batch's rows of its sequences.
        tiled = np.array([tree_parents is not None and tree_parents[n] is not None
                          and TREE_KERNEL_MIN_ROWS <= counts[n] <= TREE_DECODE_MAX_ROWS for n in range(len(seqs))])
        for tree_tiles in (False, True):
            members = np.flatnonzero(tiled == tree_tiles)
            if not len(members):
                continue
            kernel = self._kernel(heads, causal, scale, window, softcap, sinks is not None, slopes, mask is not None,
                                  tree_tiles)
            whole = len(members) == len(seqs)
            rows = slice(None) if whole else np.concatenate([np.arange(starts[n], starts[n + 1]) for n in members])
            part = out if whole else np.empty((len(rows), heads, d), out.dtype)
            kernel(*map(dlpack_argument, self.kernel_arguments(
                q[rows], [seqs[n] for n in members], [counts[n] for n in members], logits,
                None if mask is None else mask[rows], part, tree_tiles,
                None if tree_parents is None else [tree_parents[n] for n in members])))
            if not whole:
                out[rows] = part
        return result

    def kernel_arguments(self, q, seqs, counts, logits, mask, out, tree_tiles: bool, trees=None) -> tuple:
        """The arguments of one call of the paged kernel (``tree_tiles``: the paged tree kernel's; build_paged):
        q's rows are counts[0] rows of seqs[0], then counts[1] of seqs[1], ...; ``logits`` () or (the sinks,);
        ``mask`` their tree mask (tree kernels'), ``trees`` the sequences' tree_parents entries (None: no trees)."""
        max_pages = self._tiling.table_columns(max(len(self._pages[s]) for s in seqs))
        table = np.full((len(seqs), max_pages), self.num_pages, np.int32)  # past a sequence's pages: zeros
        for n, seq in enumerate(seqs):
            table[n, :len(self._pages[seq])] = self._pages[seq]
        lengths = np.array([self._lengths[s] for s in seqs], np.int32)
        counts = np.array(counts, np.int32)
        starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        row_seq = np.repeat(np.arange(len(seqs), dtype=np.int32), counts)
        walks = None if trees is None or tree_tiles else np.array([parents is not None for parents in trees])
        chunks, seq_chunks = plan_chunks(lengths, counts, self.config, self._tiling.keys, walks, tree_tiles)
        o_part, m_part, l_part = self._partials(q.shape[1], int(chunks[-1, 3] + counts[chunks[-1, 0]]))
        return (as_kernel_argument(q), self._k, self._v, table, lengths, starts, row_seq, chunks, seq_chunks, o_part,
                m_part, l_part, *logits, *(() if mask is None else (mask,)), out)

    def keep_tree_path(self, seq: int, tree_parents, path) -> None:
        """After verifying a draft tree of sequence ``seq`` (``attend`` with its tree_parents over the tree's nodes,
        its newest len(tree_parents) positions), keep the accepted ``path`` and forget the tree's other nodes:
        ``path`` lists nodes from a root (parent -1) down, each the parent of the next (empty: none accepted); their
        keys and values move, in order, to the tree's first positions, and the length becomes the tree's start plus
        len(path). Pages shared with forks are copied before they are written. The cache is unchanged when this
        raises (a ValueError also when those copies need more pages than are free)."""
        seq = self._check(seq)
        length, pages, size = self._lengths[seq], self._pages[seq], self.page_size
        parents, path = accepted_path(tree_parents, path, length)
        start = length - len(parents)
        end = start + len(path)
        kept_pages = -(-end // size)
        written = range(start // size, kept_pages)  # the pages the path moves into, the last one zeroed past end
        shared = [n for n in written if self._refs[pages[n]] > 1]
        if len(shared) > len(self._free):
            raise ValueError(f"keeping the path of sequence {seq} writes {len(shared)} pages it shares with forks, "
                             f"which are copied first, and {len(self._free)} pages are free; nothing was changed")
        def slots(positions):
            """(pages, slots) of ``positions``, as numpy's advanced index of a page buffer's axes 1 and 2."""
            return [pages[p // size] for p in positions], [p % size for p in positions]

        sources = slots([start + node for node in path])
        k, v = self._k[:, sources[0], sources[1]], self._v[:, sources[0], sources[1]]  # copies
        for n in shared:
            page = self._take()
            self._k[:, page], self._v[:, page] = self._k[:, pages[n]], self._v[:, pages[n]]
            self._release(pages[n])
            pages[n] = page
        targets = slots(range(start, end))  # (after the copies: the sequence's own pages)
        self._k[:, targets[0], targets[1]] = k
        self._v[:, targets[0], targets[1]] = v
        for page in pages[kept_pages:]:
            self._release(page)
        del pages[kept_pages:]
        if end % size:
            self._zero_past(pages[-1], end % size)
        self._lengths[seq] = end

    def _partials(self, heads: int, rows: int):
        """Scratch for ``rows`` partial rows of ``heads`` heads: each chunk's output, max and sum per row."""
        o, m, l = self._scratch.get(heads, (None, None, None))
        if o is None or o.shape[0] < rows:
            grown = max(rows, 2 * (0 if o is None else o.shape[0]))
            o = aligned_empty((grown, heads, self.head_dim), np.float32, ALIGNMENT)
            m, l = np.empty((grown, heads), np.float32), np.empty((grown, heads), np.float32)
            self._scratch[heads] = (o, m, l)
        return o[:rows], m[:rows], l[:rows]

    def _kernel(self, heads, causal, scale, window, softcap, sinks, alibi_slopes, tree, tree_tiles):
        key = (heads, causal, scale, window, softcap, sinks, alibi_slopes, tree, tree_tiles)
        if key not in self._kernels:
            spec = AttentionSpec(batch=1, heads=heads, kv_heads=self.kv_heads, seq_q=1, seq_kv=1,
                                 head_dim=self.head_dim, causal=causal, window=window, scale=scale, dtype=self.dtype,
                                 softcap=softcap, sinks=sinks, alibi_slopes=alibi_slopes,
                                 tree_parents=(-1,) if tree else None)
            self._kernels[key] = build_paged(spec.kernel, self.page_size, self.config,
                                             tree_tiles=tree_tiles)["main"]
        return self._kernels[key]


def tree_rows(tree_parents, seqs, counts, causal: bool) -> np.ndarray:
    """The paged kernel's tree mask for a batch whose sequences ``seqs`` bring ``counts`` rows: ``tree_parents``
    holds one entry per sequence, None (its rows see causally: a chain) or its rows' tree (AttentionSpec's
    tree_parents); each sequence's rows hold AttentionSpec.tree_mask's, (rows, max(counts)) int32, zeros past its
    nodes. TypeError/ValueError naming the sequence otherwise."""
    if isinstance(tree_parents, (str, bytes, np.ndarray)) or not hasattr(tree_parents, "__len__"):
        raise TypeError(f"tree_parents must be a list with one entry per sequence (None or a tree's parents), got "
                        f"{type(tree_parents).__name__}")
    if len(tree_parents) != len(seqs):
        raise ValueError(f"tree_parents has {len(tree_parents)} entries for {len(seqs)} sequences: give one per "
                         f"sequence, None for those without a tree")
    if not causal:
        raise ValueError("tree_parents needs causal=True (a tree mask narrows the causal mask: each node sees the keys "
                         "before the tree and its ancestors)")
    mask = np.zeros((sum(counts), max(counts)), np.int32)
    start = 0
    for seq, n, parents in zip(seqs, counts, tree_parents, strict=True):
        if parents is None:  # a chain: row i sees the rows' positions 0..i, at depth 0..i
            mask[start:start + n, :n] = np.tril(np.broadcast_to(np.arange(1, n + 1, dtype=np.int32), (n, n)))
        else:
            try:
                parents = tree_parents_of(host_array("tree_parents", parents), n)
            except (TypeError, ValueError) as error:
                raise type(error)(f"sequence {seq}'s {error}") from None
            mask[start:start + n, :n] = ancestor_mask(parents)
        start += n
    return mask


def plan_chunks(lengths: np.ndarray, counts: np.ndarray, config: DecodeConfig, tile_keys: int,
                trees: np.ndarray | None = None, tree_tiles: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """How the paged kernels split a batch's keys, in tiles of ``tile_keys``: (chunks, seq_chunks) as they take
    them. A sequence of at most DECODE_MAX_ROWS query rows (TREE_DECODE_MAX_ROWS where ``trees``, a bool per
    sequence, says its rows are a draft tree's, and for the paged tree kernel's batch, ``tree_tiles``) is cut into
    chunks of whole tiles, chunk_keys worth or more (at most max_splits chunks); one with more rows stays whole (its
    rows are the parallel work, and its partials would be rows x chunks). Chunk c is (sequence, first tile, end
    tile, first partial row); the partial rows of a chunk are its sequence's query rows, chunk after chunk."""
    tiles = -(-lengths // tile_keys)
    split = TREE_DECODE_MAX_ROWS if tree_tiles else DECODE_MAX_ROWS
    chunk_tiles = max(1, config.chunk_keys // tile_keys)
    if trees is not None:
        # A tree's rows walk each chunk once per node: half the keys keep its K and V in L2, as the decode
        # kernel's tree chunks (variants/decode.py default_config). Measured here (Zen 4), a 16-node tree over 8192
        # positions, GQA 32/8 D128: 20.6 ms in 512-key chunks, 22.9 in 1024, 36.5 whole.
        split = np.where(trees, TREE_DECODE_MAX_ROWS, DECODE_MAX_ROWS)
        chunk_tiles = np.where(trees, max(1, config.chunk_keys // 2 // tile_keys), chunk_tiles)
    per_chunk = np.where(counts <= split, np.maximum(chunk_tiles, -(-tiles // config.max_splits)), tiles)
    n_chunks = -(-tiles // per_chunk)
    seq_chunks = np.concatenate([[0], np.cumsum(n_chunks)]).astype(np.int32)
    seq = np.repeat(np.arange(len(lengths)), n_chunks)
    first = (np.arange(seq_chunks[-1]) - seq_chunks[seq]) * per_chunk[seq]
    rows = counts[seq]
    chunks = np.stack([seq, first, np.minimum(first + per_chunk[seq], tiles[seq]), np.cumsum(rows) - rows], axis=1)
    return chunks.astype(np.int32), seq_chunks


@functools.lru_cache(maxsize=64)
def _build_paged(kspec: KernelSpec, page_size: int, config: DecodeConfig, target_json: str, tree_tiles: bool):
    target = resolve_target(target_json)
    compute, schedule = ((paged_tree.compute, paged_tree_schedule.schedule) if tree_tiles
                         else (paged.compute, paged_schedule.schedule))
    sch = s_tir.Schedule(tvm.IRModule({"main": compute(kspec, page_size, config)}))
    schedule(sch, target)
    return compile_counted(sch.mod, target)


def build_paged(kspec: KernelSpec, page_size: int, config: DecodeConfig = DecodeConfig(), target="host",
                tree_tiles: bool = False):
    """The compiled paged kernel (tvm_attn/variants/paged.py; ``tree_tiles``: the paged tree kernel,
    variants/paged_tree.py, which takes the same arguments) for ``kspec`` over pages of ``page_size`` positions,
    keys in tiles of ``config.block_kv``: an executable whose "main" takes (q, k_pages, v_pages, page_table,
    seq_lens, row_start, row_seq, chunks, seq_chunks, o_part, m_part, l_part, out), with the (heads,) sinks
    (kspec.sinks) and the (rows, tree nodes) tree mask (kspec.tree; ``tree_rows``) before out. Cached."""
    return _build_paged(kspec, positive_int("page_size", page_size), config, str(resolve_target(target)),
                        bool(tree_tiles))
