"""Luminance-aware pruning of fitted splats (PAPER.md section 1).

Each splat is scored by the luminance of its colour's magnitude,
``s = 0.2126 |R| + 0.7152 |G| + 0.0722 |B|`` (Rec. 709 weights; for one channel ``s = |c|``), and
the dimmest go: either every splat with ``s < tau`` (the paper's rule; counts then differ per image),
or all but the ``target_count`` brightest of each image (a fixed count, for fixed-size levels).
The paper finds that fitting many splats and pruning beats fitting few from the start; a short
fine-tune of the survivors (``finetune_iterations``) recovers part of what pruning costs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from gsclip_lib.fit import FitResult, FitSettings, fit_splats
from gsclip_lib.splats import Splats

LUMINANCE_WEIGHTS = (0.2126, 0.7152, 0.0722)


@dataclass(frozen=True)
class PruneSettings:
    """How splats are pruned; mirrors a ``prune`` group of params.yaml. Set exactly one criterion."""

    threshold: float | None = None  # tau: drop splats with luminance score below it
    target_count: int | None = None  # keep this many brightest splats per image
    finetune_iterations: int = 0  # fine-tune the survivors this long (0: no fine-tune)

    def __post_init__(self) -> None:
        if (self.threshold is None) == (self.target_count is None):
            raise ValueError("set exactly one of prune threshold (tau) and target_count")
        if self.threshold is not None and not self.threshold >= 0:
            raise ValueError(f"prune threshold must be >= 0, got {self.threshold!r}")
        if self.target_count is not None and (
            not isinstance(self.target_count, int) or self.target_count <= 0
        ):
            raise ValueError(f"prune target_count must be a positive int, got {self.target_count!r}")
        if not isinstance(self.finetune_iterations, int) or self.finetune_iterations < 0:
            raise ValueError(
                f"finetune_iterations must be a non-negative int, got {self.finetune_iterations!r}"
            )


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
    prune: PruneSettings,
    fit: FitSettings,
    *,
    progress: bool = True,
) -> FitResult:
    """Prune, then fine-tune the survivors for ``prune.finetune_iterations`` (0: just re-measure)."""
    pruned = prune_by_luminance(splats, threshold=prune.threshold, target_count=prune.target_count)
    finetune = replace(fit, iterations=prune.finetune_iterations)
    return fit_splats(
        images, pruned.num_slots, finetune, initial=pruned, progress=progress, description="fine-tune"
    )
