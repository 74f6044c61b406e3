"""What softcapping, sinks and ALiBi cost (issue 29's goal: at most 10% over the same kernel without), until the
benchmark has a study of its own: each feature's kernel against the same kernel without it, timed in one interleaved
round per point with the benchmark's timer (warm-up, then turns until 1 s each and a spread under 5%), float32,
schedule "best" (tuned records where this CPU has them; a kernel with sinks or ALiBi replays the record of the kernel
without, a softcapped one takes the hand schedule) and "hand".

    python bench/feature_cost.py        # run on an idle machine; prints a markdown table
"""
import os

for k, v in (("TVM_THREAD_POOL_SPIN_COUNT", "0"),):
    os.environ.setdefault(k, v)
import warnings

import numpy as np

import tvm_attn
from tvm_attn.runtime import dlpack_argument
from tvm_attn.timing import measure_interleaved

warnings.simplefilter("ignore")
POINTS = [("flash prefill B1 H8 D64, 1024, causal", dict(batch=1, heads=8, seq_q=1024, head_dim=64, causal=True)),
          ("flash prefill B1 H8 D128, 1024", dict(batch=1, heads=8, seq_q=1024, head_dim=128)),
          ("decode GQA 32/8 D128, 4096 keys", dict(batch=1, heads=32, kv_heads=8, seq_q=1, seq_kv=4096, head_dim=128,
                                                   causal=True)),
          ("decode MHA 32 D64, 4096 keys", dict(batch=1, heads=32, seq_q=1, seq_kv=4096, head_dim=64, causal=True))]
FEATURES = {"softcap 30": dict(softcap=30.0), "sinks": dict(sinks=True), "ALiBi": dict(alibi_slopes="bloom")}


def feature_fields(fields: dict, feature: dict) -> dict:
    heads = fields["heads"]
    return {k: (tuple(2.0 ** (-8.0 * np.arange(1, heads + 1) / heads)) if v == "bloom" else v)
            for k, v in feature.items()}


def call(spec, schedule, rng):
    kernel = tvm_attn.build("flash", spec, schedule=schedule)
    q = rng.standard_normal(spec.q_shape).astype(np.float32)
    k, v = (rng.standard_normal(spec.kv_shape).astype(np.float32) for _ in "kv")
    sinks = kernel.sink_logits(np.zeros(spec.heads, np.float32) if spec.sinks else None)
    args = [dlpack_argument(x) for x in kernel.arguments(q, k, v, np.empty_like(q), (), sinks)]
    return (lambda: kernel.function(*args)), kernel.schedule


def main():
    rng = np.random.default_rng(0)
    print(f"# Feature cost on {tvm_attn.target_key('host')}: time with / time without (median of interleaved turns)\n")
    print("| kernel | schedule | without | " + " | ".join(FEATURES) + " |")
    print("|---|---|---|" + "---|" * len(FEATURES))
    for label, fields in POINTS:
        for schedule in ("best", "hand"):
            fns, used = {}, {}
            fns["none"], used["none"] = call(tvm_attn.AttentionSpec(**fields), schedule, rng)
            for name, feature in FEATURES.items():
                spec = tvm_attn.AttentionSpec(**fields, **feature_fields(fields, feature))
                fns[name], used[name] = call(spec, schedule, rng)
            res = measure_interleaved(fns, min_seconds=1.0, spread=0.05, max_seconds=4)
            base = res["none"].median_ms
            cells = [f"{res[n].median_ms / base:.3f}x ({used[n]})" for n in FEATURES]
            print(f"| {label} | {schedule} | {base:.3f} ms ({used['none']}) | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
