"""report.md and the PNG plots, generated from results.csv alone: no figure is typed by hand.

The report is REPORT, in order: sections declared as data (``sections.Section``: a study's table columns and plots,
drawn by the one renderer ``Section.render``) and the few whose layout is their own (the preamble, the memory table,
the knob sweeps' two-panel figures, the trade-off plot, the bar chart, the model and sparse-decode studies)."""

from __future__ import annotations

import math
import os
from collections import defaultdict

from ..timing import MAX_SECONDS, SPREAD
from .ceiling import SAME_ROUND_SGEMM_N
from .formatting import best, knob_points, load, mb, ms, one, pct, pick, plot, ratio, sci, table, tuned_ms
from .features import features_section
from .integer_kv import integer_kv_section
from .isa_classes import isa_classes_section
from .serving import serving_section
from .sections import Column, Context, Plot, Section
from .sparse_decode import ROWS
from .studies import NO_MASK

# after .formatting, which selects matplotlib's Agg backend before pyplot loads
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

TUNED_IS_HAND = ("\"(hand)\" after a tuned time: that kernel's confirmed record is the hand schedule itself (tuning "
                 "found nothing faster on this machine), so the tuned time is the hand schedule measured again.")


DTYPE_STYLES = {"float32": "-", "float16": "--", "bfloat16": ":"}

TRADEOFF = (("threshold_effect", "threshold", "threshold"), ("topk_effect", "top_k", "top-k"),
            ("mass_effect", "eps", "mass"))
ERROR_BUDGETS = (0.01, 0.05, 0.10)


def _decode_intro(rs, ctx: Context) -> list[str]:
    shape = rs[0]
    parts = ["Inputs and KV cache in float32, or in float16/bfloat16 where the line says so (computed in "
             "float32 either way). "
             "GB/s = bytes of K and V (every key and value is read once) / median time. Each call reads a "
             f"different copy of the inputs ({int(shape['layers'])} copies at the shortest length, as many as "
             "make 512 MB), as a model's layers do, so that K and V come from memory, not the CPU caches. "
             "tvm_attn is the faster of the hand and tuned schedules (`schedule=\"best\"`); torch SDPA "
             "with `enable_gqa=True`, same threads."
             + (" \"of read\": a plain read of the same K and V bytes (a parallel sum, every thread; provider "
                "`read-kv`), timed in the same round as the kernels, divided by tvm_attn's time: the share of "
                "the machine's read rate of that minute, a ratio within the point." if pick(rs, provider="read-kv")
                else "")]
    if ctx.bandwidth:
        parts += ["", "Read bandwidth measured in this run: " + ", ".join(
            f"{r['provider']} {r['gbs']:.1f} GB/s" for r in ctx.readers) + f"; the percentages use "
            f"{ctx.bandwidth['gbs']:.1f} GB/s."]
    return parts


def _decode_series(line, points, rs) -> list:
    """tvm_attn's K+V read rate of one line, and torch's beside it for float32 lines (16-bit torch SDPA decode is
    in the table, < 5 GB/s); one colour per KV head count, one line style per dtype."""
    heads_colors = {h: f"C{i}" for i, h in enumerate(dict.fromkeys(r["kv_heads"] for r in rs))}
    first = one(rs, line=line)
    style = dict(color=heads_colors[first["kv_heads"]], linestyle=DTYPE_STYLES.get(first["dtype"], "-"))
    ours = [(p.x, p.best()["gbs"]) for p in points if p.best()]
    theirs = [(p.x, p["torch-sdpa"]["gbs"]) for p in points if p["torch-sdpa"]]
    series = [(f"tvm_attn {line}", [a for a, _ in ours], [b for _, b in ours], style)]
    if theirs and first["dtype"] == "float32":
        series.append((f"torch SDPA {line}", [a for a, _ in theirs], [b for _, b in theirs],
                       {**style, "marker": "x", "alpha": 0.6}))
    return series


DECODE = Section(
    "decode",
    lambda rs, ctx: (f"Decode (seq_q = 1): batch {int(rs[0]['batch'])}, {int(rs[0]['heads'])} query heads, head_dim "
                     f"{int(rs[0]['head_dim'])}"),
    intro=_decode_intro,
    by_line=True,
    columns=(
        Column("seq_kv", lambda p: p.x),
        Column("line", lambda p: p.line),
        Column("tvm_attn ms", lambda p: ms(p.best())),
        Column("GB/s", lambda p: f"{p.best()['gbs']:.1f}" if p.best() else "-"),
        Column("of bandwidth", lambda p: f"{100 * p.best()['gbs'] / p.ctx.bandwidth['gbs']:.0f}%"
               if p.best() and p.ctx.bandwidth else "-"),
        Column("of read", lambda p: "-" if p.read_share() is None else f"{100 * p.read_share():.0f}%"),
        Column("torch ms", lambda p: ms(p["torch-sdpa"])),
        Column("torch GB/s", lambda p: f"{p['torch-sdpa']['gbs']:.1f}" if p["torch-sdpa"] else "-"),
        Column("tvm_attn vs torch", lambda p: ratio(p.best(), p["torch-sdpa"])),
        Column("numpy ms", lambda p: ms(p["numpy"])),
        Column("rel err", lambda p: sci(p.best()["rel_err_dense"]) if p.best() else "-"),
    ),
    plots=(Plot("decode", "decode", "Decode: K+V read rate ({machine})", "seq_kv", "GB/s", series=_decode_series,
                hline=lambda ctx: (ctx.bandwidth["gbs"], f"read bandwidth ({ctx.bandwidth['provider']})")
                if ctx.bandwidth else None),),
    after=lambda rs, ctx: _half_precision_decode(rs, sorted({int(r["x"]) for r in rs})),
)


def _generation_section(rows, ctx: Context) -> list[str]:
    """The KVCache generation loop (bench/generation.py)."""
    gen = one(rows, study="generation")
    if not gen:
        return []
    return ["## A generation loop through KVCache", "",
            f"Prefill of {int(gen['seq_kv'] - gen['repeats'])} positions, then {int(gen['repeats'])} decode "
            f"steps (append one position, attend one query) at batch {int(gen['batch'])}, {int(gen['heads'])} "
            f"query heads, {int(gen['kv_heads'])} KV heads, head_dim {int(gen['head_dim'])}: prefill "
            f"{gen['prefill_ms']:.1f} ms; a step {gen['median_ms'] * 1e3:.0f} us (median), of which "
            f"{gen['overhead_us']:.1f} us outside the kernel (the step's time minus the time inside the call of the "
            f"kernel's runtime function in that step, median over steps); {int(gen['compiles'])} kernels "
            f"compiled during the loop.", ""]


def _half_precision_decode(rs, xs) -> list[str]:
    """How much faster a decode step is with a 16-bit cache than with a float32 one, per KV head count."""
    half = [r for r in rs if r.get("dtype") not in ("", "float32", None)]
    if not half:
        return []
    body = []
    for line in dict.fromkeys(r["line"] for r in half):
        kv_heads = one(half, line=line)["kv_heads"]  # the study's lines differ only in kv_heads and dtype
        for x in xs:
            fast, base = best(rs, x=x, line=line), best(rs, x=x, kv_heads=kv_heads, dtype="float32")
            body.append([x, line, ms(base), ms(fast), ratio(fast, base)])
    return ["### 16-bit KV caches", "",
            "The same decode step with float16 or bfloat16 q, K, V and output beside float32 (tvm_attn, best "
            "schedule), each 16-bit line timed interleaved with its float32 line: half the bytes, so up to 2x when "
            "the step is bandwidth-bound.", "",
            table(["seq_kv", "line", "float32 ms", "16-bit ms", "speedup"], body), ""]


SAME_KERNEL = ("variant", "provider", "distribution", "dtype", "batch", "heads", "kv_heads", "seq_q", "seq_kv",
               "head_dim", "causal", "threshold", "top_k", "eps")


def _noise_paragraph(rows) -> list[str]:
    """How noisy this run was: the spread of each timing, and the same kernel on the same inputs timed in
    different studies (different rounds, minutes apart)."""
    timed = [r for r in rows if r.get("q25_ms") is not None and r.get("median_ms") and r["study"] != "ceiling"]
    if not timed:
        return []
    spreads = sorted((r["q75_ms"] - r["q25_ms"]) / r["median_ms"] for r in timed)
    groups = defaultdict(list)
    for r in timed:
        if r.get("variant") and r.get("distribution"):
            groups[tuple(r.get(k) for k in SAME_KERNEL)].append(r)
    repeated = [g for g in groups.values() if len({r["study"] for r in g}) > 1]
    noisy = sum(x > SPREAD for x in spreads)
    text = (f"**Noise.** Interquartile range / median of the {len(timed)} timings: median "
            f"{100 * spreads[len(spreads) // 2]:.1f}%, {noisy} above {100 * SPREAD:g}% (the timer stopped at its "
            f"{MAX_SECONDS:g} s cap, or their 5 calls, before they settled).")
    if repeated:
        drift = [max(r["median_ms"] for r in g) / min(r["median_ms"] for r in g) for g in repeated]
        worst = repeated[max(range(len(drift)), key=drift.__getitem__)]
        text += (f" The same kernel on the same inputs timed in two studies (minutes apart), {len(repeated)} "
                 f"cases: they differ by {100 * (sorted(drift)[len(drift) // 2] - 1):.1f}% at the median, "
                 f"{100 * (max(drift) - 1):.1f}% at worst ({worst[0]['line']} {worst[0]['provider']} at seq_kv "
                 f"{int(worst[0]['seq_kv'])}: " + ", ".join(f"{r['study']} {r['median_ms']:.2f} ms" for r in worst)
                 + "). Ratios within one point (one round) are the trustworthy ones; across studies, allow this much.")
    return [text, ""]


def _annotate_apart(ax, labelled: list[tuple]) -> None:
    """Label points (x, y, text) beside them, each where it overlaps no label placed before (right-above,
    right-below, left-above, left-below); a label with no free place is left out (the tables have every value)."""
    ax.autoscale_view()
    ax.figure.canvas.draw()  # fixes the axes' limits, so that data maps to final pixel positions
    placed = []  # label boxes in pixels: (x0, y0, x1, y1)
    width, height = 22, 8  # a 6 pt label of 4-5 characters at dpi 110, in pixels (about)
    for x, y, text in labelled:
        px, py = ax.transData.transform((x, y))
        for dx, dy in ((3, 3), (3, -11), (-25, 3), (-25, -11)):
            box = (px + dx, py + dy, px + dx + width, py + dy + height)
            if all(box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1] for b in placed):
                placed.append(box)
                ax.annotate(text, (x, y), fontsize=6, xytext=(dx, dy), textcoords="offset pixels")
                break


def _tradeoff_section(rows, ctx: Context) -> list[str]:
    """Kept fraction against error for every pruning knob and input, and the knob to pick for an error budget."""
    points = {}  # (distribution, label, knob) -> rows sorted by kept fraction
    flash = {}
    for study, knob, label in TRADEOFF:
        rs = pick(rows, study=study)
        for dist in dict.fromkeys(r["distribution"] for r in rs):
            points[(dist, label, knob)] = sorted(knob_points(rs, dist, knob), key=lambda r: r["kept_fraction"])
            flash.setdefault(dist, best(rs, distribution=dist, line="flash"))
    if not points:
        return []
    seq = int(next(iter(points.values()))[0]["seq_q"])
    parts = [f"## Accuracy against work: which knob for an error budget (seq {seq})", "",
             "Every point of the threshold, top-k and mass studies: kept fraction of the query-key pairs (x) "
             "against the relative error to dense attention (y), labelled with its time in ms. Mass pruning "
             "bounds the error by its eps (|out - dense| <= 2 eps max|v| per element); threshold and top-k do not "
             "bound it.", ""]
    dists = list(dict.fromkeys(d for d, _, _ in points))
    fig, axes = plt.subplots(1, len(dists), figsize=(5.5 * len(dists), 4.5), squeeze=False)
    for ax, dist in zip(axes[0], dists):
        ax.set_xscale("log")
        ax.set_yscale("log")
        labelled = []
        for (d, label, _), pts in points.items():
            if d != dist or not pts:
                continue
            xs = [r["kept_fraction"] for r in pts]
            ys = [max(r["rel_err_dense"], 1e-7) for r in pts]
            ax.plot(xs, ys, marker="o", label=label)
            labelled += [(x, y, f"{r['median_ms']:.1f}") for x, y, r in zip(xs, ys, pts)]
        _annotate_apart(ax, labelled)
        if flash.get(dist):
            ax.set_title(f"{dist} (flash: {flash[dist]['median_ms']:.1f} ms)", fontsize=9)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("kept fraction")
        ax.set_ylabel("mean |out - dense| / mean |dense|")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Accuracy against work, seq {seq} ({ctx.machine}); labels: ms", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(ctx.out_dir, "tradeoff.png"), dpi=110)
    plt.close(fig)
    parts += ["![tradeoff](tradeoff.png)", ""]
    body = []
    for dist in dists:
        for budget in ERROR_BUDGETS:
            for (d, label, knob), pts in points.items():
                if d != dist:
                    continue
                ok = [r for r in pts if r["rel_err_dense"] <= budget]
                if not ok:
                    body.append([dist, f"{100 * budget:g}%", label, "none measured", "-", "-", "-", "-"])
                    continue
                r = min(ok, key=lambda r: r["median_ms"])
                body.append([dist, f"{100 * budget:g}%", label, f"{knob} = {r[knob]:g}", pct(r["kept_fraction"]),
                             sci(r["rel_err_dense"]), ms(r), ratio(r, flash.get(dist))])
    parts += ["For each error budget, the fastest measured setting of each knob whose error stays within it, and "
              "its speed against flash (dense) on the same inputs:", "",
              table(["inputs", "error budget", "pruning", "pick", "kept", "rel err", "ms", "vs flash"], body), ""]
    return parts


def _context(rows, out_dir: str) -> Context:
    meta = rows[0]
    sgemms = pick(rows, study="ceiling", line="sgemm")
    readers = pick(rows, study="ceiling", line="read bandwidth")
    return Context(out_dir=out_dir, machine=f"{meta['target']}, {int(meta['threads'])} threads",
                   ceiling=max(sgemms, key=lambda r: r["gflops"]) if sgemms else None,
                   peak=one(rows, study="ceiling", line="fma peak"),
                   bandwidth=max(readers, key=lambda r: r["gbs"]) if readers else None, readers=readers)


def _preamble(rows, ctx: Context) -> list[str]:
    """Title, how times, FLOPs and errors are measured, the run's noise, ceiling and inputs."""
    meta = rows[0]
    ceiling, peak = ctx.ceiling, ctx.peak
    sgemms = pick(rows, study="ceiling", line="sgemm")
    parts = [f"# tvm_attn benchmark: {meta['target']}",
             "",
             f"Generated from `results.csv` by `python -m tvm_attn.bench` on {ctx.machine}. Every figure below comes "
             "from that file.",
             "",
             "**Timer.** One warm-up call per provider, then the providers of a point are called round-robin until "
             "every one has at least 5 calls and 0.1 s of timed calls (0.2 s in `--full` runs; 0.05 s with `--quick`) "
             "and, in `--full` runs, an interquartile range "
             f"within {100 * SPREAD:g}% of its median (one that does not settle stops after {MAX_SECONDS:g} s of "
             "calls); those that settle early keep taking turns, so that all are timed over the same minutes. "
             "Median (and quartiles in the CSV) of per-call times. Inputs are "
             "float32 (float16 or bfloat16 where a line names its dtype); output buffers are "
             "preallocated for the TVM kernels. "
             "Idle worker threads sleep instead of spinning (OMP_WAIT_POLICY=PASSIVE, OPENBLAS_THREAD_TIMEOUT=4, "
             "TVM_THREAD_POOL_SPIN_COUNT=0), so that one library's spinning pool does not stall the next one's "
             "parallel region.",
             "",
             "**FLOPs.** 4 * D * (visible query-key pairs) per head: 4*B*H*Sq*Skv*D without a mask, about half with "
             "the causal mask. Pruned variants are given the same count (GFLOP/s = the work of dense attention "
             "divided by their time).",
             "",
             "**Errors.** On batch 0 and the first query heads: rel_err = mean|out - ref| / mean|ref| against the "
             "float64 reference of dense attention (`rel_err_dense`) and, for pruned variants, of the variant itself "
             "(`rel_err_own`). Kept fraction = kept / visible query-key pairs, from the float64 keep mask.",
             ""]
    parts += _noise_paragraph(rows)
    if ceiling:
        measured = "; ".join(f"{r['provider']}: {r['gflops']:.0f}" for r in sgemms)
        parts += [f"**Ceiling.** The float32 matmul of this machine ({int(ceiling['x'])}^3, same threads), the "
                  f"GFLOP/s columns' reference: **{ceiling['gflops']:.0f} GFLOP/s** ({ceiling['provider']}), the "
                  f"fastest of the sgemms measured at the end of this run ({measured}; OpenBLAS in a process "
                  f"whose OPENBLAS_CORETYPE is dropped, so that it picks its own kernels, or, in a run held to an "
                  f"ISA class with `--isa`, set to that class's kernels)."
                  + (f" The \"of sgemm\" columns instead divide by that OpenBLAS sgemm ({SAME_ROUND_SGEMM_N}^3, in "
                     f"a child process) timed in the same round as the kernel (provider `sgemm`): a ratio within "
                     f"the point, where the machine's drift between minutes cancels."
                     if pick(rows, provider="sgemm") else "")
                  + (f" Theoretical FMA peak: {peak['gflops']:.0f} GFLOP/s ({peak['provider']}, the clock the OS "
                     f"reports); the sgemm reaches {100 * ceiling['gflops'] / peak['gflops']:.0f}% of it (above "
                     f"100%: the cores run faster than that clock)." if peak else ""), ""]
    entropies = defaultdict(list)
    for r in rows:
        if r["entropy_nats"] is not None and r["distribution"]:
            entropies[(r["distribution"], int(r["seq_kv"]))].append(r["entropy_nats"])
    if entropies:
        parts += ["**Inputs.** `gaussian`: q, k, v ~ N(0, 1), so scale * q.k has std 1 (a broad softmax). "
                  "`peaked`: q scaled by 4 (scores of std 4). Mean row entropy of the softmax, in nats "
                  "(log(seq_kv) would be uniform): " + "; ".join(
                      f"{d} at seq_kv {s}: {sum(v) / len(v):.2f} (uniform {math.log(s):.2f})"
                      for (d, s), v in sorted(entropies.items())) + ".", ""]
    return parts


def _hand_gflops(p) -> str:
    return f"{p['hand']['gflops']:.1f}" if p["hand"] else "-"


def _of_sgemm(p) -> str:
    share = p.sgemm_share()
    return "-" if share is None else f"{100 * share:.0f}%"


def _kept(p) -> str:
    return pct(p["hand"]["kept_fraction"]) if p["hand"] else "-"


def _torch_gflops_series(rs, xs) -> list:
    torch_pts = [(s, one(rs, x=s, line="flash", provider="torch-sdpa")) for s in xs]
    return [("torch SDPA", [s for s, t in torch_pts if t], [t["gflops"] for s, t in torch_pts if t])]


SEQ_SWEEP = Section(
    "seq_sweep", "1. Speedup vs sequence length",
    intro=("Each line's hand-scheduled kernel (`hand`) against the untuned standard compute (`untuned`, "
           "measured up to the seq where it still runs in seconds), the hand-scheduled standard, torch SDPA "
           "(same process, same threads) and the float32 numpy formula.",),
    columns=(
        Column("seq", lambda p: p.x),
        Column("line", lambda p: p.line),
        Column("hand ms", lambda p: ms(p["hand"])),
        Column("tuned ms", lambda p: tuned_ms(p["tuned"])),
        Column("hand GFLOP/s", _hand_gflops),
        Column("of sgemm", _of_sgemm),
        Column("hand vs untuned standard", lambda p: ratio(p["hand"], p.other("standard", "untuned"))),
        Column("hand vs own untuned", lambda p: ratio(p["hand"], p["untuned"])),
        Column("hand vs hand standard", lambda p: ratio(p["hand"], p.other("standard", "hand"))),
        Column("hand vs torch SDPA", lambda p: ratio(p["hand"], p["torch-sdpa"])),
        Column("tuned vs torch SDPA", lambda p: ratio(p["tuned"], p["torch-sdpa"])),
        Column("torch ms", lambda p: ms(p["torch-sdpa"])),
        Column("numpy ms", lambda p: ms(p["numpy"])),
        Column("kept", _kept),
    ),
    notes=(TUNED_IS_HAND,),
    plots=(
        # torch SDPA as timed in the same round as each line (its own rows: the table's ratios)
        Plot("speedup_vs_torch", "speedup over torch", "Speedup over torch SDPA (dense) ({machine})",
             "sequence length", "torch SDPA time / tvm_attn time",
             y=lambda p: p["torch-sdpa"]["median_ms"] / p["hand"]["median_ms"] if p["hand"] and p["torch-sdpa"]
             else None,
             hline=lambda ctx: (1.0, "torch SDPA")),
        Plot("gflops_vs_seq", "GFLOP/s", "Throughput ({machine})", "sequence length", "GFLOP/s (dense-equivalent)",
             y=lambda p: p["hand"]["gflops"] if p["hand"] else None, extra=_torch_gflops_series,
             hline=lambda ctx: (ctx.ceiling["gflops"], "sgemm ceiling") if ctx.ceiling else None),
    ),
)


def _memory_section(rows, ctx: Context) -> list[str]:
    """Bytes each kernel holds (bench/memory.py), at the sweep's shortest and longest seq."""
    sweep = pick(rows, study="seq_sweep")
    if not sweep:
        return []
    lines = list(dict.fromkeys(r["line"] for r in sweep))
    seqs = sorted({int(r["x"]) for r in sweep})
    parts = ["## 2. Memory", "",
             "Bytes the kernel holds, counted from its own IR after TVM places and shrinks allocations: "
             "inputs (q, k, v), output, and intermediates (scratch inside a parallel loop counted once per "
             "thread). MB = 2^20 bytes.", ""]
    body = []
    for s in (seqs[0], seqs[-1]):
        for line in lines:
            for p in ("untuned", "hand"):
                r = one(sweep, x=s, line=line, provider=p)
                if r and r["bytes_inputs"] is not None:
                    body.append([s, line, p, mb(r["bytes_inputs"]), mb(r["bytes_output"]),
                                 mb(r["bytes_intermediate"])])
    parts += [table(["seq", "line", "schedule", "inputs MB", "output MB", "intermediate MB"], body), ""]
    series = []
    for line in ("standard", "flash", lines[2] if len(lines) > 2 else "flash"):
        for p in ("untuned", "hand"):
            pts = [(s, one(sweep, x=s, line=line, provider=p)) for s in seqs]
            pts = [(s, r["bytes_intermediate"] / 2**20) for s, r in pts if r and r["bytes_intermediate"]]
            if pts:
                series.append((f"{line} {p}", [a for a, _ in pts], [b for _, b in pts]))
    plot(os.path.join(ctx.out_dir, "memory.png"), f"Intermediate memory ({ctx.machine})", "sequence length",
         "MB", series, logy=True)
    return parts + ["![memory](memory.png)", ""]


ACCURACY = Section(
    "seq_sweep", "3. Accuracy",
    intro=("Relative error of each provider's output against the float64 reference of dense attention, "
           "and for pruned variants against their own float64 reference.",),
    columns=(
        Column("seq", lambda p: p.x),
        Column("line", lambda p: p.line),
        Column("rel err vs dense", lambda p: sci(p["hand"]["rel_err_dense"])),
        Column("max abs err vs dense", lambda p: sci(p["hand"]["max_abs_err_dense"])),
        Column("rel err vs own reference", lambda p: sci(p["hand"]["rel_err_own"])),
        Column("kept", _kept),
    ),
    has_row=lambda p: p["hand"] is not None,
    plots=(Plot("accuracy", "accuracy", "Relative error vs dense float64 ({machine})", "sequence length",
                "mean |out - dense| / mean |dense|", y=lambda p: p["hand"]["rel_err_dense"] if p["hand"] else None,
                logy=True),),
)


KNOB_STUDIES = (("threshold_effect", "threshold", "Effect of the pruning threshold", 4),
                ("topk_effect", "top_k", "Effect of top-k", 5),
                ("mass_effect", "eps", "Effect of mass pruning's error budget eps", "5b"))


def _knob_sections(rows, ctx: Context) -> list[str]:
    """Each pruning knob's sweep: time, kept fraction and error per input distribution, beside dense attention."""
    parts = []
    for study, knob, title, number in KNOB_STUDIES:
        rs = pick(rows, study=study)
        if not rs:
            continue
        seq = int(rs[0]["seq_q"])
        parts += [f"## {number}. {title} (seq {seq})", ""]
        body = []
        fig_series = []
        for dist in dict.fromkeys(r["distribution"] for r in rs):
            std = best(rs, distribution=dist, line="standard")
            fl = best(rs, distribution=dist, line="flash")
            pts = knob_points(rs, dist, knob)
            for r in pts:
                body.append([dist, f"{r[knob]:g}", ms(r), pct(r["kept_fraction"]), sci(r["rel_err_dense"]),
                             ratio(r, std), ratio(r, fl)])
            fig_series.append((dist, pts, std, fl))
            body.append([dist, "(dense) standard / flash", f"{ms(std)} / {ms(fl)}", "100%", "", "", ""])
        parts += ["Times are the faster of the hand and tuned schedules (what `schedule=\"best\"` gives).", "",
                  table(["inputs", knob, "ms", "kept", "rel err vs dense", "vs standard", "vs flash"], body), ""]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        for n, (dist, pts, std, fl) in enumerate(fig_series):
            color = f"C{n}"  # one colour per input distribution in both panels; the line style says the quantity
            xs = [r[knob] for r in pts]
            ax1.plot(xs, [r["median_ms"] for r in pts], marker="o", color=color, label=f"{dist}")
            if fl:
                ax1.axhline(fl["median_ms"], linestyle="--", color=color, alpha=0.6, label=f"flash ({dist})")
            ax2.plot(xs, [r["rel_err_dense"] for r in pts], marker="o", color=color, label=f"{dist} rel err")
            ax2.plot(xs, [r["kept_fraction"] for r in pts], marker="x", linestyle=":", color=color,
                     label=f"{dist} kept")
        for ax in (ax1, ax2):
            ax.set_xscale("log")
            ax.set_xlabel(knob)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        ax1.set_ylabel("ms")
        ax2.set_yscale("log")
        ax2.set_ylabel("fraction")
        fig.suptitle(f"{title}, seq {seq} ({ctx.machine})", fontsize=10)
        fig.tight_layout()
        fig.savefig(os.path.join(ctx.out_dir, f"{study}.png"), dpi=110)
        plt.close(fig)
        parts += [f"![{study}]({study}.png)", ""]
    return parts


def _seq_cmp(seqs) -> int:
    """The seq of the sweep's one-seq comparisons (timing, tuning): 512 when measured, else the longest."""
    return 512 if 512 in seqs else max(seqs)


def _timing_comparison(rows, ctx: Context) -> list[str]:
    """Every line and provider of the sweep at one seq, as bars with quartiles."""
    sweep = pick(rows, study="seq_sweep")
    if not sweep:
        return []
    seq_cmp = _seq_cmp({int(r["x"]) for r in sweep})
    at = [r for r in sweep if int(r["x"]) == seq_cmp]
    parts = [f"## 6. Timing comparison at seq {seq_cmp}", ""]
    labels = [f"{r['line']}\n{r['provider']}{' (= hand)' if r.get('record') == 'hand' else ''}" for r in at]
    fig, ax = plt.subplots(figsize=(max(7, len(at) * 0.55), 4.5))
    ax.bar(range(len(at)), [r["median_ms"] for r in at],
           yerr=[[r["median_ms"] - r["q25_ms"] for r in at], [r["q75_ms"] - r["median_ms"] for r in at]])
    ax.set_xticks(range(len(at)))
    ax.set_xticklabels(labels, rotation=90, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("ms (median, quartile bars)")
    ax.set_title(f"Every line and provider at seq {seq_cmp} ({ctx.machine})", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(ctx.out_dir, "timing_comparison.png"), dpi=110)
    plt.close(fig)
    return parts + [table(["line", "provider", "ms", "q25", "q75", "GFLOP/s"],
                          [[r["line"], r["provider"], ms(r), f"{r['q25_ms']:.2f}", f"{r['q75_ms']:.2f}",
                            f"{r['gflops']:.1f}"] for r in at]), "", "![timing](timing_comparison.png)", ""]


TUNING = Section(
    "seq_sweep",
    lambda rs, ctx: f"7. Tuning: untuned vs hand vs tuned schedule at seq {_seq_cmp({int(r['x']) for r in rs})}",
    intro=("`tuned` rows exist only for workloads with a record in tuning_logs/ for this target.", TUNED_IS_HAND),
    columns=(
        Column("line", lambda p: p.line),
        Column("untuned ms", lambda p: ms(p["untuned"])),
        Column("hand ms", lambda p: ms(p["hand"])),
        Column("tuned ms", lambda p: tuned_ms(p["tuned"])),
        Column("hand vs untuned", lambda p: ratio(p["hand"], p["untuned"])),
        Column("hand GFLOP/s / sgemm", lambda p: f"{100 * p['hand']['gflops'] / p.ctx.ceiling['gflops']:.0f}%"
               if p["hand"] and p.ctx.ceiling else "-"),
    ),
    xs=lambda xs, ctx: [_seq_cmp(xs)],
)


def _prefill_columns(of_sgemm: bool) -> tuple:
    """The causal and 16-bit prefill tables: the hand kernel against torch SDPA and numpy at each seq (and, with
    ``of_sgemm``, against the same-round sgemm)."""
    return (
        Column("seq_q", lambda p: p.x),
        Column("line", lambda p: p.line),
        Column("hand ms", lambda p: ms(p["hand"])),
        Column("GFLOP/s", _hand_gflops),
    ) + ((Column("of sgemm", _of_sgemm),) if of_sgemm else ()) + (
        Column("torch ms", lambda p: ms(p["torch-sdpa"])),
        Column("vs torch", lambda p: ratio(p["hand"], p["torch-sdpa"])),
        Column("numpy ms", lambda p: ms(p["numpy"])),
        Column("rel err", lambda p: sci(p["hand"]["rel_err_dense"]) if p["hand"] else "-"),
    )


def _causal_speedup(rs, ctx: Context) -> list[str]:
    xs = sorted({int(r["x"]) for r in rs})
    ratios = [(x, one(rs, x=x, line=NO_MASK, provider="hand"), one(rs, x=x, line="flash", provider="hand"))
              for x in xs]
    ratios = [(x, f["median_ms"] / c["median_ms"]) for x, f, c in ratios if f and c]
    if not ratios:
        return []
    return ["Flash without mask / flash causal, timed in the same rounds: " + ", ".join(
        f"seq {s}: {r:.2f}x" for s, r in ratios) + "."]


def _prefill_section(study: str, title: str, notes=(), of_sgemm: bool = False) -> Section:
    return Section(study, title, columns=_prefill_columns(of_sgemm), by_line=True, notes=notes,
                   plots=(Plot(study, study, f"{title} ({{machine}})", "seq_q", "ms",
                               y=lambda p: p["hand"]["median_ms"] if p["hand"] else None, logy=True),))


CAUSAL = _prefill_section("causal", "Causal attention", notes=_causal_speedup, of_sgemm=True)
def _blas_library(rs, ctx: Context) -> list[str]:
    libraries = sorted({r["record"] for r in pick(rs, provider="blas") if r["record"]})
    return [f"The BLAS called: {', '.join(libraries)}. `blas` is `schedule=\"blas\"`: each tile's QK^T and P·V are "
            "sgemm calls on one thread per task, the online softmax and masks TensorIR; `TensorIR` is the faster of "
            "the hand and tuned schedules."] if libraries else [
        "No `blas` rows: this run found no BLAS held to its ISA class (see the run's warnings)."]


BLAS_PREFILL = Section(
    "blas_prefill", "Prefill on the platform's BLAS (schedule=\"blas\")", by_line=True, notes=_blas_library,
    columns=(
        Column("seq_q", lambda p: p.x),
        Column("line", lambda p: p.line),
        Column("blas ms", lambda p: ms(p["blas"])),
        Column("blas GFLOP/s", lambda p: f"{p['blas']['gflops']:.1f}" if p["blas"] else "-"),
        Column("blas of sgemm", lambda p: f"{100 * p['blas']['gflops'] / p['sgemm']['gflops']:.0f}%"
               if p["blas"] and p["sgemm"] else "-"),
        Column("TensorIR ms", lambda p: ms(p.best())),
        Column("blas vs TensorIR", lambda p: ratio(p["blas"], p.best())),
        Column("torch ms", lambda p: ms(p["torch-sdpa"])),
        Column("blas vs torch", lambda p: ratio(p["blas"], p["torch-sdpa"])),
        Column("rel err", lambda p: sci(p["blas"]["rel_err_dense"]) if p["blas"] else "-"),
    ))


def _speedup_over_float32(rs, ctx: Context) -> list[str]:
    """Each 16-bit line against its float32 line, timed in the same rounds."""
    notes = []
    for line in sorted({r["line"] for r in rs if r["dtype"] != "float32"}):
        dtype = one(rs, line=line)["dtype"]
        base = line.removesuffix(f" {dtype}")
        pairs = [(int(r["x"]), one(rs, x=r["x"], line=base, provider="hand"), r)
                 for r in sorted(pick(rs, line=line, provider="hand"), key=lambda r: int(r["x"]))]
        ratios = [f"seq {x}: {f['median_ms'] / h['median_ms']:.2f}x" for x, f, h in pairs if f and h]
        if ratios:
            notes.append(f"{line} vs {base} (float32), same rounds: " + ", ".join(ratios) + ".")
    return notes


PREFILL_16BIT = _prefill_section("prefill_16bit",
                                 "Causal prefill in float16 and bfloat16 (torch SDPA in the same dtype)",
                                 notes=_speedup_over_float32)


def _model_section(rows, ctx: Context) -> list[str]:
    """SmolLM2 with tvm_attn attention: decode and prefill speed against torch SDPA, and each pruning knob's
    perplexity and top-1 agreement with dense attention (bench/model.py)."""
    rs = pick(rows, study="model")
    if not rs:
        return []
    speed = pick(rs, x_name="prompt")
    quality = pick(rs, x_name="perplexity")
    first = rs[0]
    parts = ["## Model: SmolLM2-135M-Instruct through tvm_attn", "",
             f"30 layers, {int(first['heads'])} query heads over {int(first['kv_heads'])} KV heads, head_dim "
             f"{int(first['head_dim'])}, float32, in transformers with `attn_implementation` set to a tvm_attn "
             "registration (`tvm_attn.hf`) or to `sdpa`; everything but attention is the same torch code.", ""]
    if speed:
        ours, sdpa = one(speed, provider="tvm_attn"), one(speed, provider="torch-sdpa")
        parts += [f"**Speed.** Greedy decoding after a {int(speed[0]['x'])}-token prompt: tvm_attn flash with "
                  "`tvm_attn.hf.Cache` (K/V appended in place) against torch SDPA with transformers' DynamicCache, "
                  "alternating over rounds; median step time.", ""]
        body = [[r["line"], f"{r['prefill_ms']:.0f}", f"{int(r['x']) / r['prefill_ms'] * 1e3:.0f}",
                 f"{r['median_ms']:.1f}", f"{r['tokens_per_s']:.1f}"] for r in (ours, sdpa) if r]
        parts += [table(["attention", "prefill ms", "prefill tokens/s", "decode ms/token", "decode tokens/s"],
                         body), ""]
        if ours and sdpa:
            parts += [f"tvm_attn vs torch SDPA in the model: prefill {sdpa['prefill_ms'] / ours['prefill_ms']:.2f}x, "
                      f"decode {sdpa['median_ms'] / ours['median_ms']:.2f}x (attention is a small part of a "
                      "135M model's step; the rest is the same torch matmuls).", ""]
    if quality:
        dense = one(quality, line="flash")
        text = quality[0]["distribution"].removeprefix("text:")
        parts += [f"**Pruning judged by the model.** Perplexity over {int(quality[0]['x'])} next-token predictions "
                  f"of `{text}` (windows of {int(quality[0]['seq_q'])} tokens, teacher-forced: every attention "
                  "row is pruned as a decode step would be), and the share of positions whose top-1 prediction is "
                  "dense (flash) attention's. Time: one window's forward pass.", ""]
        body = []
        for r in quality:
            body.append([r["line"], f"{r['perplexity']:.3f}",
                         f"{(r['perplexity'] / dense['perplexity'] - 1) * 100:+.2f}%" if dense else "-",
                         "-" if r["top1_agreement"] is None else f"{100 * r['top1_agreement']:.2f}%",
                         f"{r['median_ms'] / 1e3:.2f}"])
        parts += [table(["attention", "perplexity", "vs dense", "top-1 = dense", "forward s"], body), ""]
    kv = pick(rs, x_name="kv_cache")
    if kv:
        base = one(kv, line="float32 cache")
        parts += ["**The KV cache's dtype judged by the model.** The same windows, every layer's K and V appended to "
                  "a `KVCache` of the dtype (int8: codes and a scale per row, `tvm_attn.quantized_kv`) that flash "
                  "then attends through; below them, integer formats considered for the cache, with K and V "
                  "round-tripped through each (no cache stores these). Top-1: the share of positions whose "
                  "prediction is the float32 cache's.", ""]
        body = [[r["line"], f"{r['perplexity']:.4f}",
                 f"{(r['perplexity'] / base['perplexity'] - 1) * 100:+.3f}%" if base else "-",
                 "-" if r["top1_agreement"] is None else f"{100 * r['top1_agreement']:.2f}%"] for r in kv]
        parts += [table(["K and V", "perplexity", "vs float32 cache", "top-1 = float32 cache's"], body), ""]
    return parts


# Issue 30's goals (issue 17's, top-k's raised from 2x), from 8k keys on: (label, line, speedup over flash decode on
# the same caches).
SPARSE_GOALS = (("bounded eps 0.05", "bounded eps=0.05", 3.0), ("top-k 64", "topk 64 (shadow)", 3.0),
                ("threshold 0.001", "threshold 0.001 (shadow)", 2.0))
SPARSE_GOAL_KEYS = 8192


def _sparse_decode_section(rows, ctx: Context) -> list[str]:
    """Certified sparse decode (bench/sparse_decode.py): bounded against flash decode on the same caches, per input
    set, with kept fraction, bytes read, error and the certificate; then what the shadow costs."""
    rs = pick(rows, study="sparse_decode")
    if not rs:
        return []
    parts = ["## Certified sparse decode (bounded) against dense flash decode", "",
             "One decode step through every layer's KVCache in turn (so K/V come from memory), `cache.attend(q, "
             "variant=...)`: time per layer, interleaved with flash on the same caches. Kept: the share of visible "
             "keys in the output (bounded: whose K and V rows are read). Bytes (bounded): per layer and step, the "
             "shadow plus the kept rows (per query head) against all of K and V. Certificate: the worst row's "
             f"max|out - dense| / (2 eps max|v|) over the last {ROWS} query positions of every layer (<= 1: it "
             "holds). Top-k and threshold through the shadow are exact: their error against their own float64 "
             "reference is float32 rounding; \"own kernel\" is the same variant's decode kernel on a cache "
             "without a shadow (it scores every key).", ""]
    goal_keys = SPARSE_GOAL_KEYS
    for dist in dict.fromkeys(r["distribution"] for r in rs if r["distribution"] != "shadow cost"):
        sub = pick(rs, distribution=dist)
        flash = one(sub, variant="flash")
        first = sub[0]
        parts += [f"**{dist}**: {int(first['seq_kv'])} keys, {int(first['heads'])} query heads over "
                  f"{int(first['kv_heads'])} KV heads, head_dim {int(first['head_dim'])}, {int(first['layers'])} "
                  "layers.", ""]
        body = []
        for r in sub:
            body.append([r["line"], f"{r['median_ms']:.3f}", ratio(r, flash), pct(r["kept_fraction"]),
                         mb(r["bytes_kv"]),
                         f"{flash['bytes_kv'] / r['bytes_kv']:.1f}x" if flash and r["bytes_kv"] else "-",
                         sci(r["rel_err_dense"]), sci(r["rel_err_own"]),
                         "-" if r["certificate"] is None else f"{r['certificate']:.3f}"])
        parts += [table(["line", "ms per layer", "vs flash", "kept", "MB read", "fewer bytes", "err vs dense",
                          "err vs own ref.", "certificate"], body), ""]
        if flash and first["seq_kv"] >= goal_keys:
            verdicts = []
            for label, line, speedup in SPARSE_GOALS:
                r = one(sub, line=line)
                if r:
                    got = flash["median_ms"] / r["median_ms"]
                    verdicts.append(f"{label} >= {speedup:g}x flash: {'met' if got >= speedup else 'missed'} "
                                    f"({got:.2f}x)")
            parts += ["Goals (issue 30): " + "; ".join(verdicts) + ".", ""]
    costs = pick(rs, distribution="shadow cost")
    if costs:
        body = [[r["line"], "-" if r["median_ms"] is None else f"{r['median_ms'] * 1e3:.0f} us",
                 mb(r["bytes_kv"]) if r["line"].startswith("memory") else "-"] for r in costs]
        parts += ["**What the shadow costs** (one KVCache of the same head shape):", "",
                  table(["", "time", "MB"], body), ""]
    return parts


# The report, in order: declared sections (drawn by Section.render) and the sections whose layout is their own.
REPORT = (_preamble, SEQ_SWEEP, _memory_section, ACCURACY, _knob_sections, _tradeoff_section, _timing_comparison,
          TUNING, DECODE, _generation_section, CAUSAL, BLAS_PREFILL, PREFILL_16BIT, _model_section,
          _sparse_decode_section, serving_section, integer_kv_section, features_section, isa_classes_section)


def write_report(csv_path: str, out_dir: str) -> str:
    """Write report.md and its plots into ``out_dir`` from the rows of ``csv_path``; returns report.md's path."""
    rows = load(csv_path)
    if not rows:
        raise ValueError(f"{csv_path} has no rows")
    ctx = _context(rows, out_dir)
    parts = []
    for section in REPORT:
        parts += section.render(rows, ctx) if isinstance(section, Section) else section(rows, ctx)
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(parts))
    return path
