"""The integer-cache study: a decode step through an int8 KVCache against float16 and float32 caches of the same keys,
and a plain read of the int8 cache's bytes (provider read-kv), all timed in one interleaved round per point.

Each cache dtype gets as many layers (caches of the same rows) as make ROTATE_BYTES, attended in turn, so that a step
finds its K and V in memory, not in the CPU caches, as in a model's decode step. Bytes per step: K and V as stored
(int8: head_dim + 4 bytes a row, the codes and the row's scale). read-kv reads the int8 codes of the layer (not
the scales, 3% of the bytes at head_dim 128).
"""

from __future__ import annotations

import itertools

import numpy as np

import tvm_attn
from tvm_attn.runtime import numpy_dtype
from tvm_attn.timing import measure_interleaved

from .bandwidth import parallel_sum, reader
from .studies import decode_label

SHAPES = ((32, 32), (32, 8))  # (heads, kv_heads): MHA and GQA of a Llama-7B / Llama-3-8B layer
HEAD_DIM = 128
LENGTHS = (4096, 8192, 16384, 32768)
DTYPES = ("float32", "float16", "int8")
ROTATE_BYTES = 512 * 2**20
READ = "read-kv"
# Issue 30's goals: int8 decode against the float16 cache (MHA, GQA) and against the read of its bytes (MHA)
GOALS = dict(mha_vs_float16=1.8, gqa_vs_float16=1.6, mha_of_read=0.85)


def row_bytes(dtype: str, head_dim: int) -> int:
    """Bytes of one K (or V) row of a cache of ``dtype``."""
    if dtype in tvm_attn.KV_DTYPES:
        return head_dim + 4
    return head_dim * np.dtype(numpy_dtype(dtype)).itemsize


def _layers(dtype, k, v, rotate_bytes):
    """Caches of ``dtype`` holding k, v (1, kv_heads, n, head_dim float32), as many as make rotate_bytes."""
    _, kv_heads, n, head_dim = k.shape
    per_layer = 2 * kv_heads * n * row_bytes(dtype, head_dim)
    caches = []
    for _ in range(max(2, -(-rotate_bytes // per_layer))):
        cache = tvm_attn.KVCache(1, kv_heads, head_dim, n, dtype=dtype)
        cache.append(*(x.astype(numpy_dtype(cache.input_dtype)) for x in (k, v)))
        caches.append(cache)
    return caches, per_layer


def integer_kv_study(shapes=SHAPES, lengths=LENGTHS, head_dim: int = HEAD_DIM, dtypes=DTYPES,
                     rotate_bytes: int = ROTATE_BYTES, min_seconds: float = 0.5, seed: int = 0, log=None) -> list:
    """Rows: per (shape, length) each cache dtype's decode step (flash, causal, one query) and read-kv."""
    rng = np.random.default_rng(seed)
    rows = []
    for heads, kv_heads in shapes:
        for n in lengths:
            k = rng.standard_normal((1, kv_heads, n, head_dim), np.float32)
            v = rng.standard_normal((1, kv_heads, n, head_dim), np.float32)
            q = rng.standard_normal((1, heads, 1, head_dim), np.float32)
            fns, nbytes, outs, inputs = {}, {}, {}, {READ: ""}
            for dtype in dtypes:
                caches, nbytes[dtype] = _layers(dtype, k, v, rotate_bytes)
                inputs[dtype] = caches[0].input_dtype
                qd = q.astype(numpy_dtype(inputs[dtype]))
                outs[dtype] = np.empty_like(qd)
                turn = itertools.cycle(caches)
                fns[dtype] = lambda turn=turn, qd=qd, out=outs[dtype]: next(turn).attend(qd, out=out)
                if dtype in tvm_attn.KV_DTYPES:
                    codes = [c.buffers for c in caches]  # K's codes in blocks of positions, V's by position
                    shape = reader(codes[0][0].nbytes)
                    if shape is not None:
                        read_sum, sums = parallel_sum(*shape), np.empty((shape[0], 8, 16), np.float32)
                        views = itertools.cycle([tuple(x.reshape(-1).view(np.float32).reshape(shape) for x in kv)
                                                 for kv in codes])
                        fns[READ] = lambda views=views, f=read_sum, s=sums: [f(x, s) for x in next(views)]
                        nbytes[READ] = 2 * codes[0][0].nbytes
            for fn in fns.values():  # every kernel built before timing
                fn()
            for dtype in dtypes[1:]:  # the same step: each cache's output against float32's, within its rounding
                tolerance = 3e-2 if dtype in tvm_attn.KV_DTYPES else 1e-2
                if not np.allclose(outs[dtype].astype(np.float32), outs[dtypes[0]], atol=tolerance):
                    raise RuntimeError(f"integer_kv study: the {dtype} cache's output differs from "
                                       f"{dtypes[0]}'s by {np.abs(outs[dtype] - outs[dtypes[0]]).max():.2e}")
            timings = measure_interleaved(fns, min_seconds=min_seconds)
            label = decode_label(kv_heads, heads)
            for name, t in timings.items():
                rows.append(dict(study="integer_kv", x_name="seq_kv", x=n, line=f"{label} {name}", variant="flash",
                                 provider=READ if name == READ else "tvm_attn", dtype=inputs[name],
                                 distribution="gaussian", batch=1, heads=heads, kv_heads=kv_heads, seq_q=1,
                                 seq_kv=n, head_dim=head_dim, causal=True, median_ms=t.median_ms, q25_ms=t.q25_ms,
                                 q75_ms=t.q75_ms, repeats=t.repeats, bytes_kv=nbytes[name],
                                 gbs=nbytes[name] / t.median_ms / 1e6))
                if log is not None:
                    print(f"integer_kv {label} seq_kv={n} {name}: {t.median_ms:.3f} ms "
                          f"({nbytes[name] / t.median_ms / 1e6:.1f} GB/s)", file=log, flush=True)
    return rows


def integer_kv_section(rows, ctx) -> list[str]:
    """The report's part for the integer-cache study (rows of study "integer_kv")."""
    from .formatting import pick, table

    rs = pick(rows, study="integer_kv")
    if not rs:
        return []
    first = rs[0]
    parts = ["## Integer KV caches: decode from int8 K and V", "",
             f"One decode step (flash, causal, one query) through a `KVCache` of each dtype holding the same keys, "
             f"head_dim {int(first['head_dim'])}, every dtype's caches rotated over {ROTATE_BYTES >> 20} MB of "
             "layers so K and V come from memory; int8 stores codes and a float32 scale per row "
             "(`tvm_attn.quantized_kv`) and its decode kernel reads them as they are. read-kv: a plain read of the "
             "int8 codes in the same interleaved round. GB/s: the bytes of K and V as stored over the time.", ""]
    verdicts = []
    for heads, kv_heads in dict.fromkeys((int(r["heads"]), int(r["kv_heads"])) for r in rs):
        sub = [r for r in rs if int(r["heads"]) == heads and int(r["kv_heads"]) == kv_heads]
        names = list(dict.fromkeys(r["line"].split(") ", 1)[1] for r in sub))
        body = []
        ratios = []
        for n in sorted({int(r["x"]) for r in sub}):
            at = {r["line"].split(") ", 1)[1]: r for r in sub if int(r["x"]) == n}
            cells = [str(n)] + [f"{at[m]['median_ms']:.3f} ({at[m]['gbs']:.0f} GB/s)" if m in at else "-"
                                for m in names]
            int8, f16, read = at.get("int8"), at.get("float16"), at.get(READ)
            vs16 = f16["median_ms"] / int8["median_ms"] if int8 and f16 else None
            share = read["median_ms"] / int8["median_ms"] if int8 and read else None
            ratios.append((vs16, share))
            cells += ["-" if vs16 is None else f"{vs16:.2f}x", "-" if share is None else f"{100 * share:.0f}%"]
            body.append(cells)
        label = decode_label(kv_heads, heads)
        parts += [f"**{heads} query heads, {label}**", "",
                  table(["seq_kv"] + [f"{m} ms" for m in names] + ["int8 vs float16", "int8 of read"], body), ""]
        mha = kv_heads == heads
        goal = GOALS["mha_vs_float16" if mha else "gqa_vs_float16"]
        low = min((r for r, _ in ratios if r is not None), default=None)
        if low is not None:
            verdicts.append(f"{label} int8 vs float16 {low:.2f}x at worst (goal >= {goal:g}x: "
                            f"{'met' if low >= goal else 'not met'})")
        if mha:
            share = min((s for _, s in ratios if s is not None), default=None)
            if share is not None:
                met = "met" if share >= GOALS["mha_of_read"] else "not met"
                verdicts.append(f"{label} {100 * share:.2f}% of the read at worst (goal >= "
                                f"{100 * GOALS['mha_of_read']:.0f}%: {met})")
    if verdicts:
        parts += ["Goals (issue 30): " + "; ".join(verdicts) + ".", ""]
    return parts
