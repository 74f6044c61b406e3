"""The int8 shadow of K a KVCache keeps (``ShadowKeys``), updated by a compiled kernel as positions are appended. Its
format, the bounds it gives and the certificate over them: ``tvm_attn.certificate``."""

from __future__ import annotations

import functools

import numpy as np
import tvm
from tvm import s_tir

from .certificate import BLOCK, blocks
from .runtime import dlpack_argument
from .schedules.bounded import schedule_quantize
from .spec import array_dtype
from .targets import resolve_target
from .variants.bounded import compute_quantize


class ShadowKeys:
    """The shadow of a KV cache's K, kept up to date by ``update`` as positions are appended: codes stored
    (batch, kv_heads, block, head_dim, BLOCK), dimension-major per block so the kernels load a block's keys along
    vector lanes, and per-block offsets and steps (batch, kv_heads, block, head_dim)."""

    def __init__(self, batch: int, kv_heads: int, capacity: int, head_dim: int, alloc):
        self.codes = alloc((batch, kv_heads, blocks(capacity), head_dim, BLOCK), np.uint8)
        self.lo = alloc((batch, kv_heads, blocks(capacity), head_dim), np.float32)
        self.step = alloc((batch, kv_heads, blocks(capacity), head_dim), np.float32)

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.lo.nbytes + self.step.nbytes

    def update(self, k: np.ndarray, start: int, end: int) -> None:
        """Requantize the blocks holding positions start..end-1 of the cache's K buffer ``k``, the block holding
        ``start`` from its first key (a block that gains or loses keys gets a new range); ``end`` is the filled
        length. A compiled kernel (``quantize`` in numpy is ~20x slower)."""
        first = start // BLOCK * BLOCK
        if end > first:
            b0, b1 = first // BLOCK, blocks(end)
            kernel = _update_kernel(k.shape[1], k.shape[3], _dtype_name(k.dtype))
            kernel(dlpack_argument(k[:, :, first:end]), self.codes[:, :, b0:b1], self.lo[:, :, b0:b1],
                   self.step[:, :, b0:b1])

    def views(self, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(codes, lo, step) of the blocks holding the first ``length`` positions, as the kernels take them (views,
        no copy; codes past ``length`` in the last block are stale)."""
        nb = blocks(length)
        return self.codes[:, :, :nb], self.lo[:, :, :nb], self.step[:, :, :nb]

    def codes_by_key(self, length: int) -> np.ndarray:
        """The codes of the first ``length`` positions as (batch, kv_heads, length, head_dim), like ``quantize``'s
        (a copy)."""
        codes = self.codes[:, :, : blocks(length)].swapaxes(-1, -2)
        return codes.reshape(*codes.shape[:2], -1, codes.shape[-1])[:, :, :length].copy()


def _dtype_name(dtype) -> str:
    return array_dtype("k", np.empty(0, dtype))


def build_update(kv_heads: int, head_dim: int, dtype: str, target="host"):
    """The quantization of key blocks into a shadow's buffers (variants/bounded.py compute_quantize), compiled for
    ``target`` (a tvm.runtime.Executable; its "main" takes the key rows and the blocks' codes, lo and step)."""
    target = resolve_target(target)
    sch = s_tir.Schedule(tvm.IRModule({"main": compute_quantize(kv_heads, head_dim, dtype)}))
    schedule_quantize(sch, target, parallel=False)
    return tvm.compile(sch.mod, target=target)


@functools.lru_cache(maxsize=32)
def _update_kernel(kv_heads: int, head_dim: int, dtype: str):
    return build_update(kv_heads, head_dim, dtype)["main"]
