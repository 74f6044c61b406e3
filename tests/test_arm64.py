"""Every variant's arm64 code, executed: kernels compiled for the Apple M3's CPU model (on aarch64 Linux, see
tests/arm64_emulation.py) run under qemu-user and are checked against the float64 reference computed here; the
cache's decode kernels and its shadow quantization too. `.ci/arm64-env` sets the emulator up (CI runs it); without
it these tests skip, or fail when TVM_ATTN_REQUIRE_ARM64=1."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil

import numpy as np
import pytest
import tvm

import tvm_attn
from arm64_emulation import (TARGET, Emulator, environment, instruction_count, python, run_python,
                             simd_fp_mix)
from conftest import (TREE_16, assert_matches_reference, float16_products_here, knobs_for, make_inputs,
                      output_tolerance, pair_products_here)
from tvm_attn import certificate, export, runtime, shadow
from tvm_attn.kernel import build_shadow, scheduled_module
from tvm_attn.paged_cache import build_paged, tree_rows
from tvm_attn.runtime import numpy_dtype
from tvm_attn.variants import path_for

pytestmark = pytest.mark.arm64


@dataclasses.dataclass(frozen=True)
class Case:
    """One arm64 kernel of a variant (chosen as `build` chooses it for the first length), called at each length."""

    variant: str
    dtype: str
    heads: int
    kv_heads: int
    head_dim: int
    causal: bool
    window: int | None
    lengths: tuple[tuple[int, int], ...]  # (seq_q, seq_kv) of each call
    batch: int = 2

    @property
    def name(self) -> str:
        return f"{self.variant}-{path_for(self.lengths[0][0])}-{self.dtype}"

    def spec(self, seq_q: int, seq_kv: int) -> tvm_attn.AttentionSpec:
        return tvm_attn.AttentionSpec(batch=self.batch, heads=self.heads, kv_heads=self.kv_heads, seq_q=seq_q,
                                      seq_kv=seq_kv, head_dim=self.head_dim, causal=self.causal,
                                      window=self.window, dtype=self.dtype, **knobs_for(self.variant)[0])


# Per variant: a float32 prefill kernel (causal, grouped heads, head_dim 80), a float32 decode kernel (one KV head,
# a sliding window), a float16 prefill kernel (non-causal, one KV head per query head) and a bfloat16 decode kernel.
SHAPES = (
    dict(dtype="float32", heads=4, kv_heads=2, head_dim=80, causal=True, window=None,
         lengths=((9, 33), (100, 256), (33, 9))),
    dict(dtype="float32", heads=4, kv_heads=1, head_dim=32, causal=True, window=50,
         lengths=((1, 37), (1, 300), (5, 300))),
    dict(dtype="float16", heads=4, kv_heads=4, head_dim=64, causal=False, window=None, lengths=((9, 33), (100, 100))),
    dict(dtype="bfloat16", heads=4, kv_heads=2, head_dim=64, causal=True, window=None, lengths=((1, 100), (7, 70))),
)
# bfloat16 prefill of the variants that compute it in pair products (bfdot on the M3; the decode case above does too)
PAIR_SHAPE = dict(dtype="bfloat16", heads=4, kv_heads=2, head_dim=64, causal=True, window=None,
                  lengths=((100, 130), (33, 33)))
# float16 decode of the variants whose decode kernel computes QK^T in float16 products (fmlal on the M3); head_dim 48
# is three 16-lane steps, seq_kv 300 a partial tile
FLOAT16_DECODE_SHAPE = dict(dtype="float16", heads=6, kv_heads=2, head_dim=48, causal=True, window=None,
                            lengths=((1, 300), (4, 130)))
CASES = [Case(variant, **shape) for variant in tvm_attn.VARIANTS for shape in SHAPES] + [
    Case(variant, **PAIR_SHAPE) for variant, v in tvm_attn.VARIANTS.items() if "prefill" in v.pair_paths] + [
    Case(variant, **FLOAT16_DECODE_SHAPE) for variant, v in tvm_attn.VARIANTS.items()
    if "decode" in v.float16_product_paths]
CALLS = [(case, n) for case in CASES for n in range(len(case.lengths))]
# Decode through a KVCache (strided views of its buffers): flash's decode kernel (also reading an int8 cache's codes
# and scales) and the kernels reading the cache's shadow of K; (variant, cache dtype).
CACHE_CASES = [("flash", "float32"), ("flash", "float16"), ("flash", "int8"), ("topk", "float32"),
               ("threshold", "float32"), ("bounded", "float32"), ("bounded", "bfloat16")]
CACHE_APPENDS = (37, 1, 90, 30)  # 158 positions: whole and partial shadow blocks of 32
# top-k's cache case adds ALiBi slopes so steep for heads 0 and 1 that their 5th key lies past the shadow's 16 logits
# of bins: those rows take the kernel's cut on the bounds themselves (variants/bounded.py far_cut)
TOPK_CACHE_SLOPES = (8.0, 6.0, 0.5, 0.0)


# Decode over int8 caches with q . K and P V in byte products (sdot: tvm_attn/schedules/byte_products.py):
# (name, heads, kv_heads, head_dim, positions). MHA takes 64-key tiles, so V goes through byte products in its two
# whole tiles and is widened in the last; head_dim 36 takes K's codes only (V needs whole 16-dim interleaves); 1100
# grouped keys fill one 1024-key tile. "non-finite": a NaN and an Inf in two query rows and a NaN in V. "features":
# softcap, sinks and ALiBi in the same expression as the byte products' scores.
BYTE_CASES = [("mha-d64", 2, 2, 64, 158), ("gqa-d36", 6, 2, 36, 158), ("gqa-d48", 4, 1, 48, 1100),
              ("non-finite", 6, 3, 32, 1100), ("features", 4, 2, 64, 300)]
FEATURES = dict(softcap=3.0, sinks=True, alibi_slopes=(0.5, 0.25, 0.125, 0.0625))
FEATURE_SINKS = np.array([1.0, 4.0, -1.0, 2.0], np.float32)


def _byte_case(name: str, heads: int, kv_heads: int, head_dim: int, positions: int):
    """(cache, q, spec of its kernel) of a BYTE_CASES entry."""
    rng = np.random.default_rng(11)
    cache = tvm_attn.KVCache(batch=1, kv_heads=kv_heads, head_dim=head_dim, capacity=positions, dtype="int8")
    k, v = (rng.standard_normal((1, kv_heads, positions, head_dim)).astype(np.float32) for _ in "kv")
    q = (2 * rng.standard_normal((1, heads, 1, head_dim))).astype(np.float32)
    if name == "non-finite":
        q[0, 0, 0, 3], q[0, 1, 0, 5] = np.nan, np.inf  # rows 0 and 1 (KV head 0)
        v[0, 1, 700, 2] = np.nan  # rows 2 and 3 (KV head 1) see position 700; rows 4 and 5 (KV head 2) are finite
    cache.append(k, v)
    spec = tvm_attn.AttentionSpec(batch=1, heads=heads, kv_heads=kv_heads, seq_q=1, seq_kv=positions,
                                  head_dim=head_dim, causal=True, kv_dtype="int8",
                                  **(FEATURES if name == "features" else {}))
    return cache, q, spec


def _inputs(case: Case, spec: tvm_attn.AttentionSpec, seed: int):
    return make_inputs(spec, seed=seed, q_scale=2.0 if tvm_attn.get_variant(case.variant).knob else 1.0)


def _call_name(case: Case, n: int) -> str:
    return f"{case.name}-{case.lengths[n][0]}x{case.lengths[n][1]}"


def _cache_for(variant: str, dtype: str):
    """(cache, q, spec of its kernel); an integer cache takes float32 rows and its kernel reads the codes."""
    rng = np.random.default_rng(7)
    cache = tvm_attn.KVCache(batch=1, kv_heads=2, head_dim=64, capacity=512, dtype=dtype,
                             shadow=tvm_attn.get_variant(variant).shadow_compute is not None)
    for n in CACHE_APPENDS:
        cache.append(*(rng.standard_normal((1, 2, n, 64)).astype(numpy_dtype(cache.input_dtype)) for _ in "kv"))
    q = (2 * rng.standard_normal((1, 4, 1, 64))).astype(numpy_dtype(cache.input_dtype))
    spec = tvm_attn.AttentionSpec(batch=1, heads=4, kv_heads=2, seq_q=1, seq_kv=cache.length, head_dim=64,
                                  causal=True, dtype=cache.input_dtype, kv_dtype=dtype if cache.integer else None,
                                  alibi_slopes=TOPK_CACHE_SLOPES if variant == "topk" else None,
                                  **knobs_for(variant)[0])
    return cache, q, spec


def _tree_call(dtype: str):
    """(spec, q, k, v) of a 16-node draft tree over 140 cached keys: the tree kernel's."""
    spec = tvm_attn.AttentionSpec(batch=1, heads=6, kv_heads=2, seq_q=16, seq_kv=156, head_dim=64, causal=True,
                                  dtype=dtype, tree_parents=TREE_16)
    return (spec, *make_inputs(spec, seed=5, q_scale=2.0))


PAGED_TREE_CONFIG = tvm_attn.DecodeConfig(block_kv=16, chunk_keys=48, max_splits=8)  # 156 positions: 4 chunks


def _paged_tree_call(dtype: str):
    """(spec, arguments of the paged tree kernel's call, q, k, v as the reference takes them) of a 16-node draft
    tree over 140 cached positions in a PagedKVCache's pages of 8."""
    rng = np.random.default_rng(11)
    spec = tvm_attn.AttentionSpec(batch=1, heads=6, kv_heads=2, seq_q=16, seq_kv=156, head_dim=64, causal=True,
                                  dtype=dtype, tree_parents=TREE_16)
    cache = tvm_attn.PagedKVCache(num_pages=24, page_size=8, kv_heads=2, head_dim=64, dtype=dtype,
                                  config=PAGED_TREE_CONFIG)
    seq = cache.add_sequence()
    cache.append(seq, *(rng.standard_normal((2, 156, 64)).astype(numpy_dtype(dtype)) for _ in "kv"))
    q = (2 * rng.standard_normal((16, 6, 64))).astype(numpy_dtype(dtype))
    arguments = cache.kernel_arguments(q, [seq], [16], (), tree_rows([TREE_16], [seq], [16], True),
                                       np.zeros(q.shape, q.dtype), tree_tiles=True)
    k, v = cache.gather(seq)
    return spec, arguments, q.transpose(1, 0, 2)[None].copy(), k[None], v[None]


def break_tail_predicate(mod: tvm.IRModule) -> tvm.IRModule:
    """The kernel with an off-by-one tail: every `... < seq_kv` of its TVMScript becomes `... <= seq_kv`, so the key
    past the end (read clamped to the last one) is counted."""
    text, n = re.subn(r" < seq_kv\b", " <= seq_kv", mod.script())
    assert n > 0, "no tail predicate found to break"
    return tvm.script.from_source(text)


# flash's non-causal float16 prefill kernel (under a causal mask the tail predicate is redundant at seq_q <= seq_kv)
BROKEN = next(c for c in CASES if c.variant == "flash" and not c.causal)


@pytest.fixture(scope="module")
def emulator_ready() -> None:
    if python() is None:
        if os.environ.get("TVM_ATTN_REQUIRE_ARM64"):
            pytest.fail("TVM_ATTN_REQUIRE_ARM64 is set and the arm64 emulator is missing: run .ci/arm64-env")
        pytest.skip("no arm64 emulator: run .ci/arm64-env (qemu-user and an aarch64 Python, ~10 s with a warm "
                    "pip cache)")


@pytest.fixture(scope="module")
def emulated(emulator_ready, tmp_path_factory):
    """Every call above, run in one emulated process: {name: outputs}, plus what each call was given."""
    emulator = Emulator(tmp_path_factory.mktemp("arm64"))
    given = {}
    for case in CASES:
        kernel = tvm_attn.build(case.variant, case.spec(*case.lengths[0]), target=TARGET)
        for n, lengths in enumerate(case.lengths):
            spec = case.spec(*lengths)
            q, k, v = _inputs(case, spec, seed=n)
            out = np.zeros(spec.q_shape, numpy_dtype(spec.dtype))
            emulator.call(_call_name(case, n), kernel.executable, kernel.arguments(q, k, v, out), outputs=[-1])
            given[_call_name(case, n)] = (spec, q, k, v)
    for variant, dtype in CACHE_CASES:
        cache, q, spec = _cache_for(variant, dtype)
        shadowed = cache.shadow is not None
        kernel = (build_shadow if shadowed else tvm_attn.build)(variant, spec, target=TARGET)
        out = np.zeros(spec.q_shape, numpy_dtype(spec.dtype))
        k, v, extra = cache.kernel_inputs(kernel, 1)  # (an int8 cache's codes in blocks and its scales)
        emulator.call(f"cache-{variant}-{dtype}", kernel.executable, kernel.arguments(q, k, v, out, extra),
                      outputs=[-1])
        k, v = cache.dequantized() if cache.integer else (cache.k.copy(), cache.v.copy())
        given[f"cache-{variant}-{dtype}"] = (dataclasses.replace(spec, kv_dtype=None), q, k, v)
    for name, *shape in BYTE_CASES:
        cache, q, spec = _byte_case(name, *shape)
        kernel = tvm_attn.build("flash", spec, target=TARGET)
        out = np.zeros(spec.q_shape, np.float32)
        k, v, extra = cache.kernel_inputs(kernel, 1)
        sinks = kernel.sink_logits(FEATURE_SINKS if spec.sinks else None)
        emulator.call(f"bytes-{name}", kernel.executable, kernel.arguments(q, k, v, out, extra, sinks), outputs=[-1])
        given[f"bytes-{name}"] = (dataclasses.replace(spec, kv_dtype=None), q, *cache.dequantized())
    for dtype in ("float32", "bfloat16"):
        keys = np.random.default_rng(3).standard_normal((1, 2, 158, 64)).astype(numpy_dtype(dtype))
        nb = certificate.blocks(158)
        codes = np.zeros((1, 2, nb, 64, certificate.BLOCK), np.uint8)
        lo, step = np.zeros((1, 2, nb, 64), np.float32), np.zeros((1, 2, nb, 64), np.float32)
        emulator.call(f"quantize-{dtype}", shadow.build_update(2, 64, dtype, TARGET), (keys, codes, lo, step),
                      outputs=[1, 2, 3])
        given[f"quantize-{dtype}"] = keys
    for dtype in ("float32", "bfloat16"):  # the tree kernel (bfloat16: in bfdot pair products)
        spec, q, k, v = _tree_call(dtype)
        kernel = tvm_attn.build("flash", spec, target=TARGET)
        emulator.call(f"tree-{dtype}", kernel.executable,
                      kernel.arguments(q, k, v, np.zeros(spec.q_shape, numpy_dtype(dtype)), tree=spec.tree_mask),
                      outputs=[-1])
        given[f"tree-{dtype}"] = (spec, q, k, v)
    for dtype in ("float32", "bfloat16"):  # a PagedKVCache's paged tree kernel
        spec, arguments, q, k, v = _paged_tree_call(dtype)
        executable = build_paged(spec.kernel, 8, PAGED_TREE_CONFIG, target=TARGET, tree_tiles=True)
        emulator.call(f"paged-tree-{dtype}", executable, arguments, outputs=[-1])
        given[f"paged-tree-{dtype}"] = (spec, q, k, v)
    spec = BROKEN.spec(*BROKEN.lengths[0])
    broken = scheduled_module(tvm_attn.get_variant("flash"), spec, tvm_attn.resolve_target(TARGET), "hand")
    executable = tvm.compile(break_tail_predicate(broken.mod), target=tvm_attn.resolve_target(TARGET))
    q, k, v = _inputs(BROKEN, spec, seed=0)
    out = np.zeros(spec.q_shape, numpy_dtype(spec.dtype))
    emulator.call("broken", executable, (q, k, v, out), outputs=[-1])
    given["broken"] = (spec, q, k, v)
    return emulator.run(), given


@pytest.mark.parametrize("case,n", CALLS, ids=[_call_name(c, n) for c, n in CALLS])
def test_every_variant_matches_reference_under_emulation(emulated, case, n):
    results, given = emulated
    spec, q, k, v = given[_call_name(case, n)]
    assert_matches_reference(case.variant, spec, results[_call_name(case, n)][0], q, k, v, TARGET)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_tree_kernel_matches_reference_under_emulation(emulated, dtype):
    results, given = emulated
    spec, q, k, v = given[f"tree-{dtype}"]
    assert tvm_attn.build("flash", spec, target=TARGET).path == "tree"
    assert_matches_reference("flash", spec, results[f"tree-{dtype}"][0], q, k, v, TARGET)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_paged_tree_kernel_matches_reference_under_emulation(emulated, dtype):
    results, given = emulated
    spec, q, k, v = given[f"paged-tree-{dtype}"]
    out = results[f"paged-tree-{dtype}"][0]  # (rows, heads, head_dim)
    assert_matches_reference("flash", spec, out.transpose(1, 0, 2)[None].copy(), q, k, v, TARGET)


@pytest.mark.parametrize("variant,dtype", CACHE_CASES, ids=[f"{v}-{d}" for v, d in CACHE_CASES])
def test_cache_decode_matches_reference_under_emulation(emulated, variant, dtype):
    results, given = emulated
    spec, q, k, v = given[f"cache-{variant}-{dtype}"]
    assert_matches_reference(variant, spec, results[f"cache-{variant}-{dtype}"][0], q, k, v, TARGET)


@pytest.mark.parametrize("name", [c[0] for c in BYTE_CASES if c[0] != "non-finite"])
def test_int8_cache_decode_in_byte_products_matches_reference_under_emulation(emulated, name):
    results, given = emulated
    spec, q, k, v = given[f"bytes-{name}"]
    int8 = dataclasses.replace(spec, kv_dtype="int8").kernel
    assert tvm_attn.get_variant("flash").computes_in_byte_products("decode", int8, TARGET)
    assert_matches_reference("flash", spec, results[f"bytes-{name}"][0], q, k, v, TARGET,
                             sinks=FEATURE_SINKS if spec.sinks else None)


def test_int8_cache_decode_in_byte_products_keeps_non_finite_rows_under_emulation(emulated):
    """A NaN or an Inf in q, a NaN in V: the rows reading them are NaN, the others match the reference."""
    results, given = emulated
    spec, q, k, v = given["bytes-non-finite"]
    out = results["bytes-non-finite"][0]
    assert np.isnan(out[0, :4]).all()  # q rows 0 (NaN) and 1 (Inf); rows 2, 3 read V's NaN
    with np.errstate(invalid="ignore"):
        ref = tvm_attn.get_variant("flash").reference(spec, q, k, v)
    rtol, atol = output_tolerance(spec)
    np.testing.assert_allclose(out[0, 4:], ref[0, 4:], rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_shadow_quantization_is_bit_exact_under_emulation(emulated, dtype):
    results, given = emulated
    codes, lo, step = results[f"quantize-{dtype}"]
    want_codes, want_lo, want_step = certificate.quantize(given[f"quantize-{dtype}"])
    np.testing.assert_array_equal(lo, want_lo)
    np.testing.assert_array_equal(step, want_step)
    by_key = codes.swapaxes(-1, -2).reshape(1, 2, -1, 64)[:, :, :158]
    np.testing.assert_array_equal(by_key, want_codes)


def test_a_broken_tail_predicate_fails_under_emulation(emulated):
    """The check above catches a wrong arm64 kernel: flash with an off-by-one tail predicate."""
    results, given = emulated
    spec, q, k, v = given["broken"]
    with pytest.raises(AssertionError, match="differs from its float64 reference"):
        assert_matches_reference("flash", spec, results["broken"][0], q, k, v, TARGET)


@pytest.mark.parametrize("case", [c for c in CASES if c.dtype != "float32"], ids=lambda c: c.name)
def test_16_bit_inputs_widen_in_vector_registers(case):
    """16-bit inputs widen to float32 in NEON registers (fcvtl for float16; bfloat16 is the top half of a float32:
    shll by 16), feeding the same fmla micro-kernels (the kernels the emulated tests ran, cached), except the
    bfloat16 kernels that multiply in pair products, with bfdot (the M3 has BF16), and the float16 decode kernels,
    whose QK^T multiplies float16 lanes with fmlal / fmlal2 (FEAT_FHM)."""
    spec = case.spec(*case.lengths[0])
    kernel = tvm_attn.build(case.variant, spec, target=TARGET)
    mix = simd_fp_mix(kernel.executable.mod.inspect_source("asm"))
    if pair_products_here(case.variant, spec, TARGET):
        assert mix["bfdot.4s"] > 0, {op: n for op, n in mix.items() if op.startswith("bf")}
        return
    if float16_products_here(case.variant, spec, TARGET):
        assert mix["fmlal.4s"] > 0 and mix["fmlal2.4s"] > 0, {op: n for op, n in mix.items() if "fml" in op}
    widen = ("fcvtl.4s", "fcvtl2.4s") if case.dtype == "float16" else ("shll.4s", "shll2.4s")
    assert mix["fmla.4s"] > 0 and sum(mix[op] for op in widen) > 0, {op: mix[op] for op in ("fmla.4s", *widen)}


def test_an_exported_linux_arm64_kernel_loads_and_runs_under_emulation(emulator_ready, tmp_path):
    """`python -m tvm_attn.export --target` an aarch64-linux target, then tvm_attn.runtime.load on that machine
    (the manifest's checks, the runtime library beside the kernel)."""
    spec = tvm_attn.AttentionSpec(batch=1, heads=4, kv_heads=2, seq_q=19, seq_kv=19, head_dim=32, causal=True)
    result = export.export("flash", spec, TARGET, tmp_path)
    manifest = json.loads(result.manifest.read_text())
    assert manifest["linker"] == "clang + ld.lld" and manifest["target"]["arch"] == "arm64"
    assert result.library.read_bytes()[:4] == b"\x7fELF"
    with pytest.raises(runtime.ManifestError, match="built for aarch64-apple-m3"):
        runtime.load(result.manifest)  # not on this x86-64 host
    shutil.copy(environment() / "lib" / "libtvm_runtime.so", tmp_path)  # what --fetch-runtime downloads
    q, k, v = make_inputs(spec, seed=5)
    np.savez(tmp_path / "qkv.npz", q=q, k=k, v=v)
    proc = run_python(f"""
import numpy as np, arm64_runner
kernel = arm64_runner.runtime.load({str(result.library)!r})
qkv = np.load({str(tmp_path / "qkv.npz")!r})
np.save({str(tmp_path / "out.npy")!r}, kernel(qkv["q"], qkv["k"], qkv["v"]))
""")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_matches_reference("flash", spec, np.load(tmp_path / "out.npy"), q, k, v, TARGET)


@pytest.mark.parametrize("variant,dtype", [("flash", "float32"), ("bounded", "float32"), ("mass", "float16")])
def test_the_emulated_build_has_the_mac_builds_instructions(variant, dtype):
    """The aarch64-linux build of a kernel stands for the Mac's: the same SIMD and floating-point instructions,
    and about as many instructions in all (addressing differs between ELF and Mach-O)."""
    spec = tvm_attn.AttentionSpec(batch=1, heads=4, kv_heads=2, seq_q=100, seq_kv=100, head_dim=80, causal=True,
                                  dtype=dtype, **knobs_for(variant)[0])
    linux, mac = (tvm_attn.build(variant, spec, target=t).executable.mod.inspect_source("asm")
                  for t in (TARGET, "apple-m3"))
    assert simd_fp_mix(linux)["fmla.4s"] > 0
    assert simd_fp_mix(linux) == simd_fp_mix(mac)
    assert abs(instruction_count(linux) - instruction_count(mac)) <= 0.02 * instruction_count(mac)
