"""Building kernels: a variant's compute, scheduled, compiled for a target, cached per (variant, spec, target)."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import tvm
from tvm import s_tir

from . import tuning
from .spec import AttentionSpec
from .targets import resolve_target, runs_on_host, target_key
from .variants import Variant, get_variant

SCHEDULES = ("best", "tuned", "hand", "untuned")


def scheduled_module(variant: Variant, spec: AttentionSpec, target, schedule: str) -> tvm.IRModule:
    """The variant's compute for ``spec`` as an IRModule with ``schedule`` ("tuned", "hand", "untuned") applied."""
    if schedule == "tuned":
        sch = tuning.tuned_schedule(variant, spec, target)
        if sch is None:
            raise LookupError(f"no tuned record for {variant.name} {spec.name} on {target_key(target)} "
                              f"(python -m tvm_attn.tune tunes it)")
        return sch.mod
    mod = tuning.workload(variant, spec)
    if schedule == "untuned":
        return mod
    sch = s_tir.Schedule(mod)
    variant.schedule(sch, target)
    return sch.mod


@dataclasses.dataclass(frozen=True, eq=False)
class Kernel:
    """A compiled attention kernel for one spec and target. Call it with numpy q, k, v."""

    variant: str
    spec: AttentionSpec
    target: tvm.target.Target
    schedule: str  # the schedule actually used: "tuned", "hand" or "untuned"
    executable: object  # tvm.runtime.Executable

    @property
    def function(self):
        """The runtime function, called as f(q, k, v, out) on tvm tensors (64-byte aligned)."""
        if not runs_on_host(self.target):
            raise RuntimeError(
                f"this kernel was built for {target_key(self.target)} and cannot run on this "
                f"{target_key('host')} host; export it instead"
            )
        return self.executable["main"]

    def __call__(self, q, k, v) -> np.ndarray:
        spec = AttentionSpec.from_arrays(q, k, v, causal=self.spec.causal, scale=self.spec.scale,
                                         threshold=self.spec.threshold, top_k=self.spec.top_k)
        if spec != self.spec:
            raise ValueError(f"inputs have spec {spec.name}, this kernel was built for {self.spec.name}")
        fn = self.function
        dev = tvm.cpu()
        # tvm.runtime.tensor copies into 64-byte aligned memory: the kernels assume aligned buffers.
        args = [tvm.runtime.tensor(np.ascontiguousarray(x), dev) for x in (q, k, v)]
        out = tvm.runtime.empty(self.spec.q_shape, self.spec.dtype, dev)
        fn(*args, out)
        return out.numpy()


def build(variant="flash", spec: AttentionSpec | None = None, *, target="host", schedule: str = "best") -> Kernel:
    """Compile ``variant`` for ``spec`` on ``target``. ``schedule``: "best" (the tuned record for this target if
    one exists, else the hand schedule, with a warning once), "tuned", "hand", or "untuned" (the compute with no
    schedule at all, the reference the benchmarks compare against)."""
    v = get_variant(variant)
    spec = spec if spec is not None else AttentionSpec()
    if not isinstance(spec, AttentionSpec):
        raise TypeError(f"spec must be an AttentionSpec, got {type(spec).__name__}")
    v.check(spec)
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}: use one of {', '.join(SCHEDULES)}")
    return _build_cached(v.name, spec, str(resolve_target(target)), schedule)


@functools.lru_cache(maxsize=256)
def _build_cached(variant: str, spec: AttentionSpec, target_json: str, schedule: str) -> Kernel:
    v = get_variant(variant)
    target = resolve_target(target_json)
    if schedule == "best":
        tuned = tuning.tuned_schedule(v, spec, target)
        if tuned is None:
            tuning.warn_untuned(v.name, spec, target)
            mod, schedule = scheduled_module(v, spec, target, "hand"), "hand"
        else:
            mod, schedule = tuned.mod, "tuned"
    else:
        mod = scheduled_module(v, spec, target, schedule)
    return Kernel(variant, spec, target, schedule, tvm.compile(mod, target=target))
