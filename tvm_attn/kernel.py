"""Building kernels: a variant's compute, scheduled and compiled for a target, one per (variant, path, kernel spec,
target, schedule). Batch, seq_q and seq_kv are run-time sizes: a kernel serves every length."""

from __future__ import annotations

import collections
import dataclasses
import functools
import threading

import numpy as np
import tvm
import tvm_ffi
from tvm import s_tir

from . import blas, tuning
from .runtime import dlpack_argument, is_torch, numpy_dtype, numpy_view, refuse_overlap, torch_view
from .spec import AttentionSpec, KernelSpec, sink_logits
from .targets import capabilities, host_mismatch, resolve_target, runs_on_host, target_key
from .variants import TREE_DECODE_MAX_ROWS, Variant, get_variant, integer_kv_variants, path_for

SCHEDULES = ("best", "tuned", "hand", "untuned", "blas", "sme")

_compiles = 0
_compiles_lock = threading.Lock()
COMPILED_KEPT = 256  # modules whose executables compile_counted keeps for reuse, least recently used dropped
_compiled: collections.OrderedDict = collections.OrderedDict()  # (hash, target) -> [(module, executable)]


def compile_count() -> int:
    """How many kernels this process has compiled (a loop over many lengths must not add one per length)."""
    return _compiles


@dataclasses.dataclass(frozen=True)
class Scheduled:
    """A variant's compute for one kernel with a schedule applied."""

    mod: tvm.IRModule
    schedule: str  # the schedule actually applied: "tuned", "hand", "untuned", "blas" or "sme"
    record: str | None = None  # digest of the tuning record, when tuned


def scheduled_module(variant: Variant, spec: AttentionSpec, target, schedule: str,
                     path: str | None = None, *, blas_allowed: bool = True) -> Scheduled:
    """The kernel serving ``spec`` (its path's compute, generic over batch and lengths; ``path`` None: the one
    spec.seq_q takes) with ``schedule`` applied: "best" (schedule="blas" where `tune` measured it faster for this
    target or its ISA class and a BLAS is here, else the tuned record for this target if one exists, else the hand
    schedule, with a warning once), "tuned", "hand", "untuned", "blas" (the dense variants' prefill with its
    tiles' matmuls in the platform's BLAS: tvm_attn/blas.py) or "sme" (the same with its matmuls as Arm SME outer
    products, for targets with SME: apple-m4); the decode path has neither and takes "best".
    Kernels reading a cache's shadow ("shadow" path) or integer K and V are not tuned: "best" is their hand
    schedule. ``blas_allowed``
    False: "best" never picks "blas" (exported kernels, which do not link a BLAS yet)."""
    path = path or path_for(spec.seq_q)
    if schedule in ("blas", "sme"):
        if path == "prefill":
            return (_blas_scheduled if schedule == "blas" else _sme_scheduled)(variant, spec, target)
        schedule = "best"
    if (schedule == "best" and blas_allowed and path == "prefill" and variant.blas_compute is not None
            and not uses_features(spec) and tuning.blas_measured_faster(variant, spec, target)):
        try:
            return _blas_scheduled(variant, spec, target)
        except ValueError:  # no BLAS for this target here: the TensorIR schedule
            pass
    if (path in ("shadow", "tree") or spec.kv_dtype is not None) and schedule in ("best", "tuned"):
        if schedule == "tuned":
            what = {"shadow": "reading a cache's shadow of K", "tree": "for draft trees"}.get(
                path, f"reading {spec.kv_dtype} K and V")
            raise LookupError(f"the {variant.name} kernel {what} is not tuned: use schedule='best' or 'hand'")
        schedule = "hand"
    if schedule in ("best", "tuned"):
        record = tuning.tuned_record(variant, spec, target)
        if record is not None:
            return Scheduled(tuning.apply_record(variant, spec, record, target).mod, "tuned",
                             tuning.record_digest(record))
        if schedule == "tuned":
            raise LookupError(f"no tuned record for the {variant.name} {path} kernel {spec.kernel.name} on "
                              f"{target_key(target)} (python -m tvm_attn.tune tunes it)")
        tuning.warn_untuned(variant.name, spec, target)
        schedule = "hand"
    mod = tuning.generic_workload(variant, spec.kernel, path, target)
    if schedule == "untuned":
        return Scheduled(mod, "untuned")
    sch = s_tir.Schedule(mod)
    variant.kernel_parts(path)[1](sch, target)
    return Scheduled(sch.mod, "hand")


def _blas_scheduled(variant: Variant, spec: AttentionSpec, target) -> Scheduled:
    if variant.blas_compute is None:
        raise ValueError(f"schedule='blas' computes dense attention (standard, flash, mqa); variant "
                         f"{variant.name!r} prunes")
    refuse_features(spec, "schedule='blas'")
    library = blas.for_target(target)
    if runs_on_host(target):
        library.load()  # the compiled kernel resolves the library's sgemm in this process
    sch = s_tir.Schedule(tvm.IRModule({"main": variant.blas_compute(spec.kernel, library)}))
    variant.blas_schedule(sch, target)
    return Scheduled(sch.mod, "blas")


def _sme_scheduled(variant: Variant, spec: AttentionSpec, target) -> Scheduled:
    if variant.sme_compute is None:
        raise ValueError(f"schedule='sme' computes dense attention (standard, flash, mqa); variant "
                         f"{variant.name!r} prunes")
    refuse_features(spec, "schedule='sme'")
    if capabilities(target).matrix_unit != "sme":
        raise ValueError(f"schedule='sme' needs a CPU with Arm SME (apple-m4); target {target_key(target)} has "
                         f"none")
    sch = s_tir.Schedule(variant.sme_compute(spec.kernel))
    variant.sme_schedule(sch, target)
    return Scheduled(sch.mod, "sme")


def uses_features(spec: AttentionSpec) -> bool:
    """Whether ``spec`` asks for softcapping, sinks, ALiBi or a tree mask."""
    return spec.softcap is not None or spec.sinks or spec.alibi_slopes is not None or spec.tree_parents is not None


def refuse_features(spec: AttentionSpec, what: str, instead: str = "use schedule='best' or 'hand'") -> None:
    """ValueError when ``spec`` asks for softcapping, sinks, ALiBi or a tree mask, which ``what`` does not do yet
    (``instead``: what to do)."""
    if spec.softcap is not None:
        raise ValueError(f"{what} does not apply softcap={spec.softcap!r} yet: {instead}")
    if spec.sinks:
        raise ValueError(f"{what} does not take sinks yet: {instead}")
    if spec.alibi_slopes is not None:
        raise ValueError(f"{what} does not add ALiBi biases yet: {instead}")
    if spec.tree_parents is not None:
        raise ValueError(f"{what} does not take tree masks yet: {instead}")


def _passes_in_place(x: np.ndarray) -> bool:
    """Whether the kernels take x as it is: writable (DLPack cannot mark an array read-only, so numpy refuses to
    export one), element-aligned (the alignment the kernels are built for), last axis contiguous, every stride a
    whole number of elements."""
    return (x.flags.writeable and x.flags.aligned and x.strides[-1] == x.itemsize
            and not any(s % x.itemsize for s in x.strides))


def as_kernel_argument(x) -> np.ndarray:
    """x as the kernel takes it without a copy when possible: an element-aligned array whose last axis is contiguous
    (any other strides). Read-only, misaligned and otherwise strided arrays are copied (the kernels never write
    inputs)."""
    if not isinstance(x, np.ndarray):
        x = np.asarray(x)
    return x if _passes_in_place(x) else np.array(x, order="C")


def torch_argument(name: str, x):
    """The torch tensor x as the kernels may take it (detached). ValueError for a tensor on another device;
    TypeError for one that requires grad while grad mode is on (the kernels have no backward, so its gradient would
    be silently lost)."""
    if x.device.type != "cpu":
        raise ValueError(f"{name} is on {x.device}: tvm_attn kernels run on the CPU (pass {name}.cpu())")
    if x.requires_grad:
        import torch

        if torch.is_grad_enabled():
            raise TypeError(f"{name} requires grad, and tvm_attn kernels have no backward: call them under "
                            f"torch.no_grad() or torch.inference_mode(), or pass {name}.detach()")
        x = x.detach()
    return x


def optional_host_array(name: str, x):
    """``host_array`` of an optional argument (ALiBi slopes, tree parents): None stays None."""
    return None if x is None else host_array(name, x)


def host_array(name: str, x):
    """x as a numpy array: a torch CPU tensor (checked by ``torch_argument``) becomes a view of its memory (DLPack,
    no copy); anything else is returned unchanged."""
    return numpy_view(torch_argument(name, x)) if is_torch(x) else x


def checked_out(out, shape: tuple, dtype: str, like=None, inputs: dict | None = None) -> tuple[np.ndarray, object]:
    """(the array a kernel writes, what the call returns). ``out`` None: a new array, returned as a torch tensor
    when ``like`` (the caller's q) is one. Else ``out`` itself, which must be a writable numpy array or torch CPU
    tensor of ``shape`` and ``dtype`` with a contiguous last axis, sharing no memory with ``inputs`` ({name:
    array}: the kernel reads them while it writes out); ValueError otherwise."""
    if out is None:
        array = np.empty(shape, numpy_dtype(dtype))
        return array, (torch_view(array) if is_torch(like) else array)
    array = host_array("out", out)
    if (not isinstance(array, np.ndarray) or array.shape != shape or array.dtype != numpy_dtype(dtype)
            or not _passes_in_place(array)):
        raise ValueError(f"out must be a writable {dtype} array or torch CPU tensor of shape {shape} with a "
                         f"contiguous last axis, got {type(out).__name__} {getattr(out, 'dtype', '')} "
                         f"{tuple(getattr(out, 'shape', ()))}")
    refuse_overlap(array, inputs or {})
    return array, out


def first_visible_key(kspec: KernelSpec, seq_q: int, seq_kv: int) -> int:
    """The first key any query sees: windowed kernels are passed only the keys from there on (dropping a prefix
    of keys keeps the bottom-right alignment, so the result is the same and the skipped keys are never read)."""
    if kspec.window is None:
        return 0
    return max(0, seq_kv - seq_q + 1 - kspec.window)


@dataclasses.dataclass(frozen=True, eq=False)
class Kernel:
    """A compiled attention kernel for one kernel spec, path and target; it serves every batch, seq_q and seq_kv.
    Call it with numpy arrays or torch CPU tensors q, k, v of its kernel spec's dtype."""

    variant: str
    kernel_spec: KernelSpec
    path: str  # "prefill", "decode", "shadow" or "tree": which compute it is (all give the same result for any seq_q)
    target: tvm.target.Target
    schedule: str  # the schedule actually used: "tuned", "hand", "untuned", "blas" or "sme"
    record: str | None  # digest of the tuning record, when tuned
    executable: object  # tvm.runtime.Executable

    @functools.cached_property
    def function(self):
        """The runtime function, called as f(q, k, v, out) on tvm tensors, numpy arrays or torch tensors (any
        strides with a contiguous last axis; element-aligned data, which the function does not check: calling the
        kernel instead copies arrays that are not; out of q's shape and dtype; bfloat16 numpy arrays through
        ``runtime.dlpack_argument``)."""
        why = host_mismatch(self.target)
        if why is not None:
            raise RuntimeError(f"this kernel was built for {target_key(self.target)} and cannot run on this "
                               f"{target_key('host')} host: {why}; export it instead")
        return self.executable["main"]

    def check(self, q, k, v, tree_parents=None) -> AttentionSpec:
        """The spec of a call with q, k, v (and the tree of a kernel with a tree mask); ValueError/TypeError when
        this kernel cannot serve it."""
        ks = self.kernel_spec
        if ks.tree and tree_parents is None:
            raise ValueError(f"this kernel ({ks.name}) takes a tree mask: pass tree_parents=, one parent per query row")
        if not ks.tree and tree_parents is not None:
            raise ValueError(f"tree_parents were passed to a kernel built without a tree mask ({ks.name}): build it "
                             f"with AttentionSpec(tree_parents=...)")
        spec = AttentionSpec.from_arrays(q, k, v, causal=ks.causal, window=ks.window, scale=ks.scale,
                                         softcap=ks.softcap, sinks=ks.sinks, **ks.knobs(),
                                         tree_parents=optional_host_array("tree_parents", tree_parents),
                                         # (other heads: the mismatch is said below)
                                         alibi_slopes=ks.alibi_slopes if q.shape[1] == ks.heads else None)
        if spec.dtype != ks.dtype:
            raise TypeError(f"q, k and v are {spec.dtype}; this kernel was built for {ks.dtype}")
        if spec.kernel != ks:
            raise ValueError(f"inputs have heads={spec.heads}, kv_heads={spec.kv_heads}, head_dim={spec.head_dim}; "
                             f"this kernel was built for {ks.name}")
        return spec

    def __call__(self, q, k, v, out=None, sinks=None, tree_parents=None):
        """Attention of q, k, v into a new array (a torch tensor when q is one) or into ``out``; ``sinks``: the
        (heads,) sink logits, for a kernel built with them (AttentionSpec(sinks=True)); ``tree_parents``: the
        parent of each query row's tree node, for a kernel with a tree mask (AttentionSpec.tree_parents)."""
        if self.path == "shadow":
            raise TypeError(f"this {self.variant} kernel reads a KVCache's shadow of K: run it with cache.attend")
        if self.kernel_spec.kv_dtype is not None:
            raise TypeError(f"this {self.variant} kernel reads {self.kernel_spec.kv_dtype} K and V with their row "
                            f"scales: run it with the attend of a KVCache(dtype={self.kernel_spec.kv_dtype!r})")
        arrays = [host_array(name, x) for name, x in zip("qkv", (q, k, v))]
        return self.run_checked(self.check(*arrays, tree_parents), *arrays, out, like=q, sinks=sinks)

    def run_checked(self, spec: AttentionSpec, q: np.ndarray, k: np.ndarray, v: np.ndarray, out, like=None,
                    sinks=None):
        """``__call__`` after ``check``: numpy q, k, v of ``spec`` (its tree mask, if any, is passed); the result is a
        torch tensor when ``like`` is."""
        logits = self.sink_logits(sinks)
        out, result = checked_out(out, spec.q_shape, spec.dtype, like, inputs=dict(q=q, k=k, v=v))
        self.launch(*(as_kernel_argument(x) for x in (q, k, v)), out, sinks=logits, tree=spec.tree_mask)
        return result

    def sink_logits(self, sinks) -> np.ndarray | None:
        """``sinks`` (numpy or torch) as this kernel takes them: float32 (heads,) for a kernel with sinks, None
        without; ValueError/TypeError naming what is wrong."""
        if not self.kernel_spec.sinks:
            if sinks is not None:
                raise ValueError(f"sinks were passed to a kernel built without them ({self.kernel_spec.name}): "
                                 f"build it with AttentionSpec(sinks=True)")
            return None
        if sinks is None:
            raise ValueError(f"this kernel ({self.kernel_spec.name}) takes sinks: pass sinks=, one logit per query "
                             f"head ({self.kernel_spec.heads})")
        return sink_logits(host_array("sinks", sinks), self.kernel_spec.heads)

    def arguments(self, q, k, v, out, shadow: tuple = (), sinks=None, tree=None) -> tuple:
        """The runtime function's arguments for a call on numpy arrays or torch tensors already checked and laid out
        as the kernel takes them (``as_kernel_argument``, ``checked_out``): keys before every query's window are
        dropped (unless the kernel reads a shadow or integer K, or the variant's blocks start at key 0). ``shadow``:
        a KVCache's (codes, lo, step), for kernels of the "shadow" path, or the row scales (k_scale, v_scale) of
        integer K and V (K's codes in blocks of positions: ``KVCache.kernel_inputs``). ``sinks``: the checked sink
        logits (``sink_logits``) of a kernel with sinks; ``tree``: the tree mask (AttentionSpec.tree_mask) of a kernel
        with one."""
        first = first_visible_key(self.kernel_spec, q.shape[2], v.shape[2])
        if (first and self.path != "shadow" and self.kernel_spec.kv_dtype is None
                and not get_variant(self.variant).blocks_from_key0):
            k, v = k[:, :, first:], v[:, :, first:]
        return (q, k, v, *shadow, *(() if sinks is None else (sinks,)),
                *(() if tree is None else (as_kernel_argument(tree),)), out)

    def launch(self, q, k, v, out, shadow: tuple = (), sinks=None, tree=None) -> None:
        """Run on ``arguments``' inputs (bfloat16 numpy arrays go through DLPack). The runtime function itself still
        checks dtypes and the kernel's fixed sizes."""
        self.function(*map(dlpack_argument, self.arguments(q, k, v, out, shadow, sinks, tree)))


def build(variant="flash", spec: AttentionSpec | None = None, *, target="host", schedule: str = "best",
          path: str | None = None) -> Kernel:
    """Compile ``variant`` for the kernel serving ``spec`` on ``target``: the decode kernel when spec.seq_q is small
    (or a draft tree has at most 16 nodes, the tree kernel from 12: Variant.path_of), else the prefill one
    (``path`` "decode", "tree" or "prefill" picks one instead); each serves every batch, seq_q and seq_kv with
    spec's heads, head_dim, mask and knob.
    ``schedule``: "best" ("blas" where `tune` measured it faster for this CPU or its ISA class, else the tuned
    record for this target if one exists, else the hand schedule, with a warning once), "tuned", "hand", "untuned"
    (the compute with no schedule at all, the reference the benchmarks compare against), or "blas" (dense prefill in
    float32 with its tiles' matmuls in the BLAS of the platform: Accelerate on macOS, numpy's OpenBLAS or
    ``TVM_ATTN_BLAS`` on Linux) or "sme" (dense prefill with its tiles' matmuls as Arm SME outer products, any
    dtype, for targets with SME: apple-m4); a decode-sized spec takes "best" for both. Kernels are cached:
    building again for another length returns the same kernel."""
    v = get_variant(variant)
    spec = spec if spec is not None else AttentionSpec()
    if not isinstance(spec, AttentionSpec):
        raise TypeError(f"spec must be an AttentionSpec, got {type(spec).__name__}")
    v.check(spec)
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}: use one of {', '.join(SCHEDULES)}")
    if path is None:
        path = v.path_of(spec)
    elif (path not in ("prefill", "decode", "tree") or (path == "decode" and not v.has_decode_kernel())
          or (path == "tree" and v.tree_compute is None)):
        raise ValueError(f"path must be None (the kernel the spec takes), 'prefill', 'decode' or 'tree' (for variants "
                         f"with such a kernel), got {path!r} for variant {v.name!r}")
    if spec.kv_dtype is not None and spec.tree_parents is not None:
        raise ValueError(f"kv_dtype={spec.kv_dtype!r} with tree_parents: the kernels reading integer K and V take no "
                         f"tree mask yet (dequantize K and V, or verify the tree in a float KVCache)")
    if spec.kv_dtype is not None and path not in v.integer_kv_paths:
        raise ValueError(f"kv_dtype={spec.kv_dtype!r}: the {v.name} {path} kernel reads float K and V (integer K and "
                         f"V are read by the decode kernels of {', '.join(integer_kv_variants())}); a "
                         f"KVCache(dtype={spec.kv_dtype!r}) dequantizes for the others")
    return _build_cached(v.name, spec.kernel, path, str(resolve_target(target)), schedule)


def build_shadow(variant, spec: AttentionSpec, *, target="host", schedule: str = "best") -> Kernel:
    """Compile the kernel of ``variant`` that reads a KVCache's int8 shadow of K (``Variant.shadow_compute``) for
    ``spec``'s kernel spec; it serves every batch and length. Cached like ``build``."""
    v = get_variant(variant)
    v.check(spec)
    if v.shadow_compute is None:
        raise ValueError(f"variant {v.name!r} has no kernel reading the shadow of K")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}: use one of {', '.join(SCHEDULES)}")
    return _build_cached(v.name, spec.kernel, "shadow", str(resolve_target(target)), schedule)


def _representative(kspec: KernelSpec, path: str) -> AttentionSpec:
    """An AttentionSpec of the kernel (its sizes only pick the path: the record is the kernel's, not the shape's)."""
    seq_q = {"decode": 1, "shadow": 1, "tree": TREE_DECODE_MAX_ROWS}.get(path, 1024)
    return AttentionSpec(batch=1, heads=kspec.heads, kv_heads=kspec.kv_heads, seq_q=seq_q, seq_kv=1024,
                         head_dim=kspec.head_dim, causal=kspec.causal, window=kspec.window, scale=kspec.scale,
                         dtype=kspec.dtype, kv_dtype=kspec.kv_dtype, softcap=kspec.softcap, sinks=kspec.sinks,
                         tree_parents=tuple(range(-1, seq_q - 1)) if kspec.tree else None,
                         alibi_slopes=kspec.alibi_slopes, **kspec.knobs())


def compile_counted(mod: tvm.IRModule, target) -> object:
    """tvm.compile, counted by ``compile_count``; a module structurally equal to one this process compiled for the
    same target (the decode kernel that standard, flash and mqa share, say) takes that one's executable."""
    global _compiles
    key = (tvm_ffi.structural_hash(mod), str(target))
    with _compiles_lock:
        for seen, executable in _compiled.get(key, ()):
            if tvm_ffi.structural_equal(seen, mod):
                _compiled.move_to_end(key)
                return executable
    executable = tvm.compile(mod, target=target)
    with _compiles_lock:
        _compiles += 1
        _compiled.setdefault(key, []).append((mod, executable))
        _compiled.move_to_end(key)
        while len(_compiled) > COMPILED_KEPT:
            _compiled.popitem(last=False)
    return executable


@functools.lru_cache(maxsize=256)
def _build_cached(variant: str, kspec: KernelSpec, path: str, target_json: str, schedule: str) -> Kernel:
    target = resolve_target(target_json)
    scheduled = scheduled_module(get_variant(variant), _representative(kspec, path), target, schedule, path)
    executable = compile_counted(scheduled.mod, target)
    return Kernel(variant, kspec, path, target, scheduled.schedule, scheduled.record, executable)
