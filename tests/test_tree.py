"""Tree masks (AttentionSpec.tree_parents, speculative decoding's draft trees): the query rows are a tree's nodes,
whose keys are the last seq_q keys, and each row sees the keys before the tree, its ancestors and itself. Checked
the way the definition reads: each node's row equals the last row of its root-to-node path run as its own causal
sequence (float64 reference of that path), for the dense variants' prefill (more than 8 nodes) and decode kernels;
refused where it is not taken."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest

import tvm_attn
from conftest import TREE_16, assert_matches_reference, knobs_for, make_inputs, output_tolerance
from tvm_attn import export, runtime
from tvm_attn.variants import DECODE_MAX_ROWS, TREE_DECODE_MAX_ROWS, TREE_KERNEL_MIN_ROWS

# 16 nodes, branching at several depths (a draft tree of speculative decoding; the tree kernel serves trees of
# TREE_KERNEL_MIN_ROWS..TREE_DECODE_MAX_ROWS nodes, the split-KV decode kernel smaller ones); 40 nodes, a binary heap
# with a second root (the prefill kernels); 5 nodes
# with two roots (a forest: two first-token candidates); 8 nodes.
TREE_40 = (-1,) + tuple((i - 1) // 2 for i in range(1, 39)) + (-1,)
FOREST_5 = (-1, -1, 0, 1, 1)
TREE_8 = (-1, 0, 1, 0, 3, 2, 4, 4)

# (heads, kv_heads, cached keys before the tree, head_dim, dtype)
SHAPES = [(4, 2, 37, 40, "float32"), (6, 2, 0, 64, "float32"), (4, 4, 257, 48, "float32"),
          (4, 2, 130, 64, "bfloat16"), (4, 2, 90, 32, "float16")]
CASES = ([("flash", TREE_16, shape) for shape in SHAPES] + [("flash", TREE_40, shape) for shape in SHAPES[::3]]
         + [("flash", TREE_16[:10], shape) for shape in SHAPES[:4:3]]  # 10 nodes: the split-KV decode kernel
         + [("flash", FOREST_5, shape) for shape in SHAPES[:4]]
         + [("standard", TREE_40, SHAPES[0]), ("standard", TREE_8, SHAPES[2]),
            ("mqa", TREE_40, SHAPES[0]), ("mqa", FOREST_5, SHAPES[0])])


def case_id(value) -> str:
    """Test ids: a tree by its node count, a shape by its fields."""
    if isinstance(value, tuple) and value and isinstance(value[0], int) and value[0] == -1:
        return f"{len(value)}nodes"
    return str(value)


def path_to(parents, node: int) -> list[int]:
    """The nodes from node's root down to node."""
    path = [node]
    while parents[path[0]] >= 0:
        path.insert(0, parents[path[0]])
    return path


def tree_inputs(shape, parents, seed=0, batch=2):
    heads, kv_heads, cached, head_dim, dtype = shape
    spec = tvm_attn.AttentionSpec(batch=batch, heads=heads, kv_heads=kv_heads, seq_q=len(parents),
                                  seq_kv=cached + len(parents), head_dim=head_dim, causal=True, dtype=dtype,
                                  tree_parents=parents)
    return (spec, *make_inputs(spec, seed=seed, q_scale=2.0))


def assert_rows_equal_their_paths(spec, out, q, k, v, variant="flash", **features):
    """Each node's row of ``out`` (``variant``'s) against the float64 reference of its path run as its own causal
    sequence, within the tolerance of the tree's call (its path's keys are among the tree call's)."""
    cached = spec.seq_kv - spec.seq_q
    rtol, atol = output_tolerance(spec, variant, v)
    for node in range(spec.seq_q):
        path = path_to(spec.tree_parents, node)
        keys = list(range(cached)) + [cached + p for p in path]
        path_ref = tvm_attn.reference(q[:, :, path], k[:, :, keys], v[:, :, keys], causal=True, **features)
        np.testing.assert_allclose(np.asarray(out[:, :, node], np.float64), path_ref[:, :, -1], rtol=rtol, atol=atol,
                                   err_msg=f"tree node {node} (path {path}) differs from its path's own attention")


@pytest.mark.parametrize("variant,parents,shape", CASES, ids=case_id)
def test_tree_rows_equal_their_paths(variant, parents, shape):
    spec, q, k, v = tree_inputs(shape, parents, seed=len(parents) + shape[2])
    out = tvm_attn.attention(q, k, v, variant=variant, causal=True, tree_parents=parents)
    assert_matches_reference(variant, spec, out, q, k, v)
    assert_rows_equal_their_paths(spec, out, q, k, v, variant)
    causal = tvm_attn.reference(q, k, v, causal=True)  # the test can fail: the tree hides keys the causal mask shows
    assert np.abs(causal - out.astype(np.float64)).max() > 0.05


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_the_tree_kernel_widens_16_bit_tiles_once_without_pair_products(dtype):
    """AVX2 code (x86-64-v3: no pair products, as on AVX-512 without BF16 and NEON without it) widens each 16-bit
    KV tile to float32 once (blocks k_wide, v_wide), here over three chunks of keys with a window, against the
    float64 reference."""
    from tvm import s_tir

    from tvm_attn.kernel import scheduled_module
    from tvm_attn.schedules.common import has_block

    avx2 = {"kind": "llvm", "mcpu": "x86-64-v3"}
    if not tvm_attn.targets.runs_on_host(avx2):
        pytest.skip("this host does not run AVX2 code")
    spec = tvm_attn.AttentionSpec(batch=1, heads=6, kv_heads=2, seq_q=16, seq_kv=2100, head_dim=40, causal=True,
                                  window=1800, dtype=dtype, tree_parents=TREE_16)
    kernel = tvm_attn.build("flash", spec, target=avx2)
    assert kernel.path == "tree"
    mod = scheduled_module(tvm_attn.get_variant("flash"), spec, tvm_attn.resolve_target(avx2), "hand", "tree").mod
    assert has_block(s_tir.Schedule(mod), "k_wide") and has_block(s_tir.Schedule(mod), "v_wide")
    q, k, v = make_inputs(spec, seed=8, q_scale=2.0)
    assert_matches_reference("flash", spec, kernel(q, k, v, tree_parents=TREE_16), q, k, v, avx2)


# top_k 12 with 3 keys before the tree: deep nodes see 3 + depth keys, fewer than top_k and fewer than the causal
# range, so the selection reaches keys the tree hides.
PRUNED_CASES = [(variant, knob, TREE_16, 3) for variant, knob in (
    ("topk", {"top_k": 12}), ("threshold", {"threshold": 0.05}), ("mass", {"eps": 0.05}))] + [
    ("topk", {"top_k": 5}, FOREST_5, 40), ("bounded", {"eps": 0.05}, TREE_16, 300)]


@pytest.mark.parametrize("variant,knob,parents,cached", PRUNED_CASES, ids=case_id)
def test_pruned_variants_prune_within_the_tree(variant, knob, parents, cached):
    spec, q, k, v = tree_inputs((4, 2, cached, 32, "float32"), parents, seed=cached)
    spec = dataclasses.replace(spec, **knob)
    out = tvm_attn.attention(q, k, v, variant=variant, causal=True, tree_parents=parents, **knob)
    assert_matches_reference(variant, spec, out, q, k, v)
    causal = tvm_attn.reference(q, k, v, variant=variant, causal=True, **knob)
    assert np.abs(out - causal).max() > 0.05  # the tree hides keys that matter
    # Through a cache: the kernel reading its shadow of K for bounded, and for top-k's and threshold's decode calls
    cache = tvm_attn.KVCache(spec.batch, spec.kv_heads, spec.head_dim, capacity=spec.seq_kv)
    cache.append(k, v)
    assert_matches_reference(variant, spec, cache.attend(q, variant=variant, tree_parents=parents, **knob), q, k, v)
    assert (cache.shadow is not None) == (variant == "bounded" or (
        variant in ("topk", "threshold") and len(parents) <= DECODE_MAX_ROWS))


@pytest.mark.parametrize("parents", [TREE_40, TREE_16, TREE_16[:10]], ids=["prefill", "tree", "decode"])
def test_trees_with_sinks_and_softcap(parents):
    spec, q, k, v = tree_inputs((4, 2, 61, 64, "float32"), parents, seed=3)
    spec = dataclasses.replace(spec, softcap=5.0, sinks=True)
    sinks = np.linspace(-1.0, 4.0, 4).astype(np.float32)
    out = tvm_attn.attention(q, k, v, causal=True, tree_parents=parents, softcap=5.0, sinks=sinks)
    assert_matches_reference("flash", spec, out, q, k, v, sinks=sinks)
    assert_rows_equal_their_paths(spec, out, q, k, v, softcap=5.0, sinks=sinks)


# Windows and ALiBi count a node's position as the cached keys plus its depth (its path's own positions): a window
# of 3 cuts inside the trees (depths up to 7), one of 30 among the cached keys.
WINDOW_CASES = [("flash", TREE_40, 3, False), ("flash", TREE_16, 3, True), ("flash", TREE_16, 30, False),
                ("flash", FOREST_5, None, True), ("standard", TREE_40, 30, True), ("topk", TREE_16, 3, True),
                ("mass", TREE_8, 30, True)]


@pytest.mark.parametrize("variant,parents,window,alibi", WINDOW_CASES, ids=case_id)
def test_trees_with_windows_and_alibi_count_positions_by_depth(variant, parents, window, alibi):
    spec, q, k, v = tree_inputs((4, 2, 61, 32, "float32"), parents, seed=len(parents))
    features = dict(window=window, alibi_slopes=(0.5, 0.25, 0.125, 0.0625) if alibi else None)
    knob = knobs_for(variant)[0]
    spec = dataclasses.replace(spec, **features, **knob)
    out = tvm_attn.attention(q, k, v, variant=variant, causal=True, tree_parents=parents, **features, **knob)
    assert_matches_reference(variant, spec, out, q, k, v)
    if variant in ("flash", "standard"):
        assert_rows_equal_their_paths(spec, out, q, k, v, variant, **features)
        plain = tvm_attn.reference(q, k, v, causal=True, tree_parents=parents)  # the test can fail
        assert np.abs(plain - out.astype(np.float64)).max() > 0.05


def test_draft_trees_up_to_16_nodes_take_the_split_kv_kernels():
    def path(variant, nodes):
        spec = tvm_attn.AttentionSpec(heads=4, kv_heads=2, seq_q=nodes, seq_kv=nodes + 50, head_dim=32, causal=True,
                                      tree_parents=tuple(range(-1, nodes - 1)), **knobs_for(variant)[0])
        return tvm_attn.get_variant(variant).path_of(spec)

    assert DECODE_MAX_ROWS < 9 < TREE_KERNEL_MIN_ROWS == 12 <= TREE_DECODE_MAX_ROWS == 16
    assert [path("flash", n) for n in (8, 9, 11, 12, 16, 17)] == ["decode", "decode", "decode", "tree", "tree",
                                                                   "prefill"]
    assert path("mqa", 16) == path("standard", 16) == "tree"
    assert path("topk", 9) == path("topk", 16) == "prefill"  # (its decode kernel is not split-KV)
    spec = tvm_attn.AttentionSpec(heads=4, kv_heads=2, seq_q=16, seq_kv=60, head_dim=32, causal=True,
                                  tree_parents=TREE_16)
    assert [tvm_attn.build("flash", spec, path=p).path for p in (None, "decode", "prefill")] == [
        "tree", "decode", "prefill"]
    with pytest.raises(ValueError, match="path must be None"):
        tvm_attn.build("bounded", dataclasses.replace(spec, tree_parents=None, eps=0.1), path="decode")
    with pytest.raises(ValueError, match="path must be None"):
        tvm_attn.build("topk", dataclasses.replace(spec, top_k=4), path="tree")
    with pytest.raises(LookupError, match="the flash kernel for draft trees is not tuned"):
        tvm_attn.build("flash", spec, schedule="tuned")


@pytest.mark.parametrize("nodes", [20])
def test_a_chain_is_the_causal_mask(nodes):
    parents = tuple(range(-1, nodes - 1))
    spec, q, k, v = tree_inputs((4, 2, 100, 64, "float32"), parents, seed=nodes)
    tree = tvm_attn.attention(q, k, v, causal=True, tree_parents=parents)
    np.testing.assert_array_equal(tree, tvm_attn.attention(q, k, v, causal=True))


def test_a_kernel_serves_every_tree_and_length():
    """One compiled tree kernel, other trees and cache lengths: the mask is a run-time argument."""
    kernel = tvm_attn.build("flash", tvm_attn.AttentionSpec(batch=1, heads=4, kv_heads=2, seq_q=16, seq_kv=100,
                                                            head_dim=32, causal=True, tree_parents=TREE_16))
    for parents, cached in ((TREE_16, 300), (TREE_16[:12], 7), (tuple(range(-1, 9)) + (0, 0, 0), 64)):
        spec, q, k, v = tree_inputs((4, 2, cached, 32, "float32"), parents, seed=cached, batch=1)
        out = kernel(q, k, v, tree_parents=parents)
        assert_rows_equal_their_paths(spec, out, q, k, v)
    # The mask is cached per tree, read-only, and not kept on the spec (whose fields alone make it)
    assert spec.tree_mask is spec.tree_mask and not spec.tree_mask.flags.writeable
    assert tvm_attn.AttentionSpec(**vars(spec)) == spec


def test_bad_trees_are_clear_errors():
    spec, q, k, v = tree_inputs((4, 2, 10, 32, "float32"), TREE_8)
    bad = [
        (dict(tree_parents=(-1, 0, 1)), ValueError, r"shape \(seq_q,\) = \(8,\)"),
        (dict(tree_parents=(-1, 0, 1, 3, 3, 2, 4, 4)), ValueError, r"tree_parents\[3\] = 3.*not before it"),
        (dict(tree_parents=(-1, 2, 1, 0, 3, 2, 4, 4)), ValueError, r"tree_parents\[1\] = 2"),  # a cycle 1 <-> 2
        (dict(tree_parents=(-1, 0, 1, 0, 3, 2, 4, 9)), ValueError, r"tree_parents\[7\] = 9: .*not a node"),
        (dict(tree_parents=(-2, 0, 1, 0, 3, 2, 4, 4)), ValueError, r"tree_parents\[0\] = -2"),
        (dict(tree_parents=np.array(TREE_8, np.float32)), TypeError, "must hold ints"),
        (dict(tree_parents="01"), TypeError, "sequence or array"),
    ]
    for kwargs, error, message in bad:
        with pytest.raises(error, match=message):
            tvm_attn.attention(q, k, v, causal=True, **kwargs)
    with pytest.raises(ValueError, match="needs causal=True"):
        tvm_attn.attention(q, k, v, tree_parents=TREE_8)
    with pytest.raises(ValueError, match="only seq_kv=5 keys"):
        tvm_attn.attention(q, k[:, :, :5], v[:, :, :5], causal=True, tree_parents=TREE_8)
    _, q40, k40, v40 = tree_inputs((4, 2, 10, 32, "float32"), TREE_40)
    with pytest.raises(ValueError, match="schedule='blas' does not take tree masks yet"):
        tvm_attn.attention(q40, k40, v40, causal=True, tree_parents=TREE_40, schedule="blas")
    tree_kernel = tvm_attn.build("flash", spec)
    with pytest.raises(ValueError, match="pass tree_parents="):
        tree_kernel(q, k, v)
    plain_kernel = tvm_attn.build("flash", dataclasses.replace(spec, tree_parents=None))
    with pytest.raises(ValueError, match="built without a tree mask"):
        plain_kernel(q, k, v, tree_parents=TREE_8)


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_verify_a_tree_through_a_cache_and_keep_the_accepted_path(dtype):
    """A speculative decoding step: append the tree's keys and values, verify every node in one attend, keep the
    accepted path; the cache then holds what appending the path alone would have."""
    shape = (4, 2, 45, 32, "float32" if dtype == "int8" else dtype)
    spec, q, k, v = tree_inputs(shape, TREE_40, seed=5, batch=1)
    cached = spec.seq_kv - spec.seq_q
    cache = tvm_attn.KVCache(batch=1, kv_heads=2, head_dim=32, capacity=100, dtype=dtype)
    path_cache = tvm_attn.KVCache(batch=1, kv_heads=2, head_dim=32, capacity=100, dtype=dtype)
    for c in (cache, path_cache):
        c.append(k[:, :, :cached], v[:, :, :cached])
    cache.append(k[:, :, cached:], v[:, :, cached:])
    k_all, v_all = cache.dequantized()
    for rows in (slice(None), slice(0, 5)):  # the 40-node tree (prefill kernel) and its first 5 nodes (decode)
        if rows.stop:
            cache.truncate(cached + rows.stop)
        parents = TREE_40[rows]
        out = cache.attend(q[:, :, rows], tree_parents=parents)
        nodes = len(parents)
        tree_spec = dataclasses.replace(spec, seq_q=nodes, seq_kv=cached + nodes, tree_parents=parents)
        assert_matches_reference("flash", tree_spec, out, q[:, :, rows], k_all[:, :, :cached + nodes],
                                 v_all[:, :, :cached + nodes])
    # A cache keeps a kernel per path: 16 nodes after 40 take the tree kernel, not the 40-node call's prefill one
    cache.append(k[:, :, cached + 5:cached + 16], v[:, :, cached + 5:cached + 16])
    assert {cache._kernel("flash", 4, n, True, None, None, "best", {"tree_parents": TREE_40[:n]}).path
            for n in (16, 40)} == {"tree", "prefill"}
    cache.append(k[:, :, cached + 16:], v[:, :, cached + 16:])
    accepted = [0, 1, 3, 7]
    cache.keep_tree_path(TREE_40, accepted)
    path_cache.append(k[:, :, [cached + node for node in accepted]], v[:, :, [cached + node for node in accepted]])
    assert cache.length == path_cache.length == cached + 4
    for mine, theirs in zip(cache.dequantized(), path_cache.dequantized()):
        np.testing.assert_array_equal(mine, theirs)
    np.testing.assert_array_equal(cache.attend(q[:, :, :1]), path_cache.attend(q[:, :, :1]))
    cache.append(k[:, :, cached:cached + 3], v[:, :, cached:cached + 3])
    cache.keep_tree_path((-1, 0, 0), [])  # none accepted
    assert cache.length == cached + 4


def test_a_padded_batch_verifies_each_sequence_s_tree():
    """attention_mask pads sequences of different lengths on the left: each row's nodes see that row's own cached
    keys and their ancestors, at that row's positions (ALiBi), as the float64 reference on the row's run alone; a
    row whose mask leaves out some of the tree's nodes is refused."""
    rng = np.random.default_rng(11)
    nodes, length = len(TREE_16), 46
    q = (2 * rng.standard_normal((3, 4, nodes, 32))).astype(np.float32)
    k, v = (rng.standard_normal((3, 2, length, 32)).astype(np.float32) for _ in "kv")
    cache = tvm_attn.KVCache(batch=3, kv_heads=2, head_dim=32, capacity=length, shadow=False)
    cache.append(k, v)
    firsts = (0, 18, length - nodes)  # 30, 12 and no cached keys before the tree
    mask = np.zeros((3, length), np.int64)
    for row, first in enumerate(firsts):
        mask[row, first:] = 1
    slopes = (0.5, 0.25, 0.125, 0.0625)
    out = cache.attend(q, tree_parents=TREE_16, attention_mask=mask, alibi_slopes=slopes)
    for row, first in enumerate(firsts):
        spec = tvm_attn.AttentionSpec(batch=1, heads=4, kv_heads=2, seq_q=nodes, seq_kv=length - first, head_dim=32,
                                      causal=True, tree_parents=TREE_16, alibi_slopes=slopes)
        assert_matches_reference("flash", spec, out[row:row + 1], q[row:row + 1], k[row:row + 1, :, first:],
                                 v[row:row + 1, :, first:])
    mask[1, :length - nodes + 3] = 0  # row 1's first three nodes marked as padding
    with pytest.raises(ValueError, match="attention_mask row 1 marks 13 of the 16 newest positions real"):
        cache.attend(q, tree_parents=TREE_16, attention_mask=mask)


def test_bad_tree_paths_leave_the_cache_unchanged():
    cache = tvm_attn.KVCache(batch=1, kv_heads=2, head_dim=32, capacity=40)
    k = np.random.default_rng(0).standard_normal((1, 2, 20, 32)).astype(np.float32)
    cache.append(k, k)
    before = cache.k.copy()
    bad = [((-1, 0, 0, 1), [0, 2, 3], ValueError, r"path\[2\] = 3: its parent is 1, not 2"),
           ((-1, 0, 0, 1), [1], ValueError, r"path\[0\] = 1: its parent is 0, not -1"),
           ((-1, 0, 0, 1), [0, 7], ValueError, r"path\[1\] = 7 is not a node of the 4-node tree"),
           ((-1, 0, 0, 1), [0.0], TypeError, "node indices"),
           ((-1, 1), [0], ValueError, r"tree_parents\[1\] = 1"),
           (tuple(range(-1, 21)), [0], ValueError, "22 nodes but the cache holds 20")]
    for parents, path, error, message in bad:
        with pytest.raises(error, match=message):
            cache.keep_tree_path(parents, path)
        assert cache.length == 20
        np.testing.assert_array_equal(cache.k, before)
    q = np.zeros((1, 4, 4, 32), np.float32)
    with pytest.raises(ValueError, match=r"shape \(seq_q,\) = \(4,\)"):
        cache.attend(q, tree_parents=(-1, 0, 0))


def test_the_tree_kernel_on_other_isa_classes():
    """The tree kernel's schedule asks the target for its vectors and registers: AVX2 code (run here) matches the
    reference (NEON code runs under emulation in tests/test_arm64.py)."""
    spec, q, k, v = tree_inputs((6, 2, 70, 48, "float32"), TREE_16, seed=9, batch=1)
    avx2 = tvm_attn.build("flash", spec, target={"kind": "llvm", "mcpu": "x86-64-v3", "mtriple": "x86_64-linux-gnu"})
    assert avx2.path == "tree"
    assert_matches_reference("flash", spec, avx2(q, k, v, tree_parents=TREE_16), q, k, v)


def test_torch_op_and_export_take_trees(tmp_path):
    torch = pytest.importorskip("torch")
    import tvm_attn.torch_ops  # noqa: F401

    spec, q, k, v = tree_inputs((4, 2, 23, 32, "float32"), TREE_16, seed=8, batch=1)
    out = torch.ops.tvm_attn.attention(*map(torch.from_numpy, (q, k, v)), "flash", True,
                                       tree_parents=torch.tensor(TREE_16))
    assert_matches_reference("flash", spec, out.numpy(), q, k, v)
    kernel = runtime.load(export.export("flash", spec, "host", tmp_path, log=io.StringIO()).manifest)
    assert [a["name"] for a in kernel.manifest["arguments"]] == ["q", "k", "v", "tree", "out"]
    assert kernel.manifest["kernel"] == "tree"  # a 16-node tree: the tree kernel, as build takes
    assert "tree" in kernel.manifest["semantics"]
    assert_matches_reference("flash", spec, kernel(q, k, v, tree_parents=TREE_16), q, k, v)
    with pytest.raises(ValueError, match="takes a tree mask"):
        kernel(q, k, v)
    with pytest.raises(ValueError, match=r"tree_parents\[3\] = 5"):
        kernel(q, k, v, tree_parents=(-1, 0, 0, 5) + TREE_16[4:])
