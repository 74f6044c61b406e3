"""The float32 matmul ceiling of this machine, measured in the benchmark's own run (the GFLOP/s columns compare to
it), and the theoretical FMA peak beside it.

Two sgemms, the larger kept as the ceiling: OpenBLAS through numpy in a subprocess whose environment drops
OPENBLAS_CORETYPE (a machine may pin OpenBLAS to older kernels with it: Haswell's AVX2 kernels run ~5x below a Zen 5's
AVX-512 sgemm), with the kernels it chose reported by threadpoolctl; and torch.matmul when torch is installed.

A machine's speed drifts between minutes, so a ceiling timed once at the end of a run is not a within-point ratio:
``SgemmWorker`` keeps that OpenBLAS sgemm in a child process and runs one product per call, so that the benchmark
times it in the same interleaved round as the prefill kernels (the "sgemm" provider).
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

from ..timing import measure

# float32 flops per cycle and core of the FMA units (2 FMA pipes x lanes x 2), by LLVM CPU name
FMA_FLOPS_PER_CYCLE = {
    "znver1": 16,  # 2 x 128-bit (a 256-bit FMA takes both pipes)
    **{f"znver{n}": 32 for n in (2, 3, 4)},  # 2 x 256-bit (Zen 4 splits AVX-512 into two halves)
    "znver5": 64,  # 2 x 512-bit
    **{cpu: 64 for cpu in ("skylake-avx512", "cascadelake", "cooperlake", "icelake-server", "sapphirerapids",
                           "emeraldrapids", "graniterapids")},  # 2 x 512-bit
    **{cpu: 32 for cpu in ("haswell", "broadwell", "skylake", "alderlake", "raptorlake")},  # 2 x 256-bit
    **{f"apple-m{n}": 32 for n in (1, 2, 3, 4)},  # 4 x 128-bit NEON
}

_OPENBLAS_SGEMM = """
import json, sys
import numpy as np
from threadpoolctl import threadpool_info
from tvm_attn.timing import measure
n, min_seconds = int(sys.argv[1]), float(sys.argv[2])
a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
t = measure(lambda: a @ a, min_seconds=min_seconds)
print(json.dumps({"median_ms": t.median_ms, "q25_ms": t.q25_ms, "q75_ms": t.q75_ms, "repeats": t.repeats,
                  "blas": [i for i in threadpool_info() if i.get("user_api") == "blas"]}))
"""


def _own_kernels_env(n_threads: int, coretype: str | None = None) -> dict:
    """This process's environment for a child whose OpenBLAS picks its own kernels (or those of ``coretype``, e.g.
    Haswell for the AVX2 class), with n_threads threads."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    if coretype is not None:
        env["OPENBLAS_CORETYPE"] = coretype
    env["OPENBLAS_NUM_THREADS"] = str(n_threads)
    return env


def openblas_sgemm(n: int, n_threads: int, min_seconds: float, coretype: str | None = None) -> dict:
    """numpy's sgemm of n x n in a subprocess with OpenBLAS choosing its own kernels: the timing and what
    threadpoolctl says of the BLAS (library, version, kernels, threads)."""
    proc = subprocess.run([sys.executable, "-c", _OPENBLAS_SGEMM, str(n), str(min_seconds)],
                          env=_own_kernels_env(n_threads, coretype), capture_output=True, text=True, timeout=600)
    if proc.returncode:
        raise RuntimeError(f"the OpenBLAS sgemm subprocess failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# One product per line read from stdin; it answers with the product's trace (so the caller can check the work was
# done) after a first line naming the BLAS.
_SGEMM_WORKER = """
import json, sys
import numpy as np
from threadpoolctl import threadpool_info
n = int(sys.argv[1])
a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
a @ a
print(json.dumps([i for i in threadpool_info() if i.get("user_api") == "blas"]), flush=True)
for _ in sys.stdin:
    print(float(np.trace(a @ a)), flush=True)
"""
SAME_ROUND_SGEMM_N = 2048


class SgemmWorker:
    """numpy's float32 matmul of two n x n matrices in a child process whose OpenBLAS picks its own kernels; each
    call runs one product there and returns its trace. The parent waits on a pipe meanwhile (its thread pools idle),
    so timing a call times the child's sgemm, plus ~0.1 ms of pipe round trip."""

    def __init__(self, n: int, n_threads: int, coretype: str | None = None):
        self.n, self.flops = n, 2 * n**3
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self._proc = subprocess.Popen([sys.executable, "-c", _SGEMM_WORKER, str(n)],
                                      env=_own_kernels_env(n_threads, coretype), stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        first = self._proc.stdout.readline()
        if not first:
            self._stderr.seek(0)
            raise RuntimeError(f"the OpenBLAS sgemm worker failed to start:\n{self._stderr.read()[-2000:]}")
        self.blas = _blas_name(json.loads(first))

    def __call__(self) -> float:
        self._proc.stdin.write("\n")
        self._proc.stdin.flush()
        answer = self._proc.stdout.readline()
        if not answer:
            raise RuntimeError(f"the OpenBLAS sgemm worker exited (code {self._proc.poll()})")
        return float(answer)

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()  # the worker's loop ends at EOF
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._stderr.close()


@functools.lru_cache(maxsize=None)
def sgemm_worker(n: int, n_threads: int, coretype: str | None = None) -> SgemmWorker:
    """The process's one worker for (n, n_threads, coretype), started on first use and closed at exit."""
    worker = SgemmWorker(n, n_threads, coretype)
    atexit.register(worker.close)
    return worker


def _blas_name(blas: list[dict]) -> str:
    if not blas:
        return "numpy (BLAS unknown)"
    b = blas[0]
    return (f"numpy/{b.get('internal_api', b.get('prefix', 'blas'))} {b.get('version', '')} "
            f"({b.get('architecture', '?')} kernels, {b.get('num_threads', '?')} threads)").replace("  ", " ")


def sgemm_rows(n: int, n_threads: int, min_seconds: float, coretype: str | None = None) -> list[dict]:
    """One row per sgemm measured (provider: which library and kernels), study "ceiling", line "sgemm";
    ``coretype``: OpenBLAS held to that core's kernels (an ISA class's run)."""
    flops = 2 * n**3
    found = []
    try:
        blas = openblas_sgemm(n, n_threads, min_seconds, coretype)
        found.append((_blas_name(blas["blas"]), blas))
    except (RuntimeError, subprocess.TimeoutExpired, ValueError) as err:  # a lost ceiling must not lose the run
        print(f"warning: numpy's sgemm ceiling not measured: {err}", file=sys.stderr)
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        a = torch.from_numpy(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32))
        t = measure(lambda: torch.matmul(a, a), min_seconds=min_seconds)
        found.append((f"torch.matmul ({torch.get_num_threads()} threads)",
                      dict(median_ms=t.median_ms, q25_ms=t.q25_ms, q75_ms=t.q75_ms, repeats=t.repeats)))
    return [dict(study="ceiling", line="sgemm", variant="", provider=name, x_name="n", x=n, flops=flops,
                 gflops=flops / (t["median_ms"] * 1e-3) / 1e9, median_ms=t["median_ms"], q25_ms=t["q25_ms"],
                 q75_ms=t["q75_ms"], repeats=t["repeats"], threads=n_threads) for name, t in found]


def cpu_mhz() -> float | None:
    """The clock /proc/cpuinfo reports (a VM's is its nominal one; cores may boost above it)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return float(line.split(":", 1)[1])
    except (OSError, ValueError):
        return None
    return None


def fma_peak_row(cpu: str, n_threads: int) -> dict | None:
    """The theoretical float32 FMA peak: threads x FMA flops per cycle x the reported clock (None for a CPU or
    clock not known here)."""
    per_cycle, mhz = FMA_FLOPS_PER_CYCLE.get(cpu), cpu_mhz()
    if per_cycle is None or mhz is None:
        return None
    return dict(study="ceiling", line="fma peak", variant="", x_name="flops per cycle", x=per_cycle,
                provider=f"{n_threads} cores x {per_cycle} flop/cycle x {mhz / 1e3:.2f} GHz",
                gflops=n_threads * per_cycle * mhz / 1e3, threads=n_threads)
