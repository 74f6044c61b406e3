"""python -m tvm_attn: build every variant for one shape, check it against the float64 reference, time it."""

from __future__ import annotations

import argparse
import os

import numpy as np

from tvm_attn.plan import add_knob_arguments, check_knob_arguments, knobs_from_args
from tvm_attn.spec import DTYPE, DTYPES


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tvm_attn", description=__doc__)
    parser.add_argument("--seq", type=int, default=256, help="seq_q = seq_kv (default 256)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=None, help="default: heads")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--dtype", choices=DTYPES, default=DTYPE, help=f"of q, k, v and the output (default {DTYPE})")
    add_knob_arguments(parser)
    parser.add_argument("--variant", action="append", help="repeat to pick several (default: all)")
    parser.add_argument("--untuned", action="store_true", help="also time the untuned reference (slow)")
    args = parser.parse_args(argv)

    import tvm_attn
    from tvm_attn.runtime import dlpack_argument, numpy_dtype
    from tvm_attn.timing import measure

    variants = args.variant or list(tvm_attn.VARIANTS)
    schedules = ["best", "untuned"] if args.untuned else ["best"]
    try:
        check_knob_arguments(variants, args)
        specs = {name: tvm_attn.AttentionSpec(batch=args.batch, heads=args.heads, kv_heads=args.kv_heads,
                                              seq_q=args.seq, head_dim=args.head_dim, causal=args.causal,
                                              dtype=args.dtype, **knobs_from_args(name, args))
                 for name in variants}
    except (ValueError, TypeError) as err:
        parser.error(str(err))
    print(f"target {tvm_attn.target_key('host')}, TVM_NUM_THREADS={os.environ['TVM_NUM_THREADS']}")
    for name, spec in specs.items():
        variant = tvm_attn.get_variant(name)
        rng = np.random.default_rng(0)
        q, k, v = (rng.standard_normal(shape).astype(numpy_dtype(spec.dtype))
                   for shape in (spec.q_shape, spec.kv_shape, spec.kv_shape))
        ref = variant.reference(spec, q, k, v)
        for schedule in schedules:
            kernel = tvm_attn.build(variant.name, spec, schedule=schedule)
            err = np.abs(kernel(q, k, v) - ref).max() / np.abs(ref).mean()
            out = np.empty(spec.q_shape, numpy_dtype(spec.dtype))
            call = [dlpack_argument(x) for x in (q, k, v, out)]
            fn = kernel.function
            timing = measure(lambda: fn(*call))
            print(f"{variant.name:10s} {kernel.schedule:8s} {spec.name:40s} {timing.median_ms:9.2f} ms "
                  f"{timing.gflops(spec.dense_flops()):7.1f} GFLOP/s  max rel err {err:.1e}")


if __name__ == "__main__":
    main()
