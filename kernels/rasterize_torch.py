"""Pure-PyTorch twin of the accumulated-sum splat rasterizer (METHOD.md section 1).

This is the readable definition of the render and the oracle every faster path is tested against:

    I[b, :, p] = sum_i valid[b, i] * colours[b, i] * w(p; mu_i, L_i)
    w = exp(-d^2 / 2) if d^2 <= cutoff^2 else 0,   d^2 = |L_i^{-1} (p - mu_i)|^2

where ``p`` runs over pixel centres ``(j + 0.5, i + 0.5)``. No sorting, no alpha blending.
``d`` is the Mahalanobis distance in standard deviations; ``cutoff = inf`` gives the exact sum.

It materializes a ``[B, N, H, W]`` tensor (:func:`splat_weights_dense`, also the matrix of the
colour least-squares solve of small images), so it is only for tests, small images and the
benchmark's baseline. Its signature is shared by the Triton kernels, the C++ CPU kernel and the
windowed CPU path.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kernels.arguments import colour_adjoint_args, rasterizer_args


def pixel_centres(height: int, width: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """x and y coordinates of every pixel centre, each ``[H, W]``, on ``like``'s device and dtype."""
    ys = torch.arange(height, device=like.device, dtype=like.dtype) + 0.5
    xs = torch.arange(width, device=like.device, dtype=like.dtype) + 0.5
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return grid_x, grid_y


def mahalanobis_sq(dx: Tensor, dy: Tensor, cholesky: Tensor) -> Tensor:
    """Squared Mahalanobis distance of offsets (dx, dy) under Sigma = L L^T.

    ``cholesky[..., k]`` must broadcast against ``dx``. Solves ``L z = (dx, dy)`` by forward
    substitution instead of inverting Sigma, which keeps thin splats well conditioned.
    """
    l11, l21, l22 = cholesky[..., 0], cholesky[..., 1], cholesky[..., 2]
    z1 = dx / l11
    z2 = (dy - l21 * z1) / l22
    return z1 * z1 + z2 * z2


def splat_weights_dense(
    positions: Tensor,  # [B, N, 2] (x, y) in pixels
    cholesky: Tensor,  # [B, N, 3] (l11, l21, l22) in pixels
    valid: Tensor,  # [B, N] bool
    height: int,
    width: int,
    cutoff: float = math.inf,
) -> Tensor:  # [B, N, H, W]: w_i(p), zero for invalid splats and beyond the cutoff
    """Every splat's weight at every pixel centre: the matrix ``W`` of ``render = W @ colours``."""
    # Invalid slots may hold anything (a zero factor, NaN): swap in a harmless unit splat so that
    # they cannot poison the sum through 0 * NaN, then mask their weights out.
    unit = torch.tensor([1.0, 0.0, 1.0], dtype=cholesky.dtype, device=cholesky.device)
    cholesky = torch.where(valid[..., None], cholesky, unit)
    positions = torch.where(valid[..., None], positions, torch.zeros_like(positions))
    grid_x, grid_y = pixel_centres(height, width, positions)
    dx = grid_x[None, None] - positions[..., 0, None, None]  # [B, N, H, W]
    dy = grid_y[None, None] - positions[..., 1, None, None]
    d_sq = mahalanobis_sq(dx, dy, cholesky[:, :, None, None, :])
    weights = torch.exp(-0.5 * d_sq)
    if math.isfinite(cutoff):
        weights = torch.where(d_sq <= cutoff * cutoff, weights, torch.zeros_like(weights))
    return torch.where(valid[:, :, None, None], weights, torch.zeros_like(weights))


def rasterize_dense_torch(
    positions: Tensor,  # [B, N, 2] (x, y) in pixels
    cholesky: Tensor,  # [B, N, 3] (l11, l21, l22) in pixels
    colours: Tensor,  # [B, N, C]
    valid: Tensor,  # [B, N] bool
    height: int,
    width: int,
    cutoff: float = math.inf,  # Mahalanobis radius beyond which a splat contributes nothing
) -> Tensor:  # [B, C, H, W]
    """The accumulated-sum render, as the module docstring defines it (differentiable in all but
    ``valid``); the definition every other rasterizer is tested against."""
    height, width, cutoff = rasterizer_args(positions, cholesky, colours, valid, height, width, cutoff)
    weights = splat_weights_dense(positions, cholesky, valid, height, width, cutoff)
    colours = torch.where(valid[..., None], colours, torch.zeros_like(colours))
    return torch.einsum("bnhw,bnc->bchw", weights, colours)


def colour_adjoint_dense_torch(
    image: Tensor,  # [B, C, H, W]
    positions: Tensor,  # [B, N, 2] (x, y) in pixels
    cholesky: Tensor,  # [B, N, 3] (l11, l21, l22) in pixels
    valid: Tensor,  # [B, N] bool
    cutoff: float,  # Mahalanobis radius beyond which a splat contributes nothing
) -> tuple[Tensor, Tensor]:  # W^T image [B, N, C] fp32; sum_p w(p)^2 [B, N] fp32
    """The render's adjoint in the colours and each splat's squared weight norm, by definition.

    With ``render = W @ colours`` (:func:`splat_weights_dense` is ``W``), this is ``W^T image``
    per image and channel, ``sum_p w_i(p) image[c, p]``, and the diagonal of ``W^T W``,
    ``sum_p w_i(p)^2``: what a least-squares colour solve needs. Invalid splats give zeros, whatever
    their slots hold. Computes in fp32 (fp64 when an input is fp64) and returns fp32, as the C++
    kernel (``kernels.rasterize_cpu.colour_adjoint``) does; not meant to be differentiated.
    """
    cutoff = colour_adjoint_args(image, positions, cholesky, valid, cutoff)
    dtype = torch.promote_types(torch.promote_types(image.dtype, positions.dtype),
                                torch.promote_types(cholesky.dtype, torch.float32))
    height, width = image.shape[-2:]
    weights = splat_weights_dense(positions.detach().to(dtype), cholesky.detach().to(dtype), valid, height, width,
                                  cutoff)  # [B, N, H, W]
    adjoint = torch.einsum("bnhw,bchw->bnc", weights, image.detach().to(dtype))
    squared_norms = weights.square().sum((-2, -1))
    return adjoint.to(torch.float32), squared_norms.to(torch.float32)
