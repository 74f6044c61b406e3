"""The sparse_decode study: certified sparse decode (``bounded``, and exact top-k and threshold through the cache's
int8 shadow of K) against dense flash decode on the same KVCache, on K/V captured from a real model and on synthetic
peaked caches.

Real data: SmolLM2-135M-Instruct reads 8192 tokens of real text (GPL-3 then LGPL-2.1) in one causal forward pass;
every layer's K and V (after RoPE) fill a KVCache, and its queries of the last positions are the decode rows. A
decode step attends the newest position's query in each of the 30 layers in turn (30 caches, 377 MB: K/V come from
memory, not the CPU caches, as in a model). Synthetic: gaussian K and V with a sharpened gaussian q (peaked
softmax), at 16k and 32k keys, SmolLM2's head shape, several layers.

Per eps: time per layer (interleaved with flash, same caches), kept fraction (the float64 reference's rule, which
the kernel's output matches), bytes read per step (shadow + kept K and V rows, against all of K and V), error
against dense attention, and the certificate |out - dense| <= 2 eps max|v| checked on the last ROWS query positions
of every layer. Top-k 64 and threshold 0.001 through the shadow (exact: their error against their own float64
reference), beside the same variants' own decode kernels on a cache without a shadow. Also what the shadow costs:
append time with and without it, and its memory.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

import tvm_attn
from tvm_attn import certificate, references
from tvm_attn.timing import measure_interleaved

EPS = (0.01, 0.05, 0.2)
EXACT = (("topk 64", "topk", {"top_k": 64}), ("threshold 0.001", "threshold", {"threshold": 0.001}))
TEXTS = (Path("/usr/share/common-licenses/GPL-3"), Path("/usr/share/common-licenses/LGPL-2.1"))
REAL_TOKENS = 8192
ROWS = 16  # query positions per layer whose outputs are checked (the last ones)
SYNTHETIC = ((16384, 8), (32768, 4))  # (keys, layers)
SHAPE = dict(heads=9, kv_heads=3, head_dim=64)  # SmolLM2-135M's attention
PEAK = 4.0  # synthetic q scale: scores of std 4 logits


def capture_smollm2(tokens: int = REAL_TOKENS, rows: int = ROWS, texts=TEXTS) -> list[tuple]:
    """Per layer of SmolLM2-135M reading ``tokens`` tokens of ``texts``: (q of the last ``rows`` positions, K, V) as
    float32 numpy arrays (1, heads, rows, 64) and (1, kv_heads, tokens, 64)."""
    import torch
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from .. import hf

    model, tokenizer = hf.load_smollm2()
    ids = tokenizer("\n\n".join(p.read_text() for p in texts), return_tensors="pt").input_ids
    if ids.shape[1] < tokens:
        raise ValueError(f"{', '.join(map(str, texts))} hold {ids.shape[1]} tokens, fewer than tokens={tokens}")
    captured = {}

    def capture(module, query, key, value, attention_mask, **kwargs):
        captured[module.layer_idx] = tuple(np.array(x.detach().numpy()) for x in (query[:, :, -rows:], key, value))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("tvm_attn_capture", capture)
    AttentionMaskInterface.register("tvm_attn_capture", sdpa_mask)
    model.set_attn_implementation("tvm_attn_capture")
    with torch.no_grad():
        model(ids[:, :tokens], use_cache=False)
    return [captured[i] for i in sorted(captured)]


def synthetic(keys: int, layers: int, seed: int = 0) -> list[tuple]:
    """``layers`` of gaussian K, V and a peaked gaussian q (ROWS rows), SmolLM2's head shape."""
    rng = np.random.default_rng(seed)
    h, kvh, d = SHAPE["heads"], SHAPE["kv_heads"], SHAPE["head_dim"]
    return [((PEAK * rng.standard_normal((1, h, ROWS, d))).astype(np.float32),
             rng.standard_normal((1, kvh, keys, d), dtype=np.float32),
             rng.standard_normal((1, kvh, keys, d), dtype=np.float32)) for _ in range(layers)]


def _caches(layers, shadow: bool | None = None) -> list:
    caches = []
    for _, k, v in layers:
        cache = tvm_attn.KVCache(1, k.shape[1], k.shape[3], capacity=k.shape[2], shadow=shadow)
        cache.append(k, v)
        caches.append(cache)
    return caches


def _accuracy(layers, caches, eps: float) -> dict:
    """Over every layer's ROWS rows: kept fraction, error against dense, and the certificate's worst ratio
    max|out - dense| / (2 eps max|v|) per row (<= 1 when it holds)."""
    kept = visible = 0
    ratio, err, scale = 0.0, 0.0, 0.0
    for (q, k, v), cache in zip(layers, caches):
        spec = tvm_attn.AttentionSpec(batch=1, heads=q.shape[1], kv_heads=k.shape[1], seq_q=q.shape[2],
                                      seq_kv=k.shape[2], head_dim=k.shape[3], causal=True, eps=eps)
        out = cache.attend(q, variant="bounded", eps=eps).astype(np.float64)
        dense = references.dense(spec, q, k, v)
        keep = references.bounded_keep(spec, q, k)
        kept += keep.sum()
        visible += references.visible_mask(spec).sum() * spec.heads
        bound = 2 * eps * np.abs(v).max()
        ratio = max(ratio, float((np.abs(out - dense).max(axis=-1) / bound).max()))
        err += np.abs(out - dense).sum()
        scale += np.abs(dense).sum()
    return dict(kept_fraction=kept / visible, rel_err_dense=err / scale, certificate=ratio)


def _exactness(layers, caches, variant: str, knob: dict) -> dict:
    """Over every layer's ROWS rows: the kept fraction of the variant's own rule and the output's relative error
    against its float64 reference (float32 rounding only: the selection is exact)."""
    v_ = tvm_attn.get_variant(variant)
    kept = visible = 0
    err = scale = 0.0
    for (q, k, v), cache in zip(layers, caches):
        spec = tvm_attn.AttentionSpec(batch=1, heads=q.shape[1], kv_heads=k.shape[1], seq_q=q.shape[2],
                                      seq_kv=k.shape[2], head_dim=k.shape[3], causal=True, **knob)
        out = cache.attend(q, variant=variant, **knob).astype(np.float64)
        own = v_.reference(spec, q, k, v)
        kept += v_.keep(spec, q, k).sum()
        visible += references.visible_mask(spec).sum() * spec.heads
        err += np.abs(out - own).sum()
        scale += np.abs(own).sum()
    return dict(kept_fraction=kept / visible, rel_err_own=err / scale)


def _bytes_read(layers, eps: float | None) -> float:
    """Bytes a decode step reads per layer (the newest position's query): all of K and V for flash; the shadow
    (codes and per-block offsets and steps) plus the kept keys' K and V rows, per query head, for bounded."""
    total = 0.0
    for q, k, v in layers:
        n, d, kvh, heads = k.shape[2], k.shape[3], k.shape[1], q.shape[1]
        if eps is None:
            total += 2 * k.nbytes
            continue
        spec = tvm_attn.AttentionSpec(batch=1, heads=heads, kv_heads=kvh, seq_q=1, seq_kv=n, head_dim=d,
                                      causal=True, eps=eps)
        kept = references.bounded_keep(spec, q[:, :, -1:], k).sum()
        total += kvh * certificate.blocks(n) * (certificate.BLOCK * d + 8 * d) + kept * 2 * d * k.itemsize
    return total / len(layers)


def _shadow_costs(keys: int, min_seconds: float = 0.5) -> list[dict]:
    """Append time of one position to a cache of ``keys`` positions and of a ``keys``-position prefill, with and
    without the shadow, and the shadow's bytes against K and V's."""
    h, kvh, d = SHAPE["heads"], SHAPE["kv_heads"], SHAPE["head_dim"]
    rng = np.random.default_rng(1)
    k = rng.standard_normal((1, kvh, keys + 1, d), dtype=np.float32)
    rows = []
    for with_shadow in (False, True):
        cache = tvm_attn.KVCache(1, kvh, d, capacity=keys + 1, shadow=with_shadow)
        prefill = measure_interleaved({"prefill": lambda: (cache.truncate(0), cache.append(k[:, :, :keys],
                                                                                            k[:, :, :keys]))},
                                      min_seconds=min_seconds)["prefill"]
        cache.truncate(0)
        cache.append(k[:, :, :keys], k[:, :, :keys])
        step = measure_interleaved({"step": lambda: (cache.truncate(keys), cache.append(k[:, :, keys:],
                                                                                        k[:, :, keys:]))},
                                   min_seconds=min_seconds)["step"]
        label = "with shadow" if with_shadow else "no shadow"
        for what, timing, n in (("append 1 position", step, keys + 1), (f"append {keys} positions", prefill, keys)):
            rows.append(dict(line=f"{what}, {label}", x_name="seq_kv", x=n, median_ms=timing.median_ms,
                             q25_ms=timing.q25_ms, q75_ms=timing.q75_ms, repeats=timing.repeats))
        memory = cache.shadow.nbytes if with_shadow else sum(b.nbytes for b in cache.buffers)
        rows.append(dict(line="memory: the shadow" if with_shadow else "memory: K and V", x_name="seq_kv",
                         x=keys + 1, bytes_kv=memory))
    return [dict(study="sparse_decode", distribution="shadow cost", variant="bounded", provider="tvm_attn KVCache",
                 batch=1, heads=h, kv_heads=kvh, head_dim=d, seq_q=1, **r) for r in rows]


def sparse_decode_study(real: bool = True, synthetic_sets=SYNTHETIC, min_seconds: float = 1.0,
                        shadow_cost_keys: int = REAL_TOKENS, log=None) -> list[dict]:
    """The study's rows (see the module docstring). ``real``: include the SmolLM2 capture (needs the model)."""
    sets = []
    if real:
        t0 = time.perf_counter()
        sets.append((f"SmolLM2-135M K/V, {REAL_TOKENS} tokens of text", capture_smollm2()))
        if log:
            print(f"sparse_decode: captured SmolLM2's q/k/v in {time.perf_counter() - t0:.0f} s", file=log,
                  flush=True)
    for keys, n_layers in synthetic_sets:
        sets.append((f"synthetic peaked (q x{PEAK:g}), {n_layers} layers", synthetic(keys, n_layers)))
    rows = []
    for name, layers in sets:
        caches = _caches(layers)
        newest = [np.ascontiguousarray(q[:, :, -1:]) for q, _, _ in layers]

        def step(cs, variant, **knob):
            def run():
                for cache, q in zip(cs, newest):
                    cache.attend(q, variant=variant, **knob)
            return run

        plain = _caches(layers, shadow=False)
        lines = {"flash": (step(caches, "flash"), "flash", {})}
        lines.update({f"bounded eps={eps:g}": (step(caches, "bounded", eps=eps), "bounded", {"eps": eps})
                      for eps in EPS})
        for label, variant, knob in EXACT:
            lines[f"{label} (shadow)"] = (step(caches, variant, **knob), variant, knob)
            lines[f"{label} (own kernel)"] = (step(plain, variant, **knob), variant, knob)
        for fn, _, _ in lines.values():
            fn()  # builds the kernels
        timings = measure_interleaved({label: fn for label, (fn, _, _) in lines.items()}, min_seconds=min_seconds)
        q, k, _ = layers[0]
        for label, (_, variant, knob) in lines.items():
            t = timings[label]
            row = dict(study="sparse_decode", distribution=name, line=label, variant=variant,
                       provider="tvm_attn KVCache", x_name="seq_kv", x=k.shape[2], batch=1, heads=q.shape[1],
                       kv_heads=k.shape[1], seq_q=1, seq_kv=k.shape[2], head_dim=k.shape[3], causal=True,
                       layers=len(layers), median_ms=t.median_ms / len(layers), q25_ms=t.q25_ms / len(layers),
                       q75_ms=t.q75_ms / len(layers), repeats=t.repeats, **knob)
            if variant == "flash":
                row["bytes_kv"] = _bytes_read(layers, None)
            elif variant == "bounded":
                row.update(_accuracy(layers, caches, knob["eps"]), bytes_kv=_bytes_read(layers, knob["eps"]))
            elif label.endswith("(shadow)"):
                row.update(_exactness(layers, caches, variant, knob))
            rows.append(row)
            if log:
                extra = "".join(f", {key} {row[key]:.3g}" for key in ("kept_fraction", "certificate", "rel_err_own")
                                if row.get(key) is not None)
                print(f"sparse_decode {name} {label}: {row['median_ms']:.3f} ms per layer "
                      f"({timings['flash'].median_ms / t.median_ms:.2f}x flash){extra}", file=log, flush=True)
    return rows + _shadow_costs(shadow_cost_keys)
