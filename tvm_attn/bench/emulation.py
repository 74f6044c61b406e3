"""arm64 kernels under qemu-user: the aarch64 Python `.ci/arm64-env` sets up, the SME support routine a Linux
streaming function calls, and how often each basic block of a kernel runs (qemu's in_asm and exec logs), which the
Apple estimate multiplies by per-block costs. Emulated time says nothing about a Mac's speed; counts do.

tests/arm64_emulation.py drives the tests' runs with the same environment.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np


def environment() -> Path:
    """The folder `.ci/arm64-env` sets up (its default, or $TVM_ATTN_ARM64_ENV)."""
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tvm_attn" / "arm64"
    return Path(os.environ.get("TVM_ATTN_ARM64_ENV") or default)


def python() -> Path | None:
    """The emulated interpreter, None when the environment is not set up."""
    path = environment() / "bin" / "python"
    return path if path.exists() else None


# The SME support routine LLVM calls from a Linux function that switches to streaming mode (to describe VG to the
# unwinder): libgcc 14 and compiler-rt 19 have it, the emulated Debian 12's libgcc 12 not. AAPCS64: VG when SVE is
# available or PSTATE.SM is 1; qemu's "max" CPU has SVE, so cntd answers both. (LLVM emits no such call for macOS.)
SME_SUPPORT = """
    .arch armv9-a+sve+sme
    .text
    .globl __arm_get_current_vg
    .type __arm_get_current_vg, %function
__arm_get_current_vg:
    cntd x0
    ret
    .size __arm_get_current_vg, .-__arm_get_current_vg
"""


def build_sme_support(directory: Path) -> Path:
    """directory/support.so, SME_SUPPORT linked for aarch64 Linux (clang and ld.lld, as export's cross linker)."""
    source, library = Path(directory) / "support.S", Path(directory) / "support.so"
    source.write_text(SME_SUPPORT)
    subprocess.run(["clang", "--target=aarch64-linux-gnu", "-fuse-ld=lld", "-nostdlib", "-shared", str(source),
                    "-o", str(library)], check=True)
    return library


def qemu_environment(streaming_vector_bytes: int | None = None, **extra) -> dict:
    """os.environ for an emulated run; ``streaming_vector_bytes``: SME's streaming vector length (qemu's default
    is 32; Apple M4's is 64)."""
    env = dict(os.environ, **extra)
    if streaming_vector_bytes is not None:
        env["QEMU_CPU"] = f"max,sme-default-vector-length={streaming_vector_bytes}"
    return env


# Loads one kernel library, prints where it is mapped, calls its "main" once on the saved arrays (bfloat16 ones
# saved as their bits, "*.bfloat16.npy"), passed as tvm_attn/runtime.py passes them.
_CALL_ONCE = """
import ctypes, importlib.util, os, sys
import ml_dtypes, numpy as np, tvm_ffi
spec = importlib.util.spec_from_file_location("runtime", sys.argv[3])
runtime = importlib.util.module_from_spec(spec)
spec.loader.exec_module(runtime)
ctypes.CDLL(os.environ["TVM_ATTN_ARM64_RUNTIME"], ctypes.RTLD_GLOBAL)
ctypes.CDLL(sys.argv[2], ctypes.RTLD_GLOBAL)
library = sys.argv[1]
module = tvm_ffi.load_module(library)
base = min(int(line.split("-")[0], 16) for line in open("/proc/self/maps") if library in line)
end = max(int(line.split()[0].split("-")[1], 16) for line in open("/proc/self/maps") if library in line)
print(f"mapped {base:#x} {end:#x}", flush=True)
arrays = [np.load(p).view(ml_dtypes.bfloat16) if p.endswith(".bfloat16.npy") else np.load(p) for p in sys.argv[4:]]
module["main"](*map(runtime.dlpack_argument, arrays))
"""


# An SVE or SME instruction: a z, p or pn register or ZA as an operand, or a mnemonic reading the vector length.
SCALABLE_OPERAND = re.compile(r"\b(?:z\d{1,2}|p\d{1,2}|pn\d{1,2}|za\d?[hv]?)(?:\.[bhsdq])?\b|\{\s*za\s*\}")
SCALABLE_MNEMONIC = re.compile(r"^(?:rdvl|rdsvl|addvl|addpl|addsvl|addspl|cnt[bhwd]|inc[bhwd]|dec[bhwd]|ptrue|"
                               r"pfalse|whilel[eost]|whileh[is]|ptest|zero)\b")


def is_scalable(instruction: str) -> bool:
    """Whether an AArch64 instruction (``mnemonic operands``) is SVE or SME: smstart/smstop themselves are not."""
    op, _, operands = instruction.strip().replace("\t", " ").partition(" ")
    if op in ("smstart", "smstop"):
        return False
    return bool(SCALABLE_MNEMONIC.match(op) or SCALABLE_OPERAND.search(operands))


@dataclasses.dataclass(frozen=True)
class Block:
    """A basic block of a kernel library as qemu translated it: where it starts (the ELF's virtual address), its
    instructions (llvm-objdump's text: qemu 7.2 cannot disassemble SVE and SME) and how many times it ran."""

    address: int
    instructions: tuple[str, ...]
    executions: int


_IN_ASM = re.compile(r"^0x([0-9a-f]+):\s+[0-9a-f]{8}\s+(.*)$")
_TRACE = re.compile(r"^Trace \d+: 0x[0-9a-f]+ \[[0-9a-f]+/([0-9a-f]+)/")


def block_counts(library: Path, arrays: list[np.ndarray], *, streaming_vector_bytes: int | None = None,
                 timeout: float = 1800) -> list[Block]:
    """Run ``library``'s main once on ``arrays`` (numpy; bfloat16 as ml_dtypes') under qemu on one thread, and count
    the executions of each of its basic blocks. Two emulated runs: the first finds where the
    library is mapped (qemu-user maps it at the same address given the same environment), the second logs only
    that range."""
    if python() is None:
        raise RuntimeError("no arm64 emulator: run .ci/arm64-env")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        support = build_sme_support(tmp)
        paths = []
        for n, array in enumerate(arrays):
            bits = array.dtype.name == "bfloat16"
            paths.append(tmp / (f"arg{n}.bfloat16.npy" if bits else f"arg{n}.npy"))
            np.save(paths[-1], array.view(np.uint16) if bits else array)
        runtime = Path(__file__).parents[1] / "runtime.py"
        command = [str(python()), "-c", _CALL_ONCE, str(library), str(support), str(runtime), *map(str, paths)]
        log = tmp / "qemu.log"

        def run(first: int, last: int) -> tuple[int, int]:
            # Both runs get the same environment but for the range's digits: what qemu maps where depends on it.
            env = qemu_environment(streaming_vector_bytes, TVM_NUM_THREADS="1", QEMU_LOG="in_asm,exec,nochain",
                                   QEMU_LOG_FILENAME=str(log), QEMU_DFILTER=f"{first:#018x}..{last:#018x}")
            proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
            found = re.search(r"^mapped (0x[0-9a-f]+) (0x[0-9a-f]+)$", proc.stdout, re.M)
            if proc.returncode or found is None:
                raise RuntimeError(f"the emulated call failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
            return int(found.group(1), 16), int(found.group(2), 16)

        base, end = run(0, 0)  # logs nothing: where the library goes
        if run(base, end - 1) != (base, end):
            raise RuntimeError("qemu mapped the kernel library elsewhere in the logged run: counts would miss it")
        return _parse_log(log, base, disassemble(library))


def llvm_objdump() -> str | None:
    for name in ("llvm-objdump-19", "llvm-objdump-20", "llvm-objdump-18", "llvm-objdump"):
        if shutil.which(name):
            return shutil.which(name)
    return None


# What llvm-objdump and llvm-mca are told the code may use (features they do not default to for aarch64).
AARCH64_FEATURES = "+sme,+sve,+bf16,+fp16fml,+fullfp16,+dotprod,+i8mm"


def disassemble(library: Path) -> dict[int, str]:
    """{virtual address: "mnemonic operands"} of an aarch64 library's code, SVE and SME included."""
    objdump = llvm_objdump()
    if objdump is None:
        raise RuntimeError("needs llvm-objdump (Debian: apt-get install llvm-19)")
    text = subprocess.run([objdump, "-d", "--no-show-raw-insn", f"--mattr={AARCH64_FEATURES}", str(library)],
                          capture_output=True, text=True, check=True).stdout
    code = {}
    for line in text.splitlines():
        found = _OBJDUMP.match(line)
        if found:
            code[int(found.group(1), 16)] = " ".join(found.group(2).split("//")[0].split())
    return code


_OBJDUMP = re.compile(r"^\s*([0-9a-f]+):\s+(\S.*)$")


def _parse_log(log: Path, base: int, code: dict[int, str]) -> list[Block]:
    translated: dict[int, int] = {}  # address -> instructions
    runs = collections.Counter()
    current: list[str] | None = None
    start = 0
    with open(log) as f:
        for line in f:
            if line.startswith("IN:"):
                current = []
                continue
            if current is not None:
                found = _IN_ASM.match(line)
                if found:
                    if not current:
                        start = int(found.group(1), 16)
                    current.append(found.group(2).strip())
                    continue
                if current:
                    translated[start - base] = len(current)
                current = None
            trace = _TRACE.match(line)
            if trace:
                runs[int(trace.group(1), 16) - base] += 1
    if current:
        translated[start - base] = len(current)
    missing = set(runs) - set(translated)
    if missing:
        raise RuntimeError(f"qemu's log has executions of {len(missing)} blocks it never showed translated")
    return sorted((Block(address, tuple(code[address + 4 * i] for i in range(translated[address])), n)
                   for address, n in runs.items()), key=lambda b: b.address)
