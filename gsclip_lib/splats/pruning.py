"""Pruning fitted splats to a smaller count, then refitting the survivors (METHOD.md section 1).

The paper scores each splat by the luminance of its colour's magnitude,
``s = 0.2126 |R| + 0.7152 |G| + 0.0722 |B|`` (Rec. 709 weights; ``|c|`` for one channel), and drops
the dimmest: every splat with ``s < tau``, or (for levels of a fixed size) all but the ``target``
brightest of each image (this project uses the fixed-size form). The L1 penalty on colours during the large fit drives weak splats dark, so
luminance finds them.

A second score, ``energy``, is the squared norm of a splat's own contribution to the render,
``||c||^2 sum_p w(p)^2``: unlike luminance it sees the splat's area, so a wide faint splat that
carries a whole background outranks a bright speck. On 28x28 Fashion-MNIST it keeps 2.4 dB more
than luminance before any refit (``benchmarks/fitting.py``).

Pruning alone costs about 9 dB there when half the splats go; :func:`prune_and_refit` re-solves the
survivors' colours and refits them for a few steps, which recovers most of it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gsclip_lib.errors import InputError, positive_int
from gsclip_lib.params import FitSettings
from gsclip_lib.splats.container import Splats
from gsclip_lib.splats.fitting import FitResult, fit_splats
from gsclip_lib.splats.least_squares import splat_weight_norms

LUMINANCE_WEIGHTS = (0.2126, 0.7152, 0.0722)
SCORES = ("luminance", "energy")


def luminance_score(colours: Tensor) -> Tensor:  # colours [B, N, C] -> [B, N]
    channels = colours.shape[-1]
    if channels == 1:
        return colours[..., 0].abs()
    if channels == 3:
        weights = torch.tensor(LUMINANCE_WEIGHTS, dtype=colours.dtype, device=colours.device)
        return colours.abs() @ weights
    raise InputError(f"luminance pruning needs 1 or 3 colour channels, got {channels}")


def prune_score(splats: Splats, score: str, height: int, width: int, cutoff: float, backend: str) -> Tensor:  # [B, N]
    """How much each splat is worth keeping, by ``score`` (one of :data:`SCORES`)."""
    if score == "luminance":
        return luminance_score(splats.colours)
    if score == "energy":
        norms = splat_weight_norms(splats, height, width, cutoff, backend)
        return splats.colours.square().sum(-1) * norms
    raise InputError(f"unknown prune score {score!r}; choose one of {SCORES}")


def keep_best(splats: Splats, score: Tensor, target_count: int) -> Splats:
    """The ``target_count`` best-scoring splats of each image, best first, as ``[B, target_count]``
    slots; an image with fewer valid splats keeps them all and pads with invalid slots."""
    positive_int(target_count, "target_count")
    if target_count >= splats.num_slots:
        return splats
    ranked = torch.where(splats.valid, score, torch.full_like(score, -1.0))  # invalid slots rank last
    keep = ranked.topk(target_count, dim=1).indices  # [B, target_count]

    def take(values: Tensor) -> Tensor:
        return torch.gather(values, 1, keep[..., None].expand(-1, -1, values.shape[-1]))

    return Splats(take(splats.positions), take(splats.cholesky), take(splats.colours), torch.gather(splats.valid, 1, keep))


def prune(splats: Splats, target_count: int, score: str, height: int, width: int, settings: FitSettings) -> Splats:
    """Each image's ``target_count`` best splats by ``score`` (``settings`` gives the cutoff and backend
    the ``energy`` score renders with)."""
    return keep_best(splats, prune_score(splats, score, height, width, settings.cutoff, settings.backend), target_count)


def prune_and_refit(
    images: Tensor,  # [B, C, H, W] the images the splats were fitted to
    splats: Splats,
    target_count: int,
    settings: FitSettings,  # the refit's settings; ``iterations`` refit steps (0: colours only)
    score: str,  # one of SCORES; the pipeline's is ``prune.score``
    *,
    progress: bool = False,
) -> FitResult:
    """Keep each image's ``target_count`` best splats by ``score``, then refit them.

    With ``settings.colour_solve`` other than ``none`` the survivors' colours are solved first: the
    ones they had were shared with the splats that went.
    """
    pruned = prune(splats, target_count, score, images.shape[-2], images.shape[-1], settings)
    return fit_splats(images, pruned.num_slots, settings, initial=pruned, progress=progress, description="refit")
