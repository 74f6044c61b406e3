"""Workloads (a variant and a spec) and the plan that `tune`, `export` and `bench` share, with their CLI options."""

from __future__ import annotations

import argparse
import dataclasses

from .spec import DTYPE, DTYPES, AttentionSpec
from .variants import get_variant, path_for


@dataclasses.dataclass(frozen=True)
class Workload:
    variant: str
    spec: AttentionSpec

    @property
    def name(self) -> str:
        return f"{self.variant}_{self.spec.name}"


# The length a kernel is tuned at when the benchmark times it at several: every length then uses that record.
TUNING_LENGTH = {"prefill": 1024, "decode": 4096}


def default_plan(quick: bool = False) -> list[Workload]:
    """One workload per kernel that `python -m tvm_attn.bench` times, at the timed length nearest TUNING_LENGTH,
    in the studies' order."""
    from .bench.runner import spec_for
    from .bench.studies import default_studies

    chosen: dict = {}  # kernel -> workload
    for study in default_studies(quick):
        if "hand" not in study.providers:
            continue
        for x in study.x_vals:
            for line in study.lines:
                if not study.measures(line, x):
                    continue
                w = Workload(line.variant, spec_for(study, line, x))
                path = path_for(w.spec.seq_q)
                kernel = (get_variant(w.variant).kernel_parts(path), w.spec.kernel)
                best = chosen.get(kernel)
                if best is None or _distance(w, path) < _distance(best, path):
                    chosen[kernel] = w
    return list(chosen.values())


def _distance(w: Workload, path: str) -> int:
    return abs(w.spec.seq_kv - TUNING_LENGTH[path])


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
    parser.add_argument("--threshold", type=float, default=0.01, help="threshold variant's knob (default 0.01)")
    parser.add_argument("--top-k", type=int, default=64, help="topk variant's knob (default 64)")
    parser.add_argument("--eps", type=float, default=0.05, help="mass variant's knob (default 0.05)")


def knobs_from_args(variant, args: argparse.Namespace) -> dict:
    """{knob: value} for the variant's knob from the parsed --threshold/--top-k/--eps (empty for dense variants)."""
    v = get_variant(variant)
    return {v.knob: getattr(args, v.knob)} if v.knob else {}


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
