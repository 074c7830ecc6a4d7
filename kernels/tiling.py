"""Binning splats to square pixel tiles, in plain PyTorch (any device, no Triton needed).

A splat's weight is zero where its Mahalanobis distance exceeds ``cutoff`` (kernels/rasterize_torch.py),
so its support is the ellipse ``|L^{-1} (p - mu)| <= cutoff`` with ``Sigma = L L^T``. With
``L = [[l11, 0], [l21, l22]]`` the ellipse's axis-aligned bounding box has half-extents

    half_x = cutoff * sqrt(Sigma_xx) = cutoff * |l11|
    half_y = cutoff * sqrt(Sigma_yy) = cutoff * sqrt(l21^2 + l22^2)

(the support function of an ellipse along a unit axis e is ``cutoff * |L^T e|``). The pixel centres
``j + 0.5`` inside ``[mu - half, mu + half]`` give each splat a box of pixel columns and rows, clipped to
the image; the tiles that box touches are the tiles the splat can contribute to. This is the culling
that GaussianImage's and gsplat's tiled rasterizers do; here it is done with a handful of tensor ops:

1. every (splat, tile) pair is enumerated with ``repeat_interleave`` over the per-splat tile counts;
2. the pairs are sorted by the key ``(image * tiles + tile) * N + splat``, which is unique, so the
   order (and therefore every sum the kernels make over a tile's list) is the same on every run;
3. ``searchsorted`` on the sorted keys gives each (image, tile) list's start and end, without the
   atomics a histogram would use on a GPU.

The box is made slightly larger than the exact one (a relative 1e-5 plus 1e-4 pixel) so that float
rounding in a kernel's distance can never put a pixel inside the cutoff that the box left out; a
pixel or tile too many costs a little work and changes no result. Invalid splats and splats whose
parameters are NaN get an empty box: the dense kernels give them zero weight everywhere too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from kernels.arguments import check_cutoff

# Slack added to each half-extent, in pixels, relative and absolute (see the module docstring).
BOX_RELATIVE_SLACK = 1e-5
BOX_ABSOLUTE_SLACK = 1e-4


@dataclass(frozen=True)
class TileBins:
    """The splats of every (image, tile), plus every splat's pixel box.

    Tile ``t`` of image ``b`` (row-major over a ``tiles_y x tiles_x`` grid of ``tile_size`` squares;
    the last row and column of tiles may hang over the image's edge) holds the splats
    ``tile_splats[tile_offsets[b * tiles + t] : tile_offsets[b * tiles + t + 1]]``, ascending.
    """

    tile_size: int
    tiles_y: int
    tiles_x: int
    tile_offsets: Tensor  # [B * tiles_y * tiles_x + 1] int64, non-decreasing, starts at 0
    tile_splats: Tensor  # [K] int32, splat index within its image
    boxes: Tensor  # [B, N, 4] int32 (first column, first row, columns, rows); 0 columns and rows if empty
    # Pair k of the tile lists is pair pair_order[k] of the splat-major enumeration, where splat
    # b * N + n owns tiles_per_splat[b * N + n] consecutive pairs, its tiles in row-major order.
    pair_order: Tensor  # [K] int64, a permutation
    tiles_per_splat: Tensor  # [B * N] int64

    @property
    def tiles_per_image(self) -> int:
        return self.tiles_y * self.tiles_x

    def splats_per_tile(self) -> Tensor:  # [B, tiles_y, tiles_x] int64
        counts = self.tile_offsets[1:] - self.tile_offsets[:-1]
        return counts.reshape(-1, self.tiles_y, self.tiles_x)

    def sum_over_tiles(self, pair_values: Tensor) -> Tensor:  # [K, D] in tile-list order -> [B * N, D]
        """Each splat's sum of its (tile, splat) pairs' values: what a tile-parallel kernel's per-pair
        partial sums add up to per splat. Deterministic on every device: the pairs are permuted into
        the splat-major order (a scatter to distinct places) and each splat's run is summed in its
        tiles' row-major order; 0 for a splat on no tile."""
        if pair_values.shape[0] != self.pair_order.shape[0]:
            raise ValueError(f"pair_values must have one row per (tile, splat) pair ({self.pair_order.shape[0]}), "
                             f"got shape {tuple(pair_values.shape)}")
        splat_major = torch.empty_like(pair_values)
        splat_major[self.pair_order] = pair_values
        return torch.segment_reduce(splat_major, "sum", lengths=self.tiles_per_splat, axis=0)


def _pixel_span(centre: Tensor, half: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """First and last pixel index (inclusive, clipped to [0, size - 1]) whose centre lies within
    ``half`` of ``centre``; last < first when there is none. float64 in, int64 out."""
    first = torch.ceil(centre - half - 0.5).clamp(0, size)
    last = torch.floor(centre + half - 0.5).clamp(-1, size - 1)
    return first.to(torch.int64), last.to(torch.int64)


def splat_pixel_boxes(
    positions: Tensor, cholesky: Tensor, valid: Tensor,  # [B, N, 2], [B, N, 3] (l11, l21, l22), [B, N] bool; pixels
    height: int, width: int, cutoff: float,
) -> Tensor:  # [B, N, 4] int32 (first column, first row, columns, rows), clipped to the image
    """Every splat's box of pixels that may lie within ``cutoff`` standard deviations of it."""
    cutoff = check_cutoff(cutoff)
    positions = positions.detach().to(torch.float64)
    cholesky = cholesky.detach().to(torch.float64)
    half_x = cutoff * cholesky[..., 0].abs()
    half_y = cutoff * torch.sqrt(cholesky[..., 1] ** 2 + cholesky[..., 2] ** 2)
    half_x = half_x * (1 + BOX_RELATIVE_SLACK) + BOX_ABSOLUTE_SLACK
    half_y = half_y * (1 + BOX_RELATIVE_SLACK) + BOX_ABSOLUTE_SLACK
    # 0 * inf (cutoff inf, a zero factor) is NaN: an infinite cutoff reaches everywhere.
    if math.isinf(cutoff):
        half_x = torch.full_like(half_x, math.inf)
        half_y = torch.full_like(half_y, math.inf)
    centre_x, centre_y = positions[..., 0], positions[..., 1]
    finite = ~(centre_x.isnan() | centre_y.isnan() | half_x.isnan() | half_y.isnan())
    live = valid.to(torch.bool) & finite
    zeros = torch.zeros_like(centre_x)
    first_col, last_col = _pixel_span(torch.where(live, centre_x, zeros), torch.where(live, half_x, zeros), width)
    first_row, last_row = _pixel_span(torch.where(live, centre_y, zeros), torch.where(live, half_y, zeros), height)
    cols = (last_col - first_col + 1).clamp(min=0)
    rows = (last_row - first_row + 1).clamp(min=0)
    empty = ~live | (cols == 0) | (rows == 0)
    cols = torch.where(empty, 0, cols)
    rows = torch.where(empty, 0, rows)
    first_col = torch.where(empty, 0, first_col)
    first_row = torch.where(empty, 0, first_row)
    return torch.stack([first_col, first_row, cols, rows], -1).to(torch.int32)


def bin_splats_to_tiles(positions: Tensor, cholesky: Tensor, valid: Tensor, height: int, width: int, cutoff: float,
                        tile_size: int = 16) -> TileBins:  # the splats as splat_pixel_boxes takes them
    """The per-(image, tile) splat lists of a batch, on the tensors' device (see the module docstring)."""
    if tile_size < 1:
        raise ValueError(f"tile_size must be a positive integer, got {tile_size}")
    batch, n_splats = positions.shape[:2]
    device = positions.device
    tiles_y = -(-height // tile_size)
    tiles_x = -(-width // tile_size)
    tiles = tiles_y * tiles_x
    boxes = splat_pixel_boxes(positions, cholesky, valid, height, width, cutoff)  # [B, N, 4]

    box = boxes.reshape(-1, 4).to(torch.int64)  # [B * N, 4]
    first_col, first_row, cols, rows = box.unbind(-1)
    nonempty = (cols > 0) & (rows > 0)
    first_tile_x = first_col // tile_size
    first_tile_y = first_row // tile_size
    tiles_across = torch.where(nonempty, (first_col + cols - 1) // tile_size - first_tile_x + 1, 0)
    tiles_down = torch.where(nonempty, (first_row + rows - 1) // tile_size - first_tile_y + 1, 0)
    tiles_per_splat = tiles_across * tiles_down  # [B * N]

    # 1. Every (splat, tile) pair, splat-major: pair k belongs to splat `owner[k]` and is its
    #    `rank[k]`-th tile in row-major order within the splat's own tile rectangle.
    total_pairs = int(tiles_per_splat.sum())
    owner = torch.repeat_interleave(
        torch.arange(batch * n_splats, device=device), tiles_per_splat, output_size=total_pairs
    )  # [K]
    first_pair = torch.cumsum(tiles_per_splat, 0) - tiles_per_splat  # [B * N]
    rank = torch.arange(total_pairs, device=device) - first_pair[owner]
    across = tiles_across[owner]
    tile_x = first_tile_x[owner] + rank % across.clamp(min=1)
    tile_y = first_tile_y[owner] + rank // across.clamp(min=1)
    image = owner // max(n_splats, 1)
    splat = owner % max(n_splats, 1)

    # 2. Sort by (image, tile, splat); the keys are distinct, so the order is unique.
    list_index = image * tiles + tile_y * tiles_x + tile_x  # [K]
    key, pair_order = torch.sort(list_index * n_splats + splat)
    sorted_list = key // max(n_splats, 1)

    # 3. Where each (image, tile) list starts: the first key of list i is the first >= i.
    boundaries = torch.arange(batch * tiles + 1, device=device)
    tile_offsets = torch.searchsorted(sorted_list, boundaries)
    return TileBins(
        tile_size=tile_size,
        tiles_y=tiles_y,
        tiles_x=tiles_x,
        tile_offsets=tile_offsets,
        tile_splats=(key % max(n_splats, 1)).to(torch.int32),
        boxes=boxes,
        pair_order=pair_order,
        tiles_per_splat=tiles_per_splat,
    )


def tile_pixel_counts(height: int, width: int, tile_size: int) -> Tensor:  # [tiles_y, tiles_x] int64
    """How many of each tile's pixels lie inside the image (edge tiles may hang over)."""
    tile_rows = torch.clamp(height - torch.arange(0, height, tile_size), max=tile_size)
    tile_cols = torch.clamp(width - torch.arange(0, width, tile_size), max=tile_size)
    return tile_rows[:, None] * tile_cols[None, :]


def count_evaluations(bins: TileBins, n_splats: int, height: int, width: int) -> dict[str, int | float]:
    """Splat-pixel evaluations (weights computed) per pass: dense kernels against tiled ones.

    - dense: every splat slot at every pixel, ``B * N * H * W``, in both directions;
    - tiled forward and backward (and the colour adjoint): each tile's in-image pixels times the
      splats on its list (all three are one program per tile, walking its list);
    - ``box``: each splat's in-image pixel box, the fewest a per-splat kernel could evaluate.
    Padding lanes of the kernels' vector blocks are not counted.
    """
    batch = bins.boxes.shape[0]
    dense = batch * n_splats * height * width
    pixels = tile_pixel_counts(height, width, bins.tile_size).to(bins.tile_offsets.device)
    forward = int((bins.splats_per_tile() * pixels[None]).sum())
    box = bins.boxes.to(torch.int64)
    return {
        "dense_forward": dense,
        "dense_backward": dense,
        "tiled_forward": forward,
        "tiled_backward": forward,
        "box": int((box[..., 2] * box[..., 3]).sum()),
        "forward_ratio_dense_over_tiled": dense / forward if forward else math.inf,
        "backward_ratio_dense_over_tiled": dense / forward if forward else math.inf,
        "pairs": int(bins.tile_offsets[-1]),
    }
