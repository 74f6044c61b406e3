"""tvm_attn as a PyTorch operator: importing this module defines ``torch.ops.tvm_attn.attention``.

    import tvm_attn.torch_ops
    out = torch.ops.tvm_attn.attention(q, k, v, "flash", True)     # variant, causal; knobs by keyword

The operator has a fake (meta) implementation, so ``torch.compile(fullgraph=True)`` traces through it as one opaque
call (no graph break). It is inference-only: no autograd formula is registered, so a backward through it raises.
"""

from __future__ import annotations

import torch

from .api import attention as _attention


@torch.library.custom_op("tvm_attn::attention", mutates_args=(), device_types="cpu")
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, variant: str = "flash", causal: bool = False,
              window: int | None = None, scale: float | None = None, threshold: float | None = None,
              top_k: int | None = None, eps: float | None = None, softcap: float | None = None,
              sinks: torch.Tensor | None = None, alibi_slopes: torch.Tensor | None = None,
              tree_parents: torch.Tensor | None = None) -> torch.Tensor:
    """``tvm_attn.attention`` on torch CPU tensors q (B, H, Sq, D), k and v (B, KVH, Skv, D) (``sinks``: (H,) sink
    logits; ``alibi_slopes``: (H,) ALiBi slopes; ``tree_parents``: (Sq,) integer parents of a draft tree's nodes);
    returns a new contiguous (B, H, Sq, D) tensor of q's dtype."""
    return _attention(q, k, v, variant=variant, causal=causal, window=window, scale=scale, threshold=threshold,
                      top_k=top_k, eps=eps, softcap=softcap, sinks=sinks, alibi_slopes=alibi_slopes,
                      tree_parents=tree_parents)


@attention.register_fake
def _(q, k, v, variant="flash", causal=False, window=None, scale=None, threshold=None, top_k=None, eps=None,
      softcap=None, sinks=None, alibi_slopes=None, tree_parents=None):
    return q.new_empty(q.shape)
