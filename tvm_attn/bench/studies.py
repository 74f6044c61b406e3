"""The benchmark, declared as data: each Study is one question of the seed report (or one it left out), with its
x axis, the variants (label, registry name, fixed knobs), the providers and the input distributions."""

from __future__ import annotations

import dataclasses

from ..plan import (DECODE_KV_HEADS, DECODE_SHAPE, GQA_PREFILL_SHAPE, HALF_DTYPES, KNOB_DEFAULTS, KNOB_SWEEPS,
                    PREFILL_SHAPE, QUICK_DECODE_SHAPE, QUICK_GQA_PREFILL_SHAPE, QUICK_KNOB_SWEEPS, QUICK_PREFILL_SHAPE,
                    QUICK_TUNING_LENGTH, TUNING_LENGTH)
from ..spec import DTYPE, KNOBS
from ..variants import get_variant


@dataclasses.dataclass(frozen=True)
class Line:
    """One curve: a registry variant with fixed spec fields (e.g. mqa = kv_heads 1)."""

    label: str
    variant: str
    fields: tuple = ()  # (name, value) pairs of AttentionSpec fields

    def spec_fields(self) -> dict:
        return dict(self.fields)


@dataclasses.dataclass(frozen=True)
class Study:
    name: str
    question: str
    x_name: str  # an AttentionSpec field ("seq_q" sets seq_kv too) or a knob ("threshold", "top_k", "eps")
    x_vals: tuple
    lines: tuple
    providers: tuple
    base: tuple = tuple(PREFILL_SHAPE.items())
    distributions: tuple = ("gaussian",)
    slow_providers_max_x: int | None = None  # untuned/numpy only up to this x (they take seconds per call)
    sgemm_min_x: int | None = None  # the same-round sgemm ceiling (provider "sgemm") from this x on
    # Replicate the inputs into as many "layers" as make this many bytes of K and V, called in turn, so that a call
    # finds its K and V in memory, not in the CPU caches, as in a model's decode step (0: one set of inputs).
    rotate_bytes: int = 0
    # Time the lines that differ only in dtype in one interleaved round (not line after line), so a 16-bit line's
    # ratio to its float32 line is as trustworthy as ratios between providers. (All lines of a decode point at
    # once would hold ~20 GB of rotated inputs and numpy's repeated K/V.)
    interleave_dtypes: bool = False
    # Time all lines of an x in one interleaved round, so that ratios between lines (causal against no mask) are
    # within a round too.
    interleave_lines: bool = False

    def round_key(self, line: Line, x, dist) -> tuple:
        """Points with equal keys are timed in one interleaved round."""
        if self.interleave_lines:
            return (self.name, x, dist)
        fields = tuple(f for f in line.fields if f[0] != "dtype") if self.interleave_dtypes else line.label
        return (self.name, x, dist, line.variant, fields)

    def varies(self, line: Line) -> bool:
        """Whether x sets a field of this line's spec: a knob sweep does not vary its dense baselines."""
        return self.x_name not in KNOBS or get_variant(line.variant).knob == self.x_name

    def measures(self, line: Line, x) -> bool:
        """Whether the point (line, x) is timed: lines that x does not vary only at the first x."""
        return self.varies(line) or x == self.x_vals[0]


DENSE_LINES = (
    Line("standard", "standard"),
    Line("flash", "flash"),
    Line("mqa (kv_heads=1)", "mqa", (("kv_heads", 1),)),
)
PRUNED_LINES = (
    Line(f"threshold {KNOB_DEFAULTS['threshold']:g}", "threshold", (("threshold", KNOB_DEFAULTS["threshold"]),)),
    Line(f"topk {KNOB_DEFAULTS['top_k']}", "topk", (("top_k", KNOB_DEFAULTS["top_k"]),)),
)
BASELINES = (Line("standard", "standard"), Line("flash", "flash"))
DECODE_ROTATE_BYTES = 512 * 2**20  # well past any L3 these VMs have


def decode_label(kv_heads: int, heads: int) -> str:
    kind = "MHA" if kv_heads == heads else "MQA" if kv_heads == 1 else "GQA"
    return f"kv_heads={kv_heads} ({kind})"


def with_dtype(label: str, dtype: str) -> str:
    """A line label with its dtype named unless float32."""
    return label if dtype == DTYPE else f"{label} {dtype}"
NO_MASK = "flash (no mask)"


def _knob_study(name: str, question: str, knob: str, variant: str, x_vals: tuple, seq: int, base: tuple) -> Study:
    """One pruning knob swept at one seq, beside the dense baselines, on gaussian and peaked inputs."""
    lines = (Line(variant, variant, (("seq_q", seq),)),) + tuple(
        Line(b.label, b.variant, (("seq_q", seq),)) for b in BASELINES)
    return Study(name, question, knob, x_vals, lines, ("hand", "tuned"), base, distributions=("gaussian", "peaked"))


def default_studies(quick: bool = False) -> list[Study]:
    """The default studies (a few minutes on 2 cores), or with ``quick`` reduced ones on tiny shapes."""
    seqs = (64, 128) if quick else (128, 256, 512, 1024, 2048)
    mid = (QUICK_TUNING_LENGTH if quick else TUNING_LENGTH)["prefill"]  # the knob sweeps' seq
    base = tuple((QUICK_PREFILL_SHAPE if quick else PREFILL_SHAPE).items())
    decode = QUICK_DECODE_SHAPE if quick else DECODE_SHAPE
    sweeps = QUICK_KNOB_SWEEPS if quick else KNOB_SWEEPS
    all_providers = ("hand", "tuned", "untuned", "numpy", "torch-sdpa", "sgemm")
    sgemm_min_x = seqs[-1] if quick else 1024  # where prefill is measured against the matmul ceiling
    gqa = QUICK_GQA_PREFILL_SHAPE if quick else GQA_PREFILL_SHAPE
    gqa_label = f"mqa {gqa['heads']}/{gqa['kv_heads']} heads d{gqa['head_dim']}"
    return [
        Study("seq_sweep", "Speedup vs sequence length; timing, memory and accuracy of every variant",
              "seq_q", seqs, DENSE_LINES + PRUNED_LINES, all_providers, base,
              slow_providers_max_x=128 if quick else 512, sgemm_min_x=sgemm_min_x),
        _knob_study("threshold_effect", "Effect of the pruning threshold: time, kept fraction, error",
                    "threshold", "threshold", sweeps["threshold"], mid, base),
        _knob_study("topk_effect", "Effect of top-k: time, kept fraction, error",
                    "top_k", "topk", sweeps["top_k"], mid, base),
        _knob_study("mass_effect", "Error-bounded pruning: eps against time, kept fraction and error",
                    "eps", "mass", sweeps["eps"], mid, base),
        Study("causal", "Causal attention (LLM prefill), the case the seed left out",
              "seq_q", seqs[-2:] if quick else (512, 1024, 2048, 4096),
              tuple(Line(l.label, l.variant, l.fields + (("causal", True),)) for l in DENSE_LINES)
              + (Line(NO_MASK, "flash"),),  # measured in the same points, for the causal speedup
              ("hand", "tuned", "torch-sdpa", "sgemm"), base, sgemm_min_x=sgemm_min_x, interleave_lines=True),
        Study("blas_prefill", "Prefill with each tile's two matmuls in the platform's BLAS (schedule='blas', as torch "
              "does), against the TensorIR schedules and torch SDPA",
              "seq_q", seqs[-2:] if quick else (512, 1024, 2048, 4096),
              (Line("flash", "flash"), Line("flash causal", "flash", (("causal", True),))),
              ("blas", "hand", "tuned", "torch-sdpa", "sgemm"), base, sgemm_min_x=sgemm_min_x, interleave_lines=True),
        Study("decode", "Decode: one query against a KV cache (seq_q = 1), a Llama-7B-like layer",
              "seq_kv", (128, 512) if quick else (1024, 2048, 4096, 8192, 16384, 32768),
              tuple(Line(with_dtype(decode_label(kvh, decode["heads"]), dtype), "flash",
                         (("seq_q", 1), ("causal", True), ("kv_heads", kvh), ("dtype", dtype)))
                    for kvh in DECODE_KV_HEADS for dtype in (DTYPE,) + HALF_DTYPES),
              ("hand", "tuned", "numpy", "torch-sdpa", "read-kv"), tuple(decode.items()),
              slow_providers_max_x=128 if quick else 4096, rotate_bytes=2**22 if quick else DECODE_ROTATE_BYTES,
              interleave_dtypes=True),
        Study("prefill_16bit", "Causal prefill with float16 and bfloat16 inputs, against torch SDPA in the same dtype",
              "seq_q", seqs[-1:] if quick else (512, 1024, 2048),
              tuple(Line(with_dtype(label, dtype), variant, fields + (("causal", True), ("dtype", dtype)))
                    for label, variant, fields in (("flash", "flash", ()), (gqa_label, "mqa", tuple(gqa.items())))
                    for dtype in (DTYPE,) + HALF_DTYPES),
              ("hand", "tuned", "torch-sdpa"), base, interleave_dtypes=True),
    ]
