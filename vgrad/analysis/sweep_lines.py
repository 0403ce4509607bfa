"""Which runs of a sweep make which line, bar or cell of a sweep figure, and what the
caption says about them (no matplotlib).

**Nothing is pooled silently.** ``split`` makes one line per value of a figure's axis
(colour) and, when a second axis varies, per value of that one too (line style, depth
first: ``second_axis``); any further axis that varies is pooled, and ``pooled_note``
names it with its values; ``lines_note`` says how many configurations and seeds a line
pools. Categories keep the order of the sweep (``ordered``). Runs that did not record a
statistic a panel draws while other runs did are named (``recorded_lines``: "not
recorded in: act=relu (delta_norm)"), never just left out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from vgrad.analysis.naming import axis_name, label, varying_axes
from vgrad.analysis.recorded import recorded
from vgrad.analysis.style import STYLES, palette, seed_note
from vgrad.analysis.tables import Run, Sweep, axis_column


def ordered(values: pd.Series) -> list[str]:
    """The distinct values of a column as text, in the order the sweep made them."""
    return list(dict.fromkeys(values.astype(str)))


@dataclass
class Line:
    """The runs drawn as one line (or bar) of a sweep figure."""

    label: str
    runs: list[Run]
    color: object
    style: str = "-"


@dataclass
class Split:
    """How a sweep figure splits its runs: the lines, what it pools (named in the
    caption) and the axis drawn by line style, if any."""

    lines: list[Line]
    pooled: str  # "" or "pooled over depth (2, 4, 8)"
    style_axis: str | None = None


#: Axes that change the number of layers come first for the line style: a profile
#: across layers cannot pool nets of different depths.
SHAPE_AXES = ("depth", "widths")


def second_axis(runs: pd.DataFrame, first: str, most: int) -> str | None:
    """The varying axis drawn beside ``first`` (depth first): the first with at most
    ``most`` values."""
    ended = runs[runs["status"] != "failed"].drop_duplicates("run")
    col = axis_column(runs, first)
    others = sorted((a for a in varying_axes(ended) if axis_column(runs, a) != col),
                    key=lambda a: a not in SHAPE_AXES)
    return next((a for a in others if ended[axis_column(runs, a)].astype(str).nunique() <= most),
                None)


def split(sweep: Sweep, hue: str) -> Split:
    """One line per value of ``hue`` (colour) and of a second varying axis (line style,
    up to four values; depth first); any other varying axis is pooled and named."""
    runs = sweep.runs
    ended = runs[runs["status"] != "failed"].drop_duplicates("run")
    hue_col = axis_column(runs, hue)
    style_axis = second_axis(runs, hue, len(STYLES))
    pooled = pooled_note(runs, [hue] + ([style_axis] if style_axis else []))
    hues = ordered(ended[hue_col])
    colors = dict(zip(hues, palette(len(hues)), strict=True))
    styles = ({v: STYLES[i] for i, v in enumerate(ordered(ended[axis_column(runs,
                                                                             style_axis)]))}
              if style_axis else {})
    lines: dict[tuple[str, str], Line] = {}
    for _, row in ended.iterrows():
        h = str(row[hue_col])
        s = str(row[axis_column(runs, style_axis)]) if style_axis else ""
        text = label(hue, h) + (f", {label(style_axis, s)}" if style_axis else "")
        line = lines.setdefault((h, s), Line(text, [], colors[h], styles.get(s, "-")))
        line.runs.append(sweep.run(row["run"]))
    return Split(list(lines.values()), pooled, style_axis)


def by_axes(hue: str, style_axis: str | None) -> str:
    return axis_name(hue) + (f" and {axis_name(style_axis)}" if style_axis else "")


#: Lines (or runs) a "not recorded in" note names before it says how many more.
MAX_NAMED = 6


def recorded_lines(lines: Sequence[Line], key: str) -> tuple[list[Line | None], str]:
    """Each line cut to its runs that recorded ``key`` (None for a line with none), and
    a note naming the lines, or the runs of a line, that did not: "not recorded in:
    act=relu; act=tanh [run 3] (delta_norm)". The note is "" when every run recorded
    ``key``, and also when none did (the figure says that in its own way)."""
    kept: list[Line | None] = []
    missing: list[str] = []
    for line in lines:
        flags = [recorded(r, key) for r in line.runs]
        runs = [r for r, f in zip(line.runs, flags, strict=True) if f]
        kept.append(dataclasses.replace(line, runs=runs) if runs else None)
        if not all(flags):
            names = [r.name for r, f in zip(line.runs, flags, strict=True) if not f]
            missing.append(line.label if not runs else
                           f"{line.label} [run{'s' if len(names) > 1 else ''} "
                           f"{', '.join(names)}]")
    if not missing or all(line is None for line in kept):
        return kept, ""
    return kept, not_recorded(missing, key)


def not_recorded(missing: list[str], key: str) -> str:
    named = "; ".join(missing[:MAX_NAMED])
    if len(missing) > MAX_NAMED:
        named += f" and {len(missing) - MAX_NAMED} more"
    return f"not recorded in: {named} ({key})"


def category_lines(sweep: Sweep, ended: pd.DataFrame, columns: Sequence[str],
                   axes: Sequence[str]) -> dict[tuple[str, ...], Line]:
    """The runs of each category (a bar, a heatmap cell) as a Line labelled
    ``axis=value, ...``, keyed by the category's values (``columns`` of ``ended``)."""
    out: dict[tuple[str, ...], Line] = {}
    for _, row in ended.drop_duplicates("run").iterrows():
        key = tuple(str(row[c]) for c in columns)
        text = ", ".join(label(a, v) for a, v in zip(axes, key, strict=True))
        out.setdefault(key, Line(text, [], None)).runs.append(sweep.run(row["run"]))
    return out


def _seeds_of(lines: list[Line]) -> int:
    counts = [sum(len(r.rows()) for r in line.runs) for line in lines]
    return min(counts) if counts else 0


def lines_note(lines: list[Line], block: int = 1, bands: bool = True) -> str:
    """The caption's count of what each line is a median (or mean) of: seeds, or, where
    a line pools runs of several configurations, those runs and their seeds (a line
    over 10 depths of 1 seed each is not "10 seeds")."""
    n, runs = _seeds_of(lines), min((len(line.runs) for line in lines), default=1)
    note = seed_note(n, block, bands)
    if runs > 1 and n > 1:
        seeds = n // runs if n % runs == 0 else None
        each = f"{seeds} seed{'s' if seeds != 1 else ''} each" if seeds else "their seeds"
        note = note.replace(f"of {n} seeds", f"of {n} curves per line ({runs} pooled runs, "
                                             f"{each})", 1)
    return note


def runs_of(lines: Sequence[Line | None]) -> list[Run]:
    return [r for line in lines if line is not None for r in line.runs]


def pooled_note(runs: pd.DataFrame, named: Sequence[str]) -> str:
    """'pooled over a (..); b (..)' for the varying axes not in ``named``."""
    ended = runs[runs["status"] != "failed"].drop_duplicates("run")
    cols = {axis_column(runs, a) for a in named}
    pooled = [a for a in varying_axes(ended) if axis_column(runs, a) not in cols]
    if not pooled:
        return ""
    parts = [f"{a} ({', '.join(ordered(ended[axis_column(runs, a)]))})" for a in pooled]
    return "pooled over " + "; ".join(parts)
