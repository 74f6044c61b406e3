"""Named targets: "host", the Apple M-series presets, or a raw TVM target dict."""

from __future__ import annotations

import dataclasses
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
    """A tvm Target from "host", "apple-m1".."apple-m4", a TVM target dict or JSON string, or a Target; on AVX-512
    CPUs whose LLVM tuning prefers 256-bit vectors (Intel Xeons since Skylake-SP), with that preference off."""
    return _full_width_vectors(_parse_target(target))


@functools.lru_cache(maxsize=64)
def _full_width_vectors_json(target_json: str) -> str:
    from tvm.target import codegen

    t = tvm.target.Target(json.loads(target_json))
    features = set(map(str, codegen.llvm_get_cpu_features(t)))
    if "avx512f" not in features or "prefer-256-bit" not in features:
        return target_json
    # The schedules emit 512-bit vectors for AVX-512; with prefer-256-bit LLVM splits many of them into two 256-bit
    # halves (a flash kernel for sapphirerapids had 40 of its 248 FMAs on ymm, x86-64-v4 all of them).
    config = json.loads(target_json)
    config["mattr"] = [*config.get("mattr", []), "-prefer-256-bit"]
    return json.dumps(config)


def _full_width_vectors(t: tvm.target.Target) -> tvm.target.Target:
    if str(t.kind.name) != "llvm":
        return t
    full = _full_width_vectors_json(str(t))
    return t if full == str(t) else tvm.target.Target(json.loads(full))


def _parse_target(target) -> tvm.target.Target:
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


def target_os(target) -> str | None:
    """The operating system a target builds for ("linux", "macos", "windows", ...; the host's when its triple names
    none), or None."""
    t = resolve_target(target)
    return _os_and_abi(str(t.attrs.get("mtriple", "") or _host_target().attrs.get("mtriple", "")))[0]


def target_key(target) -> str:
    """A readable directory-safe key: x86_64-znver4, arm64-apple-macos-apple-m3."""
    t = resolve_target(target)
    triple = str(t.attrs.get("mtriple", "") or platform.machine())
    arch = triple.split("-")[0]
    if "apple" in triple:
        arch = "arm64-apple-macos"
    mcpu = str(t.attrs.get("mcpu", "") or "generic")
    return f"{arch}-{mcpu}"


# LLVM lists tuning flags among a CPU's features (fast-*, slow-*, fuse-*, ...); they change how code is scheduled,
# never which instructions a CPU must have, so they do not decide whether a kernel runs on a host.
_TUNING_PREFIXES = (
    "fast-", "slow-", "false-deps-", "prefer-", "tuning-", "no-bypass-delay", "allow-light-256-bit", "idivq-to-divl",
    "idivl-to-divb", "macrofusion", "branchfusion", "faster-shift-than-shuffle", "ermsb", "vzeroupper", "lea-",
    "pad-short-functions", "use-", "sbb-dep-breaking", "avoid-", "fuse-", "zcz", "zcm", "no-zcz", "disable-",
    "alternate-sextload", "arith-", "store-pair-suppress", "max-interleave-factor", "apple-a", "predictable-select",
    "balance-fp-ops", "custom-cheap-as-move", "addr-lsl", "alu-lsl", "lsl-fast", "cmp-bcc-fusion", "enable-select",
    "ascend-store-address", "no-neg-immediates", "strict-align", "force-32bit-jump-tables",
)


@dataclasses.dataclass(frozen=True)
class CpuCapabilities:
    """What a target's CPU can do, as LLVM's features for its triple, mcpu and mattr say (never guessed from names).

    ``isa_class`` groups CPUs that run the same schedules well: x86_64-avx512, x86_64-avx2, x86_64-sse, aarch64-neon.
    """

    arch: str  # "x86_64" or "aarch64" (Apple's arm64 included)
    isa_class: str
    vector_bits: int  # the widest vector registers the schedules use
    vector_registers: int  # how many of them
    fma: bool
    float16_products: bool  # float16 products into float32: NEON fmlal (fp16fml), AVX512-FP16
    bfloat16_dot: bool  # bfloat16 pair dot products into float32: AVX512-BF16 vdpbf16ps, NEON bfdot (bf16)
    int8_dot: bool  # AVX512-VNNI / AVX-VNNI vpdpbusd, NEON sdot (dotprod)
    int8_matmul: bool  # NEON smmla (i8mm)
    matrix_unit: str | None  # "amx" (Intel AMX tiles), "sme" (Arm SME), None
    features: frozenset  # LLVM's instruction-set features, tuning flags left out

    def lanes(self, dtype_bits: int = 32) -> int:
        """Elements of ``dtype_bits`` in one vector register."""
        return self.vector_bits // dtype_bits


def _instruction_features(t: tvm.target.Target) -> frozenset:
    from tvm.target import codegen

    return frozenset(f for f in map(str, codegen.llvm_get_cpu_features(t)) if not f.startswith(_TUNING_PREFIXES))


@functools.lru_cache(maxsize=64)
def _capabilities(target_json: str) -> CpuCapabilities:
    t = tvm.target.Target(json.loads(target_json))
    features = _instruction_features(t)
    triple = str(t.attrs.get("mtriple", "") or _host_target().attrs.get("mtriple", ""))
    if triple.startswith(("arm64", "aarch64")):
        return CpuCapabilities(
            arch="aarch64", isa_class="aarch64-neon", vector_bits=128, vector_registers=32, fma=True,
            float16_products="fp16fml" in features, bfloat16_dot="bf16" in features,
            int8_dot="dotprod" in features, int8_matmul="i8mm" in features,
            matrix_unit="sme" if "sme" in features else None, features=features)
    if "avx512f" in features:
        bits, registers, isa_class = 512, 32, "x86_64-avx512"
    elif "avx" in features:
        bits, registers, isa_class = 256, 16, ("x86_64-avx2" if {"avx2", "fma"} <= features else "x86_64-avx")
    else:
        bits, registers, isa_class = 128, 16, "x86_64-sse"
    return CpuCapabilities(
        arch="x86_64", isa_class=isa_class, vector_bits=bits, vector_registers=registers, fma="fma" in features,
        float16_products="avx512fp16" in features, bfloat16_dot="avx512bf16" in features,
        int8_dot=bool({"avx512vnni", "avxvnni"} & features), int8_matmul=False,
        matrix_unit="amx" if "amx-tile" in features else None, features=features)


def capabilities(target) -> CpuCapabilities:
    """The CpuCapabilities of a target (a name, dict, JSON or Target)."""
    return _capabilities(str(resolve_target(target)))


def target_from_key(key: str) -> tvm.target.Target | None:
    """The target a target key names (x86_64-znver4, arm64-apple-macos-apple-m3), or None for a name that is not
    one (a directory of something else)."""
    if key.startswith("arm64-apple-macos-"):
        config = {"kind": "llvm", "mtriple": "arm64-apple-macos", "mcpu": key[len("arm64-apple-macos-"):]}
    else:
        arch, _, mcpu = key.partition("-")
        if arch not in ARCHES or not mcpu:
            return None
        config = {"kind": "llvm", "mtriple": f"{arch}-unknown-linux-gnu", "mcpu": mcpu}
    try:
        return resolve_target(config)
    except ValueError:
        return None


def runs_on_host(target) -> bool:
    """Whether code for this target can run in this process (``host_mismatch`` is None)."""
    return host_mismatch(target) is None


def host_mismatch(target) -> str | None:
    """Why code for this target cannot run on this host (its architecture, OS or ABI differ, or it needs
    instructions the host's CPU lacks), or None when it can."""
    t = resolve_target(target)
    host = _host_target()
    triple, host_triple = str(t.attrs.get("mtriple", "") or ""), str(host.attrs.get("mtriple", "") or "")
    arch = (triple or host_triple).split("-")[0]
    host_arch = host_triple.split("-")[0]
    if _normal_arch(arch) != _normal_arch(host_arch):
        return f"the architecture differs ({arch}, this host is {host_arch})"
    if triple:
        (os_name, abi), (host_os, host_abi) = _os_and_abi(triple), _os_and_abi(host_triple)
        if os_name != host_os:
            return f"the operating system differs ({os_name}, this host runs {host_os})"
        if abi and abi != host_abi:
            return f"the ABI differs ({abi}, this host's is {host_abi})"
    missing = capabilities(t).features - capabilities(host).features
    if missing:
        return f"this host's CPU lacks {', '.join(sorted(missing))}"
    return None


def _normal_arch(arch: str) -> str:
    return "aarch64" if arch == "arm64" else arch


def vector_lanes(target, dtype_bits: int = 32) -> int:
    """Lanes of the target's widest vector register (AVX-512: 16 float32, AVX2: 8, NEON: 4)."""
    return capabilities(target).lanes(dtype_bits)
