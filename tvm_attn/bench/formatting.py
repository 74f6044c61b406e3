"""The report's formatting: results.csv loaded with numbers as floats, row lookups, cell formats, markdown tables
and line plots."""

from __future__ import annotations

import csv

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

NUMERIC = ("x", "batch", "heads", "kv_heads", "seq_q", "seq_kv", "head_dim", "threshold", "top_k", "eps", "median_ms",
           "q25_ms", "q75_ms", "repeats", "flops", "gflops", "bytes_inputs", "bytes_output", "bytes_intermediate",
           "rel_err_dense", "max_abs_err_dense", "rel_err_own", "kept_fraction", "entropy_nats", "threads",
           "layers", "bytes_kv", "gbs", "kernel_ms", "overhead_us", "compiles", "prefill_ms", "perplexity",
           "top1_agreement", "tokens_per_s", "certificate", "round")


def load(path: str) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key in NUMERIC:
            value = row.get(key, "")
            row[key] = float(value) if value not in ("", None) else None
        row["causal"] = row.get("causal") == "True"
    return rows


def pick(rows, **match):
    return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


def one(rows, **match):
    found = pick(rows, **match)
    return found[0] if found else None


def best(rows, **match):
    """The faster of the `hand` and `tuned` rows matching (what a user gets from schedule="best")."""
    found = [r for r in pick(rows, **match) if r["provider"] in ("hand", "tuned")]
    return min(found, key=lambda r: r["median_ms"]) if found else None


def knob_points(rs, dist: str, knob: str) -> list[dict]:
    """The best row (see best) at each value of ``knob`` on inputs ``dist``, in knob order."""
    vals = sorted({r[knob] for r in rs if r["distribution"] == dist and r[knob] is not None})
    return [p for p in (best(rs, distribution=dist, **{knob: x}) for x in vals) if p]


def ms(row):
    return f"{row['median_ms']:.2f}" if row else "-"


def tuned_ms(row):
    """A tuned row's time, marked "(hand)" when its record is the hand schedule itself."""
    return ms(row) + (" (hand)" if row and row.get("record") == "hand" else "")


def ratio(a, b):
    return f"{b['median_ms'] / a['median_ms']:.2f}x" if a and b else "-"


def pct(x):
    return "-" if x is None else f"{100 * x:.2f}%"


def sci(x):
    return "-" if x is None else f"{x:.1e}"


def mb(x):
    return "-" if x is None else f"{x / 2**20:.1f}"


def table(header, body) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def plot(path, title, xlabel, ylabel, series, *, logx=True, logy=False, hline=None):
    """series: (label, xs, ys) or (label, xs, ys, matplotlib style keywords)."""
    many = len(series) > 8
    fig, ax = plt.subplots(figsize=(9.5 if many else 7, 4.2))
    for label, xs, ys, *style in series:
        if xs:
            ax.plot(xs, ys, **{"marker": "o", **(style[0] if style else {})}, label=label)
    if hline:
        ax.axhline(hline[0], color="gray", linestyle="--", label=hline[1])
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if many:  # beside the axes, not over the lines
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    else:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
