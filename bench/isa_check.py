"""Prefill per ISA class on this machine, until `python -m tvm_attn.bench` has a per-ISA section (issue 26): the hand
kernels built for an ISA class (AVX2: x86-64-v3 code; AVX-512: the host's), torch SDPA held to the same class
(ATEN_CPU_CAPABILITY) and that class's sgemm (AVX2: numpy's OpenBLAS with OPENBLAS_CORETYPE=Haswell as set here;
AVX-512: OpenBLAS's own kernels in a child process), timed in one interleaved round per point with the benchmark's
timer. B2 H8 D64 float32; GFLOP/s are useful FLOPs (causal: half).

    python bench/isa_check.py avx2      # needs torch; run on an idle machine
"""
import os, sys
isa = sys.argv[1]
os.environ["ATEN_CPU_CAPABILITY"] = {"avx2": "avx2", "avx512": "avx512"}[isa]
for k, v in (("TVM_THREAD_POOL_SPIN_COUNT", "0"), ("OMP_WAIT_POLICY", "PASSIVE"), ("OPENBLAS_THREAD_TIMEOUT", "4")):
    os.environ.setdefault(k, v)
import numpy as np, torch, warnings
import tvm_attn
from tvm_attn.timing import measure_interleaved
from tvm_attn.bench.ceiling import SgemmWorker
warnings.simplefilter("ignore")
torch.set_num_threads(2)
target = {"avx2": {"kind": "llvm", "mcpu": "x86-64-v3"}, "avx512": "host"}[isa]
if isa == "avx2":  # the OPENBLAS_CORETYPE=Haswell of these VMs holds OpenBLAS to its AVX2 kernels
    a = np.random.rand(2048, 2048).astype(np.float32); b = a.copy()
    sgemm, sg_name = (lambda: a @ b), "numpy OpenBLAS (OPENBLAS_CORETYPE=Haswell)"
else:
    worker = SgemmWorker(2048, 2); sgemm, sg_name = worker, "OpenBLAS own kernels: " + worker.blas
print(f"# {isa}: target {target}, torch {torch.backends.cpu.get_cpu_capability()}, sgemm {sg_name}")
rng = np.random.default_rng(0)
points = [("flash", 512, False, 8), ("flash", 1024, False, 8), ("flash", 2048, False, 8), ("flash", 2048, True, 8),
          ("flash", 4096, True, 8), ("mqa", 1024, False, 2), ("standard", 1024, False, 8), ("flash", 128, False, 8)]
for variant, seq, causal, kvh in points:
    spec = tvm_attn.AttentionSpec(batch=2, heads=8, kv_heads=kvh, seq_q=seq, seq_kv=seq, head_dim=64, causal=causal)
    kernel = tvm_attn.build(variant, spec, target=target, schedule="hand")
    q = rng.standard_normal(spec.q_shape).astype(np.float32)
    k, v = (rng.standard_normal(spec.kv_shape).astype(np.float32) for _ in range(2))
    out = np.empty_like(q)
    nk = 2 if kvh == 8 else 1
    ref = tvm_attn.reference(q[:1, :2], k[:1, :nk], v[:1, :nk], causal=causal)
    kernel(q, k, v, out)
    assert np.allclose(out[:1, :2], ref, atol=2e-4), variant
    tq, tk, tv = map(torch.from_numpy, (q, k, v))
    fns = {"tvm_attn": lambda: kernel(q, k, v, out),
           "torch": lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal,
                                                                             enable_gqa=kvh != 8)}
    if seq >= 1024:
        fns["sgemm"] = sgemm
    res = measure_interleaved(fns, min_seconds=1.0, spread=0.05, max_seconds=4)
    flops = 4 * 2 * 8 * seq * seq * 64 * (0.5 if causal else 1)
    g = flops / res["tvm_attn"].median_ms / 1e6
    line = (f"{variant:8s} seq {seq:5d} {'causal' if causal else '      '} kv{kvh}: tvm_attn {res['tvm_attn'].median_ms:8.2f} ms"
            f" {g:6.1f} GFLOP/s, torch {res['torch'].median_ms:8.2f} ms -> {res['torch'].median_ms / res['tvm_attn'].median_ms:.2f}x")
    if "sgemm" in res:
        sg = 2 * 2048**3 / res["sgemm"].median_ms / 1e6
        line += f"; sgemm {sg:6.1f} GFLOP/s -> {g / sg:.0%}"
    print(line, flush=True)
