"""tvm_attn: attention kernels for LLM inference on CPUs, written in TVM TE/TensorIR.

    import tvm_attn
    out = tvm_attn.attention(q, k, v, variant="flash", causal=True)
    ref = tvm_attn.reference(q, k, v, variant="flash", causal=True)

The public names load lazily, so that `tvm_attn.runtime` (the loader of exported kernels) works without the TVM
compiler installed and never imports it.
"""

import importlib
import os

# TVM's thread pool defaults to one thread on some VMs; use every core unless the caller chose.
os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))

__version__ = "0.1.0"

_PUBLIC = {
    "attention": ".api", "reference": ".api",
    "SCHEDULES": ".kernel", "Kernel": ".kernel", "build": ".kernel", "compile_count": ".kernel",
    "AttentionSpec": ".spec", "KernelSpec": ".spec", "DTYPES": ".spec", "KV_DTYPES": ".spec",
    "KVCache": ".cache", "PagedKVCache": ".paged_cache", "DecodeConfig": ".variants.decode",
    "APPLE_PRESETS": ".targets", "TARGET_NAMES": ".targets", "resolve_target": ".targets", "target_key": ".targets",
    "VARIANTS": ".variants", "Variant": ".variants", "get_variant": ".variants",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tvm_attn' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
