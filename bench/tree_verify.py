"""Verifying a speculative decoding draft tree in one call against one decode call per node (issue 29's goal: a
16-node tree over an 8k-position cache in at most a quarter of the time of 16 decode calls), timed in one interleaved
round per point with the benchmark's timer (warm-up, then turns until 1 s each and a spread under 5%), schedule
"best" (tuned records where this CPU has them; a tree kernel replays the record of the causal kernel without).

The tree call is each dense kernel serving the 16 rows over the cache and the tree's keys: the split-KV decode kernel
(what ``build`` and ``KVCache.attend`` take for trees of up to 16 nodes, ``variants.TREE_DECODE_MAX_ROWS``), and, for
comparison, flash's and mqa's prefill kernels (mqa stacks a KV group's query heads in its row tiles). The 16 decode
calls are flash's decode kernel, one query row each, over the cache and the node's path (cache + depth keys), as a
loop verifying each root-to-node path as its own sequence would run.

    python bench/tree_verify.py        # run on an idle machine; prints a markdown table
"""
import os

for k, v in (("TVM_THREAD_POOL_SPIN_COUNT", "0"),):
    os.environ.setdefault(k, v)
import warnings

import numpy as np

import tvm_attn
from tvm_attn.kernel import _build_cached
from tvm_attn.runtime import dlpack_argument, numpy_dtype
from tvm_attn.targets import resolve_target
from tvm_attn.timing import measure_interleaved

warnings.simplefilter("ignore")
TREE = (-1, 0, 0, 1, 1, 2, 3, 3, 4, 5, 6, 7, 9, 9, 10, 14)  # 16 nodes, depth 7 (tests/test_tree.py's TREE_16)
CACHED = 8192
POINTS = [("GQA 32/8 D128 (Llama 3 8B)", dict(heads=32, kv_heads=8, head_dim=128)),
          ("MHA 32 D128 (Llama 2 7B)", dict(heads=32, kv_heads=32, head_dim=128)),
          ("GQA 9/3 D64 (SmolLM2 135M)", dict(heads=9, kv_heads=3, head_dim=64))]
DTYPES = ("float32", "bfloat16")


def depth(node: int) -> int:
    return 0 if TREE[node] < 0 else depth(TREE[node]) + 1


def tree_call(variant, path, spec, q, k, v):
    """The runtime function of ``variant``'s ``path`` kernel for the tree, with its arguments bound."""
    kernel = _build_cached(variant, spec.kernel, path, str(resolve_target("host")), "best")
    args = [dlpack_argument(x) for x in kernel.arguments(q, k, v, np.empty_like(q), tree=spec.tree_mask)]
    return (lambda: kernel.function(*args)), kernel.schedule


def decode_calls(spec, q, k, v):
    """16 decode calls, node i's row over the cache and its path's keys."""
    one = tvm_attn.AttentionSpec(batch=1, heads=spec.heads, kv_heads=spec.kv_heads, seq_q=1, seq_kv=CACHED + 1,
                                 head_dim=spec.head_dim, causal=True, dtype=spec.dtype)
    kernel = tvm_attn.build("flash", one)
    calls = []
    for node in range(len(TREE)):
        keys = CACHED + depth(node) + 1  # (the timing depends on the count, not which keys)
        row = q[:, :, node:node + 1]
        calls.append([dlpack_argument(x) for x in kernel.arguments(row, k[:, :, :keys], v[:, :, :keys],
                                                                   np.empty_like(row))])

    def run():
        for args in calls:
            kernel.function(*args)

    return run, kernel.schedule


def main():
    rng = np.random.default_rng(0)
    print(f"# Tree verification on {tvm_attn.target_key('host')}: a {len(TREE)}-node tree over {CACHED} cached "
          f"positions, time of one call / time of {len(TREE)} decode calls (median of interleaved turns)\n")
    print("| shape | dtype | 16 decode calls | one call: split-KV decode kernel (taken) | flash prefill kernel | "
          "mqa prefill kernel |")
    print("|---|---|---|---|---|---|")
    for label, fields in POINTS:
        for dtype in DTYPES:
            spec = tvm_attn.AttentionSpec(batch=1, seq_q=len(TREE), seq_kv=CACHED + len(TREE), causal=True,
                                          dtype=dtype, tree_parents=TREE, **fields)
            np_dtype = numpy_dtype(dtype)
            q = rng.standard_normal(spec.q_shape).astype(np.float32).astype(np_dtype)
            k, v = (rng.standard_normal(spec.kv_shape).astype(np.float32).astype(np_dtype) for _ in "kv")
            fns, used = {}, {}
            fns["decode"], used["decode"] = decode_calls(spec, q, k, v)
            assert tvm_attn.get_variant("flash").path_of(spec) == "decode"
            for name, variant, path in (("flash decode", "flash", "decode"), ("flash", "flash", "prefill"),
                                        ("mqa", "mqa", "prefill")):
                fns[name], used[name] = tree_call(variant, path, spec, q, k, v)
            res = measure_interleaved(fns, min_seconds=1.0, spread=0.05, max_seconds=6)
            base = res["decode"].median_ms
            cells = [f"{res[n].median_ms / base:.3f}x ({res[n].median_ms:.2f} ms, {used[n]})"
                     for n in ("flash decode", "flash", "mqa")]
            print(f"| {label} | {dtype} | {base:.2f} ms ({used['decode']}) | " + " | ".join(cells) + " |",
                  flush=True)


if __name__ == "__main__":
    main()
