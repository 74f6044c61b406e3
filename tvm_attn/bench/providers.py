"""What the benchmark times: tvm_attn kernels under each schedule, and the peers a user would otherwise pick.

A provider turns (variant, spec, q, k, v) into a zero-argument callable that computes the output once, plus a
function returning that output (for the error columns); None where it does not apply.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import tvm

import tvm_attn
from tvm_attn import tuning


@dataclasses.dataclass(frozen=True)
class Prepared:
    run: Callable[[], object]
    output: Callable[[], np.ndarray]
    kernel: object = None  # the tvm_attn Kernel, when the provider is one


def _tvm(schedule: str):
    def prepare(variant: str, spec, q, k, v):
        if schedule == "tuned" and tuning.tuned_record(tvm_attn.get_variant(variant), spec, "host") is None:
            return None  # no record for this workload: the row is left out, not faked with the hand schedule
        kernel = tvm_attn.build(variant, spec, schedule=schedule)
        dev = tvm.cpu()
        args = [tvm.runtime.tensor(x, dev) for x in (q, k, v)]
        out = tvm.runtime.empty(spec.q_shape, spec.dtype, dev)
        fn = kernel.function
        return Prepared(lambda: fn(*args, out), out.numpy, kernel)

    return prepare


DENSE = ("standard", "flash", "mqa")


def _numpy(variant: str, spec, q, k, v):
    """The float32 numpy formula (matmul, softmax, matmul) of dense attention."""
    if variant not in DENSE:
        return None
    kk = np.repeat(k, spec.group_size, axis=1)
    vv = np.repeat(v, spec.group_size, axis=1)
    mask = tvm_attn.references.visible_mask(spec)
    result = {}

    def run():
        s = (q @ kk.swapaxes(-1, -2)) * np.float32(spec.scale)
        if spec.causal:
            s = np.where(mask, s, np.float32(-np.inf))
        s = np.exp(s - s.max(axis=-1, keepdims=True))
        result["out"] = (s / s.sum(axis=-1, keepdims=True)) @ vv

    return Prepared(run, lambda: result["out"])


def _torch_sdpa(variant: str, spec, q, k, v):
    """torch.nn.functional.scaled_dot_product_attention, same threads, bottom-right causal mask."""
    if variant not in DENSE:
        return None
    try:
        import torch
    except ImportError:
        return None
    tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
    mask = None
    if spec.causal:  # torch's is_causal aligns top-left; the contract here is bottom-right
        mask = torch.from_numpy(tvm_attn.references.visible_mask(spec))
    gqa = spec.kv_heads != spec.heads
    result = {}

    def run():
        result["out"] = torch.nn.functional.scaled_dot_product_attention(
            tq, tk, tv, attn_mask=mask, scale=spec.scale, enable_gqa=gqa)

    return Prepared(run, lambda: result["out"].numpy())


PROVIDERS: dict[str, Callable] = {
    "untuned": _tvm("untuned"),
    "hand": _tvm("hand"),
    "tuned": _tvm("tuned"),
    "numpy": _numpy,
    "torch-sdpa": _torch_sdpa,
}


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True
