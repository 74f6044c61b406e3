"""The entry points: numpy in, numpy out; torch CPU tensors in, a torch tensor out."""

from __future__ import annotations

import numpy as np

from .kernel import build, host_array, optional_host_array
from .spec import AttentionSpec, sink_logits
from .variants import get_variant


def attention(q, k, v, *, variant: str = "flash", causal: bool = False, window: int | None = None,
              scale: float | None = None, threshold: float | None = None, top_k: int | None = None,
              eps: float | None = None, softcap: float | None = None, sinks=None, alibi_slopes=None, tree_parents=None,
              target="host", tuned: bool = True, schedule: str | None = None, out=None):
    """Attention of q (B, H, Sq, D), k and v (B, KVH, Skv, D), computed by a compiled kernel; returns an array of
    q's dtype, or fills ``out``. q, k, v share one dtype: float32, float16 or bfloat16 (ml_dtypes.bfloat16);
    scores, softmax and accumulation are float32 for all three. numpy arrays or torch CPU tensors (read in place
    through DLPack; with torch q the result is a torch tensor; no autograd).

    A kernel is compiled once per (variant, heads, kv_heads, head_dim, mask, knob) and its path (decode for a few
    query rows, prefill for more) and serves every batch and length. Arrays whose last axis is contiguous (strided
    views such as ``k_buf[:, :, :n]``, any element-aligned address) are read in place. ``tuned`` picks the best
    schedule available; ``tuned=False`` or ``schedule="hand"`` forces the variant's hand schedule;
    ``schedule="untuned"`` compiles the compute with no schedule (the slow reference the benchmarks compare
    against). ``softcap``: each score s becomes softcap * tanh(s / softcap) before the softmax (Gemma 2's logit
    softcapping). ``sinks``: one logit per query head (numpy or torch, shape (heads,)) that joins each row's softmax
    denominator as a key without a value (gpt-oss' attention sinks; README "Semantics" says how the pruned variants
    keep it). ``alibi_slopes``: one slope per query head (numpy, torch or a sequence); the score of query i and key j
    gains -slope * (i + seq_kv - seq_q - j) (ALiBi; the dense variants; a kernel per set of slopes).
    ``tree_parents`` (causal; the dense variants): the query rows are the nodes of a tree of draft tokens whose k and v
    are the last seq_q keys; entry i is node i's parent, -1 or an earlier node; each row sees the keys before the
    tree, its ancestors and itself (speculative decoding's tree verification in one call; AttentionSpec).
    """
    v_ = get_variant(variant)
    arrays = [host_array(n, x) for n, x in zip("qkv", (q, k, v))]
    spec = AttentionSpec.from_arrays(*arrays, causal=causal, window=window, scale=scale, threshold=threshold,
                                     top_k=top_k, eps=eps, softcap=softcap, sinks=sinks is not None,
                                     alibi_slopes=optional_host_array("alibi_slopes", alibi_slopes),
                                     tree_parents=optional_host_array("tree_parents", tree_parents))
    if schedule is None:
        schedule = "best" if tuned else "hand"
    return build(v_, spec, target=target, schedule=schedule).run_checked(spec, *arrays, out, like=q, sinks=sinks)


def reference(q, k, v, *, variant: str = "flash", causal: bool = False, window: int | None = None,
              scale: float | None = None, threshold: float | None = None, top_k: int | None = None,
              eps: float | None = None, softcap: float | None = None, sinks=None, alibi_slopes=None,
              tree_parents=None) -> np.ndarray:
    """The float64 numpy reference of ``variant`` (same arguments as ``attention``; returns numpy)."""
    v_ = get_variant(variant)
    q, k, v = (host_array(n, x) for n, x in zip("qkv", (q, k, v)))
    spec = AttentionSpec.from_arrays(q, k, v, causal=causal, window=window, scale=scale, threshold=threshold,
                                     top_k=top_k, eps=eps, softcap=softcap, sinks=sinks is not None,
                                     alibi_slopes=optional_host_array("alibi_slopes", alibi_slopes),
                                     tree_parents=optional_host_array("tree_parents", tree_parents))
    v_.check(spec)
    if sinks is None:
        return v_.reference(spec, q, k, v)
    sinks = host_array("sinks", sinks)
    sink_logits(sinks, spec.heads)  # the checks
    return v_.reference(spec, q, k, v, sinks=np.asarray(sinks, np.float64))
