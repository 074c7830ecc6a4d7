"""Image-quality measures used to report how well splats reproduce their images."""

from __future__ import annotations

import torch
from torch import Tensor


def psnr(reference: Tensor, test: Tensor, data_range: float = 1.0) -> Tensor:  # [B]
    """Peak signal-to-noise ratio in dB of each image of a ``[B, ...]`` batch.

    ``test`` is clamped to ``[0, data_range]`` first, as a decoder that writes pixels would do.
    Identical images give ``inf``.
    """
    if reference.shape != test.shape:
        raise ValueError(f"psnr needs equal shapes, got {tuple(reference.shape)} and {tuple(test.shape)}")
    error = (test.clamp(0, data_range) - reference).square().flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / error)
