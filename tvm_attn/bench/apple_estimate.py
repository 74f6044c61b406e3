"""An estimate of the Apple M kernels' speed, said to be one: nothing here runs on a Mac.

For each dense kernel built for apple-m1..m4 (float32; the ELF build of the same CPU model, whose instructions equal
the Mach-O build's: tests/test_arm64.py), the micro-kernel loops of its assembly (innermost loops with 8 or more
vector FMAs: ``asm_loops``) are given to llvm-mca, which reports the cycles per iteration of a loop body under a
CPU's scheduling model; the FMAs per iteration over 4 x the cycles is the share of the 4 x 128-bit FMA pipes of an
Apple M core the loop keeps busy. Two models, named in the report: LLVM's own for the Apple CPU (the "Cyclone" model
LLVM keeps for every Apple core, written for the A7) and Neoverse-V2's (also 4 x 128-bit FMA pipes, a current model).
A loop's share is an upper bound on its speed: llvm-mca assumes L1 hits and predicted branches.

    python -m tvm_attn.bench.apple_estimate [--out bench/results/apple-estimate.md]   # needs llvm-mca >= 17

The same rows go to a CSV beside the report (apple-estimate.csv), which the benchmark's report summarizes. With
the arm64 emulator (`.ci/arm64-env`) the report also estimates whole kernels (tvm_attn/bench/apple_kernel_time.py:
blocks counted under qemu, costed from published figures; apple-estimate-kernels.csv), ~6 min on one core.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from .asm_loops import micro_kernel_loops

FMA_PIPES = 4  # 128-bit FMA pipes per Apple M performance core
MODELS = ("apple", "neoverse-v2")  # "apple": the -mcpu of the kernel itself
ITERATIONS = 200
CHIPS = ("apple-m1", "apple-m2", "apple-m3", "apple-m4")


def llvm_mca() -> str | None:
    """An llvm-mca that knows Neoverse-V2 (LLVM 17 or later; Debian: apt-get install llvm-19), or None."""
    for name in ("llvm-mca-19", "llvm-mca-18", "llvm-mca-17", "llvm-mca"):
        path = shutil.which(name)
        if path is None:
            continue
        version = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
        found = re.search(r"LLVM version (\d+)", version)
        if found and int(found.group(1)) >= 17:
            return path
    return None


@dataclasses.dataclass(frozen=True)
class LoopEstimate:
    kernel: str
    chip: str
    instructions: int  # per iteration
    fmas: int  # vector FMAs per iteration
    cycles: dict  # scheduling model -> llvm-mca's cycles per iteration

    @property
    def is_matmul(self) -> bool:
        """A register-blocked matmul loop: at least 16 FMAs, and FMAs at least 40% of its instructions (the exp's
        polynomial loops have 8-16 FMAs among conversions, shifts and selects)."""
        return self.fmas >= 16 and self.fmas >= 0.4 * self.instructions

    def fma_share(self, model: str) -> float:
        """The share of the FMA pipes the loop keeps busy under ``model``."""
        return self.fmas / (FMA_PIPES * self.cycles[model])


def loop_cycles(mca: str, body: str, cpu: str) -> float:
    """llvm-mca's cycles per iteration of an AArch64 loop body (instructions only) on ``cpu``'s model."""
    with tempfile.NamedTemporaryFile("w", suffix=".s", delete=False) as f:
        f.write(body + "\n")
    try:
        proc = subprocess.run([mca, "-mtriple=aarch64-linux-gnu", f"-mcpu={cpu}", f"-iterations={ITERATIONS}",
                               f.name], capture_output=True, text=True, timeout=120)
    finally:
        os.unlink(f.name)
    total = re.search(r"^Total Cycles:\s+(\d+)", proc.stdout, re.M)
    if proc.returncode or total is None:
        raise RuntimeError(f"llvm-mca failed on a loop of {cpu}: {proc.stderr[-500:]}")
    return int(total.group(1)) / ITERATIONS


def kernels():
    """(name, variant, spec) of the dense kernels estimated: prefill and decode at the benchmark's shapes in float32,
    flash prefill in bfloat16 (bfdot on M2 and later, widened on M1) and decode in float16 (QK^T in fmlal)."""
    import tvm_attn

    from ..plan import DECODE_SHAPE, PREFILL_SHAPE

    prefill = tvm_attn.AttentionSpec(**{**PREFILL_SHAPE, "seq_q": 1024, "seq_kv": 1024})
    decode = tvm_attn.AttentionSpec(**{**DECODE_SHAPE, "seq_q": 1, "seq_kv": 4096, "kv_heads": 8, "causal": True})
    return [("flash prefill", "flash", prefill), ("mqa prefill", "mqa", dataclasses.replace(prefill, kv_heads=1)),
            ("standard prefill", "standard", prefill), ("decode (GQA 32/8, d128)", "flash", decode),
            ("flash prefill bfloat16", "flash", dataclasses.replace(prefill, dtype="bfloat16")),
            ("decode float16", "flash", dataclasses.replace(decode, dtype="float16"))]


def estimate(mca: str, chips=CHIPS) -> list[LoopEstimate]:
    import tvm_attn

    found = []
    for chip in chips:
        target = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": chip}
        for name, variant, spec in kernels():
            asm = tvm_attn.build(variant, spec, target=target, schedule="hand").executable.mod.inspect_source("asm")
            for loop in micro_kernel_loops(asm):
                body = "\n".join(loop.instructions)
                cycles = {model: loop_cycles(mca, body, chip if model == "apple" else model) for model in MODELS}
                found.append(LoopEstimate(name, chip, len(loop.instructions), loop.fmas, cycles))
    return found


def report(estimates: list[LoopEstimate], mca: str, kernel_lines: list[str] = ()) -> str:
    version = subprocess.run([mca, "--version"], capture_output=True, text=True).stdout
    version = re.search(r"LLVM version [\d.]+", version).group(0)
    lines = ["# Apple M: an estimate, not a measurement", "",
             f"Generated by `python -m tvm_attn.bench.apple_estimate` ({version}). Nothing here ran on a Mac: the "
             "kernels' instructions are counted (under qemu) or read (from the assembly) and costed with llvm-mca's "
             "scheduling models and published figures.", "",
             *kernel_lines, "## Per micro-kernel loop: llvm-mca", "",
             "Hand schedules, float32 "
             "unless the kernel says bfloat16 (its matmul loops are bfdot on M2 and later: 8 multiply-adds per "
             "instruction against fmla's 4, so the same share is twice the work) or float16 (decode's QK^T loop "
             "is fmlal / fmlal2: 4 multiply-adds per instruction, as fmla, without converting K first). "
             "Per kernel and chip, each micro-kernel loop (an innermost loop of the apple-mN build with >= 8 vector "
             "FMAs): FMAs per iteration, llvm-mca's cycles per iteration, and the share of the core's 4 x 128-bit "
             "FMA pipes it keeps busy, under LLVM's scheduling model for that Apple CPU (`apple`: the Cyclone "
             "model, written for the A7) and under Neoverse-V2's. llvm-mca assumes L1 hits and predicted branches: "
             "an upper bound for each loop, and the loops are not the whole kernel (softmax, masks, merges).", "",
             "| kernel | chip | loop | instructions | FMAs | cycles (apple) | FMA share (apple) | "
             "cycles (neoverse-v2) | FMA share (neoverse-v2) |", "|---|---|---|---|---|---|---|---|---|"]
    for e in estimates:
        lines.append(f"| {e.kernel} | {e.chip} | {'matmul' if e.is_matmul else 'other'} | {e.instructions} | "
                     f"{e.fmas} | {e.cycles['apple']:.2f} | {e.fma_share('apple'):.0%} | "
                     f"{e.cycles['neoverse-v2']:.2f} | {e.fma_share('neoverse-v2'):.0%} |")
    matmuls = [e for e in estimates if e.is_matmul]
    if matmuls:
        lines += [""] + [
            f"The register-blocked matmul loops (>= 16 FMAs, >= 40% of the loop's instructions), FMA share under "
            f"the {model} model: {min(e.fma_share(model) for e in matmuls):.0%}-"
            f"{max(e.fma_share(model) for e in matmuls):.0%}." for model in MODELS]
    return "\n".join(lines) + "\n"


CSV_FIELDS = ("kernel", "chip", "instructions", "fmas", *(f"cycles {model}" for model in MODELS))


def write_csv(estimates: list[LoopEstimate], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_FIELDS)
        for e in estimates:
            writer.writerow([e.kernel, e.chip, e.instructions, e.fmas, *(e.cycles[model] for model in MODELS)])


def read_csv(path: str) -> list[LoopEstimate]:
    """The estimates ``write_csv`` wrote; ValueError naming the file when it is not such a CSV."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    try:
        return [LoopEstimate(r["kernel"], r["chip"], int(r["instructions"]), int(r["fmas"]),
                             {model: float(r[f"cycles {model}"]) for model in MODELS}) for r in rows]
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path} is not an Apple estimate CSV ({CSV_FIELDS}): {err!r}") from None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tvm_attn.bench.apple_estimate",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join("bench", "results", "apple-estimate.md"))
    parser.add_argument("--chip", action="append", choices=CHIPS, help="only these chips (repeatable)")
    parser.add_argument("--no-kernels", dest="kernels", action="store_false", help="only the loops (no emulated "
                        "counts of whole kernels)")
    args = parser.parse_args(argv)
    mca = llvm_mca()
    if mca is None:
        parser.error("needs llvm-mca from LLVM 17 or later on PATH (Debian: apt-get install llvm-19)")
    chips = tuple(args.chip or CHIPS)
    estimates = estimate(mca, chips)
    kernel_lines = []
    if args.kernels:
        from . import apple_kernel_time
        from .emulation import python

        if python() is None:
            parser.error("--kernels needs the arm64 emulator: run .ci/arm64-env (or pass --no-kernels)")
        with tempfile.TemporaryDirectory() as work:
            kernels = apple_kernel_time.estimate_kernels(mca, chips, MODELS[::-1], Path(work),
                                                         log=lambda m: print(m, flush=True))
        kernel_lines = apple_kernel_time.report_lines(kernels, MODELS[::-1])
        apple_kernel_time.write_csv(kernels, MODELS[::-1], os.path.splitext(args.out)[0] + "-kernels.csv")
    text = report(estimates, mca, kernel_lines)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    write_csv(estimates, os.path.splitext(args.out)[0] + ".csv")
    print(text)


if __name__ == "__main__":
    main()
