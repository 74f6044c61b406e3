"""schedule="sme": the dense prefill with its tiles' matmuls as Arm SME outer products (tvm_attn/variants/
sme_prefill.py), built for the Apple M4's CPU model and executed under qemu-user with SME (`.ci/arm64-env`) at
M4's streaming vector length (512 bits) and at 128 bits, against the float64 reference; the apple-m4 builds have
no SVE instruction outside streaming mode (M4 has no SVE: it would fault there); what the schedule refuses."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import tvm
from tvm import s_tir
from tvm.script import tirx as T

import tvm_attn
from arm64_emulation import SME_TARGET, Emulator
from conftest import assert_matches_reference, make_inputs
from test_arm64 import emulator_ready  # noqa: F401 (the fixture)
from tvm_attn import export, runtime
from tvm_attn.bench.emulation import is_scalable
from tvm_attn.runtime import numpy_dtype
from tvm_attn.variants import sme_matmul

DENSE = ("standard", "flash", "mqa")


@dataclasses.dataclass(frozen=True)
class Case:
    variant: str
    dtype: str
    heads: int
    kv_heads: int
    head_dim: int
    causal: bool
    window: int | None
    lengths: tuple[tuple[int, int], ...]  # (seq_q, seq_kv) of each call of the one kernel
    scale: float | None = None

    def spec(self, seq_q: int, seq_kv: int) -> tvm_attn.AttentionSpec:
        return tvm_attn.AttentionSpec(batch=2, heads=self.heads, kv_heads=self.kv_heads, seq_q=seq_q, seq_kv=seq_kv,
                                      head_dim=self.head_dim, causal=self.causal, window=self.window,
                                      dtype=self.dtype, scale=self.scale)

    def name(self, n: int) -> str:
        return f"{self.variant}-{self.dtype}-d{self.head_dim}-{self.lengths[n][0]}x{self.lengths[n][1]}"


# Tails of every kind: rows and keys past whole 128-tiles and 2SVL blocks, head_dim 80 (2.5 blocks of 32), a row
# tile with fewer rows than keys and the reverse, one query row, grouped heads, windows, a negative scale.
CASES = (
    Case("flash", "float32", 4, 2, 80, True, None, ((9, 33), (100, 256), (33, 9), (1, 50))),
    Case("standard", "float16", 4, 4, 64, False, None, ((9, 33), (130, 200))),
    Case("mqa", "bfloat16", 4, 1, 32, True, 50, ((70, 300), (200, 200))),
    Case("flash", "float32", 6, 2, 48, True, 100, ((129, 257),), scale=-0.2),
)
CALLS = [(case, n) for case in CASES for n in range(len(case.lengths))]
VECTOR_BYTES = (64, 16)  # Apple M4's streaming vector length, and SME's smallest


def build_sme(case: Case):
    return tvm_attn.build(case.variant, case.spec(*case.lengths[0]), target=SME_TARGET, schedule="sme")


@pytest.fixture(scope="module")
def emulated(emulator_ready, tmp_path_factory):  # noqa: F811
    """{streaming vector bytes: {call name: outputs}} and what each call was given."""
    given, results = {}, {}
    kernels = {case: build_sme(case) for case in CASES}
    for vector_bytes in VECTOR_BYTES:
        emulator = Emulator(tmp_path_factory.mktemp(f"sme{vector_bytes}"))
        for case, kernel in kernels.items():
            assert kernel.schedule == "sme"
            for n, lengths in enumerate(case.lengths):
                spec = case.spec(*lengths)
                q, k, v = make_inputs(spec, seed=n)
                out = np.zeros(spec.q_shape, numpy_dtype(spec.dtype))
                emulator.call(case.name(n), kernel.executable, kernel.arguments(q, k, v, out), outputs=[-1])
                given[case.name(n)] = (spec, q, k, v)
        results[vector_bytes] = emulator.run(streaming_vector_bytes=vector_bytes)
    return results, given


@pytest.mark.arm64
@pytest.mark.parametrize("vector_bytes", VECTOR_BYTES)
@pytest.mark.parametrize("case,n", CALLS, ids=[c.name(n) for c, n in CALLS])
def test_sme_prefill_matches_reference_under_emulation(emulated, case, n, vector_bytes):
    results, given = emulated
    spec, q, k, v = given[case.name(n)]
    assert_matches_reference(case.variant, spec, results[vector_bytes][case.name(n)][0], q, k, v, SME_TARGET)


def scalable_outside_streaming(asm: str) -> list[str]:
    """The SVE/SME instructions of ``asm`` that run outside streaming mode, read in layout order per function
    (``.cfi_startproc`` .. ``.cfi_endproc``): streaming from ``smstart`` (``smstart sm``) to ``smstop``; blocks laid
    out after a ``ret`` (branched to from the body) count as streaming when the function started streaming before."""
    found, streaming, entered = [], False, False
    for line in asm.splitlines():
        text = line.split("//")[0].split(";")[0].strip()
        if text.startswith(".cfi_startproc"):
            streaming = entered = False
        if not text or text[0] in ".#" or text.endswith(":"):
            continue
        op, _, operands = text.replace("\t", " ").partition(" ")
        if op == "smstart" and operands.strip() in ("", "sm"):
            streaming = entered = True
        elif op == "smstop" and operands.strip() in ("", "sm"):
            streaming = False
        elif op == "ret":
            streaming = entered
        elif not streaming and is_scalable(f"{op} {operands}"):  # smstart za / smstop za: legal in either mode
            found.append(text)
    return found


def _asm(kernel) -> str:
    return kernel.executable.mod.inspect_source("asm")


@pytest.mark.parametrize("target", ["apple-m4", SME_TARGET], ids=["macos", "linux"])
def test_apple_m4_builds_have_no_sve_outside_streaming_mode(target):
    """The SME kernels stream only inside their matmul subroutine and everything else (and the other apple-m4
    kernels of flash and mqa: NEON prefill and decode) is NEON: M4 has SME but no SVE, so an SVE instruction outside
    streaming mode faults there (LLVM emits them when told +sve)."""
    case = CASES[0]
    sme = tvm_attn.build(case.variant, case.spec(100, 100), target=target, schedule="sme")
    asm = _asm(sme)
    assert asm.count("smstart\tsm") + asm.count("smstart sm") >= 1 and "fmopa" in asm
    assert scalable_outside_streaming(asm) == []
    if target != "apple-m4":
        return  # the Linux build of the NEON kernels is the Mac's (test_arm64.py)
    for variant in ("flash", "mqa"):  # their NEON prefill and the dense decode kernel
        for seq_q in (1, 100):
            asm = _asm(tvm_attn.build(variant, case.spec(seq_q, 100), target=target, schedule="hand"))
            assert "smstart" not in asm and scalable_outside_streaming(asm) == [], (variant, seq_q)


def test_the_check_finds_sve_outside_streaming_mode():
    """The check above fails when it should: a scalable-vector copy (predicated SVE loads and stores) built for an
    M4 told it has SVE and not asked to stream is SVE code outside streaming mode. (LLVM refuses SME's outer
    products there by itself: "Cannot select".)"""
    lanes = 4 * T.vscale()

    @T.prim_func
    def copy(a: T.handle, b: T.handle):
        n = T.int32()
        A = T.match_buffer(a, (n,), "float32")
        B = T.match_buffer(b, (n,), "float32")
        for i in range(T.ceildiv(n, lanes)):
            T.evaluate(T.call_llvm_intrin(
                "void", "llvm.aarch64.sve.st1",
                T.call_llvm_intrin("float32xvscalex4", "llvm.aarch64.sve.ld1",
                                   T.get_active_lane_mask("uint1xvscalex4", i * lanes, n), T.address_of(A[i * lanes])),
                T.get_active_lane_mask("uint1xvscalex4", i * lanes, n), T.address_of(B[i * lanes])))

    target = tvm_attn.resolve_target({**SME_TARGET, "mattr": ["+sve"]})
    asm = tvm.compile(copy, target=target).mod.inspect_source("asm")
    assert any(op.startswith(("ld1w", "st1w", "whilelo")) for op in scalable_outside_streaming(asm))


def test_sme_refuses_targets_without_it_and_pruned_variants():
    spec = tvm_attn.AttentionSpec(batch=1, heads=2, kv_heads=2, seq_q=64, seq_kv=64, head_dim=32)
    with pytest.raises(ValueError, match="needs a CPU with Arm SME.*apple-m3"):
        tvm_attn.build("flash", spec, target="apple-m3", schedule="sme")
    with pytest.raises(ValueError, match="needs a CPU with Arm SME"):
        tvm_attn.build("flash", spec, target="host", schedule="sme")
    with pytest.raises(ValueError, match="variant 'topk' prunes"):
        tvm_attn.build("topk", dataclasses.replace(spec, top_k=8), target="apple-m4", schedule="sme")
    decode = tvm_attn.build("flash", dataclasses.replace(spec, seq_q=1), target="apple-m4", schedule="sme")
    assert decode.schedule == "hand"  # decode has no SME kernel: the NEON one


def test_sme_tiles_refuse_bad_sizes():
    from tvm_attn.variants.sme_prefill import SmeTiles
    for bad in (0, -32, 1.5, True):
        with pytest.raises(ValueError, match="SmeTiles.block_q"):
            SmeTiles(block_q=bad)


def test_exported_sme_kernel_is_refused_on_a_cpu_without_sme(tmp_path, monkeypatch):
    """The apple-m4 .dylib streams and calls no SME support routine (LLVM emits none for macOS); its manifest
    asks for the "sme" CPU feature, which runtime.load checks (hw.optional.arm.FEAT_SME on macOS, /proc/cpuinfo's
    Features on Linux) before loading anything."""
    spec = tvm_attn.AttentionSpec(batch=1, heads=4, kv_heads=2, seq_q=128, seq_kv=128, head_dim=64, causal=True)
    result = export.export("flash", spec, "apple-m4", tmp_path, schedule="sme")
    manifest = json.loads(result.manifest.read_text())
    assert manifest["schedule"] == "sme" and manifest["target"]["cpu_features"] == ["sme"]
    if result.linked:
        nm = shutil.which("llvm-nm-19") or shutil.which("llvm-nm") or shutil.which("llvm-nm-14")
        if nm is not None:
            undefined = subprocess.run([nm, "-u", str(result.library)], capture_output=True, text=True).stdout
            assert "__arm_" not in undefined, undefined
    monkeypatch.setattr(runtime, "_host_platform", lambda: ("arm64", "darwin"))
    monkeypatch.setattr(runtime, "_host_cpu_flags", lambda: {"fp16fml", "bf16", "i8mm"})  # an M3
    with pytest.raises(runtime.ManifestError, match="needs CPU features sme"):
        runtime.check_runs_here(manifest)
    monkeypatch.setattr(runtime, "_host_cpu_flags", lambda: {"bf16", "sme", "sme2"})  # an M4
    runtime.check_runs_here(manifest)


def test_the_host_cpu_flags_read_macos_sysctl(monkeypatch):
    listing = "hw.optional.arm.FEAT_SME: 1\nhw.optional.arm.FEAT_SME2: 1\nhw.optional.arm.FEAT_SME_FA64: 0\n" \
              "hw.optional.arm.FEAT_BF16: 1\nhw.optional.arm.caps: 123\n"
    monkeypatch.setattr(runtime.sys, "platform", "darwin")
    monkeypatch.setattr(runtime.subprocess, "run",
                        lambda *a, **k: subprocess.CompletedProcess(a, 0, stdout=listing, stderr=""))
    assert runtime._host_cpu_flags() == {"sme", "sme2", "bf16"}


def test_sme_schedule_blocks_match_the_compute():
    """schedules/sme_prefill.py finds every block it names in each dtype's compute."""
    for dtype in ("float32", "bfloat16"):
        spec = tvm_attn.AttentionSpec(batch=1, heads=2, kv_heads=1, seq_q=64, seq_kv=64, head_dim=32, dtype=dtype)
        variant = tvm_attn.get_variant("flash")
        sch = s_tir.Schedule(variant.sme_compute(spec.kernel))
        variant.sme_schedule(sch, tvm_attn.resolve_target("apple-m4"))
        assert sme_matmul.NAME in [gv.name_hint for gv in sch.mod.functions]


def test_the_kernel_estimate_costs_outer_products_at_the_published_rate():
    """apple_kernel_time: a streaming block costs the slowest of its FMOPAs, loads and stores at M4's published
    SME rates, a NEON block llvm-mca's cycles; the chip time overlaps or serializes the two."""
    from tvm_attn.bench import apple_estimate
    from tvm_attn.bench.apple_chips import CHIPS
    from tvm_attn.bench.apple_kernel_time import kernel_cost
    from tvm_attn.bench.emulation import Block

    mca = apple_estimate.llvm_mca()
    if mca is None:
        pytest.skip("no llvm-mca 17+ here")
    outer = ["ld1w { z0.s }, p0/z, [x14]", "ld1w { z1.s }, p2/z, [x12]", "fmopa za0.s, p0/m, p2/m, z0.s, z1.s",
             "ld1w { z2.s }, p3/z, [x28]", "fmopa za1.s, p0/m, p3/m, z0.s, z2.s", "ld1w { z0.s }, p1/z, [x18]",
             "fmopa za2.s, p1/m, p2/m, z0.s, z1.s", "fmopa za3.s, p1/m, p3/m, z0.s, z2.s", "subs x6, x6, #1",
             "b.ne 0x1998"]
    neon = ["fmla v0.4s, v1.4s, v2.4s", "fmla v3.4s, v1.4s, v2.4s", "fmla v4.4s, v1.4s, v2.4s",
            "fmla v5.4s, v1.4s, v2.4s", "fmla v6.4s, v1.4s, v2.4s", "fmla v7.4s, v1.4s, v2.4s",
            "fmla v16.4s, v1.4s, v2.4s", "fmla v17.4s, v1.4s, v2.4s"]
    blocks = [Block(0x1000, tuple(outer), 1000), Block(0x2000, tuple(neon), 100),
              Block(0x3000, ("smstart sm",), 3)]
    cost = kernel_cost(mca, blocks, "apple-m4", ("neoverse-v2",))
    m4 = CHIPS["apple-m4"]
    assert cost.sme_seconds == pytest.approx(1000 * 4 * 2 * 16 * 16 / m4.sme_flops)  # FMOPAs outlast 4 loads
    assert 150 <= cost.neon_cycles["neoverse-v2"] <= 400  # 8 FMAs per iteration on 4 pipes: ~2 cycles, 100 times
    neon_seconds = cost.neon_cycles["neoverse-v2"] / (m4.p_core_ghz * 1e9)
    assert cost.seconds("apple-m4", "neoverse-v2", 1, overlap=False) == pytest.approx(neon_seconds + cost.sme_seconds)
    assert cost.seconds("apple-m4", "neoverse-v2", 4, overlap=True) == pytest.approx(max(neon_seconds / 4,
                                                                                         cost.sme_seconds))
    assert cost.switches == 3 and cost.instructions == 1000 * 10 + 100 * 8 + 3
    with pytest.raises(ValueError, match="apple-m3 has no SME figures"):
        kernel_cost(mca, blocks, "apple-m3", ("neoverse-v2",))


def test_the_estimate_checks_its_counted_outer_products():
    """apple_kernel_time refuses qemu's block counts of an SME call unless they hold exactly the FMOPAs sme_matmul
    issues for the call's shape: 4 per k per 2SVL x 2SVL block (one 40 x 40 tile, head_dim 16, at 512 bits: S^T 2 x 2
    blocks over 16 k, O 2 x 1 blocks over 40 k). The counting itself is checked this way on every estimate run."""
    from tvm_attn.bench.apple_kernel_time import KernelCase, _check_outer_products
    from tvm_attn.bench.emulation import Block

    spec = tvm_attn.AttentionSpec(batch=1, heads=1, kv_heads=1, seq_q=40, seq_kv=40, head_dim=16)
    case = KernelCase("flash prefill", "flash", spec, "sme")
    fmopa = ("fmopa za0.s, p0/m, p2/m, z0.s, z1.s",)
    _check_outer_products(case, [Block(0, fmopa, 4 * (2 * 2 * 16 + 2 * 1 * 40))], 64)
    with pytest.raises(RuntimeError, match="575 FMOPAs counted under qemu, 576 issued"):
        _check_outer_products(case, [Block(0, fmopa, 575)], 64)
