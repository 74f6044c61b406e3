"""The read bandwidth of this machine, measured in the benchmark's own run: the ceiling of decode attention, which
must read every cached key and value once.

Two readers of the same 256 MB, the larger figure kept: a TVM kernel that sums it with every thread (vectorized,
8 independent accumulators, each task streaming its own contiguous 64 KB, as the decode kernel's tasks do) and
torch.sum (when torch is installed).
"""

from __future__ import annotations

import functools

import numpy as np
import tvm
from tvm import s_tir
from tvm.script import tirx as T

from ..timing import measure

BYTES = 256 * 2**20
ROW = 16384  # floats per parallel task


ACCUMULATORS = 8  # independent vector sums per task, so that loads are not serialized behind one add chain
STRIDE = 16 * ACCUMULATORS  # floats per step of a task: row lengths are multiples of it


@functools.lru_cache(maxsize=32)
def parallel_sum(rows: int, row: int = ROW):
    """A compiled kernel (a (rows, row) float32, out (rows, ACCUMULATORS, 16) float32) summing each row in its own
    parallel task. Any 4-byte aligned arrays (numpy's, the benchmark's K and V): T.Buffer's default 64-byte alignment
    would let LLVM emit aligned vector loads, which fault on numpy arrays."""
    @T.prim_func(s_tir=True)
    def read(a_h: T.handle, out_h: T.handle):
        a = T.match_buffer(a_h, (rows, row), "float32", align=4, offset_factor=1)
        out = T.match_buffer(out_h, (rows, ACCUMULATORS, 16), "float32", align=4, offset_factor=1)
        for i, c, acc, lane in T.grid(rows, row // STRIDE, ACCUMULATORS, 16):
            with T.sblock("sum"):
                vi, vc, va, vl = T.axis.remap("SRSS", [i, c, acc, lane])
                with T.init():
                    out[vi, va, vl] = T.float32(0)
                out[vi, va, vl] = out[vi, va, vl] + a[vi, (vc * ACCUMULATORS + va) * 16 + vl]

    sch = s_tir.Schedule(read)
    block = sch.get_sblock("sum")
    i, c, acc, lane = sch.get_loops(block)
    sch.parallel(i)
    local = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(local, i)
    sch.unroll(acc)
    sch.vectorize(lane)
    init = sch.decompose_reduction(block, c)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(local)[-1])
    return tvm.compile(sch.mod, target=tvm.target.Target.from_device("cpu"))["main"]


def reader(nbytes: int):
    """(rows, row) of a parallel_sum that reads ``nbytes`` viewed as float32 rows of at most ROW floats, or None when
    they do not split into rows of STRIDE floats."""
    floats, rem = divmod(nbytes, 4)
    row = ROW
    while row >= STRIDE and floats % row:
        row //= 2
    if rem or row < STRIDE:
        return None
    return floats // row, row


def read_bandwidth(min_seconds: float = 0.5) -> dict:
    """{reader name: GB/s} for the readers available here."""
    rows = BYTES // 4 // ROW
    dev = tvm.cpu()
    a = tvm.runtime.tensor(np.ones((rows, ROW), np.float32), dev)
    out = tvm.runtime.empty((rows, ACCUMULATORS, 16), "float32", dev)
    fn = parallel_sum(rows)
    found = {"tvm parallel sum": BYTES / (measure(lambda: fn(a, out), min_seconds=min_seconds).median_ms * 1e-3) / 1e9}
    try:
        import torch
    except ImportError:
        return found
    t = torch.ones(BYTES // 4, dtype=torch.float32)
    found["torch.sum"] = BYTES / (measure(lambda: t.sum(), min_seconds=min_seconds).median_ms * 1e-3) / 1e9
    return found
