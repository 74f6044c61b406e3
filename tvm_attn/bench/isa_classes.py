"""The report's section per ISA class: the headline ratios of every run of this machine held to an ISA class
(``bench/results/<key>`` for its own, ``<key>-<isa>`` for ``--isa``), side by side, and the Apple M estimate
(``bench/results/apple-estimate.csv``, from ``python -m tvm_attn.bench.apple_estimate``). Every figure is a ratio
within one point of its run (the kernel against torch, the sgemm or the plain read timed in the same rounds)."""

from __future__ import annotations

import os

from ..spec import DTYPE
from . import apple_estimate
from .formatting import load, one, pick, ratio, table
from .isa import ISAS
from .sections import Point
from .studies import with_dtype

SEQS = (512, 1024, 2048)
CAUSAL_SEQS = (1024, 2048, 4096)


def sibling_runs(out_dir: str) -> list[tuple[str, str]]:
    """(ISA class, results.csv) of the runs of this machine beside ``out_dir`` (itself included), native first."""
    parent, name = os.path.split(os.path.abspath(out_dir))
    base = next((name.removesuffix(f"-{isa}") for isa in ISAS if isa != "native" and name.endswith(f"-{isa}")),
                name)
    runs = []
    for isa in ISAS:
        path = os.path.join(parent, base if isa == "native" else f"{base}-{isa}", "results.csv")
        if os.path.exists(path):
            runs.append((isa, path))
    return runs


def _joined(values) -> str:
    shown = list(values)
    return " / ".join(shown) if any(v != "-" for v in shown) else "-"


def _of_sgemm(rows, study: str, line: str, x) -> str:
    share = Point.at(pick(rows, study=study), x, line).sgemm_share()
    return "-" if share is None else f"{100 * share:.0f}%"


def _vs_torch(rows, study: str, line: str, x) -> str:
    point = Point.at(pick(rows, study=study), x, line)
    return ratio(point["hand"], point["torch-sdpa"])


def _of_read(rows, line: str) -> str:
    """The range over seq_kv of a decode line's best schedule against the plain read of the same round."""
    decode = pick(rows, study="decode", line=line)
    shares = [s for s in (Point.at(decode, x, line).read_share() for x in sorted({r["x"] for r in decode}))
              if s is not None]
    return f"{100 * min(shares):.0f}%-{100 * max(shares):.0f}%" if shares else "-"


def _over_float32(rows, line: str, x) -> str:
    """A line's bfloat16 prefill against its float32 line, same rounds."""
    half, full = (one(rows, study="prefill_16bit", line=with_dtype(line, dtype), x=x, provider="hand")
                  for dtype in ("bfloat16", DTYPE))
    return ratio(half, full)


def headlines(rows) -> list[tuple[str, str]]:
    """(what, figures) of one run: prefill against the same-round sgemm and torch, causal, decode, bfloat16."""
    sweep_sgemm = [r["gflops"] for r in pick(rows, study="seq_sweep", provider="sgemm")]
    gqa_line = next((r["line"] for r in pick(rows, study="prefill_16bit") if r["line"].startswith("mqa ")
                     and r["dtype"] == DTYPE), None)
    return [
        ("same-round sgemm, GFLOP/s", f"{min(sweep_sgemm):.0f}-{max(sweep_sgemm):.0f}" if sweep_sgemm else "-"),
        ("flash, of the sgemm, seq 1024 / 2048", _joined(_of_sgemm(rows, "seq_sweep", "flash", x) for x in SEQS[1:])),
        ("flash vs torch SDPA, seq 512 / 1024 / 2048", _joined(_vs_torch(rows, "seq_sweep", "flash", x) for x in SEQS)),
        ("mqa (1 KV head), of the sgemm, seq 1024 / 2048",
         _joined(_of_sgemm(rows, "seq_sweep", "mqa (kv_heads=1)", x) for x in SEQS[1:])),
        ("causal flash vs torch SDPA (bottom-right mask), seq 1024 / 2048 / 4096",
         _joined(_vs_torch(rows, "causal", "flash", x) for x in CAUSAL_SEQS)),
        ("decode MHA float32, of the same-round read, 1k-32k keys", _of_read(rows, "kv_heads=32 (MHA)")),
        ("decode GQA (8 KV heads) float32, of the same-round read", _of_read(rows, "kv_heads=8 (GQA)")),
        ("causal prefill bfloat16 vs float32: flash d64 / GQA d128, seq 2048",
         _joined([_over_float32(rows, "flash", 2048), _over_float32(rows, gqa_line, 2048) if gqa_line else "-"])),
    ]


def _label(isa: str, rows) -> str:
    """e.g. "native: x86_64-avx512 (x86_64-znver5 code)"."""
    from ..targets import capabilities, target_from_key

    target = target_from_key(rows[0]["target"])
    return f"{isa}: {capabilities(target).isa_class} ({rows[0]['target']} code)" if target else isa


def _span(shares) -> str:
    low, high = f"{min(shares):.0%}", f"{max(shares):.0%}"
    return low if low == high else f"{low}-{high}"


def _apple_summary(path: str) -> list[str]:
    estimates = apple_estimate.read_csv(path)
    chips = sorted({e.chip for e in estimates})
    body = []
    for kernel in dict.fromkeys(e.kernel for e in estimates):
        cells = []
        for chip in chips:
            loops = [e for e in estimates if e.kernel == kernel and e.chip == chip and e.is_matmul]
            cells.append(" / ".join(_span([e.fma_share(m) for e in loops]) for m in apple_estimate.MODELS)
                         if loops else "-")
        body.append([kernel, *cells])
    return ["**Apple M: an estimate, not a measurement** (`python -m tvm_attn.bench.apple_estimate`, "
            "`apple-estimate.md`): the share of the 4 x 128-bit FMA pipes the register-blocked matmul loops of each "
            "kernel keep busy per llvm-mca, under LLVM's Apple (Cyclone) model / Neoverse-V2's (float32 unless "
            "named; bfloat16 runs bfdot on M2 and later, twice the multiply-adds of an fmla; float16 decode's q·k "
            "runs fmlal, as many as an fmla, with no conversions).", "",
            table(["kernel", *chips], body), ""]


def isa_classes_section(rows, ctx) -> list[str]:
    """## ISA classes: this machine's runs per ISA class side by side, then the Apple estimate."""
    runs = [(isa, rows if os.path.abspath(os.path.dirname(path)) == os.path.abspath(ctx.out_dir) else load(path))
            for isa, path in sibling_runs(ctx.out_dir)]
    apple = os.path.join(os.path.dirname(os.path.abspath(ctx.out_dir)), "apple-estimate.csv")
    if len(runs) < 2 and not os.path.exists(apple):
        return []
    parts = ["## ISA classes", "",
             "The same studies on this machine held to each ISA class (`python -m tvm_attn.bench --isa CLASS`: "
             "kernels built for the class, torch and the sgemm held to it; each run's own report has the details). "
             "Ratios within one point of each run.", ""]
    if runs:
        figures = [(_label(isa, run_rows), dict(headlines(run_rows))) for isa, run_rows in runs]
        parts += [table(["", *(label for label, _ in figures)],
                        [[what, *(f[what] for _, f in figures)] for what in figures[0][1]]), ""]
    if os.path.exists(apple):
        parts += _apple_summary(apple)
    return parts
