"""Named targets: "host", the Apple M-series presets, or a raw TVM target dict."""

from __future__ import annotations

import functools
import json
import platform

import tvm

APPLE_PRESETS = {
    f"apple-m{n}": {"kind": "llvm", "mtriple": "arm64-apple-macos", "mcpu": f"apple-m{n}"} for n in (1, 2, 3, 4)
}
TARGET_NAMES = ("host", *APPLE_PRESETS)


@functools.lru_cache(maxsize=None)
def _host_target() -> tvm.target.Target:
    return tvm.target.Target.from_device("cpu")


def resolve_target(target) -> tvm.target.Target:
    """A tvm Target from "host", "apple-m1".."apple-m4", a TVM target dict or JSON string, or a Target."""
    if isinstance(target, tvm.target.Target):
        return target
    if isinstance(target, str):
        if target == "host":
            return _host_target()
        if target in APPLE_PRESETS:
            return tvm.target.Target(APPLE_PRESETS[target])
        if target.lstrip().startswith("{"):
            try:
                target = json.loads(target)
            except json.JSONDecodeError as err:
                raise ValueError(f"target {target!r} is not valid JSON: {err}") from None
        else:
            raise ValueError(
                f"unknown target {target!r}: use one of {', '.join(TARGET_NAMES)} or a TVM target dict"
            )
    if isinstance(target, dict):
        if target.get("kind") != "llvm":
            raise ValueError(f"target {target!r}: only CPU targets of kind 'llvm' are supported")
        _check_triple_and_cpu(target)
        try:
            return tvm.target.Target(target)
        except Exception as err:  # TVM raises its own error types for bad keys and values
            raise ValueError(f"target {target!r} is not a valid TVM target: {err}") from None
    raise TypeError(f"target must be a name, a dict or a tvm Target, got {type(target).__name__}")


# CPU architectures the schedules are written for (their vector widths; arm64 is LLVM's name for aarch64 on Apple).
ARCHES = ("x86_64", "aarch64", "arm64")
_OS_NAMES = {"linux": "linux", "darwin": "macos", "macos": "macos", "macosx": "macos", "windows": "windows",
             "win32": "windows", "freebsd": "freebsd", "ios": "ios"}


def _check_triple_and_cpu(target: dict) -> None:
    """ValueError for an mtriple or mcpu LLVM would not know (LLVM crashes the process on some bad triples)."""
    from tvm.target import codegen

    triple = target.get("mtriple")
    if triple is not None:
        parts = str(triple).split("-")
        if not isinstance(triple, str) or len(parts) < 2 or parts[0] not in ARCHES:
            raise ValueError(f"target mtriple {triple!r}: give arch-vendor-os[-env] with arch one of "
                             f"{', '.join(ARCHES)} (e.g. x86_64-pc-linux-gnu, arm64-apple-macos)")
        if _os_and_abi(triple)[0] is None:
            raise ValueError(f"target mtriple {triple!r}: no operating system LLVM knows in it (one of "
                             f"{', '.join(sorted(set(_OS_NAMES)))})")
    cpu = target.get("mcpu")
    if cpu is not None:
        check_triple = triple or str(_host_target().attrs.get("mtriple", ""))
        if not isinstance(cpu, str) or not codegen.llvm_is_valid_cpu(cpu, check_triple):
            raise ValueError(f"target mcpu {cpu!r} is not a CPU LLVM knows for {check_triple}")


def _os_and_abi(triple: str) -> tuple[str | None, str]:
    """The operating system an LLVM triple names (normalized: darwin and macosx are macos; None when it names none)
    and what follows it (gnu, msvc, musl, ... or "")."""
    parts = triple.split("-")
    for i, part in enumerate(parts[1:], 1):
        name = part.rstrip("0123456789.")  # macos14.0, darwin23
        if name in _OS_NAMES:
            return _OS_NAMES[name], "-".join(parts[i + 1:])
    return None, ""


def target_key(target) -> str:
    """A readable directory-safe key: x86_64-znver4, arm64-apple-macos-apple-m3."""
    t = resolve_target(target)
    triple = str(t.attrs.get("mtriple", "") or platform.machine())
    arch = triple.split("-")[0]
    if "apple" in triple:
        arch = "arm64-apple-macos"
    mcpu = str(t.attrs.get("mcpu", "") or "generic")
    return f"{arch}-{mcpu}"


def runs_on_host(target) -> bool:
    """Whether code for this target can run in this process: the host's architecture and CPU (target_key), OS and
    ABI."""
    t = resolve_target(target)
    host = _host_target()
    if target_key(t) != target_key(host):
        return False
    triple, host_triple = str(t.attrs.get("mtriple", "") or ""), str(host.attrs.get("mtriple", "") or "")
    if not triple:
        return True  # no triple: LLVM compiles for the host's
    (os_name, abi), (host_os, host_abi) = _os_and_abi(triple), _os_and_abi(host_triple)
    return os_name == host_os and (not abi or abi == host_abi)


def vector_lanes(target, dtype_bits: int = 32) -> int:
    """fp32 lanes of the target's widest vector register (AVX-512: 16, AVX2: 8, NEON: 4)."""
    t = resolve_target(target)
    triple = str(t.attrs.get("mtriple", ""))
    if triple.startswith(("arm64", "aarch64")):
        return 128 // dtype_bits
    keys = set(str(f) for f in t.attrs.get("mattr", []) or [])
    mcpu = str(t.attrs.get("mcpu", ""))
    avx512_cpus = ("znver4", "znver5", "skylake-avx512", "cascadelake", "icelake", "sapphirerapids", "tigerlake")
    if any(m in mcpu for m in avx512_cpus) or "+avx512f" in keys:
        return 512 // dtype_bits
    return 256 // dtype_bits
