"""The zero-shot figures: accuracy against compression ratio, ours beside the paper's, and the
tower against each other representation (findings (c) and (d)). The evaluation page (06) and the
report page (07) draw them from one evaluation set's scores with their intervals
(:func:`gsclip_lib.reporting.comparisons.with_intervals`) and the rows that module derives from them.

They keep the conventions of :mod:`gsclip_lib.reporting.figures`, whose helpers they use: every
accuracy with its 95 % interval, the compression ratio on a log axis ticked at the data's own
ratios (:func:`ratio_axis`), comparisons drawn as differences around a zero line.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import numpy as np
from matplotlib.axes import Axes
from matplotlib.container import ErrorbarContainer
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from gsclip_lib.reporting.figures import (
    draw_difference,
    fill_handles,
    legend_below,
    new_figure,
    nudge,
    plain_log_ticks,
    spans,
)

BASELINES = {"jpeg": ("JPEG", "s", "C2"), "thumbnail": ("thumbnail", "^", "C3")}  # method -> name, marker, colour
AGAINST = {"rendered back": ("o", "C1"), "thumbnail": ("^", "C3"), "JPEG": ("s", "C2"), "RGB pixels": ("D", "C7")}
PAPER_LABEL = "paper (v2, mean of 38 sets)"


# Helpers of the figures below.


def ratio_label(ratio: float) -> str:
    """A compression ratio as ``3x``, ``5.9x``, ``24x``."""
    return f"{ratio:.0f}x" if ratio >= 10 else f"{ratio:.2g}x"


def accuracy_errorbar(axis: Axes, ratios: Sequence[float], rows: Sequence[dict], **style) -> ErrorbarContainer:
    """Top-1 (%) of ``rows`` (each with ``top1``, ``top1_low``, ``top1_high``, fractions) at ``ratios``."""
    top1 = [100 * row["top1"] for row in rows]
    low = [100 * row.get("top1_low", math.nan) for row in rows]
    high = [100 * row.get("top1_high", math.nan) for row in rows]
    return axis.errorbar(ratios, top1, yerr=spans(top1, low, high), capsize=3, markersize=6, **style)


def relative_errorbar(axis: Axes, ratios: Sequence[float], rows: Sequence[dict], **style) -> ErrorbarContainer:
    """``relative`` of ``rows`` with its ``relative_low`` / ``relative_high`` interval at ``ratios``."""
    value = [row["relative"] for row in rows]
    low = [row.get("relative_low", math.nan) for row in rows]
    high = [row.get("relative_high", math.nan) for row in rows]
    return axis.errorbar(ratios, value, yerr=spans(value, low, high), capsize=3, markersize=6, **style)


def level_tick_label(ratio: float, splats_at: dict[float, int]) -> str:
    """A ratio tick with the splat count of the level drawn there (``3x`` and ``N=22`` below it)."""
    return ratio_label(ratio) + (f"\nN={splats_at[ratio]}" if ratio in splats_at else "")


def ratio_axis(figure: Figure, axis: Axes, ratios: Sequence[float], *, ylabel: str, title: str,
               label: Callable[[float], str] = ratio_label) -> None:
    """Finish a figure drawn against compression ratio: the log x axis ticked at ``ratios`` (each
    written by ``label``), the axis titles, and the legend under the axes."""
    plain_log_ticks(axis, ratios, label=label)
    axis.set_xlabel("compression ratio (source bytes / stored bytes)")
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    legend_below(figure, axis=axis)


# The figures.


def plot_zero_shot_against_ratio(scores: dict, title: str = "Zero-shot accuracy against compression") -> Figure:
    """The paper's main result, redrawn: zero-shot top-1 (%) against compression ratio, 95 % intervals.

    ``scores`` is one evaluation set's scores. Reads ``rgb``: ``top1``, ``top1_low``, ``top1_high``,
    ``source_bytes`` (and ``classes`` or ``rgb.per_class_top1`` for the chance line); each of
    ``levels``: ``splats``, ``ratio_payload``, the three top-1 keys and ``render_back`` (the same);
    each of ``baselines``: ``method``, ``mean_bytes``, ``over_budget_images`` and the top-1 keys.
    RGB pixels are a dashed line in a shaded band; points of one level are nudged sideways a little."""
    figure, axis = new_figure(figsize=(7.5, 5.2))
    rgb = scores["rgb"]
    axis.axhspan(100 * rgb.get("top1_low", rgb["top1"]), 100 * rgb.get("top1_high", rgb["top1"]),
                 color="black", alpha=0.12, linewidth=0)
    axis.axhline(100 * rgb["top1"], color="black", linestyle="--", linewidth=1,
                 label=f"RGB pixels ({100 * rgb['top1']:.1f} %, band: 95 % interval)")
    levels = sorted(scores["levels"].values(), key=lambda row: row["ratio_payload"])
    ratios = np.array([row["ratio_payload"] for row in levels])
    accuracy_errorbar(axis, ratios * nudge(4, 0), levels, marker="o", color="C0", label="splat tower")
    backs = [(ratio, row["render_back"]) for ratio, row in zip(ratios, levels) if row.get("render_back")]
    if backs:
        accuracy_errorbar(axis, [ratio * nudge(4, 1) for ratio, _ in backs], [row for _, row in backs],
                          marker="x", linestyle=":", color="C1", label="RGB model on the splats rendered back")
    baselines = scores.get("baselines", [])
    methods = list(dict.fromkeys(row["method"] for row in baselines))
    for index, method in enumerate(methods):
        name, marker, colour = BASELINES.get(method, (method, "D", f"C{4 + index}"))
        for over in (False, True):
            rows = [row for row in baselines if row["method"] == method and (row.get("over_budget_images", 0) > 0) == over]
            if rows:
                accuracy_errorbar(axis, [rgb["source_bytes"] / row["mean_bytes"] * nudge(4, 2 + index) for row in rows],
                                  rows, marker=marker, linestyle="none", color=colour,
                                  markerfacecolor="white" if over else colour,
                                  label=f"RGB model on {name}, " + ("over budget" if over else "same bytes"))
    classes = scores.get("classes") or len(rgb.get("per_class_top1", []))
    if classes:
        axis.axhline(100 / classes, color="grey", linestyle=":", label=f"chance ({100 / classes:.0f} %)")
    splats_at = {float(row["ratio_payload"]): row["splats"] for row in levels}
    other = [rgb["source_bytes"] / row["mean_bytes"] for row in baselines]
    ratio_axis(figure, axis, [*splats_at, *other], ylabel="zero-shot top-1 (%)", title=title,
               label=partial(level_tick_label, splats_at=splats_at))
    return figure


def plot_relative_accuracy(scores: dict, paper_levels: dict[float, float], title: str = "") -> Figure:
    """Finding (c): zero-shot top-1 relative to RGB pixels against compression ratio, ours (tower and
    render-back, paired bootstrap 95 % intervals) beside the paper's (``paper_levels``: ratio ->
    relative accuracy). Reads each of ``scores["levels"]``: ``ratio_payload``, ``relative``,
    ``relative_low``, ``relative_high``, and ``render_back`` with the same three keys."""
    figure, axis = new_figure(figsize=(7.5, 4.8))
    levels = sorted(scores["levels"].values(), key=lambda row: row["ratio_payload"])
    ratios = [row["ratio_payload"] for row in levels]
    axis.axhline(1.0, color="grey", linestyle="--", linewidth=0.8, label="RGB pixels (1.0)")
    relative_errorbar(axis, [ratio * nudge(2, 0) for ratio in ratios], levels, marker="o", color="C0",
                      label="ours: splat tower")
    backs = [(ratio, row["render_back"]) for ratio, row in zip(ratios, levels)
             if row.get("render_back") and "relative" in row["render_back"]]
    if backs:
        relative_errorbar(axis, [ratio * nudge(2, 1) for ratio, _ in backs], [row for _, row in backs],
                          marker="x", linestyle=":", color="C1", label="ours: RGB model on the splats rendered back")
    paper_ratios = sorted(paper_levels)
    axis.plot(paper_ratios, [paper_levels[ratio] for ratio in paper_ratios], marker="s", linestyle="none",
              color="black", label="paper (v2, ViT-B/16, mean of 38 sets)")
    ratio_axis(figure, axis, [*ratios, *paper_ratios], ylabel="top-1 / top-1 of RGB pixels",
               title=title or "Relative zero-shot accuracy against compression")
    return figure


def plot_relative_against_paper(rows: list[dict], title: str = "") -> Figure:
    """The paper's main result redrawn: relative top-1 (tower / RGB) against compression ratio, ours
    per evaluation set with 95 % intervals, the paper's as one series.

    Reads each row's ``set``, ``level``, ``ratio``, ``relative``, ``low``, ``high`` and ``paper`` (the
    paper's relative accuracy at that level, or None); the paper's points sit at our levels' ratios."""
    figure, axis = new_figure(figsize=(7.5, 4.8))
    axis.axhline(1.0, color="grey", linestyle="--", linewidth=0.8, label="RGB pixels (1.0)")
    sets = list(dict.fromkeys(row["set"] for row in rows))
    for index, name in enumerate(sets):
        ours = sorted((row for row in rows if row["set"] == name), key=lambda row: row["ratio"])
        value = [row["relative"] for row in ours]
        axis.errorbar([row["ratio"] * nudge(len(sets) + 1, index) for row in ours], value,
                      yerr=spans(value, [row["low"] for row in ours], [row["high"] for row in ours]),
                      marker="o", capsize=3, color=f"C{index}", label=f"ours: {name}")
    by_level = {}
    for row in rows:
        if row.get("paper") is not None:
            by_level.setdefault(row["level"], (row["ratio"], row["paper"]))
    if by_level:
        points = sorted(by_level.values())
        axis.plot([ratio * nudge(len(sets) + 1, len(sets)) for ratio, _ in points], [value for _, value in points],
                  marker="s", color="black", linestyle="--", linewidth=1, label=PAPER_LABEL)
    ratio_axis(figure, axis, [row["ratio"] for row in rows], ylabel="relative top-1 (tower / RGB pixels)",
               title=title or "Relative zero-shot top-1 against compression, ours and the paper's")
    return figure


def plot_tower_differences(comparisons: list[dict], title: str = "") -> Figure:
    """Finding (d): at every level, the splat tower minus each other representation (percentage
    points) with its 95 % interval, around a zero line; filled where the interval excludes 0.

    Reads each dict's ``level``, ``ratio``, ``against``, ``difference``, ``low``, ``high`` (the
    ``verdict`` is not drawn: the fill says the same). One row per level, sorted by ratio; the
    representations of a level are spread vertically; one legend entry per representation present."""
    levels = sorted({(row["ratio"], row["level"]) for row in comparisons})
    against = [name for name in AGAINST if any(row["against"] == name for row in comparisons)]
    against += [name for name in dict.fromkeys(row["against"] for row in comparisons) if name not in against]
    height = 0.22 * max(1, len(against)) + 0.25
    figure, axis = new_figure(figsize=(7.5, 1.9 + height * max(2, len(levels))))
    position = {level: index for index, (_, level) in enumerate(levels)}
    step = 0.8 / max(1, len(against))
    handles = []
    for index, name in enumerate(against):
        marker, colour = AGAINST.get(name, ("v", f"C{4 + index}"))
        handles.append(Line2D([], [], marker=marker, color=colour, linestyle="none", label=f"minus {name}"))
        for row in comparisons:
            if row["against"] == name:
                y = position[row["level"]] + (index - (len(against) - 1) / 2) * step
                draw_difference(axis, y, row["difference"], row["low"], row["high"], colour=colour, marker=marker,
                                gid=f"{row['level']}|{name}")
    for boundary in range(1, len(levels)):
        axis.axhline(boundary - 0.5, color="lightgrey", linewidth=0.6)
    axis.axvline(0, color="black", linewidth=0.8)
    axis.set_yticks(range(len(levels)), labels=[f"{level} ({ratio_label(ratio)})" for ratio, level in levels])
    axis.set_ylim(len(levels) - 0.5, -0.5)
    axis.set_xlabel("tower minus the other (percentage points)")
    axis.set_title(title or "Splat tower minus the other representations, per level")
    legend_below(figure, handles + fill_handles())
    return figure

