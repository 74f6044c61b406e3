"""What a kernel should take on an Apple M chip, estimated from counts, never timed: the aarch64-linux build of the
chip's CPU model runs once under qemu (tvm_attn/bench/emulation.py), which counts how often each basic block ran;
each NEON block costs llvm-mca's cycles per iteration of its instructions (a steady-state throughput: L1 hits,
predicted branches) at the P-core clock, and each streaming block (Arm SME) the slowest of its outer products,
loads and stores at the rates published for M4's SME unit (tvm_attn/bench/apple_chips.py). Branches are left out
of the llvm-mca input (they name absolute addresses it cannot assemble; at most one per block), as is the scalar
loop control of streaming blocks, which the core issues while the SME unit works.

Chip time: the NEON work spread over the base chip's 4 P-cores (perfect scaling, optimistic) and the SME work on
the cluster's one SME unit, either overlapped with it (the lower bound) or after it (the upper bound).
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import tempfile
from pathlib import Path

from .apple_chips import CHIPS
from .emulation import AARCH64_FEATURES, Block, is_scalable

_BRANCH = re.compile(r"^(?:b|bl|br|blr|ret|cbn?z|tbn?z|b\.\w+)$")
_PC_RELATIVE = re.compile(r"^(adrp?)\s+(\w+),.*$")  # adrp x8, #0x5509de3000: an address llvm-mca cannot encode


@dataclasses.dataclass(frozen=True)
class KernelCost:
    """The counted work of one kernel call: NEON cycles per scheduling model, SME seconds, mode switches."""

    neon_cycles: dict  # model -> cycles (llvm-mca steady state x executions)
    sme_seconds: float  # on one SME unit at the published rates
    switches: int  # smstart sm executed
    instructions: int  # executed in all

    def seconds(self, chip: str, model: str, cores: int, *, overlap: bool) -> float:
        """Time on ``cores`` P-cores of ``chip`` under ``model``: NEON work split evenly, SME work on one unit,
        overlapped with it or after it."""
        neon = self.neon_cycles[model] / (CHIPS[chip].p_core_ghz * 1e9) / cores
        return max(neon, self.sme_seconds) if overlap else neon + self.sme_seconds


def _mca_blocks(mca: str, blocks: list[Block], cpu: str, iterations: int = 100) -> list[float]:
    """llvm-mca's cycles per iteration of each block (its branches left out), in one llvm-mca run (code regions)."""
    lines = []
    for n, block in enumerate(blocks):
        body = [_PC_RELATIVE.sub(r"mov \2, #0", i) for i in block.instructions if not _BRANCH.match(i.split(" ")[0])]
        lines += [f"# LLVM-MCA-BEGIN b{n}", *(body or ["nop"]), f"# LLVM-MCA-END b{n}"]
    with tempfile.NamedTemporaryFile("w", suffix=".s", delete=False) as f:
        f.write("\n".join(lines) + "\n")
    try:
        proc = subprocess.run([mca, "-mtriple=aarch64-linux-gnu", f"-mcpu={cpu}", f"-iterations={iterations}",
                               f"-mattr={AARCH64_FEATURES}", f.name],
                              capture_output=True, text=True, timeout=600)
    finally:
        Path(f.name).unlink()
    totals = re.findall(r"^\[\d+\] Code Region - b(\d+)\n\n(?:.*\n)*?Total Cycles:\s+(\d+)", proc.stdout, re.M)
    if proc.returncode or len(totals) != len(blocks):
        raise RuntimeError(f"llvm-mca failed on {cpu} ({len(totals)} of {len(blocks)} regions): "
                           f"{proc.stderr[-800:]}")
    return [int(cycles) / iterations for _, cycles in sorted(totals, key=lambda t: int(t[0]))]


def _sme_block_seconds(block: Block, chip) -> float:
    """One run of a streaming block on the SME unit: its outer products, vector loads and stores at the published
    rates, whichever takes longest."""
    ops = [i.split(" ")[0] for i in block.instructions]
    vector = chip.streaming_vector_bytes
    fmopa = sum(op in ("fmopa", "bfmopa") for op in ops)
    loads = sum(op.startswith("ld1") and is_scalable(i) for op, i in zip(ops, block.instructions))
    stores = sum(op.startswith("st1") and is_scalable(i) for op, i in zip(ops, block.instructions))
    flops_per_fmopa = 2 * (vector // 4) ** 2  # a float32 outer product of two streaming vectors
    return max(fmopa * flops_per_fmopa / chip.sme_flops, loads * vector / chip.sme_load_bytes,
               stores * vector / chip.sme_store_bytes)


def kernel_cost(mca: str, blocks: list[Block], chip: str, models: tuple[str, ...]) -> KernelCost:
    """The cost of one call whose blocks ran as ``blocks`` say, on ``chip`` under each llvm-mca model ("apple":
    the chip's own -mcpu, else a CPU name llvm-mca knows)."""
    streaming, neon = [], []
    for b in blocks:
        (streaming if any(is_scalable(i) for i in b.instructions) else neon).append(b)
    if streaming and CHIPS[chip].sme_flops is None:
        raise ValueError(f"{chip} has no SME figures: a streaming kernel cannot be estimated for it")
    cycles = {}
    for model in models:
        per_block = _mca_blocks(mca, neon, chip if model == "apple" else model)
        cycles[model] = sum(c * b.executions for c, b in zip(per_block, neon, strict=True))
    sme = sum(_sme_block_seconds(b, CHIPS[chip]) * b.executions for b in streaming)
    switches = sum(b.executions for b in blocks for i in b.instructions if i.replace("\t", " ").strip() in
                   ("smstart sm", "smstart"))
    return KernelCost(cycles, sme, switches, sum(len(b.instructions) * b.executions for b in blocks))


@dataclasses.dataclass(frozen=True)
class KernelCase:
    """A kernel the estimate runs: a variant, its spec (one head of prefill; decode at the benchmark's shape) and
    the schedule; ``flops`` the useful work, ``kv_bytes`` what decode reads."""

    name: str
    variant: str
    spec: object  # AttentionSpec
    schedule: str  # "hand" (NEON) or "sme"

    @property
    def flops(self) -> int:
        s = self.spec
        return 4 * s.batch * s.heads * s.seq_q * s.seq_kv * s.head_dim

    @property
    def kv_bytes(self) -> int:
        s = self.spec
        if s.kv_dtype is not None:  # codes and a float32 scale per row
            return 2 * s.batch * s.kv_heads * s.seq_kv * (s.head_dim + 4)
        return 2 * s.batch * s.kv_heads * s.seq_kv * s.head_dim * {"float32": 4}.get(s.dtype, 2)


def kernel_cases() -> list[KernelCase]:
    """Flash prefill (one head of the benchmark's seq-1024 B2 H8 D64 shape: every head costs the same) in float32
    and bfloat16, NEON and SME; dense decode GQA 32/8 d128 at 4096 keys in float32, float16 and from an int8 cache."""
    import tvm_attn

    from ..plan import DECODE_SHAPE, PREFILL_SHAPE

    head = tvm_attn.AttentionSpec(**{**PREFILL_SHAPE, "batch": 1, "heads": 1, "seq_q": 1024, "seq_kv": 1024})
    decode = tvm_attn.AttentionSpec(**{**DECODE_SHAPE, "seq_q": 1, "seq_kv": 4096, "kv_heads": 8, "causal": True})
    bf16 = dataclasses.replace(head, dtype="bfloat16")
    return [KernelCase("flash prefill", "flash", head, "hand"), KernelCase("flash prefill", "flash", head, "sme"),
            KernelCase("flash prefill bfloat16", "flash", bf16, "hand"),
            KernelCase("flash prefill bfloat16", "flash", bf16, "sme"),
            KernelCase("decode (GQA 32/8, d128, 4096 keys)", "flash", decode, "hand"),
            KernelCase("decode float16", "flash", dataclasses.replace(decode, dtype="float16"), "hand"),
            KernelCase("decode int8 cache", "flash", dataclasses.replace(decode, kv_dtype="int8"), "hand")]


@dataclasses.dataclass(frozen=True)
class KernelEstimate:
    case: KernelCase
    chip: str
    cost: KernelCost


def estimate_kernels(mca: str, chips, models: tuple[str, ...], workdir: Path, log=print) -> list[KernelEstimate]:
    """Each case on each chip that has its schedule (SME: M4): built for the chip's aarch64-linux model, counted
    under qemu (once per distinct build: M1-M4 share most), costed."""
    import hashlib

    import numpy as np

    import tvm_attn
    from .. import export
    from ..runtime import numpy_dtype
    from .emulation import block_counts

    counted: dict[str, list[Block]] = {}
    found = []
    for case in kernel_cases():
        for chip in chips:
            if case.schedule == "sme" and CHIPS[chip].sme_flops is None:
                continue
            target = tvm_attn.resolve_target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": chip})
            kernel = tvm_attn.build(case.variant, case.spec, target=target, schedule=case.schedule)
            digest = hashlib.sha256(kernel.executable.mod.inspect_source("asm").encode()).hexdigest()[:16]
            if digest not in counted:
                library = Path(workdir) / f"{digest}.so"
                kernel.executable.export_library(str(library), fcompile=export.cross_linker(target))
                rng = np.random.default_rng(0)
                s = case.spec
                q, k, v = (rng.standard_normal(shape).astype(np.float32) for shape in (s.q_shape, s.kv_shape,
                                                                                       s.kv_shape))
                q, k, v = (x.astype(numpy_dtype(s.dtype)) for x in (q, k, v))
                out = np.zeros_like(q)
                extra = ()
                if s.kv_dtype is not None:  # an integer cache's codes (K in blocks of keys) and row scales
                    cache = tvm_attn.KVCache(s.batch, s.kv_heads, s.head_dim, s.seq_kv, dtype=s.kv_dtype)
                    cache.append(k, v)
                    k, v, extra = cache.kernel_inputs(kernel, s.seq_q)
                log(f"counting {case.name} ({case.schedule}) for {chip} under qemu")
                counted[digest] = block_counts(library, [q, k, v, *extra, out],
                                               streaming_vector_bytes=CHIPS[chip].streaming_vector_bytes)
            cost = kernel_cost(mca, counted[digest], chip, models)
            if case.schedule == "sme":
                _check_outer_products(case, counted[digest], CHIPS[chip].streaming_vector_bytes)
            found.append(KernelEstimate(case, chip, cost))
    return found


def _check_outer_products(case: KernelCase, blocks: list[Block], vector_bytes: int) -> None:
    """The FMOPAs counted for an SME prefill call equal what sme_matmul issues for its shape (4 per k per 2SVL x
    2SVL block of each tile's two products): RuntimeError otherwise (the counts would be wrong)."""
    from ..variants.sme_prefill import SmeTiles

    s, tiles, block = case.spec, SmeTiles(), 2 * vector_bytes // 4
    if s.causal or s.window is not None:
        return  # the tiles visited depend on the mask
    blocks_of = lambda n: -(-n // block)  # noqa: E731
    expected = 0
    for rows in [min(tiles.block_q, s.seq_q - r) for r in range(0, s.seq_q, tiles.block_q)]:
        for keys in [min(tiles.block_kv, s.seq_kv - t) for t in range(0, s.seq_kv, tiles.block_kv)]:
            expected += 4 * (blocks_of(keys) * blocks_of(rows) * s.head_dim + blocks_of(rows) * blocks_of(s.head_dim)
                             * keys)
    expected *= s.batch * s.heads
    counted = sum(b.executions * sum(i.startswith("fmopa ") for i in b.instructions) for b in blocks)
    if counted != expected:
        raise RuntimeError(f"{case.name}: {counted} FMOPAs counted under qemu, {expected} issued by the kernel's "
                           f"shape: the block counts are wrong")


def _gflops(e: KernelEstimate, model: str, overlap: bool) -> float:
    return e.case.flops / e.cost.seconds(e.chip, model, CHIPS[e.chip].p_cores, overlap=overlap) / 1e9


def _span(low: float, high: float) -> str:
    return f"{low:.0f}" if round(low) == round(high) else f"{low:.0f}-{high:.0f}"


def report_lines(estimates: list[KernelEstimate], models: tuple[str, ...]) -> list[str]:
    """The kernel section of the Apple estimate: prefill GFLOP/s and decode times per chip, with the published
    figures beside them."""
    lines = ["## Per kernel: counted under qemu, costed from published figures", "",
             "Each kernel's aarch64-linux build for the chip ran once under qemu (one thread), which counted the "
             "executions of each basic block (`tvm_attn/bench/emulation.py`). A NEON block costs llvm-mca's cycles "
             "per iteration (steady state, L1 hits, branches left out) at the P-core clock; a streaming (SME) block "
             "the longest of its outer products, loads and stores at the rates published for M4's SME unit "
             "(`tvm_attn/bench/apple_chips.py` has every figure and its source). Time on the base chip's 4 P-cores: "
             "NEON work split evenly (perfect scaling) and SME work on the P-cluster's one SME unit, overlapped "
             "with the NEON work (the first number) or after it (the second); a single figure where the kernel "
             f"does not stream. Cycle models: {', '.join(models)} (`apple`: LLVM's model for the Apple cores, "
             "written for the A7). Mode switches (smstart) are counted; their cost is not published and not "
             "included.", ""]
    prefill = [e for e in estimates if "prefill" in e.case.name]
    if prefill:
        s = prefill[0].case.spec
        lines += [f"### Prefill, one head of seq {s.seq_q} x {s.seq_kv}, head_dim {s.head_dim} (GFLOP/s on 4 P-cores)",
                  "", "| kernel | chip | schedule | " + " | ".join(f"GFLOP/s ({m})" for m in models)
                  + " | SME unit time | smstart | vs NEON (" + models[0] + ") |",
                  "|---|---|---|" + "---|" * len(models) + "---|---|---|"]
        for e in prefill:
            neon = next((x for x in prefill if x.case.name == e.case.name and x.chip == e.chip
                         and x.case.schedule == "hand"), None)
            ratio = "-"
            if neon is not None and e.case.schedule != "hand":
                base = _gflops(neon, models[0], True)
                ratio = f"{_gflops(e, models[0], False) / base:.1f}x-{_gflops(e, models[0], True) / base:.1f}x"
            lines.append(f"| {e.case.name} | {e.chip} | {e.case.schedule} | "
                         + " | ".join(_span(_gflops(e, m, False), _gflops(e, m, True)) for m in models)
                         + f" | {e.cost.sme_seconds * 1e6:.0f} us | {e.cost.switches} | {ratio} |")
        lines += ["", "Published float32 matmul rates of the matrix unit torch's matmuls reach through Accelerate "
                  "(per P-cluster; torch's SDPA also runs its softmax on NEON, so these bound its matmuls only):", ""]
        lines += [f"- {chip}: " + (f"{c.matmul_gflops} GFLOP/s: " if c.matmul_gflops else "") + c.matmul_source
                  for chip, c in CHIPS.items()]
        lines.append("")
    decode = [e for e in estimates if "decode" in e.case.name]
    if decode:
        lines += ["### Decode (bandwidth-bound where the read takes longer than the arithmetic)", "",
                  "| kernel | chip | K+V bytes | compute on 4 P-cores (" + ", ".join(models)
                  + ") | read at the base / Pro / Max bandwidth |", "|---|---|---|---|---|"]
        for e in decode:
            compute = ", ".join(f"{e.cost.seconds(e.chip, m, CHIPS[e.chip].p_cores, overlap=True) * 1e6:.0f} us"
                                for m in models)
            reads = " / ".join(f"{e.case.kv_bytes / (gbs * 1e9) * 1e6:.0f} us ({name} {gbs} GB/s)"
                               for name, gbs in CHIPS[e.chip].bandwidth_gbs.items())
            lines.append(f"| {e.case.name} | {e.chip} | {e.case.kv_bytes / 2**20:.1f} MiB | {compute} | {reads} |")
        lines.append("")
    return lines


CSV_FIELDS = ("kernel", "schedule", "chip", "flops", "kv_bytes", "sme_seconds", "switches", "instructions")


def write_csv(estimates: list[KernelEstimate], models: tuple[str, ...], path) -> None:
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*CSV_FIELDS, *(f"neon cycles {m}" for m in models)])
        for e in estimates:
            writer.writerow([e.case.name, e.case.schedule, e.chip, e.case.flops, e.case.kv_bytes, e.cost.sme_seconds,
                             e.cost.switches, e.cost.instructions, *(e.cost.neon_cycles[m] for m in models)])
