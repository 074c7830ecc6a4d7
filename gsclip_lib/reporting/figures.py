"""Figures of the pipeline (matplotlib, seaborn): the stages make them, the notebooks show them.

Every function returns a matplotlib ``Figure`` made without pyplot (:func:`new_figure`), so no
backend is involved and a notebook does not draw it by itself at the end of a cell:
:class:`gsclip_lib.stages.runner.StageRun` saves it as a PNG and shows that, once, where the
notebook asks for it.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from torch import Tensor

from gsclip_lib.reporting import paper



def new_figure(rows: int = 1, columns: int = 1, *, figsize: tuple[float, float], squeeze: bool = True):
    """``(figure, axes)`` as ``plt.subplots`` gives them, on a Figure that pyplot does not track."""
    figure = Figure(figsize=figsize)
    return figure, figure.subplots(rows, columns, squeeze=squeeze)


def to_display(image: Tensor) -> np.ndarray:  # [C, H, W] -> [H, W, C] or [H, W]
    array = image.detach().cpu().clamp(0, 1).permute(1, 2, 0).numpy()
    return array[..., 0] if array.shape[-1] == 1 else array


def plot_psnr_against_size(table: pd.DataFrame) -> Figure:
    """PSNR against splat count and against payload bytes, splats beside JPEG at the same bytes."""
    import seaborn as sns  # imported here: it adds a second to every stage's start-up
    figure, (by_count, by_bytes) = new_figure(1, 2, figsize=(11, 4))
    sns.lineplot(data=table, x="splats", y="psnr", marker="o", ax=by_count, label="splats", errorbar="sd")
    by_count.set_xscale("log")
    by_count.set_xlabel("splats per image")
    by_count.set_ylabel("PSNR (dB)")
    by_count.set_title("Fit quality against splat count")
    long = pd.concat(
        [
            table.assign(codec="splats (fp16)", bytes=table["payload_bytes"], quality=table["psnr_after_codec"]),
            table.assign(codec="JPEG, same budget", bytes=table["jpeg_bytes"], quality=table["jpeg_psnr"]),
        ]
    )
    sns.lineplot(data=long, x="bytes", y="quality", hue="codec", marker="o", ax=by_bytes, errorbar="sd")
    by_bytes.set_xscale("log")
    by_bytes.set_xlabel("bytes per image")
    by_bytes.set_ylabel("PSNR (dB)")
    by_bytes.set_title("Rate-distortion: splats against JPEG")
    figure.tight_layout()
    return figure


def plot_psnr_history(history: pd.DataFrame, hue: str = "splats") -> Figure:
    """Mean PSNR during fitting against steps and against seconds, one line per ``hue`` value."""
    import seaborn as sns  # imported here: it adds a second to every stage's start-up
    figure, (by_step, by_time) = new_figure(1, 2, figsize=(11, 4))
    for axis, x, label in ((by_step, "iteration", "step"), (by_time, "seconds", "seconds (wall)")):
        if x in history:
            sns.lineplot(data=history, x=x, y="psnr", hue=hue, palette="viridis", ax=axis)
        axis.set_xlabel(label)
        axis.set_ylabel("mean PSNR (dB)")
    by_step.set_title("Fitting progress against steps")
    by_time.set_title("... and against time")
    figure.tight_layout()
    return figure


def plot_photo_findings(table: pd.DataFrame) -> Figure:
    """Two of the paper's findings on the photos: (a) grid against random init at the largest count,
    (b) pruning a larger fit against fitting the count directly, at equal steps."""
    figure, (init_axis, prune_axis) = new_figure(1, 2, figsize=(11, 4))
    largest = table["splats"].max()
    first = table[table["splats"] == largest]
    if first["psnr_random_init"].notna().any():
        means = [first["psnr"].mean(), first["psnr_random_init"].mean()]
        init_axis.bar(["grid (structured)", "random"], means, color=["steelblue", "lightgrey"])
        for index, value in enumerate(means):
            init_axis.annotate(f"{value:.1f} dB", (index, value), ha="center", va="bottom", fontsize=9)
        reference = paper.GRID_VS_RANDOM
        init_axis.set_title(f"(a) init at {largest} splats: ours {means[0] - means[1]:+.1f} dB (paper "
                            f"{reference['grid_db'] - reference['random_db']:+.1f} at {reference['splats']})")
    init_axis.set_ylabel("PSNR (dB)")
    grouped = table.groupby("splats")[["psnr", "psnr_pruned_from_larger"]].mean().sort_index()
    prune_axis.plot(grouped.index, grouped["psnr"], marker="o", label="fitted directly")
    if grouped["psnr_pruned_from_larger"].notna().any():
        cascade = grouped["psnr_pruned_from_larger"].copy()
        cascade.iloc[-1] = grouped["psnr"].iloc[-1]  # the cascade starts from the largest direct fit
        prune_axis.plot(cascade.index, cascade, marker="s", label="pruned from the next larger, refitted")
    prune_axis.set_xscale("log")
    prune_axis.minorticks_off()
    prune_axis.set_xticks(list(grouped.index), labels=[str(count) for count in grouped.index])
    prune_axis.set_xlabel("splats per image")
    prune_axis.set_ylabel("PSNR (dB)")
    prune_axis.set_title("(b) at equal steps: the paper finds pruning wins")
    prune_axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def plot_captioned_samples(samples: list, columns: int = 8) -> Figure:
    """Image-text samples (anything with ``.image [C, H, W]`` and ``.caption``) with their captions."""
    rows = math.ceil(len(samples) / columns)
    figure, axes = new_figure(rows, columns, figsize=(2.0 * columns, 2.3 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, sample in zip(axes.flat, samples):
        axis.imshow(to_display(sample.image), cmap="gray")
        axis.set_title(sample.caption, fontsize=6, wrap=True)
    figure.tight_layout()
    return figure


def plot_zero_shot_against_ratio(evaluation: dict, title: str = "Zero-shot accuracy against compression") -> Figure:
    """The paper's main result, redrawn: zero-shot top-1 against compression ratio.

    ``evaluation`` is one evaluation set's scores (``metrics["sets"][split]`` of the evaluate stage).
    RGB pixels are a horizontal line (ratio 1); each splat level is a point at its real ratio; the
    JPEG and thumbnail baselines sit at the ratio of the bytes they actually used.
    """
    figure, axis = new_figure(figsize=(7, 4.5))
    rgb_top1 = 100 * evaluation["rgb"]["top1"]
    source = evaluation["rgb"]["source_bytes"]
    axis.axhline(rgb_top1, color="black", linestyle="--", label=f"RGB pixels ({rgb_top1:.1f} %)")
    levels = sorted(evaluation["levels"].values(), key=lambda row: row["ratio_payload"])
    axis.plot(
        [row["ratio_payload"] for row in levels], [100 * row["top1"] for row in levels],
        marker="o", label="splat encoder",
    )
    for row in levels:
        axis.annotate(f"N={row['splats']}", (row["ratio_payload"], 100 * row["top1"]), fontsize=8,
                      textcoords="offset points", xytext=(4, 4))
    backs = [row for row in levels if row.get("render_back")]
    if backs:
        axis.plot([row["ratio_payload"] for row in backs], [100 * row["render_back"]["top1"] for row in backs],
                  marker="x", linestyle=":", label="RGB on the splats rendered back")
    for method, marker in (("jpeg", "s"), ("thumbnail", "^")):
        rows = [row for row in evaluation.get("baselines", []) if row["method"] == method]
        if rows:
            ratios = [source / row["mean_bytes"] for row in rows]
            over = [row.get("over_budget_images", 0) > 0 for row in rows]
            axis.scatter(ratios, [100 * row["top1"] for row in rows], marker=marker,
                         label=f"RGB on {method}, same bytes", zorder=3)
            for ratio, row, is_over in zip(ratios, rows, over):
                if is_over:
                    axis.annotate("over budget", (ratio, 100 * row["top1"]), fontsize=7, color="grey",
                                  textcoords="offset points", xytext=(4, -10))
    chance = 100 / evaluation.get("classes", len(evaluation["rgb"]["per_class_top1"]))
    axis.axhline(chance, color="grey", linestyle=":", label=f"chance ({chance:.0f} %)")
    axis.set_xscale("log")
    axis.set_xlabel("compression ratio (source bytes / stored bytes)")
    axis.set_ylabel("zero-shot top-1 (%)")
    axis.set_title(title)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def plot_relative_accuracy(evaluation: dict, paper_levels: dict[float, float], title: str = "") -> Figure:
    """Finding (c): zero-shot top-1 relative to RGB pixels against compression ratio, ours (tower and
    render-back) beside the paper's (``paper_levels``: ratio -> relative accuracy)."""
    figure, axis = new_figure(figsize=(7, 4.2))
    rgb_top1 = evaluation["rgb"]["top1"]
    levels = sorted(evaluation["levels"].values(), key=lambda row: row["ratio_payload"])
    ratios = [row["ratio_payload"] for row in levels]
    axis.plot(ratios, [row["top1"] / rgb_top1 for row in levels], marker="o", label="ours: splat tower")
    for ratio, row in zip(ratios, levels):
        axis.annotate(f"{row['top1'] / rgb_top1:.2f}", (ratio, row["top1"] / rgb_top1), fontsize=8,
                      color="C0", textcoords="offset points", xytext=(-24, 6))
    if all(row.get("render_back") for row in levels):
        axis.plot(ratios, [row["render_back"]["top1"] / rgb_top1 for row in levels], marker="x", linestyle=":",
                  label="ours: RGB model on the splats rendered back")
    paper_ratios = sorted(paper_levels)
    axis.plot(paper_ratios, [paper_levels[r] for r in paper_ratios], marker="s", color="black",
              label="paper (v2, ViT-B/16, mean of 38 sets)")
    for ratio in paper_ratios:
        axis.annotate(f"{paper_levels[ratio]:.2f}", (ratio, paper_levels[ratio]), fontsize=8,
                      textcoords="offset points", xytext=(4, -12))
    axis.axhline(1.0, color="grey", linestyle="--", linewidth=0.8)
    axis.set_xscale("log")
    ticks = sorted({round(r, 1) for r in ratios})
    axis.minorticks_off()
    axis.set_xticks(ticks, labels=[f"{t:g}x" for t in ticks], fontsize=8)
    axis.set_xlabel("compression ratio")
    axis.set_ylabel("top-1 / top-1 of RGB pixels")
    axis.set_title(title or "Relative zero-shot accuracy against compression")
    axis.legend(fontsize=8, loc="lower left")
    figure.tight_layout()
    return figure


def plot_tower_against_render_back(evaluation: dict, title: str = "") -> Figure:
    """Finding (d): at every level, the splat tower beside the RGB model on the same splats rendered
    back to pixels, and on a thumbnail and a JPEG of the same bytes."""
    levels = sorted(evaluation["levels"].items(), key=lambda item: item[1]["ratio_payload"])
    baselines = {(row["method"], row["level"]): row for row in evaluation.get("baselines", [])}
    series = {"splat tower": [100 * row["top1"] for _, row in levels]}
    if all(row.get("render_back") for _, row in levels):
        series["RGB on splats rendered back"] = [100 * row["render_back"]["top1"] for _, row in levels]
    for method in ("thumbnail", "jpeg"):
        if all((method, name) in baselines for name, _ in levels):
            series[f"RGB on {method}, same bytes"] = [100 * baselines[(method, name)]["top1"] for name, _ in levels]
    figure, axis = new_figure(figsize=(7.5, 4.2))
    width = 0.8 / len(series)
    for index, (label, values) in enumerate(series.items()):
        offsets = [i + (index - (len(series) - 1) / 2) * width for i in range(len(levels))]
        bars = axis.bar(offsets, values, width, label=label)
        axis.bar_label(bars, fmt="%.1f", fontsize=7)
    axis.axhline(100 * evaluation["rgb"]["top1"], color="black", linestyle="--", linewidth=0.8, label="RGB pixels")
    axis.set_xticks(range(len(levels)), [f"{name}\n{row['ratio_payload']:.1f}x" for name, row in levels])
    axis.set_ylabel("zero-shot top-1 (%)")
    axis.set_title(title or "The tower against its own splats rendered back")
    axis.legend(fontsize=7, loc="lower left")
    figure.tight_layout()
    return figure


def plot_training_curves(histories: dict[str, list[dict]]) -> Figure:
    """Loss against step for every training stage (one panel each)."""
    names = [name for name, rows in histories.items() if rows]
    columns = min(4, max(1, len(names)))
    rows_count = math.ceil(len(names) / columns) if names else 1
    figure, axes = new_figure(rows_count, columns, figsize=(3.6 * columns, 2.8 * rows_count), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, name in zip(axes.flat, names):
        axis.axis("on")
        table = pd.DataFrame(histories[name])
        axis.plot(table["step"], table["loss"])
        axis.set_title(name, fontsize=9)
        axis.set_xlabel("step")
        axis.set_ylabel("loss")
    figure.tight_layout()
    return figure


def plot_stage_times(stage_seconds: dict[str, float], throughput: dict[str, float] | None = None) -> Figure:
    """Wall time of every stage, and fitting throughput (images/s) where known."""
    import seaborn as sns  # imported here: it adds a second to every stage's start-up
    panels = 2 if throughput else 1
    figure, axes = new_figure(1, panels, figsize=(6 * panels, 3.8), squeeze=False)
    names = list(stage_seconds)
    sns.barplot(x=[stage_seconds[name] / 60 for name in names], y=names, ax=axes[0, 0], color="steelblue")
    axes[0, 0].set_xlabel("minutes")
    axes[0, 0].set_title(f"Stage wall time (total {sum(stage_seconds.values()) / 60:.1f} min)")
    if throughput:
        labels = list(throughput)
        sns.barplot(x=[throughput[name] for name in labels], y=labels, ax=axes[0, 1], color="seagreen")
        axes[0, 1].set_xlabel("images per second")
        axes[0, 1].set_title("Fitting throughput")
    figure.tight_layout()
    return figure


def plot_pruning(metrics: dict, fitted_count: int, split: str) -> Figure:
    """The prune stage's cascade on one split: PSNR at every level after pruning alone and after the
    refit, and, where measured, the same count fitted directly with as many steps."""
    levels = metrics["levels"]
    names = list(levels)
    counts = [levels[name][split]["splats"] for name in names]
    before = [levels[name][split]["mean_psnr_before"] for name in names]
    after = [levels[name][split]["mean_psnr"] for name in names]
    figure, axis = new_figure(figsize=(6.5, 4))
    pruned = [levels[name][split]["mean_psnr_pruned"] for name in names]
    axis.plot([fitted_count, *counts], [before[0], *after], marker="o", label="pruned from the level above, refitted")
    axis.plot(counts, pruned, marker="v", linestyle=":", color="grey", label="pruned only (no refit)")
    if "fit_small" in metrics:
        direct = [metrics["fit_small"][name]["fit_small"] for name in names]
        axis.plot(counts, direct, marker="s", linestyle="--", label="fitted directly, same total steps")
    axis.set_xscale("log")
    axis.minorticks_off()
    axis.set_xticks([fitted_count, *counts], labels=[str(c) for c in [fitted_count, *counts]])
    axis.set_xlabel("splats per image")
    axis.set_ylabel(f"mean PSNR on {split} (dB)")
    axis.set_title("Pruning: each level from the one above")
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure
