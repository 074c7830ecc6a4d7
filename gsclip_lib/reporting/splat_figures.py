"""Figures of splats: renders beside their originals, and each splat drawn as its ellipse.

Kept apart from :mod:`gsclip_lib.reporting.figures` because they render splats: only the pages
that draw splats depend on the renderer through them.
"""

from __future__ import annotations

import textwrap

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.collections import EllipseCollection
from torch import Tensor

from gsclip_lib.reporting.figures import new_figure, to_display
from gsclip_lib.splats.container import Splats
from gsclip_lib.splats.quality import psnr
from gsclip_lib.splats.render import render_splats

TITLE_CHARACTERS = 30  # a caption's line above a 2.2-inch image at 7.5 points


def draw_splat_ellipses(
    axis: Axes, splats: Splats, image_index: int, sigmas: float = 1.0, max_splats: int = 4000
) -> None:
    """Each valid splat as its ``sigmas``-sigma ellipse, filled with its (clamped) colour, drawn as one
    collection (thousands of separate patches take seconds)."""
    valid = splats.valid[image_index].cpu()
    covariance = splats.covariance()[image_index].detach().cpu()[valid][:max_splats]
    centres = splats.positions[image_index].detach().cpu()[valid][:max_splats].numpy()
    colours = splats.colours[image_index].detach().cpu()[valid][:max_splats].numpy()
    eigenvalues, eigenvectors = np.linalg.eigh(covariance.double().numpy())  # ascending: minor, major
    angles = np.degrees(np.arctan2(eigenvectors[:, 1, 1], eigenvectors[:, 0, 1]))
    axes_lengths = 2 * sigmas * np.sqrt(np.clip(eigenvalues, 0.0, None))  # [n, 2] minor, major
    brightest = max(float(np.abs(colours).max(initial=0.0)), 1e-6)
    shades = np.clip(colours / brightest, 0, 1)
    faces = shades if shades.shape[1] == 3 else np.repeat(shades[:, :1], 3, axis=1)
    ellipses = EllipseCollection(
        axes_lengths[:, 1], axes_lengths[:, 0], angles, units="xy", offsets=centres,
        offset_transform=axis.transData, facecolors=np.column_stack([faces, np.full(len(faces), 0.6)]),
        edgecolors="none",
    )
    axis.add_collection(ellipses, autolim=False)


def plot_fit_gallery(
    images: Tensor,  # [B, C, H, W]
    renders: dict[int, Tensor],  # splat count -> [B, C, H, W]
    splats: dict[int, Splats] | None = None,  # splat count -> splats, drawn as ellipses if given
    titles: list[str] | None = None,
    psnr_by_count: dict[int, Tensor] | None = None,
) -> Figure:
    """Rows of images: the original, then the render at each count (and its ellipses).

    ``titles`` (one per row, e.g. captions) are wrapped in full above the originals, never cut."""
    counts = sorted(renders, reverse=True)
    per_count = 2 if splats else 1
    columns = 1 + per_count * len(counts)
    rows = images.shape[0]
    wrapped = [textwrap.fill(str(title), width=TITLE_CHARACTERS) for title in titles] if titles else ["original"] * rows
    lines = max((title.count("\n") + 1 for title in wrapped), default=1)
    figure, axes = new_figure(rows, columns, figsize=(2.2 * columns, (2.1 + 0.15 * lines) * rows), squeeze=False)
    height, width = images.shape[-2:]
    for row in range(rows):
        axes[row, 0].imshow(to_display(images[row]), cmap="gray")
        axes[row, 0].set_title(wrapped[row], fontsize=7.5)
        for k, count in enumerate(counts):
            axis = axes[row, 1 + per_count * k]
            axis.imshow(to_display(renders[count][row]), cmap="gray")
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
    return figure


SMALL_RENDER = 4_000_000  # splat-pixel pairs up to which example figures render with the dense twin


def example_backend(splats: Splats, size: int, backend: str) -> str:
    """The renderer for a few example images: a few small images render faster densely than through
    the compiled path's first call, so up to :data:`SMALL_RENDER` splat-pixel pairs use ``dense``."""
    return "dense" if splats.batch_size * splats.num_slots * size * size <= SMALL_RENDER else backend


def plot_level_examples(
    images: Tensor,  # [k, C, S, S]
    splats_by_level: dict[int, Splats],  # splat count -> the k images' splats
    captions: list[str],
    *,
    cutoff: float,
    backend: str,
) -> Figure:
    """Originals (their captions above them, in full) beside their renders and ellipses at each level."""
    size = images.shape[-1]
    renders = {
        level: render_splats(splats, size, size, backend=example_backend(splats, size, backend), cutoff=cutoff)
        for level, splats in splats_by_level.items()
    }
    quality = {level: psnr(images, render) for level, render in renders.items()}
    return plot_fit_gallery(
        images,
        {level: render.clamp(0, 1) for level, render in renders.items()},
        splats=splats_by_level,
        titles=list(captions),
        psnr_by_count=quality,
    )
