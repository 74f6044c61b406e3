"""What the benchmark times: tvm_attn kernels under each schedule, and the peers a user would otherwise pick.

A provider turns (variant, spec, layers, isa) into a zero-argument callable that computes one output, plus a function
returning the output of the first layer (for the error columns); None where it does not apply. ``layers`` is a list
of (q, k, v): calls take them in turn, as a model's layers do, so that a study can make each call find its K and V
outside the CPU caches.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Callable

import numpy as np

import tvm_attn
from tvm_attn import tuning
from tvm_attn.runtime import dlpack_argument, numpy_dtype, torch_view


@dataclasses.dataclass(frozen=True)
class Prepared:
    run: Callable[[], object]
    output: Callable[[], np.ndarray] | None  # None: the provider computes no attention (read-kv)
    kernel: object = None  # the tvm_attn Kernel, when the provider is one
    # "tuned": the record's digest, or "hand" when the record is the hand schedule itself; "blas": the library called
    record: str | None = None
    flops: int | None = None  # what one call computes, when not the point's attention (sgemm)


def threads() -> int:
    """The threads every provider runs with (TVM_NUM_THREADS, else every CPU)."""
    return int(os.environ.get("TVM_NUM_THREADS", os.cpu_count() or 1))


def _in_turn(calls: list) -> Callable[[], object]:
    """One callable that makes the next of ``calls`` each time."""
    if len(calls) == 1:
        return calls[0]
    turn = [0]

    def run():
        turn[0] = (turn[0] + 1) % len(calls)
        return calls[turn[0]]()

    return run


def _tvm(schedule: str):
    def prepare(variant: str, spec, layers, isa):
        record = None
        if schedule == "tuned":
            v = tvm_attn.get_variant(variant)
            found = tuning.tuned_record(v, spec, isa.target)
            if found is None:
                return None  # no record for this workload: the row is left out, not faked with the hand schedule
            is_hand = str(found.trace) == str(tuning.hand_trace(v, spec, isa.target))
            record = "hand" if is_hand else tuning.record_digest(found)
        kernel = tvm_attn.build(variant, spec, target=isa.target, schedule=schedule)
        fn = kernel.function
        calls, outs = [], []
        for q, k, v in layers:
            out = np.empty(spec.q_shape, numpy_dtype(spec.dtype))
            args = [dlpack_argument(x) for x in (q, k, v, out)]
            calls.append(lambda args=args: fn(*args))
            outs.append(out)
        return Prepared(_in_turn(calls), lambda: (calls[0](), outs[0])[1], kernel, record)

    return prepare


DENSE = ("standard", "flash", "mqa")


def _blas(variant: str, spec, layers, isa):
    """tvm_attn's schedule="blas" (the tiles' matmuls in the platform's BLAS), for the float32 dense prefill it
    serves; None (with a warning) where there is no BLAS or it is not held to the run's ISA class."""
    from tvm_attn import blas
    from tvm_attn.variants import path_for

    if tvm_attn.get_variant(variant).blas_compute is None or spec.dtype != "float32" or \
            path_for(spec.seq_q) != "prefill":
        return None
    try:
        library = blas.for_target(isa.target)
    except ValueError as err:
        _warn_once(f"warning: no 'blas' rows: {err}")
        return None
    if isa.openblas_coretype and isa.openblas_coretype not in library.name:
        _warn_once(f"warning: no 'blas' rows: {library.name} is not held to {isa.name} (start the run with "
                   f"OPENBLAS_CORETYPE={isa.openblas_coretype}: OpenBLAS picks its kernels when it loads)")
        return None
    prepared = _tvm("blas")(variant, spec, layers, isa)
    return dataclasses.replace(prepared, record=library.name)


_warned = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        print(message, file=sys.stderr)


def _numpy(variant: str, spec, layers, isa):
    """The float32 numpy formula (matmul, softmax, matmul) of dense attention."""
    if variant not in DENSE or spec.dtype != "float32":
        return None
    mask = tvm_attn.references.visible_mask(spec)
    result = {}

    def call(q, k, v):
        kk = np.repeat(k, spec.group_size, axis=1)
        vv = np.repeat(v, spec.group_size, axis=1)

        def run():
            s = (q @ kk.swapaxes(-1, -2)) * np.float32(spec.scale)
            if spec.causal:
                s = np.where(mask, s, np.float32(-np.inf))
            s = np.exp(s - s.max(axis=-1, keepdims=True))
            result["out"] = (s / s.sum(axis=-1, keepdims=True)) @ vv

        return run

    calls = [call(*layer) for layer in layers]
    return Prepared(_in_turn(calls), lambda: (calls[0](), result["out"])[1])


def _torch_sdpa(variant: str, spec, layers, isa):
    """torch.nn.functional.scaled_dot_product_attention, same threads and dtype, bottom-right causal mask."""
    if variant not in DENSE:
        return None
    try:
        import torch
    except ImportError:
        return None
    mask = None
    if spec.causal:  # torch's is_causal aligns top-left; the contract here is bottom-right
        mask = torch.from_numpy(tvm_attn.references.visible_mask(spec))
    gqa = spec.kv_heads != spec.heads
    result = {}

    def call(q, k, v):
        tq, tk, tv = (torch_view(x) for x in (q, k, v))

        def run():
            result["out"] = torch.nn.functional.scaled_dot_product_attention(
                tq, tk, tv, attn_mask=mask, scale=spec.scale, enable_gqa=gqa)

        return run

    calls = [call(*layer) for layer in layers]
    return Prepared(_in_turn(calls), lambda: (calls[0](), result["out"].float().numpy())[1])


def _read_kv(variant: str, spec, layers, isa):
    """One pass reading the bytes of the layer's K and V with every thread (bandwidth.py's parallel sum), timed in
    the same round as the kernels: a decode step's floor, so that its share of it is a ratio within the point (the
    machine's read bandwidth moves between minutes and runs)."""
    from .bandwidth import ACCUMULATORS, parallel_sum, reader

    calls = []
    for _, k, v in layers:
        shape = reader(k.nbytes)
        if shape is None or not (k.flags.c_contiguous and v.flags.c_contiguous):
            return None
        fn = parallel_sum(*shape)
        out = np.empty((shape[0], ACCUMULATORS, 16), np.float32)
        args = [dlpack_argument(x.reshape(-1).view(np.float32).reshape(shape)) for x in (k, v)]
        out_arg = dlpack_argument(out)
        calls.append(lambda fn=fn, args=args, out_arg=out_arg: (fn(args[0], out_arg), fn(args[1], out_arg)))
    return Prepared(_in_turn(calls), None)


def _sgemm(variant: str, spec, layers, isa):
    """The machine's float32 matmul ceiling (2048^3, OpenBLAS with its own kernels in a child process:
    ceiling.SgemmWorker) timed in the same round as the point's kernels, so that their share of it is a ratio within
    the point. None (with a warning) when the worker cannot start."""
    from .ceiling import SAME_ROUND_SGEMM_N, sgemm_worker

    try:
        worker = sgemm_worker(SAME_ROUND_SGEMM_N, threads(), isa.openblas_coretype)
    except (RuntimeError, ValueError) as err:
        print(f"warning: no same-round sgemm: {err}", file=sys.stderr)
        return None
    return Prepared(worker, None, flops=worker.flops)


PROVIDERS: dict[str, Callable] = {
    "untuned": _tvm("untuned"),
    "hand": _tvm("hand"),
    "tuned": _tvm("tuned"),
    "blas": _blas,
    "numpy": _numpy,
    "torch-sdpa": _torch_sdpa,
    "read-kv": _read_kv,
    "sgemm": _sgemm,
}


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True
