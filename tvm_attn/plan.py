"""Workloads (a variant and a spec) and the plan that `tune`, `export` and `bench` share, with their CLI options."""

from __future__ import annotations

import argparse
import dataclasses

from .spec import DTYPE, DTYPES, AttentionSpec
from .variants import get_variant, variant_using


@dataclasses.dataclass(frozen=True)
class Workload:
    variant: str
    spec: AttentionSpec

    @property
    def name(self) -> str:
        return f"{self.variant}_{self.spec.name}"


# What `python -m tvm_attn.bench` times, declared here so that `tune` and `export` default to the same kernels without
# importing the benchmark: tvm_attn/bench/studies.py builds its studies from these, and tests/test_bench.py checks
# that the studies time exactly the kernels default_plan lists.
PREFILL_SHAPE = {"batch": 2, "heads": 8, "head_dim": 64}  # the seed report's
DECODE_SHAPE = {"batch": 1, "heads": 32, "head_dim": 128}  # a Llama-7B-like layer
DECODE_KV_HEADS = (32, 8, 1)  # MHA, GQA, MQA
KNOB_DEFAULTS = {"threshold": 0.01, "top_k": 64, "eps": 0.05}
KNOB_SWEEPS = {"threshold": (0.001, 0.01, 0.05, 0.1), "top_k": (32, 64, 128, 256), "eps": (0.01, 0.05, 0.1, 0.2)}
HALF_DTYPES = ("float16", "bfloat16")
# 16-bit prefill is also timed on a Llama-like GQA layer (mqa): head_dim 128 gives each score twice the
# multiply-adds of the seed's head_dim 64, which decides how much 16-bit products buy.
GQA_PREFILL_SHAPE = {"batch": 1, "heads": 32, "kv_heads": 8, "head_dim": 128}
# The length each kernel is tuned at (one record then serves every length).
TUNING_LENGTH = {"prefill": 1024, "decode": 4096}
# `--quick` (the benchmark's smoke run, and the tests): tiny shapes.
QUICK_PREFILL_SHAPE = {"batch": 1, "heads": 4, "head_dim": 32}
QUICK_DECODE_SHAPE = {"batch": 1, "heads": 32, "head_dim": 32}
QUICK_KNOB_SWEEPS = {"threshold": (0.01, 0.1), "top_k": (8, 32), "eps": (0.05, 0.2)}
QUICK_TUNING_LENGTH = {"prefill": 128, "decode": 512}
QUICK_GQA_PREFILL_SHAPE = {"batch": 1, "heads": 4, "kv_heads": 2, "head_dim": 64}


def default_plan(quick: bool = False) -> list[Workload]:
    """One workload per kernel that `python -m tvm_attn.bench` times (``quick``: with --quick), at its tuning
    length: the dense variants with and without the causal mask, the pruned ones at their default and swept knobs,
    causal flash and GQA mqa in every dtype, and flash decode over every KV head grouping and dtype."""
    prefill, decode = (QUICK_PREFILL_SHAPE, QUICK_DECODE_SHAPE) if quick else (PREFILL_SHAPE, DECODE_SHAPE)
    length = QUICK_TUNING_LENGTH if quick else TUNING_LENGTH
    sweeps = QUICK_KNOB_SWEEPS if quick else KNOB_SWEEPS

    def prefill_spec(**fields) -> AttentionSpec:
        return AttentionSpec(**{**prefill, "seq_q": length["prefill"], **fields})

    dense = [("standard", {}), ("flash", {}), ("mqa", {"kv_heads": 1})]
    plan = [Workload(v, prefill_spec(**f)) for v, f in dense]
    swept = {"threshold": "threshold", "top_k": "topk", "eps": "mass"}  # knob -> the variant the studies sweep
    # the sequence sweep's pruned lines at their default knobs, then the knob sweeps
    for knob, values in [(k, (KNOB_DEFAULTS[k],)) for k in ("threshold", "top_k")] + list(sweeps.items()):
        plan += [Workload(swept[knob], prefill_spec(**{knob: x})) for x in values]
    plan += [Workload(v, prefill_spec(causal=True, **f)) for v, f in dense]
    plan += [Workload("flash", AttentionSpec(**decode, seq_q=1, seq_kv=length["decode"], causal=True, kv_heads=kvh,
                                             dtype=dtype))
             for kvh in DECODE_KV_HEADS for dtype in (DTYPE, *HALF_DTYPES)]
    plan += [Workload("flash", prefill_spec(causal=True, dtype=dtype)) for dtype in HALF_DTYPES]
    gqa = QUICK_GQA_PREFILL_SHAPE if quick else GQA_PREFILL_SHAPE
    plan += [Workload("mqa", prefill_spec(causal=True, dtype=dtype, **gqa)) for dtype in (DTYPE, *HALF_DTYPES)]
    return list(dict.fromkeys(plan))  # a sweep's default value once


def add_workload_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    """The options that name workloads: --variant with shape and knob options, or the default plan."""
    parser.add_argument("--variant", action="append", help=f"{verb} this variant (repeatable); default: the default "
                        "plan, the workloads python -m tvm_attn.bench reports")
    parser.add_argument("--seq", type=int, nargs="+", help="seq_q = seq_kv values (with --variant; default 512)")
    parser.add_argument("--seq-kv", type=int, default=None, help="seq_kv when it differs from seq_q (decode: --seq 1)")
    parser.add_argument("--batch", type=int, default=2, help="default 2")
    parser.add_argument("--heads", type=int, default=8, help="default 8")
    parser.add_argument("--kv-heads", type=int, default=None, help="default: heads")
    parser.add_argument("--head-dim", type=int, default=64, help="default 64")
    parser.add_argument("--causal", action="store_true", help="causal mask (bottom-right aligned)")
    parser.add_argument("--window", type=int, default=None, help="sliding window (with --causal)")
    parser.add_argument("--dtype", choices=DTYPES, default=DTYPE, help=f"of q, k, v and the output (default {DTYPE})")
    add_knob_arguments(parser)
    parser.add_argument("--quick", action="store_true", help="the plan of `python -m tvm_attn.bench --quick`")


def add_knob_arguments(parser: argparse.ArgumentParser) -> None:
    """--threshold, --top-k, --eps: each applies to the variant that uses it (Variant.knob)."""
    parser.add_argument("--threshold", type=float, default=None, help="threshold variant's knob (default 0.01)")
    parser.add_argument("--top-k", type=int, default=None, help="topk variant's knob (default 64)")
    parser.add_argument("--eps", type=float, default=None, help="mass variant's knob (default 0.05)")


def knobs_from_args(variant, args: argparse.Namespace) -> dict:
    """{knob: value} for the variant's knob from the parsed --threshold/--top-k/--eps, else its default (empty
    for dense variants)."""
    v = get_variant(variant)
    if not v.knob:
        return {}
    value = getattr(args, v.knob)
    return {v.knob: KNOB_DEFAULTS[v.knob] if value is None else value}


def check_knob_arguments(variants, args: argparse.Namespace) -> None:
    """ValueError for a knob option that none of ``variants`` uses (it would be silently ignored)."""
    used = {get_variant(name).knob for name in variants}
    for knob in KNOB_DEFAULTS:
        if getattr(args, knob) is not None and knob not in used:
            raise ValueError(f"--{knob.replace('_', '-')} {getattr(args, knob)} is only used by variant "
                             f"{variant_using(knob)}, not by {', '.join(variants)}")


def cli_workloads(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list:
    """The workloads of tune's and export's options, and their --target checked; bad values end the program
    with an argparse error (exit status 2) naming them, not a traceback."""
    from .targets import resolve_target

    try:
        resolve_target(args.target)
        if not args.variant and any(getattr(args, knob) is not None for knob in KNOB_DEFAULTS):
            raise ValueError("--threshold, --top-k and --eps apply to the variants named with --variant")
        if args.variant:
            check_knob_arguments(args.variant, args)
        return workloads_from_args(args)
    except (ValueError, TypeError) as err:
        parser.error(str(err))


def workloads_from_args(args: argparse.Namespace) -> list[Workload]:
    if not args.variant:
        return default_plan(args.quick)
    plan = []
    for name in args.variant:
        variant = get_variant(name)
        for seq in args.seq or [512]:
            spec = AttentionSpec(batch=args.batch, heads=args.heads, kv_heads=args.kv_heads, seq_q=seq,
                                 seq_kv=args.seq_kv, head_dim=args.head_dim, causal=args.causal,
                                 window=args.window, dtype=args.dtype,
                                 **knobs_from_args(variant, args))
            variant.check(spec)
            plan.append(Workload(variant.name, spec))
    return plan
