"""Luminance-aware pruning of fitted splats (METHOD.md section 1).

Each splat is scored by the luminance of its colour's magnitude,
``s = 0.2126 |R| + 0.7152 |G| + 0.0722 |B|`` (Rec. 709 weights; for one channel ``s = |c|``), and
the dimmest go: either every splat with ``s < tau`` (the paper's rule; counts then differ per image),
or all but the ``target_count`` brightest of each image (a fixed count, for fixed-size levels).
The paper finds that fitting many splats and pruning beats fitting few from the start; a short
fine-tune of the survivors (``finetune_iterations``) recovers part of what pruning costs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gsclip_lib.params import FitSettings
from gsclip_lib.splats.fitting import FitResult, fit_splats
from gsclip_lib.splats.container import Splats

LUMINANCE_WEIGHTS = (0.2126, 0.7152, 0.0722)


def luminance_score(colours: Tensor) -> Tensor:  # colours [B, N, C] -> [B, N]
    channels = colours.shape[-1]
    if channels == 1:
        return colours[..., 0].abs()
    if channels == 3:
        weights = torch.tensor(LUMINANCE_WEIGHTS, dtype=colours.dtype, device=colours.device)
        return colours.abs() @ weights
    raise ValueError(f"luminance pruning needs 1 or 3 colour channels, got {channels}")


def prune_by_luminance(
    splats: Splats,
    *,
    threshold: float | None = None,
    target_count: int | None = None,
) -> Splats:
    """Drop dim splats by ``threshold`` (keeps the slot layout, clears ``valid``) or keep the
    ``target_count`` brightest per image (returns ``[B, target_count]`` slots, brightest first;
    an image with fewer valid splats keeps them all and pads with invalid slots)."""
    if (threshold is None) == (target_count is None):
        raise ValueError("give exactly one of threshold and target_count")
    score = luminance_score(splats.colours)
    if threshold is not None:
        return splats.with_valid(splats.valid & (score >= threshold))
    if target_count <= 0:
        raise ValueError(f"target_count must be positive, got {target_count}")
    if target_count >= splats.num_slots:
        return splats
    # Invalid slots rank below every valid one.
    ranked = torch.where(splats.valid, score, torch.full_like(score, -1.0))
    keep = ranked.topk(target_count, dim=1).indices  # [B, target_count]

    def take(values: Tensor) -> Tensor:
        return torch.gather(values, 1, keep[..., None].expand(-1, -1, values.shape[-1]))

    return Splats(
        take(splats.positions),
        take(splats.cholesky),
        take(splats.colours),
        torch.gather(splats.valid, 1, keep),
    )


def prune_and_finetune(
    images: Tensor,  # [B, C, H, W]
    splats: Splats,
    target_count: int,
    settings: FitSettings,
    iterations: int,
    *,
    progress: bool = True,
) -> FitResult:
    """Keep the ``target_count`` brightest splats, then fine-tune them for ``iterations`` steps
    with ``settings`` (0: just re-measure)."""
    pruned = prune_by_luminance(splats, target_count=target_count)
    return fit_splats(
        images, pruned.num_slots, settings.replace(iterations=iterations), initial=pruned, progress=progress,
        description="fine-tune",
    )
