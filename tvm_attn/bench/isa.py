"""The ISA class a benchmark run holds every provider to (``python -m tvm_attn.bench --isa avx2``): kernels built for
that class, torch and the sgemm ceiling held to it too, so that an AVX2 laptop's figures can be measured on an
AVX-512 machine (which executes AVX2 code)."""

from __future__ import annotations

import dataclasses
import os
import sys


@dataclasses.dataclass(frozen=True)
class BenchIsa:
    name: str
    target: object  # what tvm_attn kernels are built for ("host", or a TVM target dict)
    # The environment that holds the peers to the class: torch's own kernels (ATEN_CPU_CAPABILITY), the BLAS torch
    # calls for its matmuls (MKL_ENABLE_INSTRUCTIONS, oneDNN's ONEDNN_MAX_CPU_ISA), and OpenBLAS's sgemm ceiling
    # (OPENBLAS_CORETYPE). Empty for the host's own class: every library picks its best kernels.
    environment: tuple = ()

    @property
    def openblas_coretype(self) -> str | None:
        return dict(self.environment).get("OPENBLAS_CORETYPE")


ISAS = {
    "native": BenchIsa("native", "host"),
    "avx2": BenchIsa("avx2", {"kind": "llvm", "mcpu": "x86-64-v3"},
                     (("ATEN_CPU_CAPABILITY", "avx2"), ("MKL_ENABLE_INSTRUCTIONS", "AVX2"),
                      ("ONEDNN_MAX_CPU_ISA", "AVX2"), ("OPENBLAS_CORETYPE", "Haswell"))),
}


def activate(name: str) -> BenchIsa:
    """Hold this process to ISA class ``name``: ValueError for an unknown class or one this host cannot run;
    RuntimeError when torch was imported before (its kernels are chosen at import)."""
    if name not in ISAS:
        raise ValueError(f"unknown ISA class {name!r}: use one of {', '.join(ISAS)}")
    isa = ISAS[name]
    if isa.environment and "torch" in sys.modules:
        raise RuntimeError(f"--isa {name} must be chosen before torch is imported (importing tvm imports it)")
    os.environ.update(dict(isa.environment))
    from tvm_attn.targets import host_mismatch, target_key

    why = host_mismatch(isa.target)
    if why is not None:
        raise ValueError(f"--isa {name}: kernels for {target_key(isa.target)} cannot run on this "
                         f"{target_key('host')} host: {why}")
    return isa
