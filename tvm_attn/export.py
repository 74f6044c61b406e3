"""python -m tvm_attn.export: kernels as shared libraries other programs load, each with a JSON manifest.

For the host: DIR/<name>.so, plus libtvm_runtime.so (thread pool and workspace of parallel kernels) copied once into
DIR. For Apple targets: DIR/<name>.dylib, a Mach-O arm64 library cross-linked here with clang and ld64.lld, or with
zig cc from the ziglang wheel where they are missing (a .tar of objects when neither is found, said clearly). For
Linux on another architecture (e.g. aarch64-linux-gnu): DIR/<name>.so cross-linked with clang and ld.lld. Load them
with `tvm_attn.runtime.load(path)`, which needs only apache-tvm-ffi and numpy.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import tvm
import tvm_ffi
from tvm.target import codegen

from . import __version__, blas
from .kernel import scheduled_module
from .plan import Workload, add_workload_arguments, cli_workloads
from .runtime import ALIGNMENT_BYTES, MANIFEST_FORMAT, file_sha256
from .spec import DTYPE, DTYPE_TAGS, AttentionSpec
from .targets import resolve_target, target_key
from .variants import get_variant

# Features whose /proc/cpuinfo names equal LLVM's: the loader refuses a kernel whose CPU lacks one it was built with.
CHECKED_X86_FEATURES = ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl")
APPLE_DEPLOYMENT = "arm64-apple-macos11"


@dataclasses.dataclass(frozen=True)
class Exported:
    name: str
    library: Path
    manifest: Path
    schedule: str  # "tuned" or "hand"
    linked: bool  # False: .tar of objects, no linker was found


def export_name(variant: str, spec: AttentionSpec, target) -> str:
    """e.g. attn_flash_b2_h8_kv8_q512_k512_d64_f32_arm64-apple-macos-apple-m3 (f16, bf16 for 16-bit kernels)."""
    shape = dataclasses.replace(spec, dtype=DTYPE).name  # the dtype tag goes last, for every dtype
    return f"attn_{variant}_{shape}_{DTYPE_TAGS[spec.dtype]}_{target_key(target)}"


def function_name(name: str) -> str:
    """The exported symbol: the export name as a C identifier."""
    return re.sub(r"\W", "_", name)


def _is_apple(target) -> bool:
    return "apple" in str(target.attrs.get("mtriple", ""))


def _platform(target, *, matrix_unit: bool = False) -> dict:
    """Where a kernel for ``target`` runs: arch, os, and the CPU features runtime.load checks the host has (x86's
    vector extensions; "sme" for a kernel on Arm SME, ``matrix_unit``, which an M1-M3 lacks)."""
    features = ["sme"] if matrix_unit else []
    if _is_apple(target):
        return {"arch": "arm64", "os": "darwin", "cpu_features": features}
    arch = str(target.attrs.get("mtriple", "") or "x86_64").split("-")[0]
    arch = {"aarch64": "arm64"}.get(arch, arch)
    if arch == "x86_64":
        llvm_features = {str(f) for f in codegen.llvm_get_cpu_features(target)}
        features = [f for f in CHECKED_X86_FEATURES if f in llvm_features]
    return {"arch": arch, "os": "linux", "cpu_features": features}


def apple_linker() -> str | None:
    """Why Apple dylibs cannot be linked here (None when clang and ld64.lld, or the ziglang wheel, are found)."""
    if _apple_link_tool() is not None:
        return None
    return ("no Mach-O linker: install clang and lld (Debian: apt-get install clang lld) or the ziglang wheel "
            "(pip install tvm_attn[apple])")


def _apple_link_tool() -> str | None:
    """"clang" when clang and ld64.lld are installed (preferred), else "zig" when the ziglang wheel is, else None."""
    clang = shutil.which("clang")
    if clang is not None and ((Path(os.path.realpath(clang)).parent / "ld64.lld").exists()
                              or shutil.which("ld64.lld") is not None):
        return "clang"
    if importlib.util.find_spec("ziglang") is not None:
        return "zig"
    return None


def _zig_cc(output, objects, options=None):
    """zig's clang driver and Mach-O linker, from the ziglang wheel (the pip-only path to a .dylib)."""
    cmd = [sys.executable, "-m", "ziglang", "cc", "-o", output, *objects, *(options or [])]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"zig cc failed linking {output}:\n{proc.stderr[-3000:]}")


def _apple_compiler(name: str, tool: str):
    from tvm.support import cc

    install_name = f"-Wl,-install_name,@rpath/{name}.dylib"
    if tool == "zig":
        return cc.cross_compiler(_zig_cc, options=[
            "-target", "aarch64-macos.11.0", "-shared", "-nostdlib", "-Wl,-undefined,dynamic_lookup", install_name,
        ], output_format="dylib")
    return cc.cross_compiler("clang", options=[
        "-target", APPLE_DEPLOYMENT, "-fuse-ld=lld", "-nostdlib",
        "-Wl,-undefined,dynamic_lookup",  # libSystem (memset, expf) and the TVM runtime resolve when loaded
        install_name,
    ], output_format="dylib")


def cross_linker(target):
    """The ``fcompile`` linking a Linux kernel library for ``target`` when its architecture is not the host's
    (clang and ld.lld, which link any LLVM architecture), None for the host's architecture (TVM's default)."""
    from tvm.support import cc

    arch = _platform(target)["arch"]
    if arch == _platform(resolve_target("host"))["arch"]:
        return None
    if shutil.which("clang") is None or shutil.which("ld.lld") is None:
        raise RuntimeError(f"linking a {arch} Linux library here needs clang and ld.lld (Debian: apt-get install "
                           f"clang lld)")
    triple = str(target.attrs.get("mtriple"))
    # -nostdlib: libc (memset, expf) and the TVM runtime resolve when the library is loaded
    return cc.cross_compiler("clang", options=[f"--target={triple}", "-fuse-ld=lld", "-nostdlib"])


def host_runtime_library() -> Path:
    """libtvm_runtime.so of the installed apache-tvm."""
    path = Path(tvm.__file__).parent / "lib" / "libtvm_runtime.so"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: the apache-tvm installation is incomplete")
    return path


# (wheel platform tag, runtime library in the wheel) of the apache-tvm wheels for the targets we cross-compile for
RUNTIME_WHEELS = {
    ("arm64", "darwin"): ("macosx_11_0_arm64", "libtvm_runtime.dylib"),
    ("arm64", "linux"): ("manylinux_2_28_aarch64", "libtvm_runtime.so"),
}


def fetch_runtime_library(dest: Path, target) -> Path:
    """The TVM runtime library for ``target`` (a cross-compiled one) from PyPI's apache-tvm wheel of our TVM version
    for its platform (a ~80-95 MB download), into ``dest``."""
    where = _platform(target)
    if (where["arch"], where["os"]) not in RUNTIME_WHEELS:
        raise ValueError(f"no apache-tvm wheel is known for {where['arch']} {where['os']}: copy libtvm_runtime from "
                         f"an apache-tvm {tvm.__version__} installation on that machine")
    platform_tag, runtime_name = RUNTIME_WHEELS[where["arch"], where["os"]]
    path = dest / runtime_name
    if path.exists():
        return path
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", f"apache-tvm=={tvm.__version__}", "--no-deps",
                        "--only-binary=:all:", "--platform", platform_tag, "-d", tmp, "-q"], check=True)
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as zf:
            path.write_bytes(zf.read(f"tvm/lib/{runtime_name}"))
    return path


def _arguments(func, spec: AttentionSpec) -> list[dict]:
    shapes = {"q": spec.q_shape, "k": spec.kv_shape, "v": spec.kv_shape, "sinks": (spec.heads,),
              "tree": (spec.seq_q, spec.seq_q), "out": spec.q_shape}
    dtypes = {"sinks": "float32", "tree": "int32"}
    return [{"name": name, "role": "output" if name == "out" else "input", "shape": list(shapes[name]),
             "dtype": dtypes.get(name, spec.dtype)} for name in map(str, (p.name for p in func.params))]


EXPORT_SCHEDULES = ("best", "tuned", "hand", "blas", "sme")


def export(variant: str, spec: AttentionSpec, target="host", out_dir=".", *, fetch_runtime: bool = False,
           schedule: str = "best", log=None) -> Exported:
    """Build ``variant`` for ``spec`` with ``schedule`` for ``target`` ("best": the tuned record or the hand
    schedule; "blas": the BLAS-backed prefill, whose library ``runtime.load`` loads first; "sme": the prefill on
    Arm SME, which ``runtime.load`` refuses on a CPU without it) and write the library and manifest (said on
    ``log``, default sys.stderr at the time of the call)."""
    log = log or sys.stderr
    if schedule not in EXPORT_SCHEDULES:
        raise ValueError(f"unknown export schedule {schedule!r}: use one of {', '.join(EXPORT_SCHEDULES)}")
    v = get_variant(variant)
    v.check(spec)
    t = resolve_target(target)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = export_name(v.name, spec, t)
    fname = function_name(name)

    # "best" never builds the BLAS form here: that an exported kernel needs a BLAS at load is asked for, not chosen.
    path = v.path_of(spec)  # (a draft tree of up to 16 nodes: the tree or split-KV decode kernel, as build takes)
    scheduled = scheduled_module(v, spec, t, schedule, path, blas_allowed=False)
    func = scheduled.mod["main"].with_attr("global_symbol", fname)
    subroutines = {gv: f for gv, f in scheduled.mod.functions.items() if gv.name_hint != "main"}  # sme_matmul
    executable = tvm.compile(tvm.IRModule({fname: func, **subroutines}), target=t)

    linked = True
    if _is_apple(t):
        missing = apple_linker()
        if missing is None:
            library = out_dir / f"{name}.dylib"
            tool = _apple_link_tool()
            executable.export_library(str(library), fcompile=_apple_compiler(name, tool))
            linker = "clang + ld64.lld" if tool == "clang" else "zig cc (the ziglang wheel)"
        else:
            linked = False
            library = out_dir / f"{name}.tar"
            executable.export_library(str(library))
            linker = None
            print(f"warning: {missing}: wrote {library.name}, object files only; link them on the Mac "
                  f"(clang -dynamiclib) or export again with a linker installed", file=log)
        runtime_name = "libtvm_runtime.dylib"
        if fetch_runtime:
            fetch_runtime_library(out_dir, t)
    else:
        library = out_dir / f"{name}.so"
        runtime_name = "libtvm_runtime.so"
        fcompile = cross_linker(t)
        executable.export_library(str(library), fcompile=fcompile)
        if fcompile is None:
            linker = "TVM's default (the host compiler)"
            runtime = host_runtime_library()
            shipped = out_dir / runtime_name
            if not shipped.exists() or shipped.stat().st_size != runtime.stat().st_size:
                shutil.copy2(runtime, shipped)
        else:
            linker = "clang + ld.lld"
            if fetch_runtime:
                fetch_runtime_library(out_dir, t)

    manifest = {
        "format": MANIFEST_FORMAT,
        "name": name,
        "library": library.name,
        "function": fname,
        "call": f"{fname}({', '.join(str(p.name) for p in func.params)})",
        "arguments": _arguments(func, spec),
        "layout": "BHSD: q and out (batch, heads, seq_q, head_dim); k, v (batch, kv_heads, seq_kv, head_dim)",
        "semantics": {
            "variant": v.name, "batch": spec.batch, "heads": spec.heads, "kv_heads": spec.kv_heads,
            "seq_q": spec.seq_q, "seq_kv": spec.seq_kv, "head_dim": spec.head_dim, "causal": spec.causal,
            "window": spec.window,
            "causal_alignment": "bottom-right: query i sees keys j <= i + seq_kv - seq_q",
            "scale": spec.scale, "threshold": spec.threshold, "top_k": spec.top_k, "eps": spec.eps, "dtype": spec.dtype,
            **({"softcap": spec.softcap} if spec.softcap is not None else {}),  # scores s -> softcap tanh(s / softcap)
            # one logit per query head joining each row's softmax denominator (the "sinks" argument)
            **({"sinks": True} if spec.sinks else {}),
            # one slope per query head, compiled in: score -= slope * (query position - key position)
            **({"alibi_slopes": list(spec.alibi_slopes)} if spec.alibi_slopes is not None else {}),
            # the query rows are a tree's nodes, the last seq_q keys: the "tree" argument, tree[i, j] = 1 + the depth
            # of node j where j is node i or an ancestor of it (else 0), which the runtime makes from tree_parents=
            **({"tree": "node i sees keys j < seq_kv - seq_q and the keys of nodes j with tree[i, j] > 0; a node's "
                        "position is seq_kv - seq_q + tree[i, i] - 1"}
               if spec.tree_parents is not None else {}),
        },
        "target": {"key": target_key(t), "tvm_target": json.loads(str(t)),
                   **_platform(t, matrix_unit=scheduled.schedule == "sme")},
        "schedule": scheduled.schedule,
        "kernel": path,  # which of the variant's kernels: "prefill", "decode" (few query rows) or "tree" (draft trees)
        "tuning_record": scheduled.record,
        # The BLAS a "blas" kernel calls (its sgemm symbol is left undefined in the library): runtime.load loads
        # Accelerate on macOS, numpy's OpenBLAS or TVM_ATTN_BLAS on Linux, and checks it exports that symbol.
        "blas": _blas_entry(t) if scheduled.schedule == "blas" else None,
        "alignment_bytes": ALIGNMENT_BYTES,
        "runtime_library": runtime_name,
        "linked": linked,
        "linker": linker,
        "sha256": file_sha256(library),  # runtime.load refuses a library that differs (truncated, corrupted)
        "versions": {"tvm_attn": __version__, "tvm": tvm.__version__, "tvm_ffi": tvm_ffi.__version__},
    }
    manifest_path = out_dir / f"{name}.json"
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    how = {"tuned": f"tuned record {scheduled.record}",
           "hand": "hand schedule" + (" (no tuned record)" if schedule == "best" else ""),
           "blas": f"the tiles' matmuls in {(manifest['blas'] or {}).get('name')}",
           "sme": "the tiles' matmuls as SME outer products"}[scheduled.schedule]
    print(f"{library}: {how}", file=log, flush=True)
    return Exported(name, library, manifest_path, scheduled.schedule, linked)


def _blas_entry(target) -> dict:
    library = blas.for_target(target)
    return {"name": library.name, "sgemm": library.sgemm, "index_dtype": library.index_dtype,
            "threads_local": library.threads_local}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tvm_attn.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_arguments(parser, "export")
    parser.add_argument("--target", default="host", help="host, apple-m1..apple-m4, or a TVM target JSON")
    parser.add_argument("-o", "--out", required=True, help="output directory")
    parser.add_argument("--schedule", default="best", choices=EXPORT_SCHEDULES, help="best (default: the tuned "
                        "record, else the hand schedule), tuned, hand, or blas (float32 dense prefill calling the "
                        "platform's BLAS, which the loader then needs: Accelerate, numpy's OpenBLAS), or sme (dense "
                        "prefill on Arm SME: apple-m4)")
    parser.add_argument("--fetch-runtime", action="store_true", help="cross-compiled targets (Apple, Linux "
                        "aarch64): download the TVM runtime library from PyPI's apache-tvm wheel for that platform "
                        "into the output directory (~80-95 MB download)")
    args = parser.parse_args(argv)
    plan: list[Workload] = cli_workloads(parser, args)
    try:
        results = [export(w.variant, w.spec, args.target, args.out, fetch_runtime=args.fetch_runtime,
                          schedule=args.schedule) for w in plan]
    except (LookupError, ValueError) as err:  # no tuned record; no BLAS-backed form for a kernel or target
        parser.error(str(err))
    counts = {name: sum(r.schedule == name for r in results) for name in ("tuned", "hand", "blas", "sme")}
    print(f"exported {len(results)} kernels to {args.out} ({counts['tuned']} tuned, {counts['hand']} "
          f"hand-scheduled" + (f", {counts['blas']} on the BLAS" if counts["blas"] else "")
          + (f", {counts['sme']} on SME" if counts["sme"] else "") + ")",
          file=sys.stderr)


if __name__ == "__main__":
    main()
