"""Image-quality measures used to report how well splats reproduce their images."""

from __future__ import annotations

import numpy as np
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


def psnr_uint8(reference: np.ndarray, test: np.ndarray) -> float:  # two uint8 pictures of one shape
    """PSNR in dB of one 8-bit picture against another (pixels scaled to [0, 1], in float64)."""
    as_images = [torch.from_numpy(np.asarray(pixels, dtype=np.float64) / 255.0)[None] for pixels in (reference, test)]
    return float(psnr(*as_images))
