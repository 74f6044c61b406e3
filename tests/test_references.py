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
                elif variant == "mass":
                    keep, held = [], 0.0
                    for j in sorted(range(n), key=lambda j: (-s[j], j)):
                        if held >= 1 - spec.eps:
                            break
                        keep.append(j)
                        held += p[j]
                else:
                    keep = list(range(n))
                w = p[keep] / p[keep].sum()
                out[b, h, i] = w @ v[b, kh, keep].astype(float)
    return out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("variant,knobs", [("standard", {}), ("threshold", {"threshold": 0.1}), ("topk", {"top_k": 3}),
                                           ("mass", {"eps": 0.2})])
def test_reference_matches_definition(variant, knobs, causal):
    spec = tvm_attn.AttentionSpec(batch=1, heads=4, kv_heads=2, seq_q=9, seq_kv=6, head_dim=8, causal=causal,
                                  **knobs)
    q, k, v = make_inputs(spec, seed=1, q_scale=2.0)
    np.testing.assert_allclose(tvm_attn.reference(q, k, v, variant=variant, causal=causal, **knobs),
                               _row_by_row(variant, spec, q, k, v), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant,knobs,kept", [("topk", {"top_k": 2}, 2), ("mass", {"eps": 0.6}, 3)])
def test_ties_go_to_the_lower_key_index(variant, knobs, kept):
    """Every score equal (weights 1/6): top-2 keeps keys 0-1; mass with 1 - eps = 0.4 needs 3 keys, 0-2."""
    spec = tvm_attn.AttentionSpec(batch=1, heads=1, seq_q=2, seq_kv=6, head_dim=4, **knobs)
    q = np.zeros(spec.q_shape, np.float32)
    k = np.ones(spec.kv_shape, np.float32)
    v = np.arange(24, dtype=np.float32).reshape(spec.kv_shape)
    expected = v[0, 0, :kept].mean(axis=0)
    for out in (tvm_attn.reference(q, k, v, variant=variant, **knobs),
                tvm_attn.attention(q, k, v, variant=variant, **knobs)):
        np.testing.assert_allclose(out[0, 0], np.stack([expected, expected]), rtol=1e-6)


@pytest.mark.parametrize("eps", [0.01, 0.05, 0.2, 0.5])
@pytest.mark.parametrize("q_scale", [1.0, 4.0], ids=["gaussian", "peaked"])
def test_mass_error_is_bounded_by_two_eps_max_v(eps, q_scale):
    """|mass - dense| <= 2 eps max_j |v_j| per element (proof in references.mass), for kernel and reference."""
    spec = tvm_attn.AttentionSpec(batch=1, heads=4, kv_heads=2, seq_q=40, seq_kv=300, head_dim=32, causal=True,
                                  eps=eps)
    q, k, v = make_inputs(spec, seed=7, q_scale=q_scale)
    dense = tvm_attn.reference(q, k, v, causal=True)
    bound = 2 * eps * np.abs(v).max(axis=2, keepdims=True).repeat(2, axis=1)  # max over keys, per KV head
    for out in (tvm_attn.reference(q, k, v, variant="mass", eps=eps, causal=True),
                tvm_attn.attention(q, k, v, variant="mass", eps=eps, causal=True)):
        assert (np.abs(out - dense) <= bound + 1e-5).all()
