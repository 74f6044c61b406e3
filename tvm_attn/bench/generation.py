"""A generation loop through KVCache: prefill, then decode steps, timed per step with the share spent outside the
kernel's runtime function (the append, argument checks, kernel lookup, views, output allocation)."""

from __future__ import annotations

import time

import numpy as np

import tvm_attn


def generation_loop(variant: str = "flash", batch: int = 1, heads: int = 32, kv_heads: int = 8, head_dim: int = 128,
                    prefill: int = 1000, steps: int = 256, seed: int = 0) -> dict:
    """Prefill ``prefill`` positions through a fresh cache, then ``steps`` decode steps (append one position, attend
    one query). Each step is timed, and so is the call into the compiled kernel inside it (the kernel's runtime
    function, wrapped for this loop): their difference is the per-step overhead of tvm_attn's Python side (the
    append, argument checks, kernel lookup, views, output allocation). The cache's kernels are built before the
    loop; compiles during the loop are counted (0 expected)."""
    rng = np.random.default_rng(seed)
    total = prefill + steps
    k = rng.standard_normal((batch, kv_heads, total, head_dim), dtype=np.float32)
    v = rng.standard_normal((batch, kv_heads, total, head_dim), dtype=np.float32)
    q = rng.standard_normal((batch, heads, total, head_dim), dtype=np.float32)
    cache = tvm_attn.KVCache(batch=batch, kv_heads=kv_heads, head_dim=head_dim, capacity=total)
    warm = tvm_attn.KVCache(batch=batch, kv_heads=kv_heads, head_dim=head_dim, capacity=prefill + 1)
    warm.append(k[:, :, :prefill + 1], v[:, :, :prefill + 1])
    warm.attend(q[:, :, :prefill], variant=variant)  # builds the prefill and decode kernels
    warm.attend(q[:, :, prefill:prefill + 1], variant=variant)
    decode = tvm_attn.build(variant, tvm_attn.AttentionSpec(batch=batch, heads=heads, kv_heads=kv_heads, seq_q=1,
                                                            seq_kv=total, head_dim=head_dim, causal=True))
    compiles = tvm_attn.compile_count()

    t0 = time.perf_counter()
    cache.append(k[:, :, :prefill], v[:, :, :prefill])
    cache.attend(q[:, :, :prefill], variant=variant)
    prefill_s = time.perf_counter() - t0

    inside = []
    function = decode.function

    def timed(*args):
        start = time.perf_counter()
        function(*args)
        inside.append(time.perf_counter() - start)

    decode.__dict__["function"] = timed  # the cached runtime function that attend calls
    step_s = []
    try:
        for n in range(prefill, total):
            t0 = time.perf_counter()
            cache.append(k[:, :, n:n + 1], v[:, :, n:n + 1])
            cache.attend(q[:, :, n:n + 1], variant=variant)
            step_s.append(time.perf_counter() - t0)
    finally:
        decode.__dict__["function"] = function
    step_ms = np.array(step_s) * 1e3
    kernel_ms = np.array(inside) * 1e3
    return dict(study="generation", x_name="steps", x=steps, line=f"{variant} KVCache", variant=variant,
                provider="tvm_attn KVCache", batch=batch, heads=heads, kv_heads=kv_heads, seq_q=1, seq_kv=total,
                head_dim=head_dim, causal=True, median_ms=float(np.median(step_ms)),
                q25_ms=float(np.percentile(step_ms, 25)), q75_ms=float(np.percentile(step_ms, 75)), repeats=steps,
                kernel_ms=float(np.median(kernel_ms)), overhead_us=float(np.median(step_ms - kernel_ms) * 1e3),
                compiles=tvm_attn.compile_count() - compiles, prefill_ms=prefill_s * 1e3)
