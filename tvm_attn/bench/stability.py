"""How far two runs of the benchmark agree: the ratios each point measures within one interleaved round (every
provider against `hand`, and `hand` against torch SDPA), and the absolute times, run against run.

    python -m tvm_attn.bench --compare OTHER/results.csv     # writes stability.md beside this run's results.csv
"""

from __future__ import annotations

import statistics

from .formatting import load

POINT = ("study", "x", "line", "distribution")  # one round of interleaved providers
PAIRS = (("tuned", "hand"), ("untuned", "hand"), ("numpy", "hand"), ("hand", "torch-sdpa"), ("hand", "read-kv"),
         ("hand", "sgemm"))


def _points(rows) -> dict:
    points = {}
    for r in rows:
        if r["study"] in ("ceiling", "generation", "model", "sparse_decode") or r["median_ms"] is None:
            continue
        points.setdefault(tuple(r[k] for k in POINT), {})[r["provider"]] = r["median_ms"]
    return points


def _change(factor: float) -> float:
    """How far a factor between two runs is from 1, the same either way round (1.5 and 1/1.5: 50%)."""
    return max(factor, 1 / factor) - 1


def _summary(changes: list[float]) -> str:
    if not changes:
        return "-"
    changes = sorted(changes)
    p90 = changes[min(len(changes) - 1, int(0.9 * len(changes)))]
    return (f"{len(changes)} | {100 * statistics.median(changes):.1f}% | {100 * p90:.1f}% | "
            f"{100 * changes[-1]:.1f}%")


def compare(csv_a: str, csv_b: str) -> str:
    """A markdown report of how the ratios and times of run ``csv_a`` differ from those of ``csv_b``."""
    a, b = _points(load(csv_a)), _points(load(csv_b))
    shared = sorted(set(a) & set(b), key=str)
    ratio_changes: dict[str, list] = {}
    by_study: dict[tuple, list] = {}
    worst = []
    time_changes = []
    for point in shared:
        for p in set(a[point]) & set(b[point]):
            time_changes.append(_change(a[point][p] / b[point][p]))
        for num, den in PAIRS:
            if {num, den} <= set(a[point]) and {num, den} <= set(b[point]):
                ra, rb = a[point][num] / a[point][den], b[point][num] / b[point][den]
                change = _change(ra / rb)
                ratio_changes.setdefault(f"{num} / {den}", []).append(change)
                by_study.setdefault((point[0], f"{num} / {den}"), []).append(change)
                worst.append((change, point, num, den, ra, rb))
    lines = [f"# Run against run: `{csv_a}` and `{csv_b}`", "",
             "Each point's providers are timed in one interleaved round; a ratio of two of them is what the report "
             "compares. Change: the larger of (ratio in run A / ratio in run B) and its inverse, minus 1, over the "
             "points both runs measured:", "",
             "| ratio | points | median change | 90th percentile | worst |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {_summary(changes)} |" for name, changes in ratio_changes.items()]
    lines += [f"| (absolute times, every provider) | {_summary(time_changes)} |", "",
              "By study:", "", "| study | ratio | points | median change | 90th percentile | worst |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {study} | {name} | {_summary(changes)} |" for (study, name), changes in sorted(by_study.items())]
    lines += ["", "The ten largest ratio changes:", "",
              "| study | x | line | inputs | ratio | run A | run B | change |", "|---|---|---|---|---|---|---|---|"]
    for change, (study, x, line, dist), num, den, ra, rb in sorted(worst, key=lambda w: w[0], reverse=True)[:10]:
        lines.append(f"| {study} | {x:g} | {line} | {dist} | {num} / {den} | {ra:.3f} | {rb:.3f} | "
                     f"{100 * change:.1f}% |")
    return "\n".join(lines) + "\n"
