"""Published figures of the Apple M chips the Apple estimate computes from, each with its source. Nothing here was
measured by this project: no machine here is a Mac.

Sources (the README's "What we expect on a Mac" cites them the same way):
  [NBC]  notebookcheck: "Apple M4 10 cores Processor - Benchmarks and Specs" (4 performance cores up to 4.4 GHz;
         LPDDR5x-7500, 120 GB/s) and "M2 vs M3 vs M4" (M2 P cluster up to 3.5 GHz; M3 4 performance cores up to
         4.06 GHz)
  [CX]   corsix/amx issue #7: an M1 performance core, NEON: 102.4 GFLOP/s (4 FMA instructions per cycle, 4 wide,
         3.2 GHz)
  [DJ]   Dougall Johnson, Firestorm SIMD tables (dougallj.github.io/applecpu): FMLA (vector, 4S) throughput 4 per
         cycle; 4 FP/SIMD units
  [TZ]   tzakharko/m4-sme-exploration (commit 80ec71b; M4 iPad Pro): reports/02-sme-outer-product.md (FP32 FMOPA
         2000 GFLOP/s on a P-core, saturated by one thread with 4 ZA tiles, one SME unit per cluster; FP16/BF16
         widening FMOPA also 2000), reports/01-sme-overview.md (SVL 512 bits; streaming-SVE FMLA ~31 GFLOP/s; no
         SVE outside streaming mode), results/sme-memcpy.json (one thread, z registers: loads ~470 GB/s, stores
         ~216 GB/s, the best median over sizes)
  [APL]  Apple's announcements as quoted by the press: M1 Pro 200 / M1 Max 400 GB/s (Apple press release
         2021-10-18), M2 100 GB/s (MacRumors 2022-06-06), M2 Pro 200 / M2 Max 400 GB/s (press release 2023-01-17,
         BGR copy), M3 Pro 150 / M3 Max 400 GB/s (MacRumors 2023-10-31, from Apple's tech specs), M4 Pro 273 /
         M4 Max 546 GB/s (MacRumors and Neowin 2024-10-30)
  [2ND]  secondary pages only: M1 68.25 GB/s (LPDDR4X-4266 on a 128-bit bus gives 68.3), M3 100 GB/s
  [AMX]  jott.live, "How to Get 1.5 TFlops of FP32 Performance on a Single M1 CPU Core" (hand-written AMX);
         corsix/amx PR #3 ("PyTorch CPU on M1 is so fast at GEMMs (1.7 TFLOPS)"); chsasank/device-benchmarks
         (torch.matmul float32 on the CPU: "Apple M2 CPU | 1" TFLOP/s)
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Chip:
    """One Apple M generation's figures for the estimate: its performance cores and memory."""

    mcpu: str
    p_core_ghz: float  # the P-cores' top clock
    p_cores: int  # in the base chip (the Pro and Max have more)
    bandwidth_gbs: dict  # memory bandwidth of the base, Pro and Max chips
    sources: str
    # float32 matmul on the matrix unit torch's CPU matmuls reach through Accelerate (AMX on M1-M3, SME on M4), per
    # P-cluster, GFLOP/s: None where no figure was found
    matmul_gflops: float | None
    matmul_source: str
    # Arm SME (M4): one unit per P-cluster, shared by its cores (a single thread saturates it)
    sme_flops: float | None = None  # float32 outer products, FLOP/s
    sme_load_bytes: float | None = None  # streaming z-register loads, bytes/s (one thread)
    sme_store_bytes: float | None = None  # streaming stores, bytes/s (one thread)
    streaming_vector_bytes: int | None = None

    @property
    def neon_gflops(self) -> float:
        """A P-core's float32 NEON peak: 4 FMA instructions per cycle, 4 lanes, 2 FLOPs each ([CX], [DJ])."""
        return 4 * 4 * 2 * self.p_core_ghz


CHIPS = {
    "apple-m1": Chip("apple-m1", 3.2, 4, {"M1": 68.25, "M1 Pro": 200, "M1 Max": 400}, "[CX] [APL] [2ND] [AMX]",
                     1500, "AMX, one core, a hand-written kernel [AMX] (torch's CPU GEMM: ~1700)"),
    "apple-m2": Chip("apple-m2", 3.5, 4, {"M2": 100, "M2 Pro": 200, "M2 Max": 400}, "[NBC] [APL] [AMX]",
                     1000, "torch's CPU float32 matmul [AMX]"),
    "apple-m3": Chip("apple-m3", 4.06, 4, {"M3": 100, "M3 Pro": 150, "M3 Max": 400}, "[NBC] [APL] [2ND]",
                     None, "no published figure found"),
    "apple-m4": Chip("apple-m4", 4.4, 4, {"M4": 120, "M4 Pro": 273, "M4 Max": 546}, "[NBC] [APL] [TZ]",
                     2000, "the SME unit's FP32 FMOPA peak [TZ]: Accelerate reaches at most that",
                     sme_flops=2.0e12, sme_load_bytes=470e9, sme_store_bytes=216e9, streaming_vector_bytes=64),
}
