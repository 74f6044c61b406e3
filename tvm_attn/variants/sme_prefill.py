"""Dense prefill whose two matmuls per tile are outer products on Arm SME (Apple M4): the tile matmuls call the
streaming subroutine of tvm_attn/variants/sme_matmul.py, the online softmax, masks, packing and tails stay in
NEON TensorIR outside streaming mode (streaming SVE arithmetic is slow on M4 and NEON is illegal there). It
computes what flash computes, for every dense variant (standard, flash, mqa), in float32 and from float16 or
bfloat16 inputs (widened while packing: M4's widening outer products are no faster than float32 ones).

The outer products take both operands k-major: K is packed once per call as (d, key) float32 (common.transpose_k,
as flash does), V is read in place (float32) or packed widened, each row tile's q as (d, row) pre-scaled. The
scores come out transposed, S^T = K q^T as (key, row), and the softmax works on them in that layout: its reductions
over keys run down the columns with rows in the vector lanes, and its weights P^T are already the (key, row) left
operand that O = P V takes.

Blocks (the contract with schedules/sme_prefill.py):
  k_t          K transposed to (d, key) float32, zero-padded to whole KV tiles
  v_f          V widened to float32 (16-bit inputs only)
  tile         one per (batch, head, row tile), owning the scratch buffers; inside it:
    q_t        the tile's rows transposed to (d, row), scaled, zero past seq_q
    init_stats, init_acc
    kv_tile    one per KV tile some row of the tile sees; inside it:
      qk_sme     S^T = k q^T                                   (sme_matmul)
      tile_max, rescale, p, tile_sum                           (common.softmax_weights_by_key: P^T)
      pv_sme     O = P v                                       (sme_matmul)
      update, update_sum                                       (common.update_output)
    out        acc / l (0 for rows that see no key)
"""

from __future__ import annotations

import dataclasses

import tvm
from tvm.script import tirx as T

from ..fast_exp import softmax_exp
from ..spec import KernelSpec
from . import sme_matmul
from .common import (ACC, Visibility, bhsd, ceil_div, fresh_block_names, init_online_softmax, online_softmax_state,
                     row_output, run_time_sizes, softmax_weights_by_key, transpose_k, update_output, widen)


@dataclasses.dataclass(frozen=True)
class SmeTiles:
    """Row and KV tile sizes of the SME-backed prefill. Multiples of 2 SVL (32 floats at M4's 512-bit streaming
    vectors, 128 at SME's largest, 2048 bits) leave no partial ZA block inside a tile. Not measured: no machine
    here runs SME (see README, "Apple M")."""

    block_q: int = 128
    block_kv: int = 128

    def __post_init__(self):
        for name in ("block_q", "block_kv"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SmeTiles.{name} must be an int >= 1, got {value!r}")


def compute(kspec: KernelSpec, tiles: SmeTiles = SmeTiles()) -> tvm.IRModule:
    """The IRModule of dense prefill for ``kspec`` with its tiles' matmuls on SME: "main" and its subroutine."""
    H, KVH, D = kspec.heads, kspec.kv_heads, kspec.head_dim
    G = kspec.group_size
    BQ, BK = tiles.block_q, tiles.block_kv
    SCALE = T.float32(kspec.scale)
    NEG = T.min_value("float32")
    ZERO = T.float32(0)
    ONE = T.float32(1)
    dtype = kspec.dtype
    wide_v = dtype != "float32"
    MATMUL = sme_matmul.GLOBAL_VAR

    fresh_block_names()
    B, SQ, SKV = run_time_sizes()
    vis = Visibility(kspec, SQ, SKV)

    def row_sees(row0, r, j):
        return vis.sees(row0 + r, j)

    def last_row(rt):
        return T.min(rt * BQ + BQ, SQ) - 1

    @T.macro
    def pv_sme(p_t, values, ld, O, vb, vkh, vrt, vt):
        """O = P v, v read from ``values`` (V, or V widened) at leading dimension ``ld``."""
        with T.sblock("pv_sme"):
            T.reads(p_t[0:BK, 0:BQ], values[vb, vkh, vt * BK:vt * BK + BK, 0:D])
            T.writes(O[0:BQ, 0:D])
            T.evaluate(MATMUL(T.min(BQ, SQ - vrt * BQ), D, T.min(BK, SKV - vt * BK), T.address_of(p_t[0, 0]), BQ,
                              T.address_of(values[vb, vkh, vt * BK, 0]), ld, T.address_of(O[0, 0]), D))

    @T.prim_func(s_tir=True)
    def sme_prefill(q_h: T.handle, k_h: T.handle, v_h: T.handle, out_h: T.handle):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        q = bhsd(q_h, B, H, SQ, D, dtype)
        k = bhsd(k_h, B, KVH, SKV, D, dtype)
        v = bhsd(v_h, B, KVH, SKV, D, dtype)
        out = bhsd(out_h, B, H, SQ, D, dtype)
        with T.sblock("root"):
            k_t = T.sblock_alloc_buffer((B, KVH, D, ceil_div(SKV, BK) * BK), ACC)
            transpose_k(k, k_t, B, KVH, D, SKV, ceil_div(SKV, BK) * BK, ZERO)
            if wide_v:
                v_f = T.sblock_alloc_buffer((B, KVH, SKV, D), ACC)
                for b, kh, j, d in T.grid(B, KVH, SKV, D):
                    with T.sblock("v_f"):
                        vb, vkh, vj, vd = T.axis.remap("SSSS", [b, kh, j, d])
                        v_f[vb, vkh, vj, vd] = widen(v[vb, vkh, vj, vd])
            for b, h, rt in T.grid(B, H, ceil_div(SQ, BQ)):
                with T.sblock("tile"):
                    vb, vh, vrt = T.axis.remap("SSS", [b, h, rt])
                    q_t = T.sblock_alloc_buffer((D, BQ), ACC)
                    s_t = T.sblock_alloc_buffer((BK, BQ), ACC)
                    p_t = T.sblock_alloc_buffer((BK, BQ), ACC)
                    O, m, t_max, t_sum, alpha, l, acc = online_softmax_state(BQ, D)
                    for d, ri in T.grid(D, BQ):
                        with T.sblock("q_t"):
                            dd, r = T.axis.remap("SS", [d, ri])
                            q_t[dd, r] = T.if_then_else(
                                vrt * BQ + r < SQ, widen(q[vb, vh, T.min(vrt * BQ + r, SQ - 1), dd]) * SCALE, ZERO)
                    init_online_softmax(m, l, acc, BQ, D, NEG, ZERO)
                    for t in range(vis.first_tile(vrt * BQ, BK), vis.end_tile(last_row(vrt), BK)):
                        with T.sblock("kv_tile"):
                            vt = T.axis.opaque(ceil_div(SKV, BK), t)
                            with T.sblock("qk_sme"):
                                T.reads(q_t[0:D, 0:BQ], k_t[vb, vh // G, 0:D, vt * BK:vt * BK + BK])
                                T.writes(s_t[0:BK, 0:BQ])
                                T.evaluate(MATMUL(
                                    T.min(BK, SKV - vt * BK), T.min(BQ, SQ - vrt * BQ), D,
                                    T.address_of(k_t[vb, vh // G, 0, vt * BK]), ceil_div(SKV, BK) * BK,
                                    T.address_of(q_t[0, 0]), BQ, T.address_of(s_t[0, 0]), BQ))
                            softmax_weights_by_key(s_t, p_t, m, t_max, t_sum, alpha, vt * BK, BQ, BK, vrt * BQ,
                                                   row_sees,
                                                   vis.all_see(vrt * BQ, last_row(vrt), vt * BK, vt * BK + BK),
                                                   NEG, ZERO, ONE, softmax_exp, False)
                            if wide_v:
                                pv_sme(p_t, v_f, D, O, vb, vh // G, vrt, vt)
                            else:
                                pv_sme(p_t, v, v.strides[2], O, vb, vh // G, vrt, vt)
                            update_output(acc, O, alpha, l, t_sum, BQ, D)
                    for ri, d in T.grid(BQ, D):
                        with T.sblock("out"):
                            r, dd = T.axis.remap("SS", [ri, d])
                            T.where(vrt * BQ + ri < SQ)
                            out[vb, vh, vrt * BQ + r, dd] = row_output(acc[r, dd], l[r], m[r], dtype)

    return tvm.IRModule({"main": sme_prefill, MATMUL: sme_matmul.outer_product_matmul()})
