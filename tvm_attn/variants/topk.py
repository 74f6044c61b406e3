"""Top-k-pruned attention in TensorIR: softmax over the k largest scores of each row.

Selection costs O(32 n) per row, not a sort: a bisection over order-preserving int32 keys of the scaled scores
finds the k-th largest key exactly (32 halvings of the int32 range), then one pass finds the key index where the
ties at that key run out (ties go to the lower key index). A key j is kept when key_j > cut_key, or
key_j == cut_key and j <= cut_index.

Block names (the contract with schedules/topk.py): qk, row_max, select, exp, row_sum, pv, out.
"""

from __future__ import annotations

from tvm.script import tirx as T

from ..spec import AttentionSpec


def order_key(x):
    """int32 whose signed order is the float order of x (with -0.0 folded onto +0.0)."""
    bits = T.reinterpret("int32", x)
    flipped = T.bitwise_xor(bits, T.bitwise_and(T.shift_right(bits, 31), T.int32(0x7FFFFFFF)))
    return T.Select(x == T.float32(0), T.int32(0), flipped)


def compute(spec: AttentionSpec):
    B, H, KVH, SQ, SKV, D = spec.batch, spec.heads, spec.kv_heads, spec.seq_q, spec.seq_kv, spec.head_dim
    G = spec.group_size
    OFF = spec.causal_offset
    CAUSAL = spec.causal
    TOP_K = spec.top_k
    SCALE = T.float32(spec.scale)
    ZERO = T.float32(0)
    dtype = spec.dtype

    def n_visible(i):
        return T.min(SKV, T.max(0, i + OFF + 1)) if CAUSAL else SKV

    def visible(i, j):
        return j <= i + OFF if CAUSAL else True

    @T.prim_func(s_tir=True)
    def topk(
        q: T.Buffer((B, H, SQ, D), dtype),
        k: T.Buffer((B, KVH, SKV, D), dtype),
        v: T.Buffer((B, KVH, SKV, D), dtype),
        out: T.Buffer((B, H, SQ, D), dtype),
    ):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        with T.sblock("root"):  # intermediates must be root-block allocations for compute_at
            qk = T.sblock_alloc_buffer((B, H, SQ, SKV), dtype)
            row_max = T.sblock_alloc_buffer((B, H, SQ), dtype)
            cut_key = T.sblock_alloc_buffer((B, H, SQ), "int32")
            cut_index = T.sblock_alloc_buffer((B, H, SQ), "int32")
            exp = T.sblock_alloc_buffer((B, H, SQ, SKV), dtype)
            row_sum = T.sblock_alloc_buffer((B, H, SQ), dtype)
            pv = T.sblock_alloc_buffer((B, H, SQ, D), dtype)
            for b, h, i, j, d in T.grid(B, H, SQ, SKV, D):
                with T.sblock("qk"):
                    vb, vh, vi, vj, vd = T.axis.remap("SSSSR", [b, h, i, j, d])
                    with T.init():
                        qk[vb, vh, vi, vj] = ZERO
                    qk[vb, vh, vi, vj] = qk[vb, vh, vi, vj] + q[vb, vh, vi, vd] * k[vb, vh // G, vj, vd]
            for b, h, i, j in T.grid(B, H, SQ, SKV):
                with T.sblock("row_max"):
                    vb, vh, vi, vj = T.axis.remap("SSSR", [b, h, i, j])
                    with T.init():
                        row_max[vb, vh, vi] = T.min_value("float32")
                    row_max[vb, vh, vi] = T.max(
                        row_max[vb, vh, vi], T.Select(visible(vi, vj), qk[vb, vh, vi, vj] * SCALE, T.min_value("float32"))
                    )
            for b, h, i in T.grid(B, H, SQ):
                with T.sblock("select"):
                    vb, vh, vi = T.axis.remap("SSS", [b, h, i])
                    T.reads(qk[vb, vh, vi, 0:SKV])
                    T.writes(cut_key[vb, vh, vi], cut_index[vb, vh, vi])
                    lo = T.sblock_alloc_buffer((1,), "int64")
                    hi = T.sblock_alloc_buffer((1,), "int64")
                    count = T.sblock_alloc_buffer((1,), "int32")
                    n = n_visible(vi)
                    kk = T.min(TOP_K, n)
                    # Invariant: at least kk keys are >= lo, fewer than kk are >= hi.
                    lo[0] = T.int64(-(2**31))
                    hi[0] = T.int64(2**31)
                    for _ in range(32):
                        count[0] = 0
                        for jj in range(n):
                            count[0] = count[0] + T.Cast(
                                "int32",
                                T.Cast("int64", order_key(qk[vb, vh, vi, jj] * SCALE))
                                >= T.shift_right(lo[0] + hi[0], T.int64(1)),
                            )
                        if count[0] >= kk:
                            lo[0] = T.shift_right(lo[0] + hi[0], T.int64(1))
                        else:
                            hi[0] = T.shift_right(lo[0] + hi[0], T.int64(1))
                    cut_key[vb, vh, vi] = T.Cast("int32", lo[0])
                    # Keys strictly above the cut are all kept; the rest of the quota goes to the first ties.
                    count[0] = 0
                    for jj in range(n):
                        count[0] = count[0] + T.Cast("int32", order_key(qk[vb, vh, vi, jj] * SCALE) > cut_key[vb, vh, vi])
                    count[0] = kk - count[0]
                    cut_index[vb, vh, vi] = -1
                    for jj in range(n):
                        if count[0] > 0 and order_key(qk[vb, vh, vi, jj] * SCALE) == cut_key[vb, vh, vi]:
                            count[0] = count[0] - 1
                            cut_index[vb, vh, vi] = jj
            for b, h, i, j in T.grid(B, H, SQ, SKV):
                with T.sblock("exp"):
                    vb, vh, vi, vj = T.axis.remap("SSSS", [b, h, i, j])
                    exp[vb, vh, vi, vj] = T.Select(
                        visible(vi, vj)
                        and (
                            order_key(qk[vb, vh, vi, vj] * SCALE) > cut_key[vb, vh, vi]
                            or (order_key(qk[vb, vh, vi, vj] * SCALE) == cut_key[vb, vh, vi] and vj <= cut_index[vb, vh, vi])
                        ),
                        T.exp(qk[vb, vh, vi, vj] * SCALE - row_max[vb, vh, vi]),
                        ZERO,
                    )
            for b, h, i, j in T.grid(B, H, SQ, SKV):
                with T.sblock("row_sum"):
                    vb, vh, vi, vj = T.axis.remap("SSSR", [b, h, i, j])
                    with T.init():
                        row_sum[vb, vh, vi] = ZERO
                    row_sum[vb, vh, vi] = row_sum[vb, vh, vi] + exp[vb, vh, vi, vj]
            for b, h, i, d, j in T.grid(B, H, SQ, D, SKV):
                with T.sblock("pv"):
                    vb, vh, vi, vd, vj = T.axis.remap("SSSSR", [b, h, i, d, j])
                    with T.init():
                        pv[vb, vh, vi, vd] = ZERO
                    pv[vb, vh, vi, vd] = pv[vb, vh, vi, vd] + exp[vb, vh, vi, vj] * v[vb, vh // G, vj, vd]
            for b, h, i, d in T.grid(B, H, SQ, D):
                with T.sblock("out"):
                    vb, vh, vi, vd = T.axis.remap("SSSS", [b, h, i, d])
                    out[vb, vh, vi, vd] = T.Select(row_sum[vb, vh, vi] > ZERO, pv[vb, vh, vi, vd] / row_sum[vb, vh, vi], ZERO)

    return topk
