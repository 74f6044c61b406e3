"""The float64 references against a row-by-row implementation written from the definitions."""

from __future__ import annotations

import numpy as np
import pytest

import tvm_attn
from conftest import make_inputs


def _row_by_row(variant, spec, q, k, v):
    out = np.zeros(spec.q_shape)
    for b in range(spec.batch):
        for h in range(spec.heads):
            kh = h // (spec.heads // spec.kv_heads)
            for i in range(spec.seq_q):
                n = spec.visible_keys(i)
                if n == 0:
                    continue
                s = np.array([spec.scale * float(np.dot(q[b, h, i].astype(float), k[b, kh, j].astype(float)))
                              for j in range(n)])
                p = np.exp(s - s.max())
                p /= p.sum()
                if variant == "threshold":
                    keep = [j for j in range(n) if p[j] >= spec.threshold or s[j] == s.max()]
                elif variant == "topk":
                    keep = sorted(range(n), key=lambda j: (-s[j], j))[: spec.top_k]
                else:
                    keep = list(range(n))
                w = p[keep] / p[keep].sum()
                out[b, h, i] = w @ v[b, kh, keep].astype(float)
    return out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("variant,knobs", [("standard", {}), ("threshold", {"threshold": 0.1}), ("topk", {"top_k": 3})])
def test_reference_matches_definition(variant, knobs, causal):
    spec = tvm_attn.AttentionSpec(batch=1, heads=4, kv_heads=2, seq_q=9, seq_kv=6, head_dim=8, causal=causal,
                                  **knobs)
    q, k, v = make_inputs(spec, seed=1, q_scale=2.0)
    np.testing.assert_allclose(tvm_attn.reference(q, k, v, variant=variant, causal=causal, **knobs),
                               _row_by_row(variant, spec, q, k, v), rtol=1e-12, atol=1e-12)


def test_topk_ties_go_to_the_lower_key_index():
    spec = tvm_attn.AttentionSpec(batch=1, heads=1, seq_q=2, seq_kv=6, head_dim=4, top_k=2)
    q = np.zeros(spec.q_shape, np.float32)  # every score 0: all keys tie
    k = np.ones(spec.kv_shape, np.float32)
    v = np.arange(24, dtype=np.float32).reshape(spec.kv_shape)
    expected = v[0, 0, :2].mean(axis=0)
    for out in (tvm_attn.reference(q, k, v, variant="topk", top_k=2),
                tvm_attn.attention(q, k, v, variant="topk", top_k=2)):
        np.testing.assert_allclose(out[0, 0], np.stack([expected, expected]), rtol=1e-6)
