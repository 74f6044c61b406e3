"""Running arm64 kernels under qemu-user from the tests: kernels are compiled here for TARGET (the Apple M3's CPU
model on aarch64 Linux: the same LLVM backend and instruction selection as the Mac build, an ELF object instead of
Mach-O), cross-linked with clang + ld.lld, and called by tests/arm64_runner.py in the aarch64 Python that
`.ci/arm64-env` sets up. Numerics only: emulated time says nothing about the Mac's speed."""

from __future__ import annotations

import collections
import json
import re
import subprocess
from pathlib import Path

import numpy as np

import tvm_attn
from tvm_attn import export
from tvm_attn.bench.emulation import build_sme_support, environment, python, qemu_environment  # noqa: F401

TARGET = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "apple-m3"}
SME_TARGET = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "apple-m4"}  # SME (and SME2: not emulated)
RUNNER = Path(__file__).with_name("arm64_runner.py")


def _root(array: np.ndarray) -> np.ndarray:
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array


class Emulator:
    """Calls collected with ``call`` and run together by ``run`` (one emulated Python start, ~5 s)."""

    def __init__(self, workdir: Path):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.jobs: list[dict] = []
        self._libraries: dict[int, tuple[str, object]] = {}  # id -> (file, the executable, kept alive)
        self._buffers: dict[int, str] = {}  # id of a buffer -> its file, for the call being collected
        self._saved = 0

    def _library(self, executable) -> str:
        if not self._libraries:
            build_sme_support(self.dir)  # support.so: the runner loads it before any kernel
        if id(executable) not in self._libraries:
            name = f"lib{len(self._libraries)}.so"
            executable.export_library(str(self.dir / name),
                                      fcompile=export.cross_linker(tvm_attn.resolve_target(TARGET)))
            self._libraries[id(executable)] = (name, executable)
        return self._libraries[id(executable)][0]

    def _argument(self, array: np.ndarray) -> dict:
        root = _root(array)
        if id(root) not in self._buffers:
            name = f"buf{self._saved}.bin"
            self._saved += 1
            np.ascontiguousarray(root).view(np.uint8).tofile(self.dir / name)
            self._buffers[id(root)] = name
        itemsize = array.dtype.itemsize
        offset = array.__array_interface__["data"][0] - root.__array_interface__["data"][0]
        return {"file": self._buffers[id(root)], "dtype": array.dtype.name, "offset": offset // itemsize,
                "shape": list(array.shape), "strides": [s // itemsize for s in array.strides]}

    def call(self, name: str, executable, arguments, outputs) -> None:
        """Call ``executable``'s "main" on ``arguments`` (numpy arrays, views of any buffer) under emulation; the
        arrays at indices ``outputs`` are returned by ``run`` under ``name``. Buffers are saved now: later writes
        on the host do not reach the call."""
        self.jobs.append({"name": name, "library": self._library(executable), "function": "main",
                          "arguments": [self._argument(a) for a in arguments], "outputs": list(outputs)})
        self._buffers.clear()  # a later call's arrays are saved afresh

    def run(self, timeout: float = 900, streaming_vector_bytes: int | None = None) -> dict[str, list[np.ndarray]]:
        """Run every call; {name: [output arrays, bfloat16 ones as ml_dtypes']}. ``streaming_vector_bytes``: SME's
        streaming vector length for the run (``emulation.qemu_environment``)."""
        import ml_dtypes

        (self.dir / "jobs.json").write_text(json.dumps(self.jobs))
        proc = subprocess.run([str(python()), str(RUNNER), str(self.dir)], capture_output=True, text=True,
                              timeout=timeout, env=qemu_environment(streaming_vector_bytes))
        if proc.returncode:
            raise RuntimeError(f"the emulated run failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
        results = {}
        for job in self.jobs:
            with np.load(self.dir / f"{job['name']}.npz") as saved:
                arrays = [saved[f"out{i}"] for i in range(len(job["outputs"]))]
            kinds = [job["arguments"][n]["dtype"] for n in job["outputs"]]
            results[job["name"]] = [a.view(ml_dtypes.bfloat16) if kind == "bfloat16" else a
                                    for a, kind in zip(arrays, kinds, strict=True)]
        return results


def run_python(code: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``code`` in the emulated Python; ``import arm64_runner`` there gives ``arm64_runner.runtime``, our
    kernel loader (tvm_attn/runtime.py)."""
    code = f"import sys; sys.path.insert(0, {str(RUNNER.parent)!r})\n{code}"
    return subprocess.run([str(python()), "-c", code], capture_output=True, text=True, timeout=timeout)


_VECTOR = re.compile(r"\bv\d+\.(\d*[bhsd])\b")  # "v0.4s", "v1.s[1]"
_WHOLE_VECTOR = re.compile(r"\bv\d+\.(\d+[bhsd])\b")  # "v0.4s"
_FP_SCALAR = re.compile(r"[bhsdq]\d+$")  # "s0"


def simd_fp_mix(asm: str) -> collections.Counter:
    """How many of each SIMD and floating-point instruction the assembly holds, by mnemonic and arrangement
    ("fmla.4s", "ld1.s", "fcvtzs"), in either syntax LLVM prints: Apple's puts the arrangement on the mnemonic
    ("fmla.4s v0, v1, v2[0]", "faddp.2s s0, v0", "mov.s w0, v7[1]", but "mov s1, v19[1]"), the generic one on
    the operands ("fmla v0.4s, v1.4s, v2.s[0]", "faddp s0, v0.2s", "mov w0, v7.s[1]", "mov s1, v19.s[1]")."""
    mix = collections.Counter()
    for line in asm.splitlines():
        line = line.split("//")[0].split(";")[0].strip()
        if not line or line[0] in ".#" or line.endswith(":") or "=" in line:
            continue  # directives, labels, Apple's Lset assignments
        op, _, operands = line.replace("\t", " ").partition(" ")
        if "." not in op:
            first = operands.split(",")[0].strip("{} ")
            arrangement = (_WHOLE_VECTOR if _FP_SCALAR.match(first) else _VECTOR).search(operands)
            op = f"{op}.{arrangement.group(1)}" if arrangement else op
        if op.startswith("f") or ("." in op and not op.startswith("b.")):
            mix[op] += 1
    return mix


def instruction_count(asm: str) -> int:
    return sum(1 for line in asm.splitlines()
               if (s := line.split("//")[0].split(";")[0].strip()) and s[0] not in ".#" and not s.endswith(":")
               and "=" not in s)
