"""torch CPU tensors through tvm_attn.attention, the KV cache and the torch.ops.tvm_attn.attention operator."""

from __future__ import annotations

import numpy as np
import pytest

import tvm_attn
from conftest import knobs_for, output_tolerance

torch = pytest.importorskip("torch", reason="torch is optional: pip install torch")
import tvm_attn.torch_ops  # noqa: E402  (defines torch.ops.tvm_attn.attention)

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _inputs(heads=4, kv_heads=2, seq_q=9, seq_kv=13, head_dim=32, dtype="float32", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, seq_q, head_dim, generator=g).to(TORCH_DTYPES[dtype])
    k = torch.randn(1, kv_heads, seq_kv, head_dim, generator=g).to(TORCH_DTYPES[dtype])
    v = torch.randn(1, kv_heads, seq_kv, head_dim, generator=g).to(TORCH_DTYPES[dtype])
    return q, k, v


def _close(out: torch.Tensor, ref: np.ndarray, spec: tvm_attn.AttentionSpec, variant: str, v: torch.Tensor):
    rtol, atol = output_tolerance(spec, variant, v.float().numpy())
    np.testing.assert_allclose(out.float().numpy(), ref, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("variant", list(tvm_attn.VARIANTS))
def test_torch_in_torch_out(variant, dtype):
    # The kernels (4 heads over 2, head_dim 32, no mask, the first test knob) are those test_correctness and
    # test_half_precision build: cached, not compiled again.
    knob = knobs_for(variant)[0]
    q, k, v = _inputs(dtype=dtype)
    out = tvm_attn.attention(q, k, v, variant=variant, **knob)
    assert isinstance(out, torch.Tensor) and out.dtype == q.dtype and out.shape == q.shape
    ref = tvm_attn.reference(q, k, v, variant=variant, **knob)  # torch in, numpy float64 out
    spec = tvm_attn.AttentionSpec(batch=1, heads=4, kv_heads=2, seq_q=9, seq_kv=13, head_dim=32, dtype=dtype, **knob)
    _close(out, ref, spec, variant, v)


def test_transposed_and_expanded_tensors_are_read_in_place():
    # (B, S, H, D) projections viewed as (B, H, S, D), as transformers lays them out; a K expanded over batch.
    q = torch.randn(2, 7, 4, 16).transpose(1, 2)
    k = torch.randn(1, 2, 11, 16).expand(2, -1, -1, -1)
    v = torch.randn(2, 11, 2, 16).transpose(1, 2)
    out = torch.empty(2, 7, 4, 16)
    result = tvm_attn.attention(q, k, v, out=out.transpose(1, 2))
    assert result.data_ptr() == out.data_ptr()
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    torch.testing.assert_close(out.transpose(1, 2), expected, rtol=1e-5, atol=1e-5)


def test_mixed_numpy_and_torch_inputs_follow_q():
    q, k, v = _inputs()
    out = tvm_attn.attention(q.numpy(), k, v.numpy())
    assert isinstance(out, np.ndarray)
    out_t = tvm_attn.attention(q, k.numpy(), v)
    assert isinstance(out_t, torch.Tensor)
    np.testing.assert_array_equal(out, out_t.numpy())


def test_kv_cache_with_torch_tensors():
    q, k, v = _inputs(seq_q=1, seq_kv=20, dtype="bfloat16")
    cache = tvm_attn.KVCache(batch=1, kv_heads=2, head_dim=32, capacity=32, dtype="bfloat16")
    cache.append(k[:, :, :19], v[:, :, :19])
    cache.append(k[:, :, 19:], v[:, :, 19:])
    out = cache.attend(q, variant="flash")
    assert isinstance(out, torch.Tensor) and out.dtype == torch.bfloat16
    np.testing.assert_array_equal(out.float().numpy(),
                                  tvm_attn.attention(q, k, v, causal=True).float().numpy())
    target = torch.empty_like(q)
    assert cache.attend(q, out=target) is target


def test_refused_tensors_name_the_argument():
    q, k, v = _inputs()
    with pytest.raises(TypeError, match="q requires grad.*no_grad"):
        tvm_attn.attention(q.requires_grad_(), k, v)
    with torch.no_grad():  # no graph is being built: fine
        tvm_attn.attention(q, k, v)
    q = q.detach()
    with pytest.raises(TypeError, match="k must be float32, float16 or bfloat16, got float64"):
        tvm_attn.attention(q, k.double(), v)
    with pytest.raises(TypeError, match="v is float16 but q is float32"):
        tvm_attn.attention(q, k, v.half())
    with pytest.raises(ValueError, match="out must be a writable float32 array or torch CPU tensor of shape"):
        tvm_attn.attention(q, k, v, out=torch.empty(1, 4, 9, 16))
    cache = tvm_attn.KVCache(batch=1, kv_heads=2, head_dim=32, capacity=32)
    with pytest.raises(TypeError, match="k must be float32 like the cache, got float16"):
        cache.append(k.half(), v.half())
    assert cache.length == 0
    with pytest.raises(ValueError, match="q is on meta: tvm_attn kernels run on the CPU"):
        tvm_attn.attention(torch.empty(1, 4, 9, 32, device="meta"), k, v)


def test_custom_op_matches_the_api_and_passes_opcheck():
    q, k, v = _inputs()
    out = torch.ops.tvm_attn.attention(q, k, v, "mass", True, eps=0.1)
    np.testing.assert_array_equal(out.numpy(), tvm_attn.attention(q, k, v, variant="mass", causal=True, eps=0.1))
    out = torch.ops.tvm_attn.attention(q, k, v, "flash", True, softcap=2.0)
    np.testing.assert_array_equal(out.numpy(), tvm_attn.attention(q, k, v, causal=True, softcap=2.0))
    torch.library.opcheck(torch.ops.tvm_attn.attention.default, (q, k, v, "flash", True))


def test_custom_op_has_no_backward():
    q, k, v = _inputs()
    out = torch.ops.tvm_attn.attention(q.requires_grad_(), k, v)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        out.sum().backward()


def test_custom_op_compiles_without_graph_breaks():
    # The claim in tvm_attn/torch_ops.py: torch.compile(fullgraph=True) with the default backend (inductor).
    q, k, v = _inputs()

    def f(q, k, v):
        return torch.ops.tvm_attn.attention(q * 2.0, k, v, "flash", True).sum(-1)

    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), f(q, k, v), rtol=1e-5, atol=1e-5)
