"""Report sections declared as data, and the one renderer that draws any of them (as triton's perf_report draws any
declared Benchmark): a Section names its study, title and text, its table's columns (a cell function of one point:
the rows of one (x, line) by provider) and its plots (a y function of a point, one series per line)."""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

from .formatting import best, one, pick, plot, table


@dataclasses.dataclass(frozen=True)
class Context:
    """What every section may read besides its study's rows: where plots go, the machine's name, the run's
    ceilings."""

    out_dir: str
    machine: str
    ceiling: dict | None  # the fastest sgemm row
    peak: dict | None  # the FMA peak row
    bandwidth: dict | None  # the faster read-bandwidth row
    readers: list  # every read-bandwidth row


@dataclasses.dataclass(frozen=True)
class Point:
    """The rows of one (x, line) of a study by provider (``point["hand"]``; None where a provider has no row)."""

    x: int
    line: str
    rows: dict
    study_rows: list
    ctx: Context | None

    @classmethod
    def at(cls, study_rows: list, x, line: str, ctx: Context | None = None) -> "Point":
        """The point (x, line) of one study's rows."""
        by_provider = {}
        for r in pick(study_rows, x=x, line=line):
            by_provider.setdefault(r["provider"], r)
        return cls(x, line, by_provider, study_rows, ctx)

    def __getitem__(self, provider: str):
        return self.rows.get(provider)

    def best(self):
        """The faster of the hand and tuned rows (what schedule="best" gives)."""
        return best(self.study_rows, x=self.x, line=self.line)

    def sgemm_share(self) -> float | None:
        """The hand kernel's GFLOP/s over the sgemm's timed in the same round (provider "sgemm")."""
        return self["hand"]["gflops"] / self["sgemm"]["gflops"] if self["hand"] and self["sgemm"] else None

    def read_share(self) -> float | None:
        """A plain read of the same bytes timed in the same round (provider "read-kv") over the best schedule's
        time: the share of the minute's read rate the kernel reaches."""
        return self["read-kv"]["median_ms"] / self.best()["median_ms"] if self.best() and self["read-kv"] else None

    def other(self, line: str, provider: str):
        """Another line's row at the same x."""
        return one(self.study_rows, x=self.x, line=line, provider=provider)


@dataclasses.dataclass(frozen=True)
class Column:
    header: str
    cell: Callable[[Point], object]


@dataclasses.dataclass(frozen=True)
class Plot:
    """One PNG of a study: by default a series per line of ``y`` over the x values where it is not None."""

    name: str  # the file is <name>.png
    alt: str
    title: str  # may name {machine}
    xlabel: str
    ylabel: str
    y: Callable[[Point], float | None] | None = None
    # Instead of y: the series of one line, (line, its points in x order, the study's rows) -> [(label, xs, ys) or
    # (label, xs, ys, matplotlib style keywords), ...]
    series: Callable[[str, list, list], list] | None = None
    extra: Callable[[list, list], list] | None = None  # (study rows, xs) -> series after the lines'
    logy: bool = False
    hline: Callable[[Context], tuple | None] | None = None

    def line_series(self, line: str, points: list, rows: list) -> list:
        if self.series is not None:
            return self.series(line, points, rows)
        values = [(p.x, self.y(p)) for p in points]
        values = [(x, y) for x, y in values if y is not None]
        return [(line, [x for x, _ in values], [y for _, y in values])]


Text = Callable[[list, Context], list]  # (study rows, context) -> lines of markdown


@dataclasses.dataclass(frozen=True)
class Section:
    """A study's part of the report: "## title", intro, a table with a row per (x, line), notes, the plots' images,
    then ``after``. Title, intro, notes and after are text or functions of (study rows, context)."""

    study: str
    title: str | Callable[[list, Context], str]
    columns: tuple
    intro: tuple | Text = ()
    notes: tuple | Text = ()
    plots: tuple = ()
    after: tuple | Text = ()
    by_line: bool = False  # table rows line by line over the x values (else x by x, every line at each x)
    xs: Callable[[list, Context], list] | None = None  # which x values (default: every one, ascending)
    has_row: Callable[[Point], bool] = lambda point: True

    def render(self, rows: list, ctx: Context) -> list:
        rs = pick(rows, study=self.study)
        if not rs:
            return []

        def text(value):
            return list(value(rs, ctx) if callable(value) else value)

        xs = sorted({int(r["x"]) for r in rs})
        xs = self.xs(xs, ctx) if self.xs else xs
        lines = list(dict.fromkeys(r["line"] for r in rs))
        points = {}
        for x in xs:
            for line in lines:
                points[(x, line)] = Point.at(rs, x, line, ctx)
        order = [(x, line) for line in lines for x in xs] if self.by_line else [(x, line) for x in xs for line in lines]
        title = self.title(rs, ctx) if callable(self.title) else self.title
        parts = [f"## {title}", ""]
        intro = text(self.intro)
        if intro:
            parts += [*intro, ""]
        body = [[c.cell(points[key]) for c in self.columns] for key in order if self.has_row(points[key])]
        parts += [table([c.header for c in self.columns], body), ""]
        notes = text(self.notes)
        if notes:
            parts += [*notes, ""]
        for p in self.plots:
            series = [s for line in lines for s in p.line_series(line, [points[(x, line)] for x in xs], rs)]
            series += p.extra(rs, xs) if p.extra else []
            plot(os.path.join(ctx.out_dir, f"{p.name}.png"), p.title.format(machine=ctx.machine), p.xlabel,
                 p.ylabel, series, logy=p.logy, hline=p.hline(ctx) if p.hline else None)
        for p in self.plots:
            parts += [f"![{p.alt}]({p.name}.png)", ""]
        return parts + text(self.after)
