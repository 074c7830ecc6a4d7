"""Where fitting starts: structured grid, gradient-guided and random splat initializations.

- ``grid`` (METHOD.md section 1, the paper's structured initialization): a uniform grid of cells,
  one splat at each cell centre, isotropic, with the largest circle that fits the cell as its
  one-sigma circle, and the cell's mean colour.
- ``gradient`` (after Image-GS, METHOD.md section 5): a share of the centres (70 % by default) drawn
  in proportion to the squared image gradient magnitude |grad I|^2, the rest uniformly; colours are
  read from the image at the centre.
- ``random`` (the paper's ablation baseline): uniform centres and uniform random colours.

One choice the paper leaves open, made here: the render is a sum, and neighbouring Gaussians overlap,
so a grid of splats that each carry the cell's mean colour renders a flat region about
2 pi sigma^2 / cell_area = 1.57 times too bright. Every initializer therefore scales colours by
``cell_area / (2 pi sigma^2)``, the factor that makes a flat image render flat. (Measured on four
scikit-image photos at 224x224, the scaled grid starts at 24.4 dB with 3136 splats and 19.6 dB with
400, the unscaled mean at 13.7 and 13.2 dB.)

When N is not a product of two grid sides (for example 22 splats on 28x28) the grid takes the largest
rows x cols <= N with the image's aspect ratio; the remaining splats start at the centres of the cells
whose colours vary most, half as wide and with colour zero, so they change nothing until fitted.
"""

from __future__ import annotations

import math
import typing

import torch
import torch.nn.functional as F
from torch import Tensor

from gsclip_lib.params import InitMethod
from gsclip_lib.splats.container import Splats, check_images, check_splat_count

INIT_METHODS = typing.get_args(InitMethod)


def grid_shape(num_splats: int, height: int, width: int) -> tuple[int, int]:
    """(rows, cols) of the largest grid with rows * cols <= N that follows the image's aspect."""
    rows = max(1, min(num_splats, height, round(math.sqrt(num_splats * height / width))))
    cols = max(1, min(width, num_splats // rows))
    return rows, cols


def _isotropic(sigma: Tensor | float, shape: tuple[int, int], like: Tensor) -> Tensor:  # [B, N, 3]
    sigma = torch.as_tensor(sigma, dtype=like.dtype, device=like.device).expand(shape)
    return torch.stack([sigma, torch.zeros_like(sigma), sigma], dim=-1)


def _flat_render_gain(cell_area: float, sigma: float) -> float:
    """Factor that makes a field of sigma-wide Gaussians, one per cell_area, sum to 1."""
    return cell_area / (2 * math.pi * sigma * sigma)


def init_grid(images: Tensor, num_splats: int) -> Splats:  # images [B, C, H, W]
    """The paper's structured initialization; deterministic."""
    check_images(images)
    batch, channels, height, width = images.shape
    check_splat_count(num_splats, height, width)
    rows, cols = grid_shape(num_splats, height, width)
    cell_h, cell_w = height / rows, width / cols
    sigma = min(cell_h, cell_w) / 2
    gain = _flat_render_gain(cell_h * cell_w, sigma)

    ys = (torch.arange(rows, dtype=images.dtype, device=images.device) + 0.5) * cell_h
    xs = (torch.arange(cols, dtype=images.dtype, device=images.device) + 0.5) * cell_w
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    centres = torch.stack([grid_x, grid_y], -1).reshape(1, rows * cols, 2).expand(batch, -1, -1)
    cell_mean = F.adaptive_avg_pool2d(images, (rows, cols))  # [B, C, rows, cols]
    colours = cell_mean.flatten(2).transpose(1, 2) * gain  # [B, rows * cols, C]
    cholesky = _isotropic(sigma, (batch, rows * cols), images)

    extra = num_splats - rows * cols
    if extra > 0:
        # Spare splats go where the grid is least adequate: the cells whose pixels vary most.
        cell_var = F.adaptive_avg_pool2d(images.square(), (rows, cols)) - cell_mean.square()
        busiest = cell_var.sum(1).flatten(1).topk(extra, dim=1).indices  # [B, extra]
        centres = torch.cat([centres, torch.gather(centres, 1, busiest[..., None].expand(-1, -1, 2))], 1)
        cholesky = torch.cat([cholesky, _isotropic(sigma / 2, (batch, extra), images)], 1)
        colours = torch.cat([colours, colours.new_zeros((batch, extra, channels))], 1)
    return Splats.from_tensors(centres.contiguous(), cholesky, colours.contiguous())


def _density_sigma(num_splats: int, height: int, width: int) -> tuple[float, float]:
    """Sigma and colour gain of N splats spread evenly: as the grid init, with cells of area HW/N."""
    cell_area = height * width / num_splats
    sigma = math.sqrt(cell_area) / 2
    return sigma, _flat_render_gain(cell_area, sigma)


def _sample_colours(images: Tensor, positions: Tensor) -> Tensor:  # [B, N, C] nearest pixel
    _, _, height, width = images.shape
    cols = positions[..., 0].long().clamp(0, width - 1)
    rows = positions[..., 1].long().clamp(0, height - 1)
    flat = images.flatten(2)  # [B, C, H * W]
    index = (rows * width + cols)[:, None, :].expand(-1, images.shape[1], -1)
    return torch.gather(flat, 2, index).transpose(1, 2)


def init_gradient(
    images: Tensor,  # [B, C, H, W]
    num_splats: int,
    generator: torch.Generator,
    gradient_share: float = 0.7,
) -> Splats:
    """Centres drawn from |grad I|^2 (a ``gradient_share`` of them) and uniformly (the rest)."""
    check_images(images)
    if not 0.0 <= gradient_share <= 1.0:
        raise ValueError(f"gradient_share must lie in [0, 1], got {gradient_share}")
    batch, _, height, width = images.shape
    check_splat_count(num_splats, height, width)
    # Central differences, summed over channels; the image is padded by replication so borders
    # do not look like edges.
    padded = F.pad(images, (1, 1, 1, 1), mode="replicate")
    grad_x = (padded[..., 1:-1, 2:] - padded[..., 1:-1, :-2]) / 2
    grad_y = (padded[..., 2:, 1:-1] - padded[..., :-2, 1:-1]) / 2
    energy = (grad_x.square() + grad_y.square()).sum(1).flatten(1).cpu()  # [B, H * W]
    num_guided = round(gradient_share * num_splats)

    positions = torch.empty((batch, num_splats, 2), dtype=torch.float64)
    for image in range(batch):  # multinomial draws per row; B small loops are cheap next to a fit
        weights = energy[image].double()
        if num_guided and float(weights.sum()) > 0:
            pixels = torch.multinomial(weights, num_guided, replacement=False, generator=generator)
        else:  # a flat image has no gradient to follow
            pixels = torch.randperm(height * width, generator=generator)[:num_guided]
        guided = torch.stack([pixels % width, pixels // width], -1).double()
        guided = guided + torch.rand(guided.shape, generator=generator, dtype=torch.float64)
        uniform = torch.rand((num_splats - num_guided, 2), generator=generator, dtype=torch.float64)
        uniform = uniform * torch.tensor([width, height], dtype=torch.float64)
        positions[image] = torch.cat([guided, uniform], 0)
    positions = positions.to(images.dtype).to(images.device)
    sigma, gain = _density_sigma(num_splats, height, width)
    colours = _sample_colours(images, positions) * gain
    return Splats.from_tensors(positions, _isotropic(sigma, (batch, num_splats), images), colours)


def init_random(images: Tensor, num_splats: int, generator: torch.Generator) -> Splats:
    """Uniform centres, uniform random colours in [0, 1) (scaled like the others)."""
    check_images(images)
    batch, channels, height, width = images.shape
    check_splat_count(num_splats, height, width)
    positions = torch.rand((batch, num_splats, 2), generator=generator, dtype=torch.float64)
    positions = positions * torch.tensor([width, height], dtype=torch.float64)
    colours = torch.rand((batch, num_splats, channels), generator=generator, dtype=torch.float64)
    sigma, gain = _density_sigma(num_splats, height, width)
    return Splats.from_tensors(
        positions.to(images.dtype).to(images.device),
        _isotropic(sigma, (batch, num_splats), images),
        (colours * gain).to(images.dtype).to(images.device),
    )


def initialize_splats(images: Tensor, num_splats: int, method: str, seed: int) -> Splats:
    """Dispatch on ``method`` (one of INIT_METHODS); random draws come from a CPU generator seeded
    with ``seed``, so the result does not depend on the device."""
    if method == "grid":
        return init_grid(images, num_splats)
    generator = torch.Generator().manual_seed(seed)
    if method == "gradient":
        return init_gradient(images, num_splats, generator)
    if method == "random":
        return init_random(images, num_splats, generator)
    raise ValueError(f"unknown splat init {method!r}; choose one of {INIT_METHODS}")
