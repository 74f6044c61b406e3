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


@dataclasses.dataclass(frozen=True)
class Scheduled:
    """A variant's compute for one spec with a schedule applied."""

    mod: tvm.IRModule
    schedule: str  # the schedule actually applied: "tuned", "hand" or "untuned"
    record: str | None = None  # digest of the tuning record, when tuned


def scheduled_module(variant: Variant, spec: AttentionSpec, target, schedule: str) -> Scheduled:
    """The variant's compute for ``spec`` with ``schedule`` applied: "best" (the tuned record for this target if
    one exists, else the hand schedule, with a warning once), "tuned", "hand" or "untuned"."""
    if schedule in ("best", "tuned"):
        record = tuning.tuned_record(variant, spec, target)
        if record is not None:
            return Scheduled(tuning.apply_record(variant, spec, record).mod, "tuned", tuning.record_digest(record))
        if schedule == "tuned":
            raise LookupError(f"no tuned record for {variant.name} {spec.name} on {target_key(target)} "
                              f"(python -m tvm_attn.tune tunes it)")
        tuning.warn_untuned(variant.name, spec, target)
        schedule = "hand"
    mod = tuning.workload(variant, spec)
    if schedule == "untuned":
        return Scheduled(mod, "untuned")
    sch = s_tir.Schedule(mod)
    variant.schedule(sch, target)
    return Scheduled(sch.mod, "hand")


@dataclasses.dataclass(frozen=True, eq=False)
class Kernel:
    """A compiled attention kernel for one spec and target. Call it with numpy q, k, v."""

    variant: str
    spec: AttentionSpec
    target: tvm.target.Target
    schedule: str  # the schedule actually used: "tuned", "hand" or "untuned"
    record: str | None  # digest of the tuning record, when tuned
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
                                         **self.spec.knobs())
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
    target = resolve_target(target_json)
    scheduled = scheduled_module(get_variant(variant), spec, target, schedule)
    return Kernel(variant, spec, target, scheduled.schedule, scheduled.record,
                  tvm.compile(scheduled.mod, target=target))
