"""python -m tvm_attn.bench [--full | --quick] [--isa CLASS] [--out DIR] [--study NAME] [--variant NAME] [--seq N ...]

The default run answers the seed report's questions, every kernel study with fewer repeats (each provider of a point
timed for 0.1 s, no spread target), in about 10 minutes on 2 cores; ``--full`` times each until its interquartile
range is within 5% of its median and adds the model, sparse_decode, serving, integer_kv and features studies (~50
minutes: features ~6 to 11)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys


GENERATION = "generation"  # the KVCache generation loop (bench/generation.py), not a Study
QUICK_GENERATION = dict(heads=4, kv_heads=2, head_dim=32, prefill=100, steps=32)
MODEL = "model"  # SmolLM2 with tvm_attn attention (bench/model.py): --full runs and --study model, when installed
# certified sparse decode (bench/sparse_decode.py): --full runs and --study sparse_decode
SPARSE_DECODE = "sparse_decode"
QUICK_SPARSE_DECODE = dict(real=False, synthetic_sets=((2048, 2),), min_seconds=0.1, shadow_cost_keys=2048)
# many sequences at once through PagedKVCache (bench/serving.py): --full runs and --study serving
SERVING = "serving"
QUICK_SERVING = dict(ragged=dict(sequences=5, shortest=16, longest=300, page_sizes=(16, 64)),
                     continuous=dict(slots=3, shortest=16, longest=200, steps=6, tokens=(1, 4)),
                     shape=dict(heads=4, kv_heads=2, head_dim=32), min_seconds=0.05)
# decode through int8 caches against float16 and float32 ones (bench/integer_kv.py): --full runs and --study integer_kv
INTEGER_KV = "integer_kv"
QUICK_INTEGER_KV = dict(shapes=((4, 4), (4, 2)), lengths=(256,), head_dim=64, rotate_bytes=2**22, min_seconds=0.05)
# what softcap, sinks and ALiBi cost, and tree verification against decode calls (bench/features.py): --full runs and
# --study features
FEATURES = "features"
QUICK_FEATURES = dict(
    cost=dict(points=(dict(label="flash prefill B1 H2 D32, 64, causal",
                           fields=dict(batch=1, heads=2, seq_q=64, head_dim=32, causal=True)),
                      dict(label="bounded eps 0.05 decode B1 H4/2 D32, 256 keys (shadow)",
                           fields=dict(batch=1, heads=4, kv_heads=2, seq_q=1, seq_kv=256, head_dim=32, causal=True,
                                       eps=0.05), variant="bounded", shadow=True, q_scale=3.0)),
              min_seconds=0.02, max_seconds=0.1, rounds=2),
    tree=dict(points=(("GQA 4/2 D32", dict(heads=4, kv_heads=2, head_dim=32)),), dtypes=("float32",), cached=256,
              min_seconds=0.02, max_seconds=0.1))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tvm_attn.bench",
        description="Benchmark every attention variant against its untuned compute, the hand-scheduled standard, "
                    "torch SDPA (if installed) and numpy; write results.csv, report.md and plots.")
    parser.add_argument("--quick", action="store_true", help="a reduced study on tiny shapes (under 2 minutes)")
    parser.add_argument("--full", action="store_true", help="every provider timed to a 5%% interquartile range, "
                        "and the model, sparse_decode, serving, integer_kv and features studies (~50 minutes)")
    parser.add_argument("--out", default=None, help="output directory (default bench/results/<target key>, with "
                        "-<isa> for --isa)")
    parser.add_argument("--isa", default="native", help="the ISA class to hold every provider to: native (the "
                        "host's, default) or avx2 (kernels built for x86-64-v3, torch, its BLAS and the OpenBLAS "
                        "sgemm held to AVX2; the kernel studies only)")
    parser.add_argument("--study", action="append", help="run only these studies (repeatable)")
    parser.add_argument("--variant", action="append", help="only lines of these registry variants (repeatable)")
    parser.add_argument("--seq", type=int, nargs="+", help="sequence lengths of the seq_sweep study")
    parser.add_argument("--provider", action="append", help="only these providers (repeatable)")
    parser.add_argument("--min-seconds", type=float, default=None, help="timed seconds per provider and point")
    parser.add_argument("--report-only", action="store_true", help="regenerate report.md and plots from results.csv")
    parser.add_argument("--compare", metavar="CSV", help="also write stability.md: how this run's within-point "
                        "ratios and times differ from those of another run's results.csv")
    args = parser.parse_args(argv)
    if args.full and args.quick:
        parser.error("--full and --quick exclude each other")

    from .isa import activate

    try:
        isa = activate(args.isa)  # before anything imports torch (tvm does)
    except (ValueError, RuntimeError) as err:
        parser.error(str(err))

    import tvm_attn

    from ..timing import SPREAD
    from .providers import PROVIDERS
    from .report import write_report
    from .runner import merge_results, run_studies
    from .studies import default_studies

    suffix = ("" if isa.name == "native" else f"-{isa.name}") + ("-quick" if args.quick else "")
    out = args.out or os.path.join("bench", "results", tvm_attn.target_key("host") + suffix)
    csv_path = os.path.join(out, "results.csv")
    if not args.report_only:
        studies = default_studies(quick=args.quick)
        # The generation loop, the model and sparse_decode run the host's kernels through KVCache: native runs only.
        known = [s.name for s in studies] + ([GENERATION, MODEL, SPARSE_DECODE, SERVING, INTEGER_KV, FEATURES]
                                             if isa.name == "native" else [])
        for name in args.study or []:
            if name not in known:
                parser.error(f"unknown study {name!r}: use one of {', '.join(known)}")
        generation = None
        if (not args.study and isa.name == "native") or GENERATION in (args.study or []):
            generation = QUICK_GENERATION if args.quick else {}
        model = None
        if (not args.study and args.full and isa.name == "native") or MODEL in (args.study or []):
            from .model import unavailable

            reason = unavailable()
            if reason is None:
                model = {}
            else:
                print(f"model study skipped: {reason}", file=sys.stderr)
        sparse_decode = None
        if (not args.study and args.full and isa.name == "native") or SPARSE_DECODE in (args.study or []):
            from .model import unavailable

            reason = None if args.quick else unavailable()
            if reason is not None:
                print(f"sparse_decode study: synthetic caches only, no SmolLM2 capture: {reason}", file=sys.stderr)
            sparse_decode = QUICK_SPARSE_DECODE if args.quick else dict(real=reason is None)
        serving = None
        if (not args.study and args.full and isa.name == "native") or SERVING in (args.study or []):
            serving = QUICK_SERVING if args.quick else {}
        integer_kv = None
        if (not args.study and args.full and isa.name == "native") or INTEGER_KV in (args.study or []):
            integer_kv = QUICK_INTEGER_KV if args.quick else {}
        features = None
        if (not args.study and args.full and isa.name == "native") or FEATURES in (args.study or []):
            features = QUICK_FEATURES if args.quick else {}
        for name in args.variant or []:
            if name not in tvm_attn.VARIANTS:
                parser.error(f"unknown variant {name!r}: use one of {', '.join(tvm_attn.VARIANTS)}")
        for name in args.provider or []:
            if name not in PROVIDERS:
                parser.error(f"unknown provider {name!r}: use one of {', '.join(PROVIDERS)}")
        if args.study:
            studies = [s for s in studies if s.name in args.study]
        if args.variant:
            studies = [dataclasses.replace(s, lines=tuple(l for l in s.lines if l.variant in args.variant))
                       for s in studies]
        if args.provider:
            studies = [dataclasses.replace(s, providers=tuple(p for p in s.providers if p in args.provider))
                       for s in studies]
        if args.seq:
            studies = [dataclasses.replace(s, x_vals=tuple(args.seq)) if s.name == "seq_sweep" else s
                       for s in studies]
        min_seconds = args.min_seconds if args.min_seconds is not None else (
            0.05 if args.quick else 0.2 if args.full else 0.1)
        os.makedirs(out, exist_ok=True)
        # A partial run updates its studies' rows in an existing results.csv instead of overwriting the file.
        partial = bool(args.study) and os.path.exists(csv_path)
        run_csv = csv_path + ".partial" if partial else csv_path
        run_studies(studies, run_csv, min_seconds=min_seconds, spread=SPREAD if args.full else None,
                    generation=generation, model=model, sparse_decode=sparse_decode, serving=serving,
                    integer_kv=integer_kv, features=features, isa=isa)
        if partial:
            merge_results(csv_path, run_csv, set(args.study))
            print(f"replaced the rows of {', '.join(args.study)} in {csv_path}; the other studies' rows (and the "
                  f"ceilings) are from the run that wrote it", file=sys.stderr)
    elif not os.path.exists(csv_path):
        parser.error(f"--report-only: there is no {csv_path} to make a report from (run the benchmark first, or "
                     f"give --out the directory of a run)")
    print(f"wrote {write_report(csv_path, out)} and {csv_path}", file=sys.stderr)
    if args.compare:
        if not os.path.exists(args.compare):
            parser.error(f"--compare: no such file {args.compare}")
        from .stability import compare

        path = os.path.join(out, "stability.md")
        with open(path, "w") as f:
            f.write(compare(csv_path, args.compare))
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
