"""Figures of the pages (matplotlib): the fitting, data, training and run-time figures, and the
helpers and conventions every figure of the project shares.

Every function returns a matplotlib ``Figure`` made without pyplot (:func:`new_figure`), so no
backend is involved and a notebook does not draw it by itself at the end of a cell: the page's
:class:`gsclip_lib.pages.frame.Page` saves it as a PNG and shows that, once, where the notebook
asks for it. The zero-shot figures are in :mod:`gsclip_lib.reporting.zero_shot_figures`, the
figures that render splats in :mod:`gsclip_lib.reporting.splat_figures`; both draw with the
helpers here.

Conventions every figure keeps, so that a reader of the executed pages can trust them:

- constrained layout, legends outside the axes (:func:`legend_below`), no text past the edge;
- log axes tick only at the data's own values, in plain numbers (:func:`plain_log_ticks`);
- accuracies carry their 95 % intervals; comparisons are drawn as differences around a zero line
  (:func:`draw_difference`), filled where the interval excludes zero, hollow where it does not;
- titles say what is drawn, never what it means.
"""

from __future__ import annotations

import math
import re
import textwrap
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.container import ErrorbarContainer
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from gsclip_lib.reporting import paper

if TYPE_CHECKING:  # the plain plots run without torch (pages that draw no splat start faster)
    from torch import Tensor

Z95 = 1.96  # two-sided 95 % normal quantile
LEGEND_FONT = 8


# Helpers shared by the figures.


def new_figure(
    rows: int = 1, columns: int = 1, *, figsize: tuple[float, float], squeeze: bool = True
) -> tuple[Figure, Any]:
    """``(figure, axes)`` as ``plt.subplots`` gives them, on a Figure that pyplot does not track,
    laid out by matplotlib's constrained layout (titles, labels and outside legends all fit)."""
    figure = Figure(figsize=figsize, layout="constrained")
    return figure, figure.subplots(rows, columns, squeeze=squeeze)


def to_display(image: Tensor) -> np.ndarray:  # [C, H, W] -> [H, W, C] or [H, W]
    array = image.detach().cpu().clamp(0, 1).permute(1, 2, 0).numpy()
    return array[..., 0] if array.shape[-1] == 1 else array


def plain_number(value: float) -> str:
    """``3136``, ``12,800``, ``2.5``: a tick label without powers of ten."""
    if abs(value) >= 10:
        return f"{value:,.0f}"
    return f"{value:.2g}"


def plain_log_ticks(
    axis: Axes, values: Iterable[float], *, which: str = "x", label: Callable[[float], str] = plain_number,
    spacing: float = 0.15,
) -> list[float]:
    """Log scale on ``axis``'s x (or y) axis, ticks only at ``values`` in plain numbers, no minor ticks.

    ``values`` are taken in order of priority: one closer than ``spacing`` (natural log) to a kept
    tick is left out, so near-equal values (2.97 and 3.00) share one tick. Returns the ticks."""
    kept: list[float] = []
    for value in values:
        if value > 0 and math.isfinite(value) and all(abs(math.log(value / tick)) > spacing for tick in kept):
            kept.append(float(value))
    kept.sort()
    if which == "x":
        axis.set_xscale("log")
        axis.set_xticks(kept, labels=[label(tick) for tick in kept])
    else:
        axis.set_yscale("log")
        axis.set_yticks(kept, labels=[label(tick) for tick in kept])
    axis.minorticks_off()
    return kept


def spans(values: Sequence[float], lows: Sequence[float], highs: Sequence[float]) -> np.ndarray:
    """``[2, n]`` error-bar lengths below and above each value (0 where an end is missing)."""
    value = np.asarray(values, dtype=float)
    below = np.nan_to_num(value - np.asarray(lows, dtype=float), nan=0.0)
    above = np.nan_to_num(np.asarray(highs, dtype=float) - value, nan=0.0)
    return np.vstack([np.clip(below, 0, None), np.clip(above, 0, None)])


def mean_interval(values: Iterable[float]) -> tuple[float, float, float, int]:
    """``(mean, low, high, n)`` of the finite values: mean +- 1.96 sd / sqrt(n); NaN ends when n < 2."""
    finite = np.asarray(list(values), dtype=float)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return math.nan, math.nan, math.nan, 0
    mean = float(finite.mean())
    if finite.size < 2:
        return mean, math.nan, math.nan, 1
    half = Z95 * float(finite.std(ddof=1)) / math.sqrt(finite.size)
    return mean, mean - half, mean + half, int(finite.size)


def excludes_zero(low: float, high: float) -> bool:
    """Whether the interval ``[low, high]`` lies wholly on one side of zero (False if an end is NaN)."""
    return bool(low > 0 or high < 0)


def draw_difference(
    axis: Axes, position: float, value: float, low: float, high: float, *, colour: str = "C0",
    marker: str = "o", gid: str | None = None,
) -> ErrorbarContainer:
    """One difference at height ``position`` with its horizontal interval: a filled marker where the
    interval excludes zero, a hollow (white) one where it does not. ``gid`` names the marker line."""
    filled = excludes_zero(low, high)
    container = axis.errorbar(
        [value], [position], xerr=spans([value], [low], [high]), fmt=marker, color=colour, markersize=7,
        markerfacecolor=colour if filled else "white", markeredgecolor=colour, capsize=3, linewidth=1.2,
    )
    container.lines[0].set_gid(gid)
    return container


def fill_handles(unmeasured: bool = False) -> list[Line2D]:
    """Legend entries that explain filled against hollow markers of :func:`draw_difference`;
    ``unmeasured``: some markers have no interval (one image), hollow too."""
    hollow = "95 % interval includes 0" + (", or no interval (n = 1)" if unmeasured else "")
    return [
        Line2D([], [], marker="o", linestyle="none", color="dimgrey", label="95 % interval excludes 0"),
        Line2D([], [], marker="o", linestyle="none", color="dimgrey", markerfacecolor="white", label=hollow),
    ]


def legend_below(figure: Figure, handles: Sequence | None = None, axis: Axes | None = None) -> None:
    """The figure's legend under its axes, in as many columns as its width holds; nothing when there
    is no labelled artist. ``handles`` default to ``axis``'s labelled artists (the first axes')."""
    if handles is None:
        handles, _ = (axis or figure.axes[0]).get_legend_handles_labels()
    handles = [handle for handle in handles if not str(handle.get_label()).startswith("_")]
    if not handles:
        return
    longest = max(len(str(handle.get_label())) for handle in handles)
    entry_inches = 0.6 + longest * LEGEND_FONT * 0.56 / 72
    columns = max(1, min(len(handles), int(0.95 * figure.get_figwidth() / entry_inches)))
    figure.legend(handles=handles, loc="outside lower center", ncols=columns, fontsize=LEGEND_FONT, frameon=False)


def nudge(count: int, index: int, step: float = 0.045) -> float:
    """Factor that spreads ``count`` series sideways on a log axis (the ``index``-th of them)."""
    return math.exp(step * (index - (count - 1) / 2))


def splat_count(level: str) -> int:
    """``"N3136"`` -> 3136 (0 when the name holds no number): sorts level names by count."""
    found = re.search(r"\d+", str(level))
    return int(found.group()) if found else 0


# Fitting.


def grouped_interval(table: pd.DataFrame, by: str, column: str) -> pd.DataFrame:
    """Per value of ``by``: ``mean``, ``low``, ``high``, ``n`` of ``column`` (:func:`mean_interval`)."""
    rows = {key: mean_interval(group[column]) for key, group in table.groupby(by)}
    return pd.DataFrame.from_dict(rows, orient="index", columns=["mean", "low", "high", "n"]).sort_index()


def plot_psnr_against_size(table: pd.DataFrame) -> Figure:
    """PSNR against splat count and against bytes, means over the photos with 95 % intervals.

    Reads the columns ``splats``, ``psnr``, ``psnr_pruned_from_larger`` (NaN where no pruned fit, as
    at the largest count), ``payload_bytes``, ``psnr_after_codec``, ``jpeg_bytes``, ``jpeg_psnr``."""
    figure, (by_count, by_bytes) = new_figure(1, 2, figsize=(11, 4.4))
    direct = grouped_interval(table, "splats", "psnr")
    by_count.errorbar(direct.index, direct["mean"], yerr=spans(direct["mean"], direct["low"], direct["high"]),
                      marker="o", capsize=3, color="C0", label="fitted directly")
    pruned = grouped_interval(table, "splats", "psnr_pruned_from_larger").dropna(subset=["mean"])
    if len(pruned):
        shown = pruned.index * nudge(2, 1)
        by_count.errorbar(shown, pruned["mean"], yerr=spans(pruned["mean"], pruned["low"], pruned["high"]),
                          marker="s", linestyle="--", capsize=3, color="C1",
                          label="pruned from the next larger fit, refitted")
    plain_log_ticks(by_count, direct.index)
    by_count.set_xlabel("splats per image")
    by_count.set_ylabel("PSNR (dB)")
    by_count.set_title("PSNR against splat count")
    splat_bytes = grouped_interval(table, "splats", "payload_bytes")["mean"]
    for column, x, label, marker, colour in (
        ("psnr_after_codec", splat_bytes, "splats (fp16 payload)", "o", "C0"),
        ("jpeg_psnr", grouped_interval(table, "splats", "jpeg_bytes")["mean"], "JPEG at the same budget", "^", "C2"),
    ):
        quality = grouped_interval(table, "splats", column)
        by_bytes.errorbar(x, quality["mean"], yerr=spans(quality["mean"], quality["low"], quality["high"]),
                          marker=marker, capsize=3, color=colour, label=label)
    plain_log_ticks(by_bytes, splat_bytes)
    by_bytes.set_xlabel("bytes per image (mean)")
    by_bytes.set_ylabel("PSNR (dB)")
    by_bytes.set_title("PSNR against bytes: splats and JPEG")
    handles = by_count.get_legend_handles_labels()[0] + by_bytes.get_legend_handles_labels()[0]
    legend_below(figure, handles)
    return figure


def plot_psnr_history(history: pd.DataFrame, hue: str = "splats") -> Figure:
    """Mean PSNR during fitting against steps and against seconds, one line per ``hue`` value.

    Reads the columns ``psnr``, ``hue``, and ``iteration`` and ``seconds`` where present."""
    figure, (by_step, by_time) = new_figure(1, 2, figsize=(11, 4))
    values = sorted(history[hue].unique()) if hue in history else []
    palette = colormaps["viridis"]
    for axis, x, label in ((by_step, "iteration", "step"), (by_time, "seconds", "seconds (wall)")):
        for index, value in enumerate(values):
            rows = history[history[hue] == value].sort_values(x) if x in history else None
            if rows is not None:
                axis.plot(rows[x], rows["psnr"], color=palette(index / max(1, len(values) - 1) * 0.9),
                          label=f"{plain_number(value)}" if isinstance(value, (int, float, np.number)) else str(value))
        axis.set_xlabel(label)
        axis.set_ylabel("mean PSNR (dB)")
    by_step.set_title("Fitting: PSNR against steps")
    by_time.set_title("Fitting: PSNR against wall time")
    if values and by_step.get_legend_handles_labels()[0]:
        figure.legend(*by_step.get_legend_handles_labels(), loc="outside right upper", fontsize=LEGEND_FONT,
                      title=hue, title_fontsize=LEGEND_FONT, frameon=False)
    return figure


def draw_pruned_minus_direct(axis: Axes, table: pd.DataFrame, by: str, groups: Sequence, columns: tuple[str, str], *,
                             label: str) -> list[int]:
    """Finding (b), one row per value of ``by`` in ``groups``, the first at position 0: the mean of
    ``columns[0]`` minus ``columns[1]`` over the table's rows of that value, with its 95 % interval
    (:func:`mean_interval`), as an orange square (:func:`draw_difference`). Each row is labelled
    ``label`` formatted with ``group`` and ``n``; returns the number of rows behind each mean."""
    labels, sizes = [], []
    pruned, direct = columns
    for position, group in enumerate(groups):
        rows = table[table[by] == group]
        mean, low, high, n = mean_interval(rows[pruned] - rows[direct])
        draw_difference(axis, position, mean, low, high, colour="C1", marker="s", gid=str(group))
        labels.append(label.format(group=group, n=n))
        sizes.append(n)
    axis.set_yticks(range(len(labels)), labels=labels)
    return sizes


def plot_photo_findings(table: pd.DataFrame) -> Figure:
    """Two of the paper's fitting findings on the photos, each as a difference per photo (mean, 95 %
    interval) around zero: (a) grid minus random init at the largest count, beside the paper's; (b)
    pruned from the next larger fit minus fitted directly, at equal steps, per count.

    Reads the columns ``splats``, ``psnr``, ``psnr_random_init``, ``psnr_pruned_from_larger``."""
    largest = table["splats"].max()
    first = table[table["splats"] == largest]
    has_init = bool(first["psnr_random_init"].notna().any())
    pruned_counts = sorted(table.loc[table["psnr_pruned_from_larger"].notna(), "splats"].unique(), reverse=True)
    panels = int(has_init) + int(bool(pruned_counts))
    figure, axes = new_figure(1, max(1, panels), figsize=(11 if panels > 1 else 6.5, 1.9 + 0.45 * max(
        2, len(pruned_counts))), squeeze=False)
    axes, sizes = list(axes.flat), []
    if has_init:
        axis = axes.pop(0)
        mean, low, high, n = mean_interval(first["psnr"] - first["psnr_random_init"])
        draw_difference(axis, 0, mean, low, high, gid="ours")
        sizes.append(n)
        reference = paper.GRID_VS_RANDOM
        axis.plot([reference["grid_db"] - reference["random_db"]], [1], marker="s", color="black", linestyle="none")
        axis.set_yticks([0, 1], labels=[f"ours: {largest} splats\n({n} photo{'s' if n != 1 else ''})",
                                        f"paper: {reference['splats']} splats"])
        axis.set_xlabel("grid init minus random init (dB)")
        axis.set_title(textwrap.fill(f"(a) grid vs random initialisation, {largest} splats", 50), fontsize=11)
    if pruned_counts:
        axis = axes.pop(0)
        sizes += draw_pruned_minus_direct(axis, table, "splats", pruned_counts, ("psnr_pruned_from_larger", "psnr"),
                                          label="{group} splats (n={n})")
        axis.set_xlabel("pruned minus fitted directly (dB)")
        axis.set_title(textwrap.fill("(b) pruned from the next larger fit vs fitted directly, equal steps", 50),
                       fontsize=11)
    for axis in figure.axes:
        axis.axvline(0, color="black", linewidth=0.8)
        axis.set_ylim(axis.get_ylim()[1] + 0.4, axis.get_ylim()[0] - 0.4)  # first row on top, some air
    if panels == 0:
        axes[0].axis("off")
        axes[0].text(0.5, 0.5, "no random-init or pruned fit in this table", ha="center", va="center")
    legend_below(figure, fill_handles(unmeasured=min(sizes, default=2) < 2))
    return figure


def plot_paired_psnr(table: pd.DataFrame, title: str = "") -> Figure:
    """Finding (b) on the evaluation split: per level, the mean of pruned minus fitted directly over
    the images, with its 95 % interval (mean +- 1.96 sd / sqrt(n)), around a zero line.

    Reads the columns ``level`` (``"N11"``), ``pruned_psnr`` and ``direct_psnr`` (one row per image)."""
    levels = sorted(table["level"].unique(), key=splat_count, reverse=True)
    figure, axis = new_figure(figsize=(7, 1.9 + 0.45 * max(2, len(levels))))
    sizes = draw_pruned_minus_direct(axis, table, "level", levels, ("pruned_psnr", "direct_psnr"),
                                     label="{group} (n={n:,})")
    axis.axvline(0, color="black", linewidth=0.8)
    axis.set_ylim(len(levels) - 0.5, -0.5)
    axis.set_xlabel("pruned minus fitted directly, same steps (dB)")
    axis.set_title(title or "Pruned from the level above minus fitted directly, per image")
    legend_below(figure, fill_handles(unmeasured=min(sizes, default=2) < 2))
    return figure


def plot_pruning(metrics: dict, fitted_count: int, split: str) -> Figure:
    """The prune stage's cascade on one split: PSNR at every level after pruning alone and after the
    refit, and, where measured, the same count fitted directly with as many steps.

    Reads ``metrics["levels"][name][split]``: ``splats``, ``mean_psnr_before``, ``mean_psnr``,
    ``mean_psnr_pruned`` and, when present, ``psnr_low`` / ``psnr_high`` (95 % interval of
    ``mean_psnr``, drawn as error bars); and ``metrics["fit_small"][name]["fit_small"]`` if present."""
    names = list(metrics["levels"])
    rows = [metrics["levels"][name][split] for name in names]
    counts = [row["splats"] for row in rows]
    figure, axis = new_figure(figsize=(7, 4.6))
    x = [fitted_count, *counts]
    y = [rows[0]["mean_psnr_before"], *[row["mean_psnr"] for row in rows]]
    style = {"marker": "o", "color": "C0", "label": "pruned from the level above, refitted"}
    if all("psnr_low" in row and "psnr_high" in row for row in rows):
        low = [math.nan, *[row["psnr_low"] for row in rows]]
        high = [math.nan, *[row["psnr_high"] for row in rows]]
        handles = [axis.errorbar(x, y, yerr=spans(y, low, high), capsize=3, **style)]
    else:
        handles = axis.plot(x, y, **style)
    if "fit_small" in metrics:
        direct = [metrics["fit_small"].get(name, {}).get("fit_small", math.nan) for name in names]
        handles += axis.plot(np.asarray(counts) * nudge(2, 1), direct, marker="s", linestyle="--", color="C1",
                             label="fitted directly, same total steps")
    handles += axis.plot(counts, [row["mean_psnr_pruned"] for row in rows], marker="v", linestyle=":", color="grey",
                         label="pruned only (no refit)")
    plain_log_ticks(axis, x)
    axis.set_xlabel("splats per image")
    axis.set_ylabel(f"mean PSNR on {split} (dB)")
    axis.set_title(f"Pruning cascade on {split}: each level from the one above")
    legend_below(figure, handles)
    return figure


# Data.


def plot_captioned_samples(samples: list, columns: int = 8) -> Figure:
    """Image-text samples (anything with ``.image [C, H, W]`` and ``.caption``), each caption wrapped
    in full above its image (small font, never cut)."""
    columns = max(1, min(columns, len(samples)))
    rows = max(1, math.ceil(len(samples) / columns))
    wrapped = [textwrap.fill(str(sample.caption), width=28) for sample in samples]
    lines = max((caption.count("\n") + 1 for caption in wrapped), default=1)
    figure, axes = new_figure(rows, columns, figsize=(1.9 * columns, (1.8 + 0.13 * lines) * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, sample, caption in zip(axes.flat, samples, wrapped):
        axis.imshow(to_display(sample.image), cmap="gray")
        axis.set_title(caption, fontsize=6.5)
    return figure


# Training and run time.


def plot_training_curves(histories: dict[str, list[dict]]) -> Figure:
    """Loss against step for every training stage, one panel each, at most 4 columns.

    Reads ``{panel name: [{"step", "loss", ...}, ...]}``; panels with no rows are left out."""
    names = [name for name, rows in histories.items() if rows]
    columns = min(4, max(1, len(names)))
    rows_count = math.ceil(len(names) / columns) if names else 1
    figure, axes = new_figure(rows_count, columns, figsize=(3.4 * columns + 0.6, 2.9 * rows_count), squeeze=False)
    for axis in axes.flat[len(names):]:
        axis.set_visible(False)
    for axis, name in zip(axes.flat, names):
        table = pd.DataFrame(histories[name])
        axis.plot(table["step"], table["loss"], linewidth=1)
        axis.set_title(textwrap.fill(name, width=34), fontsize=9)
        axis.set_xlabel("step")
        axis.set_ylabel("loss")
    if not names:
        axes[0, 0].set_visible(True)
        axes[0, 0].axis("off")
        axes[0, 0].text(0.5, 0.5, "no training history", ha="center", va="center")
    return figure


DURATION_TICKS = {0.001: "1 ms", 0.01: "10 ms", 0.1: "0.1 s", 1: "1 s", 10: "10 s", 60: "1 min", 600: "10 min", 3600: "1 h", 36000: "10 h"}
DECADE_TICKS = {10.0 ** power: plain_number(10.0 ** power) for power in range(-2, 9)}


def duration_label(seconds: float) -> str:
    """``8.2 s``, ``45 s``, ``3.4 min``, ``1.2 h``."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.1f} h"


def written_bars(axis: Axes, names: Sequence[str], values: Sequence[float], written: Sequence[str], *,
                 colour: str, ticks: dict[float, str] | None = None) -> None:
    """Horizontal bars, first name on top, each value ``written`` at its bar's end. With ``ticks``
    (value -> label) the x axis is logarithmic with those plain labels, and the bars start at its
    left edge; the axis leaves room right of the longest bar for its text."""
    positions = range(len(names))
    if ticks is None:
        axis.barh(positions, values, color=colour)
        axis.set_xlim(0, 1.3 * max(values) if max(values, default=0) > 0 else 1)
    else:
        values = [max(float(value), 1e-3) for value in values]
        floor, top = min(values) / 2, max(values) * 8
        axis.barh(positions, [value - floor for value in values], left=floor, color=colour)
        axis.set_xscale("log")
        axis.set_xlim(floor, top)
        shown = [tick for tick in ticks if floor <= tick <= top]
        axis.set_xticks(shown, labels=[ticks[tick] for tick in shown])
        axis.minorticks_off()
    for position, value, text in zip(positions, values, written):
        axis.annotate(text, (value, position), xytext=(4, 0), textcoords="offset points", va="center", fontsize=8)
    axis.set_yticks(list(positions), labels=list(names))
    axis.set_ylim(len(names) - 0.5, -0.5)


def plot_stage_times(stage_seconds: dict[str, float], throughput: dict[str, float] | None = None) -> Figure:
    """Wall time of every stage as horizontal bars on a log axis (one stage dominates the run), each
    value written at its bar's end; beside it, fitting throughput (images/s) where known, on a log
    axis too when its values spread over more than a factor of 20.

    Reads ``stage_seconds``: ``{stage: seconds}`` and ``throughput``: ``{name: images per second}``."""
    panels = 2 if throughput else 1
    rows = max(len(stage_seconds), len(throughput or {}), 2)
    figure, axes = new_figure(1, panels, figsize=(6.5 * panels, 1.4 + 0.38 * rows), squeeze=False)
    seconds = [float(value) for value in stage_seconds.values()]
    written_bars(axes[0, 0], list(stage_seconds), seconds, [duration_label(value) for value in seconds],
                 colour="steelblue", ticks=DURATION_TICKS)
    axes[0, 0].set_xlabel("wall time (log scale)")
    axes[0, 0].set_title(f"Stage wall time (total {duration_label(sum(seconds))})")
    if throughput:
        values = [float(value) for value in throughput.values()]
        positive = [value for value in values if value > 0]
        spread = max(positive) / min(positive) if positive else 1.0
        written_bars(axes[0, 1], list(throughput), values,
                     [f"{value:,.1f}" if value < 100 else f"{value:,.0f}" for value in values],
                     colour="seagreen", ticks=DECADE_TICKS if spread > 20 else None)
        axes[0, 1].set_xlabel("images per second" + (" (log scale)" if spread > 20 else ""))
        axes[0, 1].set_title("Fitting throughput")
    return figure
