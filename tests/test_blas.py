"""schedule="blas": dense prefill with each tile's matmuls in the platform's BLAS (tvm_attn/blas.py). On this host it
calls numpy's OpenBLAS: against the float64 reference at awkward lengths, masks, grouped heads and layouts, the NaN
and Inf rule, and what it refuses."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import tvm_attn
from conftest import assert_matches_reference, make_inputs
from test_nonfinite import CASES, assert_follows_the_rule, make_case
from tvm_attn import blas
from tvm_attn.variants import blas_prefill

HOST_BLAS = blas.host_blas()
needs_blas = pytest.mark.skipif(HOST_BLAS is None, reason="no BLAS on this host (numpy ships none)")

SHAPES = [  # (variant, heads, kv_heads, seq_q, seq_kv, head_dim, causal, window, scale)
    ("flash", 4, 2, 300, 300, 64, True, None, None),  # a partial second row tile, one partial KV tile
    ("mqa", 4, 1, 77, 600, 80, False, None, None),  # one KV head; a full and a partial KV tile
    ("standard", 2, 2, 513, 1030, 32, True, 100, None),  # a window: rows skip the KV tiles before it
    ("flash", 2, 2, 20, 33, 16, False, None, -0.5),  # a negative scale
    ("flash", 2, 1, 700, 300, 48, True, None, None),  # seq_q > seq_kv: the first rows see no key (output 0)
]


@needs_blas
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_blas_prefill_matches_the_reference(shape):
    variant, heads, kv_heads, seq_q, seq_kv, head_dim, causal, window, scale = shape
    spec = tvm_attn.AttentionSpec(batch=2, heads=heads, kv_heads=kv_heads, seq_q=seq_q, seq_kv=seq_kv,
                                  head_dim=head_dim, causal=causal, window=window, scale=scale)
    kernel = tvm_attn.build(variant, spec, schedule="blas")
    assert kernel.schedule == "blas"
    q, k, v = make_inputs(spec, seed=seq_kv)
    assert_matches_reference(variant, spec, np.asarray(kernel(q, k, v)), q, k, v)


@needs_blas
def test_blas_prefill_reads_strided_layouts():
    """q, k, v as (batch, seq, heads, head_dim) arrays viewed as (batch, heads, seq, head_dim), as torch models hold
    them: the row stride is heads x head_dim, passed to sgemm as the leading dimension."""
    spec = tvm_attn.AttentionSpec(batch=2, heads=4, kv_heads=2, seq_q=290, seq_kv=290, head_dim=32, causal=True)
    rng = np.random.default_rng(1)
    q = rng.standard_normal((2, 290, 4, 32)).astype(np.float32).transpose(0, 2, 1, 3)
    k, v = (rng.standard_normal((2, 290, 2, 32)).astype(np.float32).transpose(0, 2, 1, 3) for _ in "kv")
    out = tvm_attn.build("flash", spec, schedule="blas")(q, k, v)
    assert_matches_reference("flash", spec, np.asarray(out), q, k, v)


@needs_blas
@pytest.mark.parametrize("case", CASES)
def test_blas_prefill_follows_the_nan_and_inf_rule(case):
    q, k, v = make_case(case, 37)
    spec = tvm_attn.AttentionSpec(batch=1, heads=4, kv_heads=2, seq_q=37, seq_kv=100, head_dim=16, causal=True)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        assert_follows_the_rule("flash", spec, tvm_attn.build("flash", spec, schedule="blas")(q, k, v), q, k, v)


@needs_blas
def test_a_decode_sized_spec_takes_the_best_schedule():
    spec = tvm_attn.AttentionSpec(batch=1, heads=4, kv_heads=2, seq_q=1, seq_kv=64, head_dim=32)
    assert tvm_attn.build("flash", spec, schedule="blas").schedule in ("hand", "tuned")


def test_blas_refuses_what_it_does_not_compute():
    spec = tvm_attn.AttentionSpec(batch=1, heads=2, kv_heads=2, seq_q=64, seq_kv=64, head_dim=32)
    with pytest.raises(ValueError, match="dtype=float16"):
        tvm_attn.build("flash", dataclasses.replace(spec, dtype="float16"), schedule="blas")
    with pytest.raises(ValueError, match="variant 'topk' prunes"):
        tvm_attn.build("topk", dataclasses.replace(spec, top_k=8), schedule="blas")
    with pytest.raises(ValueError, match="no BLAS for target aarch64-neoverse-v2"):
        tvm_attn.build("flash", spec, schedule="blas",
                       target={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "neoverse-v2"})
    with pytest.raises(ValueError, match="BlasTiles.block_q must be an int >= 1, got 0"):
        blas_prefill.BlasTiles(block_q=0)


def test_export_refuses_what_it_cannot_build(tmp_path):
    from tvm_attn import export

    spec = tvm_attn.AttentionSpec(batch=1, heads=2, kv_heads=2, seq_q=64, seq_kv=64, head_dim=32, top_k=8)
    with pytest.raises(ValueError, match="variant 'topk' prunes"):
        export.export("topk", spec, "host", tmp_path, schedule="blas")
    with pytest.raises(ValueError, match="unknown export schedule 'fast'"):
        export.export("topk", spec, "host", tmp_path, schedule="fast")
    assert not list(tmp_path.iterdir())  # nothing written


def test_a_library_that_is_not_a_blas_is_refused(tmp_path):
    with pytest.raises(ValueError, match="cannot be loaded"):
        blas.describe(str(tmp_path / "missing.so"))
    import ctypes.util

    libm = ctypes.util.find_library("m")
    if libm:
        with pytest.raises(ValueError, match="exports no CBLAS sgemm"):
            blas.describe(libm)


def test_a_mac_build_calls_accelerate():
    """The apple-m3 build (not runnable here) calls Accelerate's cblas_sgemm, which the Mac's linker resolves."""
    spec = tvm_attn.AttentionSpec(batch=1, heads=2, kv_heads=1, seq_q=64, seq_kv=64, head_dim=64, causal=True)
    kernel = tvm_attn.build("mqa", spec, target="apple-m3", schedule="blas")
    assert blas.for_target("apple-m3") is blas.ACCELERATE
    assert "cblas_sgemm" in kernel.executable.mod.inspect_source("asm")


@needs_blas
def test_best_builds_blas_where_tune_measured_it_faster(tmp_path, monkeypatch):
    """confirmed.json's "blas:<family>" entries (written by `tune`) decide whether "best" builds the BLAS-backed
    kernel, for the target itself and for other CPUs of its ISA class (where every one that measured it found it
    faster); exports never do (they link no BLAS yet)."""
    from tvm_attn import tuning
    from tvm_attn.kernel import scheduled_module
    from tvm_attn.tune import _family

    monkeypatch.setenv("TVM_ATTN_TUNING_LOGS", str(tmp_path))
    tuning._cached_database.cache_clear()
    spec = tvm_attn.AttentionSpec(batch=1, heads=2, kv_heads=1, seq_q=40, seq_kv=40, head_dim=32, causal=True)
    flash = tvm_attn.get_variant("flash")
    avx2, haswell = {"kind": "llvm", "mcpu": "x86-64-v3"}, {"kind": "llvm", "mcpu": "haswell"}
    if not tvm_attn.targets.runs_on_host(avx2):
        pytest.skip("this host does not run AVX2 code")
    tuning.open_database(avx2, tmp_path, create=True)
    try:
        tuning.write_blas_choice(avx2, tmp_path, _family(flash, spec, avx2), 1.2)
        tuning._cached_database.cache_clear()
        assert tuning.blas_measured_faster(flash, spec, avx2, root=tmp_path)
        assert tuning.blas_measured_faster(flash, spec, haswell, root=tmp_path)  # its ISA class's measurement
        assert not tuning.blas_measured_faster(flash, spec, "apple-m3", root=tmp_path)
        kernel = tvm_attn.build("flash", spec, target=avx2)
        assert kernel.schedule == "blas"
        q, k, v = make_inputs(spec)
        assert_matches_reference("flash", spec, np.asarray(kernel(q, k, v)), q, k, v)
        assert scheduled_module(flash, spec, tvm_attn.resolve_target(avx2), "best", blas_allowed=False).schedule \
            != "blas"
        znver1 = {"kind": "llvm", "mcpu": "znver1"}  # another CPU of the class, where it measured slower
        tuning.open_database(znver1, tmp_path, create=True)
        tuning.write_blas_choice(znver1, tmp_path, _family(flash, spec, znver1), None)
        tuning._cached_database.cache_clear()
        assert tuning.blas_measured_faster(flash, spec, avx2, root=tmp_path)  # its own measurement
        assert not tuning.blas_measured_faster(flash, spec, znver1, root=tmp_path)
        assert not tuning.blas_measured_faster(flash, spec, haswell, root=tmp_path)  # the class disagrees
        tuning.write_blas_choice(avx2, tmp_path, _family(flash, spec, avx2), None)  # measured, not faster
        tuning._cached_database.cache_clear()
        assert not tuning.blas_measured_faster(flash, spec, avx2, root=tmp_path)
    finally:
        tuning._cached_database.cache_clear()


@needs_blas
def test_tune_weighs_blas(tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "tvm_attn.tune", "--blas-only", "--variant", "flash", "--seq", "300", "--batch", "1",
           "--heads", "2", "--head-dim", "32", "--logs", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "blas here:" in proc.stderr and "the kept schedule" in proc.stdout
    confirmed = (tmp_path / tvm_attn.target_key("host") / "confirmed.json").read_text()
    assert '"blas:' in confirmed
    decode = [*cmd[:cmd.index("--seq") + 1], "1", *cmd[cmd.index("--seq") + 2:]]  # no BLAS-backed decode kernel
    proc = subprocess.run(decode, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "blas here:" not in proc.stderr, proc.stderr[-3000:]


@needs_blas
def test_an_exported_blas_kernel_loads_its_blas_in_a_process_without_tvm(tmp_path):
    import json
    import subprocess
    import sys
    import textwrap

    from tvm_attn import export

    spec = tvm_attn.AttentionSpec(batch=1, heads=4, kv_heads=2, seq_q=300, seq_kv=300, head_dim=32, causal=True)
    result = export.export("flash", spec, "host", tmp_path, schedule="blas")
    manifest = json.loads(result.manifest.read_text())
    assert manifest["schedule"] == "blas" and manifest["blas"]["sgemm"] == HOST_BLAS.sgemm
    q, k, v = make_inputs(spec, seed=2)
    np.savez(tmp_path / "qkv.npz", q=q, k=k, v=v)
    script = textwrap.dedent(f"""
        import sys, numpy as np
        import tvm_attn.runtime
        kernel = tvm_attn.runtime.load({str(result.manifest)!r})
        data = np.load({str(tmp_path / "qkv.npz")!r})
        np.save({str(tmp_path / "out.npy")!r}, kernel(data["q"], data["k"], data["v"]))
        assert "tvm" not in sys.modules, "the loader imported the TVM compiler"
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_matches_reference("flash", spec, np.load(tmp_path / "out.npy"), q, k, v)
    # A BLAS without that sgemm is refused by name, before the library is loaded.
    manifest["blas"]["sgemm"] = "cblas_sgemm_of_another_blas"
    result.manifest.write_text(json.dumps(manifest))
    from tvm_attn import runtime

    with pytest.raises(runtime.ManifestError, match="calls cblas_sgemm_of_another_blas of"):
        runtime.load(result.manifest)


def test_an_exported_mac_blas_kernel_leaves_cblas_sgemm_to_accelerate(tmp_path):
    """The .dylib's undefined symbols (what the Mac's loader resolves from Accelerate, which runtime.load opens
    first): cblas_sgemm, and no load command names Accelerate (linked with -undefined dynamic_lookup, no SDK here)."""
    import json
    import shutil
    import subprocess

    from tvm_attn import export

    if export.apple_linker() is not None:
        pytest.skip(export.apple_linker())
    spec = tvm_attn.AttentionSpec(batch=1, heads=2, kv_heads=1, seq_q=64, seq_kv=64, head_dim=32)
    result = export.export("mqa", spec, "apple-m3", tmp_path, schedule="blas")
    assert json.loads(result.manifest.read_text())["blas"]["name"].startswith("Accelerate")
    nm = shutil.which("llvm-nm-19") or shutil.which("llvm-nm") or shutil.which("llvm-nm-14")
    if nm is None:
        pytest.skip("no llvm-nm to read the dylib's symbols")
    undefined = subprocess.run([nm, "-u", str(result.library)], capture_output=True, text=True).stdout.split()
    assert "_cblas_sgemm" in undefined
    objdump = shutil.which("llvm-objdump-19") or shutil.which("llvm-objdump") or shutil.which("llvm-objdump-14")
    if objdump:
        loads = subprocess.run([objdump, "--macho", "--dylibs-used", str(result.library)], capture_output=True,
                               text=True).stdout
        assert "Accelerate" not in loads
