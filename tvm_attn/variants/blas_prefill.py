"""Dense prefill whose two matmuls per tile are BLAS calls (cblas sgemm), as torch's CPU flash attention does: the
online softmax, masks and tails stay in TensorIR. It computes what flash computes (standard and mqa too: the dense
variants are one function), so ``schedule="blas"`` serves any of them.

For each (batch, query head, tile of BQ query rows), KV tiles of BK keys are visited in order (causal and windowed
tiles only where some row sees a key): S = scale q k^T by one sgemm reading q and K where they lie (row strides as
leading dimensions), the online softmax of flash on S, O = P V by a second sgemm, acc = alpha acc + O. A partial
last tile passes its true row or key count to sgemm; the softmax masks keys past seq_kv, and rows past seq_q are
never written.

Blocks (the contract with schedules/blas_prefill.py):
  tile         one per (batch, head, row tile), owning the scratch buffers; inside it:
    blas_threads   the BLAS told to run this task's calls on one thread (when it can be told so per thread)
    init_stats, init_acc
    kv_tile    one per KV tile some row of the tile sees; inside it:
      qk_sgemm   S = scale q k^T                              (extern)
      tile_max, rescale, p, tile_sum                          (common.softmax_weights)
      pv_sgemm   O = P v                                      (extern)
      update, update_sum                                      (common.update_output)
    out        acc / l (0 for rows that see no key)
"""

from __future__ import annotations

import dataclasses

from tvm.script import tirx as T

from ..blas import Blas
from ..fast_exp import softmax_exp
from ..spec import KernelSpec
from .common import (ACC, Visibility, bhsd, ceil_div, fresh_block_names, init_online_softmax, online_softmax_state,
                     row_output, run_time_sizes, softmax_weights, update_output)

CBLAS_ROW_MAJOR, CBLAS_NO_TRANS, CBLAS_TRANS = 101, 111, 112


@dataclasses.dataclass(frozen=True)
class BlasTiles:
    """Row and KV tile sizes of the BLAS-backed prefill: each sgemm is (block_q x head_dim) by (head_dim x block_kv)
    and (block_q x block_kv) by (block_kv x head_dim)."""

    # Measured here (Zen 5, B2 H8 D64, seq 512-4096, OpenBLAS 0.3.31 with SkylakeX and with Haswell kernels, 2
    # threads) against 256 x 512, 128 x 512, 128 x 256 and 64 x 256: 256 x 256 within 1%-3% of the best without a
    # mask and the best with the causal mask (256 x 512 there: 0.66x-0.89x of it at seq 512-1024).
    block_q: int = 256
    block_kv: int = 256

    def __post_init__(self):
        for name in ("block_q", "block_kv"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BlasTiles.{name} must be an int >= 1, got {value!r}")


def compute(kspec: KernelSpec, blas: Blas, tiles: BlasTiles = BlasTiles()):
    """The PrimFunc of dense prefill for ``kspec`` with its tiles' matmuls calling ``blas``'s sgemm (float32)."""
    if kspec.dtype != "float32":
        raise ValueError(f"the BLAS-backed prefill computes float32 (cblas sgemm), got dtype={kspec.dtype}")
    H, KVH, D = kspec.heads, kspec.kv_heads, kspec.head_dim
    G = kspec.group_size
    BQ, BK = tiles.block_q, tiles.block_kv
    SCALE = T.float32(kspec.scale)
    NEG = T.min_value("float32")
    ZERO = T.float32(0)
    ONE = T.float32(1)
    SGEMM = blas.sgemm

    def size(x):
        """A size or leading dimension as the library takes it."""
        return T.Cast(blas.index_dtype, x)

    fresh_block_names()
    B, SQ, SKV = run_time_sizes()
    vis = Visibility(kspec, SQ, SKV)

    def row_sees(row0, r, j):
        return vis.sees(row0 + r, j)

    def last_row(rt):
        return T.min(rt * BQ + BQ, SQ) - 1

    @T.prim_func(s_tir=True)
    def blas_prefill(q_h: T.handle, k_h: T.handle, v_h: T.handle, out_h: T.handle):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        q = bhsd(q_h, B, H, SQ, D, "float32")
        k = bhsd(k_h, B, KVH, SKV, D, "float32")
        v = bhsd(v_h, B, KVH, SKV, D, "float32")
        out = bhsd(out_h, B, H, SQ, D, "float32")
        with T.sblock("root"):
            for b, h, rt in T.grid(B, H, ceil_div(SQ, BQ)):
                with T.sblock("tile"):
                    vb, vh, vrt = T.axis.remap("SSS", [b, h, rt])
                    S = T.sblock_alloc_buffer((BQ, BK), ACC)
                    P = T.sblock_alloc_buffer((BQ, BK), ACC)
                    O, m, t_max, t_sum, alpha, l, acc = online_softmax_state(BQ, D)
                    if blas.threads_local is not None:
                        with T.sblock("blas_threads"):
                            T.reads()
                            T.writes()
                            T.evaluate(T.call_extern("int32", blas.threads_local, 1))
                    init_online_softmax(m, l, acc, BQ, D, NEG, ZERO)
                    for t in range(vis.first_tile(vrt * BQ, BK), vis.end_tile(last_row(vrt), BK)):
                        with T.sblock("kv_tile"):
                            vt = T.axis.opaque(ceil_div(SKV, BK), t)
                            # Each sgemm block sits in a loop of one: TVM 0.27's rfactor (tile_max) fails on a block
                            # realized directly in kv_tile's body.
                            for _ in range(1):
                                with T.sblock("qk_sgemm"):
                                    T.reads(q[vb, vh, vrt * BQ:vrt * BQ + BQ, 0:D], k[vb, vh // G, vt * BK:vt * BK + BK, 0:D])
                                    T.writes(S[0:BQ, 0:BK])
                                    T.evaluate(T.call_extern(
                                        "int32", SGEMM, CBLAS_ROW_MAJOR, CBLAS_NO_TRANS, CBLAS_TRANS,
                                        size(T.min(BQ, SQ - vrt * BQ)), size(T.min(BK, SKV - vt * BK)), size(D), SCALE,
                                        T.address_of(q[vb, vh, vrt * BQ, 0]), size(q.strides[2]),
                                        T.address_of(k[vb, vh // G, vt * BK, 0]), size(k.strides[2]),
                                        ZERO, T.address_of(S[0, 0]), size(BK)))
                            softmax_weights(S, P, m, t_max, t_sum, alpha, vt * BK, BQ, BK, vrt * BQ, row_sees,
                                            vis.all_see(vrt * BQ, last_row(vrt), vt * BK, vt * BK + BK), NEG, ZERO,
                                            ONE, softmax_exp)
                            for _ in range(1):
                                with T.sblock("pv_sgemm"):
                                    T.reads(P[0:BQ, 0:BK], v[vb, vh // G, vt * BK:vt * BK + BK, 0:D])
                                    T.writes(O[0:BQ, 0:D])
                                    T.evaluate(T.call_extern(
                                        "int32", SGEMM, CBLAS_ROW_MAJOR, CBLAS_NO_TRANS, CBLAS_NO_TRANS,
                                        size(T.min(BQ, SQ - vrt * BQ)), size(D), size(T.min(BK, SKV - vt * BK)), ONE,
                                        T.address_of(P[0, 0]), size(BK),
                                        T.address_of(v[vb, vh // G, vt * BK, 0]), size(v.strides[2]),
                                        ZERO, T.address_of(O[0, 0]), size(D)))
                            update_output(acc, O, alpha, l, t_sum, BQ, D)
                    for ri, d in T.grid(BQ, D):
                        with T.sblock("out"):
                            r, dd = T.axis.remap("SS", [ri, d])
                            T.where(vrt * BQ + ri < SQ)
                            out[vb, vh, vrt * BQ + r, dd] = row_output(acc[r, dd], l[r], m[r], "float32")

    return blas_prefill
