"""tvm_attn: attention kernels for LLM inference on CPUs, written in TVM TE/TensorIR.

    import tvm_attn
    out = tvm_attn.attention(q, k, v, variant="flash", causal=True)
    ref = tvm_attn.reference(q, k, v, variant="flash", causal=True)
"""

import os

# TVM's thread pool defaults to one thread on some VMs; use every core unless the caller chose.
os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))

from .api import attention, reference  # noqa: E402
from .kernel import SCHEDULES, Kernel, build  # noqa: E402
from .spec import AttentionSpec  # noqa: E402
from .targets import APPLE_PRESETS, TARGET_NAMES, resolve_target, target_key  # noqa: E402
from .variants import VARIANTS, Variant, get_variant  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "APPLE_PRESETS", "AttentionSpec", "Kernel", "SCHEDULES", "TARGET_NAMES", "VARIANTS", "Variant",
    "attention", "build", "get_variant", "reference", "resolve_target", "target_key",
]
