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
        try:
            return tvm.target.Target(target)
        except Exception as err:  # TVM raises its own error types for bad keys and values
            raise ValueError(f"target {target!r} is not a valid TVM target: {err}") from None
    raise TypeError(f"target must be a name, a dict or a tvm Target, got {type(target).__name__}")


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
    """Whether code for this target can run in this process."""
    t = resolve_target(target)
    return target_key(t) == target_key(_host_target())


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
