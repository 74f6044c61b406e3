"""PagedKVCache: ragged batches (each sequence its own length and number of new query rows) attended in one call
over pages read in place, against the float64 reference of each sequence on its own; forks sharing pages, removals
freeing them, one compiled kernel for every batch composition, and what the cache refuses."""

from __future__ import annotations

import numpy as np
import pytest

import tvm_attn
from conftest import TREE_16, assert_matches_reference
from tvm_attn.runtime import numpy_dtype


SMALL = tvm_attn.DecodeConfig(block_kv=16, chunk_keys=32, max_splits=5)  # splits sequences of a few tiles


def _rows(rng, *shape_and_dtype):
    *shape, dtype = shape_and_dtype
    return rng.standard_normal(shape).astype(numpy_dtype(dtype))


def fill(cache, rng, lengths, chunk=7):
    """Sequences of ``lengths``, appended in interleaved chunks (their pages interleave in the buffers)."""
    seqs = [cache.add_sequence() for _ in lengths]
    done = [0] * len(lengths)
    while any(d < n for d, n in zip(done, lengths)):
        for i, (seq, n) in enumerate(zip(seqs, lengths)):
            step = min(chunk + i, n - done[i])
            if step > 0:
                cache.append(seq, *(_rows(rng, cache.kv_heads, step, cache.head_dim, cache.dtype) for _ in "kv"))
                done[i] += step
    return seqs


def check(cache, out, q, seqs, counts, *, causal=True, window=None, scale=None, softcap=None, sinks=None,
          alibi_slopes=None, tree_parents=None):
    """Each sequence's rows of ``out`` against the float64 reference over that sequence alone (with its own tree,
    where ``tree_parents`` gives one)."""
    heads = q.shape[1]
    start = 0
    for seq, n, parents in zip(seqs, counts, tree_parents or [None] * len(seqs), strict=True):
        k, v = cache.gather(seq)
        spec = tvm_attn.AttentionSpec(batch=1, heads=heads, kv_heads=cache.kv_heads, seq_q=n, seq_kv=k.shape[1],
                                      head_dim=cache.head_dim, causal=causal, window=window, scale=scale,
                                      dtype=cache.dtype, softcap=softcap, sinks=sinks is not None,
                                      alibi_slopes=alibi_slopes, tree_parents=parents)
        rows = slice(start, start + n)
        as_bhsd = lambda x: np.ascontiguousarray(x.transpose(1, 0, 2)[None])  # noqa: E731
        assert_matches_reference("flash", spec, as_bhsd(out[rows]), as_bhsd(q[rows]), k[None], v[None], sinks=sinks)
        start += n


@pytest.mark.parametrize("dtype,page_size,heads,kv_heads,head_dim,window", [
    ("float32", 16, 4, 2, 32, None),
    ("float32", 5, 6, 3, 48, 20),
    ("float16", 16, 4, 1, 64, None),
    ("bfloat16", 8, 2, 2, 40, None),  # head_dim padded to whole 16-lane partial sums
    ("float32", 256, 2, 1, 16, 150),  # pages longer than the kernel's 128-key tiles
])
def test_ragged_batch_matches_each_sequence_alone(dtype, page_size, heads, kv_heads, head_dim, window):
    rng = np.random.default_rng(0)
    cache = tvm_attn.PagedKVCache(num_pages=64, page_size=page_size, kv_heads=kv_heads, head_dim=head_dim,
                                  dtype=dtype)
    lengths = [1, page_size, page_size + 1, 2 * page_size - 1, 70]
    seqs = fill(cache, rng, lengths)
    counts = [1, 1, 3, page_size, 1]  # decode, a chunk of prefill, a whole page of draft rows
    q = _rows(rng, sum(counts), heads, head_dim, dtype)
    out = cache.attend(q, seqs, counts, window=window)
    assert out.shape == q.shape and out.dtype == q.dtype
    check(cache, out, q, seqs, counts, window=window)


@pytest.mark.parametrize("dtype,window,causal", [("float32", None, True), ("float16", 37, True),
                                                  ("float32", None, False)])
def test_keys_split_into_chunks_merge_to_each_sequence_alone(dtype, window, causal):
    """Small tiles and chunks, so that sequences of up to a few hundred positions split (and hit max_splits):
    chunks of one tile, many, a last partial one; rows that see none of a chunk (windows, causal draft rows)."""
    rng = np.random.default_rng(5)
    cache = tvm_attn.PagedKVCache(num_pages=80, page_size=8, kv_heads=2, head_dim=32, dtype=dtype, config=SMALL)
    lengths = [1, 16, 33, 95, 300, 40]
    seqs = fill(cache, rng, lengths, chunk=29)
    counts = [1, 1, 4, 8, 1, 12]  # 8 rows still split; 12 (over DECODE_MAX_ROWS) attend their sequence whole
    q = _rows(rng, sum(counts), 4, 32, dtype)
    out = cache.attend(q, seqs, counts, window=window, causal=causal)
    check(cache, out, q, seqs, counts, window=window, causal=causal)


def test_chunk_plan():
    from tvm_attn.paged_cache import plan_chunks
    chunks, seq_chunks = plan_chunks(np.array([1, 33, 300, 40], np.int32), np.array([1, 4, 1, 12], np.int32), SMALL,
                                     tile_keys=16)
    # 1 tile: whole; 3 tiles: chunks of 2; 19 tiles: chunks of 4 (at most max_splits=5); 12 rows: whole
    assert seq_chunks.tolist() == [0, 1, 3, 8, 9]
    assert chunks.tolist() == [[0, 0, 1, 0], [1, 0, 2, 1], [1, 2, 3, 5], [2, 0, 4, 9], [2, 4, 8, 10],
                               [2, 8, 12, 11], [2, 12, 16, 12], [2, 16, 19, 13], [3, 0, 3, 14]]
    # The same sequences, the last two rows of 12 a draft tree's: chunks of 1 tile (half chunk_keys), 12 rows each
    chunks, seq_chunks = plan_chunks(np.array([1, 33, 300, 40], np.int32), np.array([1, 4, 1, 12], np.int32), SMALL,
                                     tile_keys=16, trees=np.array([False, False, False, True]))
    assert seq_chunks.tolist() == [0, 1, 3, 8, 11]
    assert chunks[8:].tolist() == [[3, 0, 1, 14], [3, 1, 2, 26], [3, 2, 3, 38]]


def test_not_causal_and_one_sequence_twice():
    rng = np.random.default_rng(1)
    cache = tvm_attn.PagedKVCache(num_pages=16, page_size=16, kv_heads=2, head_dim=32)
    a, b = fill(cache, rng, [40, 9])
    counts = [5, 2, 3]
    q = _rows(rng, 10, 4, 32, "float32")
    out = cache.attend(q, [a, b, a], counts, causal=False, scale=-0.3)
    check(cache, out, q, [a, b, a], counts, causal=False, scale=-0.3)


def test_softcap():
    rng = np.random.default_rng(5)
    cache = tvm_attn.PagedKVCache(num_pages=16, page_size=16, kv_heads=2, head_dim=32)
    seqs = fill(cache, rng, [70, 9])
    counts = [1, 3]
    q = 3 * _rows(rng, 4, 4, 32, "float32")
    check(cache, cache.attend(q, seqs, counts, softcap=2.0), q, seqs, counts, softcap=2.0)


def test_sinks():
    """Sinks (one logit per query head) with a window and bfloat16 rows, against each sequence's reference."""
    rng = np.random.default_rng(6)
    cache = tvm_attn.PagedKVCache(num_pages=16, page_size=16, kv_heads=2, head_dim=32, dtype="bfloat16")
    seqs = fill(cache, rng, [70, 9, 40])
    counts = [1, 3, 2]
    q = _rows(rng, 6, 4, 32, "bfloat16")
    sinks = np.log(20) + 2 * rng.standard_normal(4)
    check(cache, cache.attend(q, seqs, counts, window=30, sinks=sinks), q, seqs, counts, window=30, sinks=sinks)
    with pytest.raises(ValueError, match=r"sinks must have shape \(heads,\) = \(4,\)"):
        cache.attend(q, seqs, counts, sinks=sinks[:2])


def test_alibi():
    """ALiBi slopes with softcap: each sequence's distances are its own (rows are its newest positions)."""
    rng = np.random.default_rng(7)
    cache = tvm_attn.PagedKVCache(num_pages=16, page_size=16, kv_heads=2, head_dim=32)
    seqs = fill(cache, rng, [70, 9, 40])
    counts = [1, 3, 2]
    q = 2 * _rows(rng, 6, 4, 32, "float32")
    slopes = 2.0 ** (-8.0 * np.arange(1, 5) / 4)
    out = cache.attend(q, seqs, counts, softcap=3.0, alibi_slopes=slopes)
    check(cache, out, q, seqs, counts, softcap=3.0, alibi_slopes=slopes)


FOREST_5 = (-1, -1, 0, 1, 1)


@pytest.mark.parametrize("dtype,features", [("float32", {}), ("bfloat16", dict(window=40, softcap=5.0, alibi=True,
                                                                                 sinks=True))])
def test_draft_trees_in_a_ragged_batch(dtype, features):
    """Two sequences verify draft trees (16 nodes, the split-KV kernel's most; a 5-node forest) in one call beside a
    decode row and a 3-row chunk: each sequence's rows against the float64 reference of its own tree, positions by
    depth (window, ALiBi); the trees' rows are not the causal rows."""
    rng = np.random.default_rng(12)
    cache = tvm_attn.PagedKVCache(num_pages=40, page_size=8, kv_heads=2, head_dim=32, dtype=dtype, config=SMALL)
    counts, trees = [16, 1, 5, 3], [TREE_16, None, FOREST_5, None]
    seqs = fill(cache, rng, [86, 10, 45, 36])
    q = 2 * _rows(rng, sum(counts), 4, 32, dtype)
    options = dict(window=features.get("window"), softcap=features.get("softcap"),
                   alibi_slopes=2.0 ** (-8.0 * np.arange(1, 5) / 4) if features.get("alibi") else None,
                   sinks=rng.standard_normal(4).astype(np.float32) if features.get("sinks") else None)
    out = cache.attend(q, seqs, counts, tree_parents=trees, **options)
    check(cache, out, q, seqs, counts, tree_parents=trees, **options)
    causal = cache.attend(q, seqs, counts, **options).astype(np.float32)
    moved = np.abs(out.astype(np.float32) - causal).max(axis=(1, 2))
    assert moved[:16].max() > 0.05 and moved[17:22].max() > 0.05  # the trees' rows
    assert moved[16] == 0 and moved[22:].max() == 0  # the others' rows are the same kernel's causal ones


@pytest.mark.parametrize("dtype,page_size,heads,kv_heads,head_dim,features", [
    ("float32", 8, 16, 2, 32, dict(window=40, softcap=5.0, alibi=True, sinks=True)),  # two row tiles of 8 nodes
    ("float32", 32, 3, 1, 20, {}),  # pages of two 16-key tiles; head_dim not a whole vector
    ("float16", 5, 4, 4, 32, dict(sinks=True)),  # a tile's keys on 4 pages of 5 (of 16 slots: 20-key tiles)
])
def test_trees_of_12_to_16_nodes_take_row_tiles(dtype, page_size, heads, kv_heads, head_dim, features):
    """Draft trees of 12 and 16 nodes take the paged tree kernel (their nodes' rows in row tiles read each key
    once), over several chunks, beside a 5-node forest and a decode row (the paged kernel's, in a second call): each
    sequence's rows against the float64 reference of its own tree."""
    rng = np.random.default_rng(29)
    config = tvm_attn.DecodeConfig(block_kv=16 if page_size != 5 else 20, chunk_keys=page_size * 8 if page_size == 5
                                   else 32, max_splits=5)
    cache = tvm_attn.PagedKVCache(num_pages=80, page_size=page_size, kv_heads=kv_heads, head_dim=head_dim,
                                  dtype=dtype, config=config)
    tree_12 = TREE_16[:12]
    counts, trees = [16, 1, 12, 5], [TREE_16, None, tree_12, FOREST_5]
    seqs = fill(cache, rng, [101, 10, 70, 33])
    q = 2 * _rows(rng, sum(counts), heads, head_dim, dtype)
    options = dict(window=features.get("window"), softcap=features.get("softcap"),
                   alibi_slopes=2.0 ** (-8.0 * np.arange(1, heads + 1) / heads) if features.get("alibi") else None,
                   sinks=rng.standard_normal(heads).astype(np.float32) if features.get("sinks") else None)
    out = cache.attend(q, seqs, counts, tree_parents=trees, **options)
    check(cache, out, q, seqs, counts, tree_parents=trees, **options)
    assert [key[-1] for key in cache._kernels] == [False, True]  # the paged kernel, then the paged tree kernel
    alone = cache.attend(q[:16], seqs[:1], [16], tree_parents=[TREE_16], **options)  # the tree kernel's call only
    np.testing.assert_array_equal(alone, out[:16])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_the_paged_tree_kernel_widens_16_bit_tiles_in_the_blocks_its_schedule_names(dtype):
    """Each 16-bit KV tile is widened to float32 once, in blocks k_wide and v_wide, the names schedules/paged_tree.py
    vectorizes (a macro's second call renames its blocks: v_wide_1 would go unscheduled)."""
    import tvm
    from tvm import s_tir

    from tvm_attn.schedules.common import has_block
    from tvm_attn.variants import paged_tree

    spec = tvm_attn.AttentionSpec(batch=1, heads=4, kv_heads=2, seq_q=1, seq_kv=1, head_dim=32, causal=True,
                                  dtype=dtype, tree_parents=(-1,))
    sch = s_tir.Schedule(tvm.IRModule({"main": paged_tree.compute(spec.kernel, 8, SMALL)}))
    assert has_block(sch, "k_wide") and has_block(sch, "v_wide")


def test_keep_tree_path_copies_pages_shared_with_forks():
    """The accepted path moves into pages a fork shares: they are copied first, and the fork keeps what it held;
    the sequence then holds what appending the path alone would have. With no page free for the copies, nothing
    changes."""
    rng = np.random.default_rng(13)
    cache = tvm_attn.PagedKVCache(num_pages=12, page_size=8, kv_heads=2, head_dim=32, config=SMALL)
    (seq,) = fill(cache, rng, [30])
    k_tree, v_tree = (_rows(rng, 2, len(TREE_16), 32, "float32") for _ in "kv")
    cache.append(seq, k_tree, v_tree)  # positions 30..45: pages 3 (shared), 4 (shared) and 5 (copied)
    fork = cache.fork_sequence(seq)
    held = cache.gather(fork)
    expected_k, expected_v = cache.gather(seq)
    accepted = [0, 1, 3, 7]
    expected_k = np.concatenate([expected_k[:, :30], k_tree[:, accepted]], axis=1)
    expected_v = np.concatenate([expected_v[:, :30], v_tree[:, accepted]], axis=1)
    free = cache.free_pages
    cache.keep_tree_path(seq, TREE_16, accepted)
    assert cache.length(seq) == 34 and cache.free_pages == free - 2 + 1  # two copies taken, its last page freed
    for mine, theirs in zip(cache.gather(seq), (expected_k, expected_v)):
        np.testing.assert_array_equal(mine, theirs)
    for mine, theirs in zip(cache.gather(fork), held):
        np.testing.assert_array_equal(mine, theirs)
    assert set(cache.pages(seq)[3:]).isdisjoint(cache.pages(fork)) and cache.pages(seq)[:3] == cache.pages(fork)[:3]
    q = _rows(rng, 2, 4, 32, "float32")
    check(cache, cache.attend(q, [seq, fork], [1, 1]), q, [seq, fork], [1, 1])

    tree_6 = FOREST_5 + (3,)
    cache.append(seq, k_tree[:, :6], v_tree[:, :6])  # a second tree fills page 4, which a new fork shares
    second_fork = cache.fork_sequence(seq)
    held = cache.gather(second_fork)
    filler = cache.add_sequence()
    cache.append(filler, *(_rows(rng, 2, 8 * cache.free_pages, 32, "float32") for _ in "kv"))
    before, pages = cache.gather(seq), cache.pages(seq)
    for path in ([1, 3], []):  # none accepted still zeroes page 4 past position 34
        with pytest.raises(ValueError, match="writes 1 pages it shares with forks, .* 0 pages are free; nothing was"):
            cache.keep_tree_path(seq, tree_6, path)
        assert cache.pages(seq) == pages and cache.length(seq) == 40
        for mine, theirs in zip(cache.gather(seq), before):
            np.testing.assert_array_equal(mine, theirs)
    cache.remove_sequence(filler)
    cache.keep_tree_path(seq, tree_6, [])
    assert cache.length(seq) == 34
    for mine, theirs in zip(cache.gather(second_fork), held):
        np.testing.assert_array_equal(mine, theirs)


def test_bad_trees_name_the_sequence_and_compute_nothing():
    rng = np.random.default_rng(14)
    cache = tvm_attn.PagedKVCache(num_pages=8, page_size=8, kv_heads=2, head_dim=16)
    a, b = fill(cache, rng, [20, 12])
    q = _rows(rng, 5, 2, 16, "float32")
    out = np.full_like(q, 7.0)
    bad = [([None, (-1, 0, 1)], ValueError, r"sequence 1's tree_parents must have shape \(seq_q,\) = \(4,\)"),
           ([None, (-1, 0, 2, 1)], ValueError, r"sequence 1's tree_parents\[2\] = 2"),
           ([(-1,)], ValueError, "tree_parents has 1 entries for 2 sequences"),
           (np.array([-1, -1]), TypeError, "one entry per sequence")]
    for trees, error, message in bad:
        with pytest.raises(error, match=message):
            cache.attend(q, [a, b], [1, 4], tree_parents=trees, out=out)
    with pytest.raises(ValueError, match="tree_parents needs causal=True"):
        cache.attend(q, [a, b], [1, 4], causal=False, tree_parents=[None, (-1, 0, 0, 1)], out=out)
    assert (out == 7.0).all()
    with pytest.raises(ValueError, match=r"path\[1\] = 3: its parent is 1, not 0"):
        cache.keep_tree_path(b, (-1, 0, 0, 1), [0, 3])
    with pytest.raises(ValueError, match="tree_parents has 13 nodes but the cache holds 12 positions"):
        cache.keep_tree_path(b, tuple(range(-1, 12)), [0])
    assert cache.length(b) == 12


def test_fork_shares_full_pages_and_copies_the_partial_one():
    rng = np.random.default_rng(2)
    cache = tvm_attn.PagedKVCache(num_pages=16, page_size=16, kv_heads=2, head_dim=32)
    (parent,) = fill(cache, rng, [37])  # 2 full pages and 5 positions
    free = cache.free_pages
    child = cache.fork_sequence(parent)
    assert cache.pages(child)[:2] == cache.pages(parent)[:2] and cache.pages(child)[2] != cache.pages(parent)[2]
    assert cache.free_pages == free - 1 and cache.length(child) == 37
    before = cache.gather(parent)
    for seq in (child, parent):  # each writes its own continuation
        cache.append(seq, *(rng.standard_normal((2, 20, 32)).astype(np.float32) for _ in "kv"))
    assert np.array_equal(cache.gather(parent)[0][:, :37], before[0])
    assert np.array_equal(cache.gather(child)[0][:, :37], before[0])
    assert not np.array_equal(cache.gather(child)[0][:, 37:], cache.gather(parent)[0][:, 37:])
    q = _rows(rng, 2, 4, 32, "float32")
    out = cache.attend(q, [parent, child], [1, 1])
    check(cache, out, q, [parent, child], [1, 1])
    cache.remove_sequence(parent)  # the shared pages stay with the child
    out = cache.attend(q[1:], [child], [1])
    check(cache, out, q[1:], [child], [1])
    cache.remove_sequence(child)
    assert cache.free_pages == cache.num_pages and cache.sequences == ()


def test_stale_values_in_reused_pages_never_reach_a_sequence():
    """Pages freed with NaN in them, taken again by a sequence whose last page is partial: the kernel reads that
    page's slots past the sequence's end (with weight 0) and must find zeros there, not the NaN."""
    rng = np.random.default_rng(6)
    cache = tvm_attn.PagedKVCache(num_pages=6, page_size=8, kv_heads=1, head_dim=16, config=SMALL)
    poisoned = cache.add_sequence()
    cache.append(poisoned, *(np.full((1, 48, 16), np.nan, np.float32) for _ in "kv"))  # every page
    cache.remove_sequence(poisoned)
    a, b = fill(cache, rng, [19, 3])
    c = cache.fork_sequence(a)
    q = _rows(rng, 3, 2, 16, "float32")
    out = cache.attend(q, [a, b, c], [1, 1, 1])
    check(cache, out, q, [a, b, c], [1, 1, 1])


def test_removed_pages_are_reused_and_one_kernel_serves_every_batch():
    rng = np.random.default_rng(3)
    cache = tvm_attn.PagedKVCache(num_pages=12, page_size=8, kv_heads=1, head_dim=16)
    a, b, c = fill(cache, rng, [30, 17, 25])
    q = _rows(rng, 3, 2, 16, "float32")
    cache.attend(q, [a, b, c], [1, 1, 1])
    compiled = tvm_attn.compile_count()
    cache.remove_sequence(b)
    (d,) = fill(cache, rng, [20])  # takes b's pages back
    for seqs, counts in (([a, c, d], [1, 1, 1]), ([d], [3]), ([c, a], [2, 1])):
        q = _rows(rng, sum(counts), 2, 16, "float32")
        out = cache.attend(q, seqs, counts)
        check(cache, out, q, seqs, counts)
    assert tvm_attn.compile_count() == compiled


def test_bad_input_names_the_sequence_and_writes_nothing():
    rng = np.random.default_rng(4)
    cache = tvm_attn.PagedKVCache(num_pages=4, page_size=8, kv_heads=2, head_dim=16)
    a, b = fill(cache, rng, [10, 3])
    kv = lambda n: rng.standard_normal((2, n, 16)).astype(np.float32)  # noqa: E731
    free, length = cache.free_pages, cache.length(a)
    with pytest.raises(ValueError, match="sequence 0 .* needs 2 new pages .* 1 are free; nothing was written"):
        cache.append(a, kv(20), kv(20))
    assert cache.free_pages == free and cache.length(a) == length
    with pytest.raises(ValueError, match="unknown sequence 7"):
        cache.append(7, kv(1), kv(1))
    cache.remove_sequence(b)
    with pytest.raises(ValueError, match="unknown sequence 1 .*removed"):
        cache.attend(rng.standard_normal((1, 2, 16)).astype(np.float32), [b], [1])
    q = rng.standard_normal((3, 2, 16)).astype(np.float32)
    with pytest.raises(ValueError, match="add up to 2 rows, q has 3"):
        cache.attend(q, [a], [2])
    with pytest.raises(ValueError, match="sequence 0 has 11 query rows but 10 cached positions"):
        cache.attend(np.zeros((11, 2, 16), np.float32), [a], [11])
    with pytest.raises(ValueError, match="query count of sequence 0 must be an int >= 1"):
        cache.attend(q, [a], [0])
    with pytest.raises(TypeError, match="q must be float32 like the cache"):
        cache.attend(q.astype(np.float16), [a], [3])
    with pytest.raises(ValueError, match="heads=3, not a multiple of the cache's kv_heads=2"):
        cache.attend(np.zeros((1, 3, 16), np.float32), [a], [1])
    with pytest.raises(ValueError, match=r"shape \(kv_heads=2, n, head_dim=16\)"):
        cache.append(a, np.zeros((1, 1, 16), np.float32), np.zeros((1, 1, 16), np.float32))
    empty = cache.add_sequence()
    with pytest.raises(ValueError, match=f"sequence {empty} is empty"):
        cache.attend(q[:1], [empty], [1])
    with pytest.raises(ValueError, match="page_size=200 is above block_kv=128 and not a multiple of it"):
        tvm_attn.PagedKVCache(num_pages=4, page_size=200, kv_heads=2, head_dim=16)
    with pytest.raises(ValueError, match="num_pages must be >= 1"):
        tvm_attn.PagedKVCache(num_pages=0, page_size=8, kv_heads=2, head_dim=16)
    full = tvm_attn.PagedKVCache(num_pages=2, page_size=4, kv_heads=2, head_dim=16)
    (s,) = fill(full, rng, [7])
    with pytest.raises(ValueError, match="forking sequence 0 copies its partial last page and no page is free"):
        full.fork_sequence(s)
    assert full.sequences == (s,)
