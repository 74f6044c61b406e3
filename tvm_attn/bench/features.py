"""The features study (issue 29): what logit softcapping, attention sinks and ALiBi cost against the same kernel
without them (goal: at most 1.10x; flash's kernels, and the kernels reading a KVCache's shadow of K), and what
verifying a speculative decoding draft tree in one call costs against a decode call per node (goal: at most 0.25x of
16 calls for a 16-node tree over 8192 cached positions). A feature's kernel and the kernel without it are timed in
three interleaved rounds (COST_ROUNDS), and the median of the three ratios is judged: one round moved the D64 softcap
ratio by 2% (1.088x against 1.103x-1.111x) at the goal's line. A tree point is timed in one round. Float32 unless
said, schedule "best" (tuned records where this CPU has them; a kernel with softcapping, sinks, ALiBi or a tree
replays the record of the kernel without).

Tree verification: the kernel ``build`` takes for the tree (the tree kernel for 12-16 nodes,
``variants.TREE_KERNEL_MIN_ROWS``) and, for comparison, the split-KV decode kernel, flash's and mqa's prefill kernels
and a ``PagedKVCache`` holding the same keys (its paged tree kernel), against flash's decode kernel called once per node
over the cache and the node's path (cache + depth keys), as verifying each root-to-node path as its own sequence
would run.
"""

from __future__ import annotations

import dataclasses
from statistics import median

import numpy as np

import tvm_attn
from tvm_attn.kernel import build_shadow
from tvm_attn.runtime import dlpack_argument, numpy_dtype
from tvm_attn.timing import measure_interleaved


@dataclasses.dataclass(frozen=True)
class CostPoint:
    """A kernel whose features are timed: ``variant``'s for the AttentionSpec ``fields`` (its knob included), the
    one reading a KVCache's shadow of K where ``shadow`` (a decode call through a cache), with q scaled by
    ``q_scale`` (> 1: peaked rows, as models' decode rows are, for the pruned variants)."""

    label: str
    fields: dict
    variant: str = "flash"
    shadow: bool = False
    q_scale: float = 1.0


COST_POINTS = (
    CostPoint("flash prefill B1 H8 D64, 1024, causal", dict(batch=1, heads=8, seq_q=1024, head_dim=64, causal=True)),
    CostPoint("flash prefill B1 H8 D128, 1024", dict(batch=1, heads=8, seq_q=1024, head_dim=128)),
    CostPoint("flash decode GQA 32/8 D128, 4096 keys", dict(batch=1, heads=32, kv_heads=8, seq_q=1, seq_kv=4096,
                                                            head_dim=128, causal=True)),
    CostPoint("flash decode MHA 32 D64, 4096 keys", dict(batch=1, heads=32, seq_q=1, seq_kv=4096, head_dim=64,
                                                         causal=True)),
    # the materialized-score kernels (threshold, top-k and mass take the same score terms)
    CostPoint("threshold 0.01 prefill B1 H8 D64, 1024, causal",
              dict(batch=1, heads=8, seq_q=1024, head_dim=64, causal=True, threshold=0.01), variant="threshold"),
    CostPoint("top-k 64 prefill B1 H8 D64, 1024, causal",
              dict(batch=1, heads=8, seq_q=1024, head_dim=64, causal=True, top_k=64), variant="topk"),
    CostPoint("bounded eps 0.05 decode GQA 32/8 D128, 8192 keys (shadow)",
              dict(batch=1, heads=32, kv_heads=8, seq_q=1, seq_kv=8192, head_dim=128, causal=True, eps=0.05),
              variant="bounded", shadow=True, q_scale=3.0),
    CostPoint("top-k 64 decode MHA 32 D64, 8192 keys (shadow)",
              dict(batch=1, heads=32, seq_q=1, seq_kv=8192, head_dim=64, causal=True, top_k=64),
              variant="topk", shadow=True, q_scale=3.0),
    CostPoint("threshold 0.001 decode GQA 32/8 D128, 8192 keys (shadow)",
              dict(batch=1, heads=32, kv_heads=8, seq_q=1, seq_kv=8192, head_dim=128, causal=True, threshold=0.001),
              variant="threshold", shadow=True, q_scale=3.0),
)
FEATURES = {"softcap 30": dict(softcap=30.0), "sinks": dict(sinks=True), "ALiBi": dict(alibi_slopes="bloom")}
# A pruned kernel's softcap and ALiBi also change which keys it keeps (capped scores are flatter: more keys hold the
# mass; BLOOM's slopes drop distant keys). A cap so wide that no score moves by 0.01 (|s| <= 40: 2e-4 in float64,
# and the float32 tanh's few ulps of the cap) keeps the same keys: the arithmetic alone. Pruned kernels are judged on
# it and on the sinks (logits 0, far below the scores); their other ratios are shown, not judged.
SAME_KEYS = {"softcap 1e4": dict(softcap=1e4)}
JUDGED_PRUNED = ("sinks", *SAME_KEYS)
TREE = (-1, 0, 0, 1, 1, 2, 3, 3, 4, 5, 6, 7, 9, 9, 10, 14)  # 16 nodes, depth 7 (tests/test_tree.py's TREE_16)
TREE_CACHED = 8192
TREE_POINTS = (("GQA 32/8 D128 (Llama 3 8B)", dict(heads=32, kv_heads=8, head_dim=128)),
               ("MHA 32 D128 (Llama 2 7B)", dict(heads=32, kv_heads=32, head_dim=128)),
               ("GQA 9/3 D64 (SmolLM2 135M)", dict(heads=9, kv_heads=3, head_dim=64)))
TREE_DTYPES = ("float32", "bfloat16")
DECODE_CALLS = "decode calls"  # the provider of the one-call-per-node baseline
PAGED = "PagedKVCache"
TAKEN = "one call"  # the provider of the kernel build takes for the tree
GOALS = dict(feature_cost=1.10, tree_vs_decode=0.25)
COST_ROUNDS = 3


def _prunes(variant: str) -> bool:
    """Whether ``variant`` keeps a subset of the keys (its time then depends on which)."""
    return tvm_attn.get_variant(variant).knob is not None


def _slopes(heads: int) -> tuple:
    """BLOOM's ALiBi slopes for ``heads`` heads (a power of two or not: the geometric series is what costs)."""
    return tuple(2.0 ** (-8.0 * np.arange(1, heads + 1) / heads))


def _bound_call(kernel, q, k, v, sinks=None, tree=None, shadow=()):
    """kernel's runtime function with its arguments bound (DLPack conversions outside the timing)."""
    args = [dlpack_argument(x) for x in kernel.arguments(q, k, v, np.empty_like(q), shadow, sinks, tree)]
    return lambda: kernel.function(*args)


def _shadow_call(kernel, q, cache, sinks):
    """The call of a kernel reading the shadow of K on ``cache`` (kept alive with it)."""
    k, v, shadow = cache.kernel_inputs(kernel, q.shape[2])
    call = _bound_call(kernel, q, k, v, sinks=sinks, shadow=shadow)
    return lambda: (cache, call())


def _row(feature: str, line: str, provider: str, spec, timing, record: str, x, variant: str = "flash",
         round_: int = 0) -> dict:
    return dict(study="features", x_name="feature", x=x, line=line, feature=feature, variant=variant,
                provider=provider, record=record, distribution="gaussian", dtype=spec.dtype, batch=spec.batch,
                heads=spec.heads, kv_heads=spec.kv_heads, seq_q=spec.seq_q, seq_kv=spec.seq_kv,
                head_dim=spec.head_dim, causal=spec.causal, median_ms=timing.median_ms, q25_ms=timing.q25_ms,
                q75_ms=timing.q75_ms, repeats=timing.repeats, round=round_)


def feature_cost_rows(points=COST_POINTS, features=FEATURES, min_seconds: float = 1.0, max_seconds: float = 4.0,
                      rounds: int = COST_ROUNDS, seed: int = 0, log=None) -> list[dict]:
    """Per point (a CostPoint, or its fields as a dict), the kernel without a feature and with each, on the same
    inputs (a pruned kernel's time depends on them), in ``rounds`` interleaved rounds: a row each per round (feature
    "" for the kernel without)."""
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
    rng = np.random.default_rng(seed)
    rows = []
    for point in points:
        point = point if isinstance(point, CostPoint) else CostPoint(**point)
        fns, specs, records = {}, {}, {}
        plain = tvm_attn.AttentionSpec(**point.fields)
        q = (point.q_scale * rng.standard_normal(plain.q_shape)).astype(np.float32)
        k, v = (rng.standard_normal(plain.kv_shape).astype(np.float32) for _ in "kv")
        if point.shadow:  # one cache (and shadow) that every kernel of the point reads
            cache = tvm_attn.KVCache(plain.batch, plain.kv_heads, plain.head_dim, capacity=plain.seq_kv, shadow=True)
            cache.append(k, v)
        for name, extra in {"": {}, **features, **(SAME_KEYS if _prunes(point.variant) else {})}.items():
            extra = {field: (_slopes(point.fields["heads"]) if value == "bloom" else value)
                     for field, value in extra.items()}
            spec = specs[name] = tvm_attn.AttentionSpec(**point.fields, **extra)
            kernel = (build_shadow if point.shadow else tvm_attn.build)(point.variant, spec)
            sinks = kernel.sink_logits(np.zeros(spec.heads, np.float32) if spec.sinks else None)
            fns[name] = _shadow_call(kernel, q, cache, sinks) if point.shadow else _bound_call(kernel, q, k, v, sinks)
            records[name] = kernel.schedule
        for n in range(rounds):
            timings = measure_interleaved(fns, min_seconds=min_seconds, spread=0.05, max_seconds=max_seconds)
            for name, timing in timings.items():
                rows.append(_row(name, point.label, "tvm_attn", specs[name], timing, records[name],
                                 specs[name].seq_kv, point.variant, n))
                if log is not None:
                    print(f"features {point.label} {name or 'without'} (round {n + 1}): {timing.median_ms:.3f} ms "
                          f"({records[name]})", file=log, flush=True)
    return rows


def _paged_call(spec, q, k, v):
    """A call verifying spec's tree through a PagedKVCache (pages of 16) holding k and v (batch 1)."""
    cache = tvm_attn.PagedKVCache(num_pages=-(-spec.seq_kv // 16), page_size=16, kv_heads=spec.kv_heads,
                                  head_dim=spec.head_dim, dtype=spec.dtype)
    seq = cache.add_sequence()
    cache.append(seq, k[0], v[0])
    rows = np.ascontiguousarray(q[0].transpose(1, 0, 2))
    out = np.empty_like(rows)
    return lambda: cache.attend(rows, [seq], [spec.seq_q], tree_parents=[spec.tree_parents], out=out)


def tree_rows(points=TREE_POINTS, dtypes=TREE_DTYPES, parents=TREE, cached: int = TREE_CACHED,
              min_seconds: float = 1.0, max_seconds: float = 6.0, seed: int = 0, log=None) -> list[dict]:
    """Per (point, dtype), one call verifying the tree (the kernel taken, flash's and mqa's prefill kernels) and a
    decode call per node, in one interleaved round: a row each (feature "tree")."""
    rng = np.random.default_rng(seed)
    rows = []
    for label, fields in points:
        for dtype in dtypes:
            spec = tvm_attn.AttentionSpec(batch=1, seq_q=len(parents), seq_kv=cached + len(parents), causal=True,
                                          dtype=dtype, tree_parents=parents, **fields)
            q, k, v = (rng.standard_normal(shape).astype(np.float32).astype(numpy_dtype(dtype))
                       for shape in (spec.q_shape, spec.kv_shape, spec.kv_shape))
            fns, records = {}, {}
            taken = tvm_attn.build("flash", spec)
            fns[TAKEN], records[TAKEN] = _bound_call(taken, q, k, v, tree=spec.tree_mask), taken.schedule
            for variant, path in (("flash", "decode"), ("flash", "prefill"), ("mqa", "prefill")):
                kernel = tvm_attn.build(variant, spec, path=path)
                name = f"{variant} {path} kernel" if path == "prefill" else "split-KV decode kernel"
                fns[name], records[name] = _bound_call(kernel, q, k, v, tree=spec.tree_mask), kernel.schedule
            fns[PAGED], records[PAGED] = _paged_call(spec, q, k, v), "hand"
            one = tvm_attn.build("flash", tvm_attn.AttentionSpec(
                batch=1, seq_q=1, seq_kv=cached + 1, causal=True, dtype=dtype, **fields))
            # node i's row over the cache and its path's keys, up to its position (the time depends on how many, not
            # which)
            calls = [_bound_call(one, q[:, :, i:i + 1], k[:, :, :position + 1], v[:, :, :position + 1])
                     for i, position in enumerate(spec.positions()[0])]
            fns[DECODE_CALLS] = lambda calls=calls: [call() for call in calls]
            records[DECODE_CALLS] = one.schedule
            timings = measure_interleaved(fns, min_seconds=min_seconds, spread=0.05, max_seconds=max_seconds)
            for name, timing in timings.items():
                rows.append(_row("tree", label, name, spec, timing, records[name], cached))
                if log is not None:
                    print(f"features tree {label} {dtype} {name}: {timing.median_ms:.3f} ms ({records[name]})",
                          file=log, flush=True)
    return rows


def features_study(cost: dict | None = None, tree: dict | None = None, log=None) -> list[dict]:
    """The rows of feature_cost_rows(**cost) and tree_rows(**tree) (default arguments for None)."""
    return feature_cost_rows(log=log, **(cost or {})) + tree_rows(log=log, **(tree or {}))


def features_section(rows, ctx) -> list[str]:
    """The report's part for the features study (rows of study "features")."""
    from .formatting import pick, table

    rs = pick(rows, study="features")
    if not rs:
        return []
    parts = ["## Attention features: softcap, sinks, ALiBi, tree verification", ""]
    verdicts = []
    cost = [r for r in rs if r.get("feature") != "tree"]
    if cost:
        names = list(dict.fromkeys(r["feature"] for r in cost if r["feature"]))
        body, worst, apart = [], {}, []
        most_rounds = 1
        for line in dict.fromkeys(r["line"] for r in cost):
            # {round: {feature: row}}; rows of a CSV from before rounds were recorded count as round 0
            by_round: dict = {}
            for r in cost:
                if r["line"] == line:
                    by_round.setdefault(int(r.get("round") or 0), {})[r["feature"]] = r
            bases = [at[""] for at in by_round.values() if "" in at]
            if not bases:
                continue
            most_rounds = max(most_rounds, len(bases))
            base = bases[0]
            pruned = _prunes(base.get("variant") or "flash")
            cells = [line, f"{median(b['median_ms'] for b in bases):.3f} ({base['record']})"]
            for name in names:
                ratios = [at[name]["median_ms"] / at[""]["median_ms"] for at in by_round.values()
                          if name in at and "" in at]
                if not ratios:
                    cells.append("-")
                    continue
                ratio = median(ratios)
                if pruned and name not in JUDGED_PRUNED:
                    apart.append((name, ratio))
                else:
                    kind = "pruned" if pruned else "dense"
                    worst[kind] = max(worst.get(kind, ratio), ratio)
                spread = f"{min(ratios):.3f}-{max(ratios):.3f}, " if len(ratios) > 1 else ""
                record = next(at[name]["record"] for at in by_round.values() if name in at)
                cells.append(f"{ratio:.3f}x ({spread}{record})")
            body.append(cells)
        rounds = ("one interleaved round per kernel" if most_rounds == 1 else
                  f"{most_rounds} interleaved rounds per kernel (the median of their ratios, their range in brackets; "
                  "the median time without)")
        parts += [f"Each feature's kernel against the same kernel without it, {rounds} "
                  "(float32, schedule \"best\"; the schedule used in brackets; \"(shadow)\": the kernel a decode "
                  "call through a KVCache runs, reading the cache's int8 shadow of K, on rows with q scaled by 3): "
                  "time with / time without. In a pruned kernel softcap 30 and ALiBi also change which keys it keeps "
                  "(capped scores are flatter, so more keys hold the mass; BLOOM's slopes drop distant keys, and put "
                  "a top-k cut past the 16 logits the shadow's bins separate, where the kernel bisects on the "
                  "bounds themselves): their ratios there are the data's as much as the arithmetic's. Softcap 1e4 "
                  "moves no score by 0.01 and keeps the same keys: the cap's arithmetic alone.", "",
                  table(["kernel", "without ms"] + names, body), ""]
        goal = GOALS["feature_cost"]
        for kind, ratio in worst.items():
            judged = "" if kind == "dense" else f" ({', '.join(JUDGED_PRUNED)})"
            verdicts.append(f"each feature at most {ratio:.3f}x its {kind} kernel without{judged} (goal <= "
                            f"{goal:.2f}x: {'met' if ratio <= goal else 'not met'})")
        for name in dict.fromkeys(n for n, _ in apart):
            ratios = [r for n, r in apart if n == name]
            verdicts.append(f"{name} in the pruned kernels {min(ratios):.3f}x-{max(ratios):.3f}x (the kept keys "
                            "change; not judged)")
    tree = [r for r in rs if r.get("feature") == "tree"]
    if tree:
        providers = [p for p in dict.fromkeys(r["provider"] for r in tree) if p != DECODE_CALLS]
        body, worst = [], None
        for key in dict.fromkeys((r["line"], r["dtype"]) for r in tree):
            at = {r["provider"]: r for r in tree if (r["line"], r["dtype"]) == key}
            base = at.get(DECODE_CALLS)
            if base is None:
                continue
            cells = [*key, f"{base['median_ms']:.2f} ({base['record']})"]
            for p in providers:
                r = at.get(p)
                ratio = None if r is None else r["median_ms"] / base["median_ms"]
                if p == TAKEN and ratio is not None:
                    worst = ratio if worst is None or ratio > worst else worst
                cells.append("-" if r is None else f"{ratio:.3f}x ({r['median_ms']:.2f} ms, {r['record']})")
            body.append(cells)
        first = tree[0]
        nodes, cached = int(first["seq_q"]), int(first["x"])
        parts += [f"Verifying a {nodes}-node draft tree over {cached} cached positions (batch 1): one call against "
                  f"{nodes} decode calls, one per node over the cache and its path, in one interleaved round. "
                  f"\"{TAKEN}\" is the kernel `build` and `KVCache.attend` take (the tree kernel for trees of 12-16 "
                  "nodes); the split-KV decode kernel (which took such trees before), the prefill kernels and a "
                  "`PagedKVCache` call (its paged tree kernel) for comparison.", "",
                  table(["shape", "dtype", f"{nodes} decode calls ms"] + providers, body), ""]
        if worst is not None:
            goal = GOALS["tree_vs_decode"]
            judged = nodes == len(TREE) and cached >= TREE_CACHED  # the goal's own size
            verdict = ("met" if worst <= goal else "not met") if judged else (
                f"stated for {len(TREE)} nodes over {TREE_CACHED} positions, not judged here")
            verdicts.append(f"one call verifying the tree at most {worst:.3f}x the decode calls (goal <= {goal:.2f}x: "
                            f"{verdict}; the call does the decode calls' arithmetic, reading K and V once)")
    if verdicts:
        parts += ["Goals (issue 29): " + "; ".join(verdicts) + ".", ""]
    return parts
