"""What the Triton rasterizers share: the ``@triton.jit`` pieces their kernels are built from, and
their launchers' set-up.

Every kernel of ``kernels.rasterize_triton`` (dense) and ``kernels.rasterize_triton_tiled``
(tile-culled) evaluates the same splat weights and the same gradient terms; they differ only in
which pixels meet which splats. The pieces here are that common part, written once:

- :func:`load_splats`, :func:`load_colours`: a block of splats' parameters and colours, with dead
  splats (padding lanes, ``valid = False``) made inert whatever their slots hold;
- :func:`splat_weights`: the ``[pixels, splats]`` tile of weights and the whitened offsets;
- :func:`splat_block_colour`: one forward step, a block of splats' colour at a block of pixels;
- :func:`tile_pixels`, :func:`tile_image_and_list`, :func:`list_block_weights`: the pixels of a
  tile-culled kernel's program, the image there and its splat list, and a block of the list's
  splats weighed at those pixels;
- :func:`image_offsets`: where a block of pixels' channels lie in a ``[B, C, H, W]`` image;
- :func:`zero_splat_grads`, :func:`accumulate_splat_grads`, :func:`store_splat_grads`: the
  backward's per-splat gradient sums, from the cotangent at a block of pixels to the stores.

A kernel calls them like functions; Triton inlines them, so sharing costs nothing at run time.
On the launch side, :func:`image_buffer` and :func:`splat_grad_buffers` allocate what a forward
and a backward kernel write, and :class:`LaunchSizes` holds the sizes, cutoff and channel
constants every launch passes. A new kernel over the same splat tensors takes its arguments from
:func:`kernels.arguments.kernel_inputs` and its autograd save and restore from
``kernels.arguments`` too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.arguments import KernelInputs, cutoff_args

# The kernels' pieces. Shapes: BLOCK_P pixels, BLOCK_N splats, C_PAD channels (C padded to a power
# of two); the splat-major [BLOCK_N, ...] rows are the splat tensors' rows b * N + n.


@triton.jit
def splat_weights(
    px,  # [BLOCK_P] pixel-centre x
    py,  # [BLOCK_P] pixel-centre y
    mu_x,  # [BLOCK_N] splat centre x
    mu_y,  # [BLOCK_N] splat centre y
    inv_l11,  # [BLOCK_N] 1 / l11
    l21,  # [BLOCK_N] off-diagonal Cholesky entry
    inv_l22,  # [BLOCK_N] 1 / l22
    live,  # [BLOCK_N] bool: splat is in range and valid
    cutoff_sq,  # fp32 scalar: squared Mahalanobis cutoff (ignored unless HAS_CUTOFF)
    HAS_CUTOFF: tl.constexpr,  # False for cutoff = inf: skip the compare entirely
):
    # Pixel-minus-centre offsets as a [BLOCK_P, BLOCK_N] tile (pixels down, splats across).
    dx = px[:, None] - mu_x[None, :]
    dy = py[:, None] - mu_y[None, :]
    # Forward substitution L z = (dx, dy), as the twin does: never form Sigma^{-1}, which squares
    # the condition number of thin splats.
    z1 = dx * inv_l11[None, :]
    z2 = (dy - l21[None, :] * z1) * inv_l22[None, :]
    d_sq = z1 * z1 + z2 * z2
    w = tl.exp(-0.5 * d_sq)
    keep = live[None, :]
    if HAS_CUTOFF:
        # `<=` to match the twin's torch.where(d_sq <= cutoff^2, ...) at the boundary.
        keep = keep & (d_sq <= cutoff_sq)
    # A select, not a multiply by the mask: an exact 0 even if a weight were inf/NaN.
    w = tl.where(keep, w, 0.0)
    return w, z1, z2


@triton.jit
def load_splats(
    positions_ptr,  # *fp32 [B, N, 2] contiguous
    cholesky_ptr,  # *fp32 [B, N, 3] contiguous
    valid_ptr,  # *u8 [B, N] contiguous, 1 = valid
    pid_b,  # int64 batch index
    offs_n,  # [BLOCK_N] splat indices
    N,  # splats per image
):
    in_range = offs_n < N
    row = pid_b * N + offs_n  # int64 because pid_b is: B * N * 3 may pass 2^31 for big batches
    live = (tl.load(valid_ptr + row, mask=in_range, other=0) != 0) & in_range
    mu_x = tl.load(positions_ptr + row * 2 + 0, mask=in_range, other=0.0)
    mu_y = tl.load(positions_ptr + row * 2 + 1, mask=in_range, other=0.0)
    l11 = tl.load(cholesky_ptr + row * 3 + 0, mask=in_range, other=1.0)
    l21 = tl.load(cholesky_ptr + row * 3 + 1, mask=in_range, other=0.0)
    l22 = tl.load(cholesky_ptr + row * 3 + 2, mask=in_range, other=1.0)
    # Dead splats (padding lanes or valid = False) get the unit Gaussian at the origin, so every
    # intermediate stays finite whatever the caller left in their slots; their weight is then
    # forced to zero by `live`, which also zeroes their gradients in the backward pass.
    mu_x = tl.where(live, mu_x, 0.0)
    mu_y = tl.where(live, mu_y, 0.0)
    l11 = tl.where(live, l11, 1.0)
    l21 = tl.where(live, l21, 0.0)
    l22 = tl.where(live, l22, 1.0)
    # One division per splat here instead of one per (pixel, splat) pair in the tile.
    return mu_x, mu_y, 1.0 / l11, l21, 1.0 / l22, live


@triton.jit
def load_colours(
    colours_ptr,  # *fp32 [B, N, C] contiguous
    pid_b,  # int64 batch index
    offs_n,  # [BLOCK_N] splat indices
    N,  # splats per image
    live,  # [BLOCK_N] bool, from load_splats
    offs_c,  # [C_PAD] channel indices
    C: tl.constexpr,  # channel count
):
    """The block's colours as a [BLOCK_N, C_PAD] tile, and their offsets and mask (the same layout
    as the colour gradient's). Padded channels and splats read 0."""
    col_offs = (pid_b * N + offs_n)[:, None] * C + offs_c[None, :]
    col_mask = (offs_n < N)[:, None] & (offs_c < C)[None, :]
    col = tl.load(colours_ptr + col_offs, mask=col_mask, other=0.0)
    # A dead splat's colour may be garbage too, and 0 * NaN is NaN: zero it outright.
    col = tl.where(live[:, None], col, 0.0)
    return col, col_offs, col_mask


@triton.jit
def splat_block_colour(
    positions_ptr,  # *fp32 [B, N, 2] contiguous
    cholesky_ptr,  # *fp32 [B, N, 3] contiguous
    colours_ptr,  # *fp32 [B, N, C] contiguous
    valid_ptr,  # *u8 [B, N] contiguous, 1 = valid
    pid_b,  # int64 batch index
    offs_n,  # [BLOCK_N] splat indices; N (or more) marks a padding lane
    N,  # splats per image
    px,  # [BLOCK_P] pixel-centre x
    py,  # [BLOCK_P] pixel-centre y
    offs_c,  # [C_PAD] channel indices
    cutoff_sq,  # fp32 squared Mahalanobis cutoff, used only if HAS_CUTOFF
    C: tl.constexpr,  # channel count
    HAS_CUTOFF: tl.constexpr,  # False when cutoff = inf
):
    """sum_n w[p, n] col[n, c] over one block of splats: the forward's step, [BLOCK_P, C_PAD]."""
    mu_x, mu_y, inv_l11, l21, inv_l22, live = load_splats(
        positions_ptr, cholesky_ptr, valid_ptr, pid_b, offs_n, N
    )
    w, _z1, _z2 = splat_weights(
        px, py, mu_x, mu_y, inv_l11, l21, inv_l22, live, cutoff_sq, HAS_CUTOFF
    )  # [BLOCK_P, BLOCK_N]
    col, _col_offs, _col_mask = load_colours(colours_ptr, pid_b, offs_n, N, live, offs_c, C)
    # A broadcast-and-reduce rather than tl.dot: C is tiny (1 or 3), far below tl.dot's 16-wide
    # minimum, and tl.dot's TF32 default on GPUs would cost the fp32 accuracy the twin is
    # compared at.
    return tl.sum(w[:, :, None] * col[None, :, :], axis=1)


@triton.jit
def tile_pixels(
    H,  # image height in pixels
    W,  # image width in pixels
    TILES_X,  # tiles per tile row
    TILES,  # tiles per image
    TILE: tl.constexpr,  # tile side in pixels, a power of two
):
    """The tile of a program on a flat ``(B * TILES,)`` grid (program = image * TILES + tile, the
    index of its splat list): ``list_id, pid_b`` (int64), its pixels' flat row-major indices
    [TILE * TILE], which of them lie in the image (edge tiles hang over), and their centres."""
    list_id = tl.program_id(0).to(tl.int64)
    pid_b = list_id // TILES
    tile = list_id % TILES
    offs_t = tl.arange(0, TILE * TILE)
    pix_x = (tile % TILES_X) * TILE + offs_t % TILE
    pix_y = (tile // TILES_X) * TILE + offs_t // TILE
    mask_p = (pix_x < W) & (pix_y < H)
    return list_id, pid_b, pix_y * W + pix_x, mask_p, pix_x.to(tl.float32) + 0.5, pix_y.to(tl.float32) + 0.5


@triton.jit
def tile_image_and_list(
    image_ptr,  # *fp32 [B, C, H, W] contiguous: an image or a cotangent
    tile_offsets_ptr,  # *i64 [B * TILES + 1]: list bounds of every (image, tile)
    H,
    W,
    TILES_X,
    TILES,
    C: tl.constexpr,
    C_PAD: tl.constexpr,
    TILE: tl.constexpr,
):
    """What a tile-parallel backward or adjoint program starts from (:func:`tile_pixels`): its
    ``pid_b``, which pixels lie in the image, their centres, the image there [TILE * TILE, C_PAD] (0
    past the image's edge and in padded channels), the channel indices and mask, and its list's
    bounds ``start, end`` in the pair buffers."""
    list_id, pid_b, pix, mask_p, px, py = tile_pixels(H, W, TILES_X, TILES, TILE)
    offs_c = tl.arange(0, C_PAD)
    mask_c = offs_c < C
    values = tl.load(image_ptr + image_offsets(pid_b, pix, offs_c, H * W, C),
                     mask=mask_p[:, None] & mask_c[None, :], other=0.0)
    start = tl.load(tile_offsets_ptr + list_id)
    end = tl.load(tile_offsets_ptr + list_id + 1)
    return pid_b, mask_p, px, py, values, offs_c, mask_c, start, end


@triton.jit
def list_block_weights(
    tile_splats_ptr,  # *i32 [K]: the tile lists' splat indices
    positions_ptr,  # the pointers as load_splats takes them
    cholesky_ptr,
    valid_ptr,
    pid_b,  # int64 batch index
    k0,  # the block's first pair of the list
    end,  # one past the list's last pair
    N,  # splats per image
    px,  # [BLOCK_P] the tile's pixel centres, from tile_pixels
    py,
    cutoff_sq,  # fp32 squared Mahalanobis cutoff, used only if HAS_CUTOFF
    HAS_CUTOFF: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Pairs ``k0 .. k0 + BLOCK_N`` of a tile's list: their rows ``offs_k`` [BLOCK_N] in the pair
    buffers, their splats ``offs_n`` (N, a dead splat, past the list's end), the splats' ``live``,
    ``l21``, ``inv_l11``, ``inv_l22``, and their weights ``w, z1, z2`` [BLOCK_P, BLOCK_N] at the tile's pixels."""
    offs_k = k0 + tl.arange(0, BLOCK_N)
    offs_n = tl.load(tile_splats_ptr + offs_k, mask=offs_k < end, other=N)
    mu_x, mu_y, inv_l11, l21, inv_l22, live = load_splats(positions_ptr, cholesky_ptr, valid_ptr, pid_b, offs_n, N)
    w, z1, z2 = splat_weights(px, py, mu_x, mu_y, inv_l11, l21, inv_l22, live, cutoff_sq, HAS_CUTOFF)
    return offs_k, offs_n, live, l21, inv_l11, inv_l22, w, z1, z2


@triton.jit
def image_offsets(
    pid_b,  # int64 batch index
    pix,  # [BLOCK_P] flattened row-major pixel indices
    offs_c,  # [C_PAD] channel indices
    HW,  # pixels per image
    C: tl.constexpr,  # channel count
):
    """[BLOCK_P, C_PAD] offsets into a contiguous [B, C, H, W] image: channel-major, so consecutive
    pixels of one channel are contiguous."""
    return pid_b * C * HW + offs_c[None, :] * HW + pix[:, None]


@triton.jit
def zero_splat_grads(BLOCK_N: tl.constexpr, C_PAD: tl.constexpr):
    """The backward's per-splat accumulators, summed over pixels: colour, then the offsets' and
    the Cholesky entries' (see accumulate_splat_grads)."""
    g_col = tl.zeros((BLOCK_N, C_PAD), dtype=tl.float32)
    g_dx = tl.zeros((BLOCK_N,), dtype=tl.float32)
    g_dy = tl.zeros((BLOCK_N,), dtype=tl.float32)
    g_l11 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    g_l21 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    g_l22 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    return g_col, g_dx, g_dy, g_l11, g_l21, g_l22


@triton.jit
def accumulate_splat_grads(
    g_col,  # [BLOCK_N, C_PAD] accumulators, as zero_splat_grads makes them
    g_dx,  # [BLOCK_N] dL/d(dx) summed (times l11); dL/dmu_x = -this
    g_dy,  # [BLOCK_N] dL/d(dy) summed (times l22)
    g_l11,  # [BLOCK_N] (times l11)
    g_l21,  # [BLOCK_N] (times l22)
    g_l22,  # [BLOCK_N] (times l22)
    g,  # [BLOCK_P, C_PAD] cotangent of the image at the block's pixels, 0 outside the image
    w,  # [BLOCK_P, BLOCK_N] weights, from splat_weights
    z1,  # [BLOCK_P, BLOCK_N]
    z2,  # [BLOCK_P, BLOCK_N]
    col,  # [BLOCK_N, C_PAD] colours, 0 for dead splats
    l21,  # [BLOCK_N]
    inv_l22,  # [BLOCK_N]
):
    """Add one block of pixels' terms to the per-splat gradient sums.

    Pixels with a zero cotangent add nothing (w and z stay finite there, so 0 * w cannot make a
    NaN). The factors 1/l11, 1/l22 are pulled out of the pixel sums; store_splat_grads applies them.
    """
    # I[p, c] = sum_n w[p, n] col[n, c], so
    #   dL/dcol[n, c] = sum_p w[p, n] g[p, c]   and   dL/dw[p, n] = sum_c g[p, c] col[n, c].
    g_col += tl.sum(w[:, :, None] * g[:, None, :], axis=0)
    g_w = tl.sum(g[:, None, :] * col[None, :, :], axis=2)

    # w = exp(-d^2 / 2) inside the cutoff, a constant 0 outside (and for dead splats), so
    # dL/d(d^2) = -w/2 * dL/dw; the zero w already gives the zero gradient the twin's
    # torch.where gives beyond the cutoff.
    g_dsq = -0.5 * w * g_w
    # d^2 = z1^2 + z2^2 and z2 = (dy - l21 z1) / l22, so z1 reaches d^2 directly and via z2.
    g_z2 = 2.0 * g_dsq * z2
    g_z1 = 2.0 * g_dsq * z1 - g_z2 * (l21 * inv_l22)[None, :]

    # z1 = dx / l11:  dz1/ddx = 1/l11,  dz1/dl11 = -z1/l11.
    # z2 = (dy - l21 z1) / l22:  dz2/ddy = 1/l22,  dz2/dl21 = -z1/l22,  dz2/dl22 = -z2/l22.
    g_dx += tl.sum(g_z1, axis=0)
    g_l11 -= tl.sum(g_z1 * z1, axis=0)
    g_dy += tl.sum(g_z2, axis=0)
    g_l21 -= tl.sum(g_z2 * z1, axis=0)
    g_l22 -= tl.sum(g_z2 * z2, axis=0)
    return g_col, g_dx, g_dy, g_l11, g_l21, g_l22


@triton.jit
def store_splat_grads(
    grad_positions_ptr,  # *fp32 [B, N, 2] contiguous
    grad_cholesky_ptr,  # *fp32 [B, N, 3] contiguous
    grad_colours_ptr,  # *fp32 [B, N, C] contiguous
    pid_b,  # int64 batch index
    offs_n,  # [BLOCK_N] splat indices
    N,  # splats per image
    col_offs,  # [BLOCK_N, C_PAD] and
    col_mask,  # its mask, from load_colours
    g_col,  # the accumulators of accumulate_splat_grads
    g_dx,
    g_dy,
    g_l11,
    g_l21,
    g_l22,
    inv_l11,  # [BLOCK_N] 1 / l11
    inv_l22,  # [BLOCK_N] 1 / l22
):
    """Apply the per-splat factors and write the block's gradients (each entry has this one writer)."""
    g_dx = g_dx * inv_l11
    g_l11 = g_l11 * inv_l11
    g_dy = g_dy * inv_l22
    g_l21 = g_l21 * inv_l22
    g_l22 = g_l22 * inv_l22

    mask_n = offs_n < N
    row = pid_b * N + offs_n
    # dx = px - mu_x, so the centre's gradient is minus the offset's.
    tl.store(grad_positions_ptr + row * 2 + 0, -g_dx, mask=mask_n)
    tl.store(grad_positions_ptr + row * 2 + 1, -g_dy, mask=mask_n)
    tl.store(grad_cholesky_ptr + row * 3 + 0, g_l11, mask=mask_n)
    tl.store(grad_cholesky_ptr + row * 3 + 1, g_l21, mask=mask_n)
    tl.store(grad_cholesky_ptr + row * 3 + 2, g_l22, mask=mask_n)
    tl.store(grad_colours_ptr + col_offs, g_col, mask=col_mask)


# The launchers' set-up.


@dataclass(frozen=True)
class LaunchSizes:
    """The sizes and cutoff a launch passes, read off the kernel inputs."""

    batch: int
    n_splats: int
    channels: int
    height: int
    width: int
    cutoff_sq: float  # 0.0 when there is no cutoff
    has_cutoff: bool  # False for cutoff = inf

    @classmethod
    def of(cls, inputs: KernelInputs, height: int, width: int, cutoff: float) -> "LaunchSizes":
        batch, n_splats, channels = inputs.colours.shape
        return cls(batch, n_splats, channels, height, width, *cutoff_args(cutoff))

    @property
    def pixels(self) -> int:
        """H * W, pixels per image."""
        return self.height * self.width

    @property
    def channel_constexprs(self) -> dict[str, int]:
        """The kernels' ``C`` and ``C_PAD`` (the next power of two, as tl.arange needs)."""
        return {"C": self.channels, "C_PAD": triton.next_power_of_2(self.channels)}


def image_buffer(
    inputs: KernelInputs, height: int, width: int, cutoff: float
) -> tuple[Tensor, LaunchSizes | None]:
    """The [B, C, H, W] fp32 image a forward kernel writes, every entry (not accumulated), and the
    launch's sizes; None for an empty image, where there is nothing to launch."""
    batch, _, channels = inputs.colours.shape
    out = torch.empty((batch, channels, height, width), device=inputs.colours.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, None
    return out, LaunchSizes.of(inputs, height, width, cutoff)


def splat_grad_buffers(
    inputs: KernelInputs, height: int, width: int, cutoff: float
) -> tuple[tuple[Tensor, Tensor, Tensor], LaunchSizes | None]:
    """The fp32 gradients of positions, cholesky and colours that a backward kernel writes, every
    entry, and the launch's sizes; None where there is nothing to launch: no splats, or no pixels
    (then the gradients are zeros)."""
    grads = (
        torch.empty_like(inputs.positions),
        torch.empty_like(inputs.cholesky),
        torch.empty_like(inputs.colours),
    )
    sizes = LaunchSizes.of(inputs, height, width, cutoff)
    if sizes.batch * sizes.n_splats == 0:
        return grads, None
    if sizes.pixels == 0:
        return tuple(grad.zero_() for grad in grads), None
    return grads, sizes
