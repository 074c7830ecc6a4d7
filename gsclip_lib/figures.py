"""Figures of the pipeline's notebooks (seaborn / matplotlib). Notebooks only call these."""

from __future__ import annotations

import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: papermill and CI have no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.patches import Ellipse  # noqa: E402
from torch import Tensor  # noqa: E402

from gsclip_lib.data_stages import load_level_examples  # noqa: E402
from gsclip_lib.image_quality import psnr  # noqa: E402
from gsclip_lib.render import render_splats  # noqa: E402
from gsclip_lib.splats import Splats  # noqa: E402


def _to_display(image: Tensor) -> np.ndarray:  # [C, H, W] -> [H, W, C] or [H, W]
    array = image.detach().cpu().clamp(0, 1).permute(1, 2, 0).numpy()
    return array[..., 0] if array.shape[-1] == 1 else array


def draw_splat_ellipses(
    axis: plt.Axes, splats: Splats, image_index: int, sigmas: float = 1.0, max_splats: int = 4000
) -> None:
    """Each valid splat as its ``sigmas``-sigma ellipse, filled with its (clamped) colour."""
    valid = splats.valid[image_index].cpu()
    covariance = splats.covariance()[image_index].detach().cpu()[valid][:max_splats]
    centres = splats.positions[image_index].detach().cpu()[valid][:max_splats]
    colours = splats.colours[image_index].detach().cpu()[valid][:max_splats]
    eigenvalues, eigenvectors = np.linalg.eigh(covariance.double().numpy())
    angles = np.degrees(np.arctan2(eigenvectors[:, 1, 1], eigenvectors[:, 0, 1]))
    for centre, (minor, major), angle, colour in zip(centres.numpy(), eigenvalues, angles, colours.numpy()):
        shade = np.clip(colour / max(float(np.abs(colours).max()), 1e-6), 0, 1)
        face = tuple(shade) if shade.shape[0] == 3 else (float(shade[0]),) * 3
        axis.add_patch(
            Ellipse(
                centre,
                2 * sigmas * math.sqrt(max(major, 0.0)),
                2 * sigmas * math.sqrt(max(minor, 0.0)),
                angle=angle,
                facecolor=face,
                edgecolor="none",
                alpha=0.6,
            )
        )


def plot_fit_gallery(
    images: Tensor,  # [B, C, H, W]
    renders: dict[int, Tensor],  # splat count -> [B, C, H, W]
    splats: dict[int, Splats] | None = None,  # splat count -> splats, drawn as ellipses if given
    titles: list[str] | None = None,
    psnr_by_count: dict[int, Tensor] | None = None,
) -> plt.Figure:
    """Rows of images: the original, then the render at each count (and its ellipses)."""
    counts = sorted(renders, reverse=True)
    per_count = 2 if splats else 1
    columns = 1 + per_count * len(counts)
    rows = images.shape[0]
    figure, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.3 * rows), squeeze=False)
    height, width = images.shape[-2:]
    for row in range(rows):
        axes[row, 0].imshow(_to_display(images[row]), cmap="gray")
        axes[row, 0].set_title(titles[row] if titles else "original", fontsize=9)
        for k, count in enumerate(counts):
            axis = axes[row, 1 + per_count * k]
            axis.imshow(_to_display(renders[count][row]), cmap="gray")
            label = f"N={count}"
            if psnr_by_count is not None:
                label += f", {float(psnr_by_count[count][row]):.1f} dB"
            axis.set_title(label, fontsize=9)
            if splats:
                ellipse_axis = axes[row, 2 + per_count * k]
                ellipse_axis.set_facecolor("black")
                draw_splat_ellipses(ellipse_axis, splats[count], row)
                ellipse_axis.set_xlim(0, width)
                ellipse_axis.set_ylim(height, 0)
                ellipse_axis.set_aspect("equal")
                ellipse_axis.set_title(f"N={count} ellipses", fontsize=9)
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    figure.tight_layout()
    return figure


def plot_psnr_against_size(table: pd.DataFrame) -> plt.Figure:
    """PSNR against splat count and against payload bytes, splats beside JPEG at the same bytes."""
    import seaborn as sns  # imported here: it adds a second to every stage's start-up
    figure, (by_count, by_bytes) = plt.subplots(1, 2, figsize=(11, 4))
    sns.lineplot(data=table, x="splats", y="psnr", marker="o", ax=by_count, label="splats", errorbar="sd")
    if "psnr_pruned_from_largest" in table and table["psnr_pruned_from_largest"].notna().any():
        sns.lineplot(
            data=table, x="splats", y="psnr_pruned_from_largest", marker="s", ax=by_count,
            label="pruned from largest + fine-tune", errorbar="sd",
        )
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


def plot_psnr_history(history: pd.DataFrame, hue: str = "splats") -> plt.Figure:
    """Mean PSNR during fitting, one line per ``hue`` value."""
    import seaborn as sns  # imported here: it adds a second to every stage's start-up
    figure, axis = plt.subplots(figsize=(6, 4))
    sns.lineplot(data=history, x="iteration", y="psnr", hue=hue, palette="viridis", ax=axis)
    axis.set_ylabel("mean PSNR (dB)")
    axis.set_title("Fitting progress")
    figure.tight_layout()
    return figure


def save_figure(figure: plt.Figure, path: str | Path) -> Path:
    """Save atomically (temporary name, then rename), so a crash never leaves half a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp{path.suffix}")
    figure.savefig(temporary, dpi=110, bbox_inches="tight")
    os.replace(temporary, path)
    return path


def plot_captioned_samples(samples: list, columns: int = 8) -> plt.Figure:
    """Image-text samples (anything with ``.image [C, H, W]`` and ``.caption``) with their captions."""
    rows = math.ceil(len(samples) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(2.0 * columns, 2.3 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, sample in zip(axes.flat, samples):
        axis.imshow(_to_display(sample.image), cmap="gray")
        axis.set_title(sample.caption, fontsize=6, wrap=True)
    figure.tight_layout()
    return figure


SMALL_RENDER = 4_000_000  # splat-pixel pairs up to which example figures render with the dense twin


def plot_level_examples(
    config, counts: list[int], split: str = "eval", count: int = 6, image_shards: str | None = None
) -> plt.Figure:
    """Originals of a split beside their renders and ellipses at each level in ``counts``.

    ``image_shards``: the split's image shards (see :func:`gsclip_lib.data_stages.load_level_examples`).
    """
    examples = load_level_examples(config, counts, split, count, image_shards)
    size, settings = config.image_size, config.optimizer

    def backend(splats: Splats) -> str:
        # A few small images render faster densely than through the compiled path's first call.
        return "dense" if splats.batch_size * splats.num_slots * size * size <= SMALL_RENDER else settings.backend

    renders = {
        level: render_splats(splats, size, size, backend=backend(splats), cutoff=settings.cutoff)
        for level, splats in examples.splats.items()
    }
    quality = {level: psnr(examples.images, render) for level, render in renders.items()}
    return plot_fit_gallery(
        examples.images,
        {level: render.clamp(0, 1) for level, render in renders.items()},
        splats=examples.splats,
        titles=[caption[:28] for caption in examples.captions],
        psnr_by_count=quality,
    )


def plot_zero_shot_against_ratio(evaluation: dict, title: str = "Zero-shot accuracy against compression") -> plt.Figure:
    """The paper's main result, redrawn: zero-shot top-1 against compression ratio.

    ``evaluation`` is one evaluation set's scores (``metrics["sets"][split]`` of the evaluate stage).
    RGB pixels are a horizontal line (ratio 1); each splat level is a point at its real ratio; the
    JPEG and thumbnail baselines sit at the ratio of the bytes they actually used.
    """
    figure, axis = plt.subplots(figsize=(7, 4.5))
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


def plot_training_curves(histories: dict[str, list[dict]]) -> plt.Figure:
    """Loss against step for every training stage (one panel each)."""
    names = [name for name, rows in histories.items() if rows]
    columns = min(4, max(1, len(names)))
    rows_count = math.ceil(len(names) / columns) if names else 1
    figure, axes = plt.subplots(rows_count, columns, figsize=(3.6 * columns, 2.8 * rows_count), squeeze=False)
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


def plot_stage_times(stage_seconds: dict[str, float], throughput: dict[str, float] | None = None) -> plt.Figure:
    """Wall time of every stage, and fitting throughput (images/s) where known."""
    import seaborn as sns  # imported here: it adds a second to every stage's start-up
    panels = 2 if throughput else 1
    figure, axes = plt.subplots(1, panels, figsize=(6 * panels, 3.8), squeeze=False)
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
