"""Bad input gets a ValueError/TypeError naming the argument and its value, never a crash."""

from __future__ import annotations

import numpy as np
import pytest

import tvm_attn


def _qkv(b=1, h=4, kvh=2, sq=5, skv=6, d=8, dtype=np.float32):
    rng = np.random.default_rng(0)
    return (rng.standard_normal((b, h, sq, d)).astype(dtype),
            rng.standard_normal((b, kvh, skv, d)).astype(dtype),
            rng.standard_normal((b, kvh, skv, d)).astype(dtype))


def test_good_inputs_pass():
    q, k, v = _qkv()
    assert tvm_attn.attention(q, k, v).shape == q.shape


BAD_ARRAYS = [
    ("rank", lambda q, k, v: (q[0], k, v), ValueError, "q must have rank 4"),
    ("k vs v", lambda q, k, v: (q, k, v[:, :, :3]), ValueError, "k and v must have the same shape"),
    ("batch", lambda q, k, v: (q, np.concatenate([k, k]), np.concatenate([v, v])), ValueError, "batch of q"),
    ("head_dim", lambda q, k, v: (q[..., :4], k, v), ValueError, "head_dim of q (4) and k/v (8)"),
    ("heads", lambda q, k, v: (q[:, :3], k, v), ValueError, "heads=3 is not a multiple of kv_heads=2"),
    ("seq 0", lambda q, k, v: (q[:, :, :0], k, v), ValueError, "seq_q must be >= 1, got 0"),
    ("seq_kv 0", lambda q, k, v: (q, k[:, :, :0], v[:, :, :0]), ValueError, "seq_kv must be >= 1, got 0"),
    ("dtype", lambda q, k, v: (q.astype(np.float64), k, v), TypeError, "q must be float32, float16 or bfloat16, got float64"),
    ("mixed dtype", lambda q, k, v: (q, k, v.astype(np.float16)), TypeError, "v is float16 but q is float32: q, k and v must have one dtype"),
    ("not an array", lambda q, k, v: (q.tolist(), k, v), TypeError, "q must be an array"),
]


@pytest.mark.parametrize("name,mutate,error,message", BAD_ARRAYS, ids=[b[0] for b in BAD_ARRAYS])
def test_bad_arrays(name, mutate, error, message):
    q, k, v = mutate(*_qkv())
    with pytest.raises(error, match=_literal(message)):
        tvm_attn.attention(q, k, v)
    with pytest.raises(error, match=_literal(message)):
        tvm_attn.reference(q, k, v)


BAD_KNOBS = [
    (dict(variant="nope"), ValueError, "unknown variant 'nope'"),
    (dict(variant="threshold", threshold=0.0), ValueError, "threshold must be in (0, 1), got 0.0"),
    (dict(variant="threshold", threshold=1.0), ValueError, "threshold must be in (0, 1), got 1.0"),
    (dict(variant="threshold", threshold=-0.1), ValueError, "threshold must be in (0, 1), got -0.1"),
    (dict(variant="threshold"), ValueError, "variant 'threshold' needs threshold=..."),
    (dict(variant="topk", top_k=0), ValueError, "top_k must be >= 1, got 0"),
    (dict(variant="topk", top_k=2.5), TypeError, "top_k must be an int, got 2.5"),
    (dict(variant="topk"), ValueError, "variant 'topk' needs top_k=..."),
    (dict(variant="topk", top_k=3, threshold=0.1), ValueError, "give at most one pruning knob, got threshold=0.1, top_k=3"),
    (dict(variant="mass", eps=0.0), ValueError, "eps must be in (0, 1), got 0.0"),
    (dict(variant="mass", eps=1.5), ValueError, "eps must be in (0, 1), got 1.5"),
    (dict(variant="mass", eps="0.1"), ValueError, "eps must be in (0, 1), got '0.1'"),
    (dict(variant="mass"), ValueError, "variant 'mass' needs eps=..."),
    (dict(variant="flash", eps=0.1), ValueError, "eps=0.1 is only used by variant 'mass' or 'bounded', not 'flash'"),
    (dict(variant="flash", top_k=3), ValueError, "top_k=3 is only used by variant 'topk', not 'flash'"),
    (dict(variant="standard", threshold=0.1), ValueError, "threshold=0.1 is only used by variant 'threshold'"),
    (dict(scale=0.0), ValueError, "scale must be a finite non-zero number, got 0.0"),
    (dict(scale=float("nan")), ValueError, "scale must be a finite non-zero number, got nan"),
    (dict(causal="yes"), TypeError, "causal must be a bool, got 'yes'"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD_KNOBS, ids=[str(b[0]) for b in BAD_KNOBS])
def test_bad_knobs(kwargs, error, message):
    q, k, v = _qkv()
    with pytest.raises(error, match=_literal(message)):
        tvm_attn.attention(q, k, v, **kwargs)
    with pytest.raises(error, match=_literal(message)):
        tvm_attn.reference(q, k, v, **kwargs)


@pytest.mark.parametrize("target,message", [
    ("cuda", "unknown target 'cuda'"),
    ("apple-m9", "unknown target 'apple-m9'"),
    ({"kind": "cuda"}, "only CPU targets of kind 'llvm'"),
    ("{not json", "is not valid JSON"),
    (42, "target must be a name, a dict or a tvm Target, got int"),
    # LLVM crashes the process on such triples: refused before TVM sees them
    ({"kind": "llvm", "mtriple": "garbage-triple"}, "target mtriple 'garbage-triple': give arch-vendor-os"),
    ({"kind": "llvm", "mtriple": "x86_64-garbage"}, "no operating system LLVM knows"),
    ({"kind": "llvm", "mcpu": "apple-m9"}, "target mcpu 'apple-m9' is not a CPU LLVM knows"),
])
def test_bad_targets(target, message):
    q, k, v = _qkv()
    with pytest.raises((ValueError, TypeError), match=_literal(message)):
        tvm_attn.attention(q, k, v, target=target)


def test_bad_schedule():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="unknown schedule 'fastest'"):
        tvm_attn.attention(q, k, v, schedule="fastest")


def test_kernel_serves_other_lengths_but_not_other_heads():
    q, k, v = _qkv()
    kernel = tvm_attn.build("flash", tvm_attn.AttentionSpec.from_arrays(q, k, v))
    q2, k2, v2 = _qkv(b=3, sq=7, skv=20)
    np.testing.assert_allclose(kernel(q2, k2, v2), tvm_attn.reference(q2, k2, v2), rtol=1e-5, atol=1e-5)
    for other in (_qkv(h=8), _qkv(kvh=4), _qkv(d=16)):
        with pytest.raises(ValueError, match="this kernel was built for h4_kv2_d8"):
            kernel(*other)


def _literal(message: str) -> str:
    import re
    return re.escape(message)


@pytest.mark.parametrize("fields,message", [
    (dict(block_kv=0), "DecodeConfig.block_kv must be an int >= 1, got 0"),
    (dict(max_splits=2.5), "DecodeConfig.max_splits must be an int >= 1, got 2.5"),
    (dict(block_kv=64, chunk_keys=100), "DecodeConfig.chunk_keys=100 must be a multiple of block_kv=64"),
])
def test_bad_decode_configs(fields, message):
    from tvm_attn.variants.decode import DecodeConfig

    with pytest.raises(ValueError, match=_literal(message)):
        DecodeConfig(**fields)


@pytest.mark.parametrize("window,causal,error,message", [
    (0, True, ValueError, "window must be >= 1, got 0"),
    (2.5, True, TypeError, "window must be an int or None, got 2.5"),
    (4, False, ValueError, "window=4 needs causal=True"),
])
def test_bad_windows(window, causal, error, message):
    q, k, v = _qkv()
    with pytest.raises(error, match=_literal(message)):
        tvm_attn.attention(q, k, v, causal=causal, window=window)


def test_code_for_another_os_or_abi_is_never_run_here():
    host = tvm_attn.resolve_target("host")
    cpu = str(host.attrs["mcpu"])
    for triple in ("x86_64-pc-windows-msvc", "x86_64-apple-macos", "x86_64-pc-linux-musl"):
        kernel = tvm_attn.build("flash", tvm_attn.AttentionSpec(batch=1, heads=2, seq_q=4, head_dim=8),
                                target={"kind": "llvm", "mtriple": triple, "mcpu": cpu})
        with pytest.raises(RuntimeError, match="cannot run on this"):
            kernel.function
    assert tvm_attn.targets.runs_on_host({"kind": "llvm", "mtriple": "x86_64-pc-linux-gnu", "mcpu": cpu})


def test_whether_a_kernel_runs_here_is_a_question_of_features():
    from tvm_attn.targets import capabilities, host_mismatch

    host_features = capabilities("host").features
    avx2 = {"kind": "llvm", "mtriple": "x86_64-pc-linux-gnu", "mcpu": "x86-64-v3"}
    if {"avx2", "fma"} <= host_features:  # an AVX2 kernel runs on any host with AVX2 and FMA, whatever its CPU name
        assert host_mismatch(avx2) is None
    needs = capabilities({"kind": "llvm", "mcpu": "graniterapids"}).features - host_features
    if needs:  # a CPU feature the host lacks is named
        assert f"lacks {sorted(needs)[0]}" in host_mismatch({"kind": "llvm", "mcpu": "graniterapids"})
    cpu = str(tvm_attn.resolve_target("host").attrs["mcpu"])
    windows = {"kind": "llvm", "mtriple": "x86_64-pc-windows-msvc", "mcpu": cpu}
    assert host_mismatch(windows) == "the operating system differs (windows, this host runs linux)"
    with pytest.raises(RuntimeError, match="the operating system differs"):
        tvm_attn.build("flash", tvm_attn.AttentionSpec(batch=1, heads=2, seq_q=4, head_dim=8), target=windows).function
    assert "architecture differs" in host_mismatch("apple-m3")


def test_capabilities_come_from_llvm_features_not_cpu_names():
    from tvm_attn.targets import capabilities, vector_lanes

    for cpu in ("graniterapids", "emeraldrapids", "znver4", "skylake-avx512"):
        assert vector_lanes({"kind": "llvm", "mcpu": cpu}) == 16, cpu
    for cpu in ("znver3", "haswell", "x86-64-v3", "alderlake"):
        assert vector_lanes({"kind": "llvm", "mcpu": cpu}) == 8, cpu
    no_avx512 = capabilities({"kind": "llvm", "mcpu": "znver4", "mattr": ["-avx512f"]})
    assert (no_avx512.isa_class, no_avx512.vector_registers) == ("x86_64-avx2", 16)
    m1, m2, m4 = (capabilities(f"apple-m{n}") for n in (1, 2, 4))
    assert (m1.lanes(), m1.vector_registers, m1.float16_products, m1.bfloat16_dot) == (4, 32, True, False)
    assert m2.bfloat16_dot and m2.int8_matmul and m4.matrix_unit == "sme" and m1.matrix_unit is None
    spr = capabilities({"kind": "llvm", "mcpu": "sapphirerapids"})
    assert spr.bfloat16_dot and spr.float16_products and spr.matrix_unit == "amx"
    # LLVM's prefer-256-bit tuning would split the schedules' 512-bit vectors: resolve_target turns it off.
    assert "-prefer-256-bit" in str(tvm_attn.resolve_target({"kind": "llvm", "mcpu": "sapphirerapids"}))


def test_sizes_past_int32_name_the_argument_and_limit():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="top_k must be at most 2147483647"):
        tvm_attn.attention(q, k, v, variant="topk", top_k=2**31)
    with pytest.raises(ValueError, match="seq_kv must be at most 2147483647"):
        tvm_attn.AttentionSpec(seq_q=1, seq_kv=2**31)
    with pytest.raises(ValueError, match="q would have 4294967296 elements"):
        tvm_attn.AttentionSpec(batch=2**16, heads=8, seq_q=128, head_dim=64)


def test_out_sharing_memory_with_an_input_is_refused():
    q, k, v = _qkv(sq=6)
    with pytest.raises(ValueError, match="out overlaps q"):
        tvm_attn.attention(q, k, v, out=q)
    kk = np.concatenate([k, k], axis=1)  # (1, 4, 6, 8): the shape of q
    with pytest.raises(ValueError, match="out overlaps k"):
        tvm_attn.attention(q, kk[:, :2], v, out=kk)
    cache = tvm_attn.KVCache(batch=1, kv_heads=4, head_dim=8, capacity=16)
    cache.append(kk, kk)
    with pytest.raises(ValueError, match="out overlaps k"):
        cache.attend(q[:, :, -1:], out=cache.buffers[0][:, :, :1])


def test_misaligned_arrays_are_copied_not_misread():
    q, k, v = _qkv()
    raw = np.zeros(q.nbytes + 1, np.uint8)
    shifted = raw[1:].view(np.float32).reshape(q.shape)  # a float32 view at an odd address
    shifted[...] = q
    assert not shifted.flags.aligned
    np.testing.assert_array_equal(tvm_attn.attention(shifted, k, v), tvm_attn.attention(q, k, v))


@pytest.mark.parametrize("command,message", [
    (["tvm_attn.export", "-o", "OUT", "--variant", "flsh"], "unknown variant 'flsh'"),
    (["tvm_attn.export", "-o", "OUT", "--target", "apple-m9"], "unknown target 'apple-m9'"),
    (["tvm_attn.export", "-o", "OUT", "--variant", "flash", "--seq", "0"], "seq_q must be >= 1, got 0"),
    (["tvm_attn.export", "-o", "OUT", "--variant", "mass", "--eps", "2"], "eps must be in (0, 1), got 2.0"),
    (["tvm_attn.export", "-o", "OUT", "--variant", "flash", "--eps", "0.1"], "--eps 0.1 is only used by variant"),
    (["tvm_attn.tune", "--variant", "flash", "--target", '{"kind": "llvm", "mtriple": "garbage-triple"}'],
     "target mtriple 'garbage-triple'"),
    (["tvm_attn", "--variant", "flsh"], "unknown variant 'flsh'"),
    (["tvm_attn.bench", "--provider", "torch", "--out", "OUT"], "unknown provider 'torch'"),
    (["tvm_attn.bench", "--report-only", "--out", "OUT"], "there is no"),
])
def test_cli_errors_are_usage_errors(command, message, tmp_path, capsys):
    import importlib

    module = importlib.import_module(command[0] if command[0] != "tvm_attn" else "tvm_attn.__main__")
    if not hasattr(module, "main"):
        module = importlib.import_module(command[0] + ".__main__")
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in command[1:]]
    with pytest.raises(SystemExit) as exit_:
        module.main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing written


def test_a_cli_usage_error_exits_2_without_a_traceback():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "tvm_attn.export", "-o", "unused", "--variant", "flsh"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown variant 'flsh'" in proc.stderr and "Traceback" not in proc.stderr
