"""python -m tvm_attn.export and tvm_attn.runtime: libraries that load without the TVM compiler, checked manifests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import tvm_attn
from conftest import assert_matches_reference, knobs_for, make_inputs
from tvm_attn import export, runtime

SPEC = dict(batch=1, heads=4, kv_heads=2, seq_q=19, head_dim=32, causal=True)  # GQA, odd length, causal


def _spec(variant: str) -> tvm_attn.AttentionSpec:
    return tvm_attn.AttentionSpec(**SPEC, **knobs_for(variant)[0])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every registered variant exported for the host into one directory."""
    out = tmp_path_factory.mktemp("kernels")
    return out, {name: export.export(name, _spec(name), "host", out) for name in tvm_attn.VARIANTS}


def test_every_variant_loads_in_a_process_without_tvm(exported):
    out, results = exported
    for name, result in results.items():
        q, k, v = make_inputs(_spec(name), seed=3)
        np.savez(out / f"{name}_inputs.npz", q=q, k=k, v=v)
    script = textwrap.dedent("""
        import sys, numpy as np
        import tvm_attn.runtime
        out_dir, names = sys.argv[1], sys.argv[2:]
        for name in names:
            manifest = next(p for p in __import__("pathlib").Path(out_dir).glob(f"attn_{name}_*.json"))
            kernel = tvm_attn.runtime.load(manifest)
            data = np.load(f"{out_dir}/{name}_inputs.npz")
            np.save(f"{out_dir}/{name}_out.npy", kernel(data["q"], data["k"], data["v"]))
        assert "tvm" not in sys.modules, "the loader imported the TVM compiler"
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script, str(out), *results], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
    for name in results:
        data = np.load(out / f"{name}_inputs.npz")
        q, k, v = data["q"], data["k"], data["v"]
        assert_matches_reference(name, _spec(name), np.load(out / f"{name}_out.npy"), q, k, v)


def test_manifest_says_what_is_inside(exported):
    out, results = exported
    manifest = json.loads(results["threshold"].manifest.read_text())
    assert manifest["name"] == results["threshold"].name == export.export_name("threshold", _spec("threshold"), "host")
    assert manifest["library"] == f"{manifest['name']}.so"
    assert [a["name"] for a in manifest["arguments"]] == ["q", "k", "v", "out"]
    assert manifest["arguments"][1]["shape"] == [1, 2, 19, 32]
    assert manifest["semantics"]["kv_heads"] == 2 and manifest["semantics"]["threshold"] == 0.05
    assert manifest["semantics"]["causal"] is True
    assert manifest["target"]["key"] == tvm_attn.target_key("host")
    assert manifest["schedule"] in ("tuned", "hand") and manifest["alignment_bytes"] == runtime.ALIGNMENT_BYTES == 4
    assert (out / manifest["runtime_library"]).exists()


def test_unaligned_and_strided_inputs(exported):
    _, results = exported
    spec = _spec("flash")
    kernel = runtime.load(results["flash"].library)
    q, k, v = make_inputs(spec, seed=5)
    buf = np.empty(q.size + 1, np.float32)[1:].reshape(q.shape)  # 4 bytes off alignment
    buf[...] = q
    strided = np.ascontiguousarray(np.concatenate([k, k], axis=-1))[..., ::2]
    assert not strided.flags.c_contiguous
    assert_matches_reference("flash", spec, kernel(buf, strided, v), q, strided, v)
    out = runtime.aligned_empty(spec.q_shape, np.float32, 64)
    assert kernel(q, k, v, out=out) is out


def test_torch_tensors_in_and_out(exported):
    torch = pytest.importorskip("torch")
    _, results = exported
    spec = _spec("flash")
    kernel = runtime.load(results["flash"].library)
    q, k, v = (torch.from_numpy(x) for x in make_inputs(spec, seed=6))
    out = kernel(q, k, v)
    assert isinstance(out, torch.Tensor)
    assert_matches_reference("flash", spec, out.numpy(), q.numpy(), k.numpy(), v.numpy())


def test_wrong_inputs_are_clear_errors(exported):
    _, results = exported
    kernel = runtime.load(results["flash"].library)
    q, k, v = make_inputs(_spec("flash"))
    with pytest.raises(ValueError, match=r"q has shape \(1, 4, 20, 32\), kernel attn_flash_.* takes \(1, 4, 19, 32\)"):
        kernel(np.zeros((1, 4, 20, 32), np.float32), k, v)
    with pytest.raises(TypeError, match="k is float64, kernel .* takes float32"):
        kernel(q, k.astype(np.float64), v)
    with pytest.raises(TypeError, match="v must be an array"):
        kernel(q, k, [1, 2])


def test_bad_manifests_are_clear_errors(exported, tmp_path):
    out, results = exported
    with pytest.raises(runtime.ManifestError, match="no manifest"):
        runtime.load(tmp_path / "attn_missing.so")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(runtime.ManifestError, match="not valid JSON"):
        runtime.load(broken)
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({"name": "x"}))
    with pytest.raises(runtime.ManifestError, match="not a tvm_attn kernel manifest"):
        runtime.load(foreign)
    manifest = json.loads(results["flash"].manifest.read_text())
    manifest["target"].update(arch="arm64", os="darwin", key="arm64-apple-macos-apple-m3")
    other = tmp_path / "other.json"
    other.write_text(json.dumps(manifest))
    with pytest.raises(runtime.ManifestError, match="built for arm64-apple-macos-apple-m3"):
        runtime.load(other)


def test_loading_then_importing_tvm_does_not_abort(exported):
    """The loader loads the TVM runtime library; a later `import tvm` must reuse it, not register it twice."""
    _, results = exported
    script = (f"import tvm_attn.runtime; tvm_attn.runtime.load({str(results['flash'].library)!r}); "
              "import tvm; print(tvm.__version__)")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("tool", ["clang", "zig"])
def test_apple_export_is_a_macho_arm64_dylib(tool, tmp_path, monkeypatch):
    if tool == "clang" and export._apple_link_tool() != "clang":
        if os.environ.get("TVM_ATTN_REQUIRE_APPLE_LINKER"):  # .ci/run installs them: a skip there is a failure
            pytest.fail(f"cannot link Mach-O with clang here: {export.apple_linker()}")
        pytest.skip("clang and ld64.lld are not installed")
    if tool == "zig":
        pytest.importorskip("ziglang", reason="the pip-only linker path needs pip install tvm_attn[apple]")
        monkeypatch.setattr(export, "_apple_link_tool", lambda: "zig")
    spec = tvm_attn.AttentionSpec(batch=1, heads=2, seq_q=16, head_dim=32)
    result = export.export("flash", spec, "apple-m3", tmp_path)
    assert result.linked and result.library.suffix == ".dylib"
    assert json.loads(result.manifest.read_text())["linker"].startswith("clang" if tool == "clang" else "zig")
    assert result.name.endswith("_f32_arm64-apple-macos-apple-m3")
    kind = subprocess.run(["file", str(result.library)], capture_output=True, text=True).stdout
    assert "Mach-O 64-bit arm64 dynamically linked shared library" in kind
    objdump = shutil.which("llvm-objdump") or shutil.which("llvm-objdump-14")
    if objdump:
        exports = subprocess.run([objdump, "--macho", "--exports-trie", "--dylib-id", str(result.library)],
                                 capture_output=True, text=True).stdout
        assert f"___tvm_ffi_{export.function_name(result.name)}" in exports
        assert f"@rpath/{result.name}.dylib" in exports
    with pytest.raises(runtime.ManifestError, match="built for arm64-apple-macos-apple-m3"):
        runtime.load(result.manifest)  # not on this host


def test_export_cli_names_the_schedule(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tvm_attn.export", "--variant", "topk", "--top-k", "4", "--seq", "9",
                           "--batch", "1", "--heads", "2", "--head-dim", "16", "-o", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "attn_topk_b1_h2_kv2_q9_k9_d16_top4_f32_" in proc.stderr
    assert "hand schedule (no tuned record)" in proc.stderr or "tuned record" in proc.stderr
    bad = subprocess.run([sys.executable, "-m", "tvm_attn.export", "--variant", "flash", "--target", "cuda",
                          "-o", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "unknown target 'cuda'" in bad.stderr


def test_read_only_inputs_are_copied_not_refused(exported):
    _, results = exported
    kernel = runtime.load(results["flash"].library)
    q, k, v = make_inputs(_spec("flash"), seed=7)
    for x in (q, k, v):
        x.flags.writeable = False
    assert_matches_reference("flash", _spec("flash"), kernel(q, k, v), q, k, v)


def _copy_export(results, name, tmp_path):
    """The exported kernel ``name`` and its manifest, copied into tmp_path (with the runtime library)."""
    src = results[name]
    for path in (src.library, src.manifest, src.library.with_name("libtvm_runtime.so")):
        shutil.copy2(path, tmp_path / path.name)
    return tmp_path / src.library.name, tmp_path / src.manifest.name


def test_a_corrupted_or_substituted_library_is_refused_before_loading(exported, tmp_path):
    _, results = exported
    library, manifest_path = _copy_export(results, "flash", tmp_path)
    data = library.read_bytes()
    library.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(runtime.ManifestError, match="sha256 differs"):
        runtime.load(manifest_path)
    library.write_bytes(data[:1000] + bytes([data[1000] ^ 0xFF]) + data[1001:])  # one byte flipped
    with pytest.raises(runtime.ManifestError, match="sha256 differs"):
        runtime.load(manifest_path)
    library.write_bytes(data)
    manifest = json.loads(manifest_path.read_text())
    for library_name in ("libtvm_runtime.so", "../" + library.name):
        manifest_path.write_text(json.dumps(dict(manifest, library=library_name)))
        with pytest.raises(runtime.ManifestError, match="names the library"):
            runtime.load(manifest_path)
    manifest_path.write_text(json.dumps({k: v for k, v in manifest.items() if k != "sha256"}))
    with pytest.raises(runtime.ManifestError, match="no sha256"):
        runtime.load(manifest_path)
    manifest_path.write_text(json.dumps(dict(manifest, versions=dict(manifest["versions"], tvm="0.1.0"))))
    with pytest.raises(runtime.ManifestError, match="exported with apache-tvm 0.1.0"):
        runtime.load(manifest_path)


def test_a_manifest_cannot_lower_the_alignment_or_alias_out(exported, tmp_path):
    _, results = exported
    library, manifest_path = _copy_export(results, "flash", tmp_path)
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps(dict(manifest, alignment_bytes=1)))
    kernel = runtime.load(manifest_path)
    assert kernel.alignment == 4  # float32 elements
    q, k, v = make_inputs(_spec("flash"))
    buf = np.empty(q.nbytes + 1, np.uint8)[1:].view(np.float32).reshape(q.shape)  # 1 byte off
    buf[...] = q
    assert_matches_reference("flash", _spec("flash"), kernel(buf, k, v), q, k, v)
    with pytest.raises(ValueError, match="out overlaps q"):
        kernel(q, k, v, out=q)
