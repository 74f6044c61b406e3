"""Bytes a compiled kernel holds: inputs, output, and the intermediate buffers it allocates.

Counted exactly from the kernel's own IR, after the TVM passes that place and shrink allocations (the prefix of
TVM's default pipeline through CompactBufferAllocation). A buffer allocated inside a parallel loop is per-task
scratch: it counts once per concurrently running task, min(threads, loop extent).
"""

from __future__ import annotations

import dataclasses
import math

import tvm
from tvm import s_tir, tirx

from ..runtime import numpy_dtype
from ..tuning import with_sizes

_PLACE_AND_COMPACT = (
    s_tir.transform.CanonicalizeLoop,
    s_tir.transform.LowerInitBlock,
    s_tir.transform.PlanAndUpdateBufferAllocationLocation,
    s_tir.transform.ConvertBlocksToOpaque,
    s_tir.transform.CompactBufferAllocation,
)


@dataclasses.dataclass(frozen=True)
class MemoryUse:
    inputs: int
    output: int
    intermediate: int

    @property
    def total(self) -> int:
        return self.inputs + self.output + self.intermediate


def _walk(stmt, in_parallel: int, found: list) -> None:
    if stmt is None:
        return
    if isinstance(stmt, s_tir.SBlockRealize):
        stmt = stmt.block
    if isinstance(stmt, s_tir.SBlock):
        for buf in stmt.alloc_buffers:
            elems = math.prod(int(x) for x in buf.shape)
            found.append((elems * numpy_dtype(str(buf.dtype)).itemsize, in_parallel))
        _walk(stmt.init, in_parallel, found)
        _walk(stmt.body, in_parallel, found)
        return
    if isinstance(stmt, tirx.For):
        extent = stmt.extent
        par = in_parallel
        if stmt.kind == tirx.ForKind.PARALLEL:
            par = max(in_parallel, int(extent) if isinstance(extent, tirx.IntImm) else 1 << 30)
        _walk(stmt.body, par, found)
        return
    if isinstance(stmt, tirx.SeqStmt):
        for s in stmt.seq:
            _walk(s, in_parallel, found)
        return
    if isinstance(stmt, tirx.IfThenElse):
        _walk(stmt.then_case, in_parallel, found)
        _walk(stmt.else_case, in_parallel, found)
        return
    body = getattr(stmt, "body", None)
    if body is not None:
        _walk(body, in_parallel, found)


def memory_use(mod: tvm.IRModule, spec, threads: int) -> MemoryUse:
    """Bytes of ``mod`` (a scheduled or untuned kernel of ``spec``) with ``threads`` worker threads."""
    mod = tvm.IRModule({"main": with_sizes(mod["main"], spec)})  # kernels take any length: count spec's
    low = tvm.ir.transform.Sequential([p() for p in _PLACE_AND_COMPACT])(mod)
    found: list = []
    _walk(low["main"].body, 0, found)
    intermediate = sum(size * (min(threads, par) if par else 1) for size, par in found)
    itemsize = numpy_dtype(spec.dtype).itemsize
    inputs = (math.prod(spec.q_shape) + 2 * math.prod(spec.kv_shape)) * itemsize
    return MemoryUse(inputs, math.prod(spec.q_shape) * itemsize, intermediate)
