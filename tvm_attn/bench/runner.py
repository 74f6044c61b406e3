"""Runs studies and writes one CSV row per measurement."""

from __future__ import annotations

import csv
import dataclasses
import os
import sys
import time

import numpy as np

import tvm_attn

from .. import references
from ..kernel import scheduled_module
from ..runtime import numpy_dtype
from ..timing import SPREAD, measure_interleaved
from . import ceiling
from .bandwidth import BYTES as BANDWIDTH_BYTES
from .bandwidth import read_bandwidth
from .features import features_study
from .generation import generation_loop
from .integer_kv import integer_kv_study
from .serving import serving_study
from .inputs import make_inputs, row_entropy
from .isa import ISAS, BenchIsa
from .memory import memory_use
from .model import model_study
from .sparse_decode import sparse_decode_study
from .providers import PROVIDERS, threads
from .studies import Study

FIELDS = (
    "study", "x_name", "x", "line", "variant", "provider", "record", "distribution", "dtype",
    "batch", "heads", "kv_heads", "seq_q", "seq_kv", "head_dim", "causal", "threshold", "top_k", "eps",
    "median_ms", "q25_ms", "q75_ms", "repeats", "flops", "gflops", "layers", "bytes_kv", "gbs",
    "bytes_inputs", "bytes_output", "bytes_intermediate",
    "rel_err_dense", "max_abs_err_dense", "rel_err_own", "kept_fraction", "entropy_nats",
    "threads", "target", "kernel_ms", "overhead_us", "compiles", "prefill_ms",
    "perplexity", "top1_agreement", "tokens_per_s", "certificate", "feature", "round",
)
MAX_LAYERS = 64
SLOW_PROVIDERS = ("untuned", "numpy")


def useful_flops(spec) -> int:
    """4 * D * (query, key) pairs each head sees: 4*B*H*Sq*Skv*D when not causal."""
    pairs = sum(spec.visible_keys(i) for i in range(spec.seq_q))
    return 4 * spec.batch * spec.heads * spec.head_dim * pairs


def spec_for(study: Study, line, x) -> tvm_attn.AttentionSpec:
    """The spec of one point of a study."""
    fields = dict(study.base)
    fields.update(line.spec_fields())
    if study.x_name == "seq_q":
        fields["seq_q"] = fields["seq_kv"] = x
    elif study.varies(line):
        fields[study.x_name] = x
    return tvm_attn.AttentionSpec(**fields)


def _subsample(spec, q, k, v):
    """Batch 0 and the first query heads of the first KV group(s): where errors and kept fractions are computed."""
    g = spec.group_size
    hq = g if g > 1 else min(2, spec.heads)
    kvh = max(1, hq // g)
    sub = tvm_attn.AttentionSpec(batch=1, heads=hq, kv_heads=kvh, seq_q=spec.seq_q, seq_kv=spec.seq_kv,
                                 head_dim=spec.head_dim, causal=spec.causal, scale=spec.scale,
                                 dtype=spec.dtype, **spec.knobs())
    return sub, (q[:1, :hq], k[:1, :kvh], v[:1, :kvh])


def _accuracy(variant: str, spec, q, k, v, out) -> dict:
    sub, (sq, sk, sv) = _subsample(spec, q, k, v)
    o = out[:1, : sub.heads].astype(np.float64)
    dense = references.dense(sub, sq, sk, sv)
    scale = np.abs(dense).mean()
    row = {
        "rel_err_dense": np.abs(o - dense).mean() / scale,
        "max_abs_err_dense": np.abs(o - dense).max(),
    }
    v_ = tvm_attn.get_variant(variant)
    if v_.knob:
        own = v_.reference(sub, sq, sk, sv)
        row["rel_err_own"] = np.abs(o - own).mean() / np.abs(own).mean()
        keep = v_.keep(sub, sq, sk)
        row["kept_fraction"] = keep.sum() / (references.visible_mask(sub).sum() * sub.heads)
    return row


def run_studies(studies: list[Study], out_csv: str, *, min_seconds: float = 0.2, spread: float | None = SPREAD,
                generation: dict | None = None, model: dict | None = None, sparse_decode: dict | None = None,
                serving: dict | None = None, integer_kv: dict | None = None, features: dict | None = None, log=None,
                isa: BenchIsa = ISAS["native"]) -> list[dict]:
    """Measure every point of ``studies`` (and, given ``generation``, the arguments of generation_loop; given
    ``model``, those of model_study; given ``sparse_decode``, those of sparse_decode_study; given ``serving``, those
    of serving_study; given ``integer_kv``, those of integer_kv_study; given ``features``, those of features_study);
    write and return the rows. ``spread``: the
    timer's interquartile-range target (timing.measure_interleaved). Progress goes to ``log`` (default: sys.stderr at
    the time of the call). ``isa``: the ISA class the kernels are built for (and the peers held to, by
    ``isa.activate``)."""
    log = log or sys.stderr
    target = tvm_attn.resolve_target(isa.target)
    key = tvm_attn.target_key(target)
    n_threads = threads()
    try:
        import torch
        torch.set_num_threads(n_threads)
    except ImportError:
        pass
    points = [(s, line, x, dist) for s in studies for x in s.x_vals for dist in s.distributions for line in s.lines]
    rounds: dict = {}  # the points timed in one interleaved round (Study.round_key)
    for n, (study, line, x, dist) in enumerate(points, 1):
        if study.measures(line, x):
            rounds.setdefault(study.round_key(line, x, dist), []).append((n, study, line, x, dist))
    rows = []
    start = time.time()
    for members in rounds.values():
        prepared = [_prepare_point(*member, isa) for member in members]
        timings = measure_interleaved({(point.n, p): prep.run for point in prepared
                                       for p, prep in point.providers.items()}, min_seconds=min_seconds,
                                      spread=spread)
        for point in prepared:
            for p in point.providers:
                rows.append(_row(point, p, timings[(point.n, p)], target, key, n_threads))
                print(f"[{point.n}/{len(points)} {time.time() - start:5.0f}s] {point.study.name} "
                      f"{point.study.x_name}={point.x} {point.dist} {point.line.label} {p}: "
                      f"{timings[(point.n, p)].median_ms:.2f} ms", file=log, flush=True)
    for row in ceiling.sgemm_rows(512 if len(points) < 60 else 2048, n_threads, min_seconds=min_seconds,
                                  coretype=isa.openblas_coretype):
        rows.append(dict(row, target=key))
        print(f"sgemm {row['provider']}: {row['gflops']:.0f} GFLOP/s", file=log, flush=True)
    peak = ceiling.fma_peak_row(str(target.attrs.get("mcpu", "")), n_threads)
    if peak is not None:
        rows.append(dict(peak, target=key))
    if any(s.name == "decode" for s in studies):
        for reader, gbs in read_bandwidth(min_seconds=min_seconds).items():
            rows.append(dict(study="ceiling", line="read bandwidth", variant="", provider=reader, x_name="bytes",
                             x=BANDWIDTH_BYTES, median_ms=BANDWIDTH_BYTES / gbs / 1e6, gbs=gbs, threads=n_threads,
                             target=key))
            print(f"read bandwidth ({reader}): {gbs:.1f} GB/s", file=log, flush=True)
    if generation is not None:
        row = generation_loop(**generation)
        row.update(threads=n_threads, target=key)
        rows.append(row)
        print(f"generation loop: {row['median_ms'] * 1e3:.1f} us per step, {row['overhead_us']:.1f} us outside the "
              f"kernel, {row['compiles']} compiles during the loop", file=log, flush=True)
    if model is not None:
        for row in model_study(log=log, **model):
            row.update(threads=n_threads, target=key)
            rows.append(row)
    if sparse_decode is not None:
        for row in sparse_decode_study(log=log, **sparse_decode):
            row.update(threads=n_threads, target=key)
            rows.append(row)
    for study, kwargs in ((serving_study, serving), (integer_kv_study, integer_kv), (features_study, features)):
        for row in study(log=log, **kwargs) if kwargs is not None else ():
            row.update(threads=n_threads, target=key)
            rows.append(row)
    with open(out_csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(row.get(k)) for k in FIELDS})
    return rows



def merge_results(csv_path: str, partial_csv: str, studies: set[str]) -> None:
    """Replace the rows of ``studies`` in ``csv_path`` by those of ``partial_csv`` (a run of only those studies),
    keeping every other study's rows, and delete ``partial_csv``."""
    with open(csv_path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["study"] not in studies]
    with open(partial_csv, newline="") as f:
        rows += [r for r in csv.DictReader(f) if r["study"] in studies]
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.remove(partial_csv)


@dataclasses.dataclass
class _Point:
    """One (study, line, x, distribution) with its inputs and prepared providers."""

    n: int
    study: Study
    line: object
    x: object
    dist: str
    spec: tvm_attn.AttentionSpec
    kv_bytes: int
    n_layers: int
    inputs: tuple  # (q, k, v) of the first layer: where errors are computed
    providers: dict  # provider name -> Prepared


def _prepare_point(n, study, line, x, dist, isa) -> _Point:
    spec = spec_for(study, line, x)
    kv_bytes = 2 * np.prod(spec.kv_shape) * numpy_dtype(spec.dtype).itemsize
    n_layers = min(MAX_LAYERS, max(1, -(-study.rotate_bytes // kv_bytes)))
    layers = [make_inputs(spec, dist, seed=seed) for seed in range(n_layers)]
    providers = {}
    for p in study.providers:
        if p in SLOW_PROVIDERS and study.slow_providers_max_x and x > study.slow_providers_max_x:
            continue
        if p == "sgemm" and (study.sgemm_min_x is None or x < study.sgemm_min_x):
            continue
        prep = PROVIDERS[p](line.variant, spec, layers, isa)
        if prep is not None:
            providers[p] = prep
    return _Point(n, study, line, x, dist, spec, kv_bytes, n_layers, layers[0], providers)


def _row(point: _Point, provider: str, t, target, key: str, n_threads: int) -> dict:
    """The CSV row of one provider at one point: its timing, memory and accuracy."""
    spec, (q, k, v), prep = point.spec, point.inputs, point.providers[provider]
    flops = prep.flops or useful_flops(spec)
    row = dict(
        study=point.study.name, x_name=point.study.x_name, x=point.x, line=point.line.label,
        variant=point.line.variant, provider=provider, distribution=point.dist, dtype=spec.dtype, batch=spec.batch,
        heads=spec.heads, kv_heads=spec.kv_heads, seq_q=spec.seq_q, seq_kv=spec.seq_kv, head_dim=spec.head_dim,
        causal=spec.causal, threshold=spec.threshold, top_k=spec.top_k, eps=spec.eps, median_ms=t.median_ms,
        q25_ms=t.q25_ms, q75_ms=t.q75_ms, repeats=t.repeats, flops=flops, gflops=t.gflops(flops),
        threads=n_threads, target=key, entropy_nats=row_entropy(spec, q, k), layers=point.n_layers,
        bytes_kv=point.kv_bytes, record=prep.record,
        gbs=point.kv_bytes / (t.median_ms * 1e-3) / 1e9 if prep.flops is None else None,  # sgemm reads no K, V
    )
    if prep.kernel is not None:
        mem = memory_use(scheduled_module(tvm_attn.get_variant(point.line.variant), spec, target,
                                          prep.kernel.schedule).mod, spec, n_threads)
        row.update(bytes_inputs=mem.inputs, bytes_output=mem.output, bytes_intermediate=mem.intermediate)
    if prep.output is not None:
        row.update(_accuracy(point.line.variant, spec, q, k, v, prep.output()))
    return row

def _fmt(value):
    if value is None:
        return ""
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.6g}"
    return value
