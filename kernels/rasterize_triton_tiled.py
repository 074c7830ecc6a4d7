"""Tile-culled Triton kernels of the accumulated-sum splat rasterizer (METHOD.md section 1).

Same function as the dense kernels of ``kernels.rasterize_triton`` and their PyTorch twin
``kernels.rasterize_torch.rasterize_dense_torch``,

    I[b, c, p] = sum_i valid[b, i] * colours[b, i, c] * w(p; mu_i, L_i),   w = 0 beyond the cutoff,

but each pixel only meets the splats whose cutoff ellipse can reach it. The dense kernels evaluate
every splat at every pixel (N * H * W weights per image); with a finite cutoff nearly all of those are
exact zeros. Here:

- Binning (``kernels.tiling.bin_splats_to_tiles``, torch ops on the device): every splat's pixel box
  from its Cholesky factor and the cutoff, and for every (image, tile) of ``tile_size`` x
  ``tile_size`` pixels the ascending list of splats whose box touches it.
- Forward: one program per (image, tile). It owns the tile's pixels and streams only its own list
  past them, ``BLOCK_N`` splats at a time, with the dense kernel's weight code. It writes its pixels
  once: no atomics, and the sum runs in list order, so it is deterministic.
- Backward: one program per (image, splat). It walks the splat's own pixel box (clipped to the
  image), ``BLOCK_P`` pixels at a time, and reduces the same gradient terms as the dense backward
  over those pixels only; every gradient entry has one writer, summed in a fixed order. No float
  atomics, no per-(tile, splat) partials to reduce. The box is tighter than the box's tiles, so
  the backward evaluates fewer pairs than the forward.

Pixels outside a splat's box are beyond its cutoff, where the dense kernels' weight (and every
gradient term, all proportional to it) is exactly zero, so the two compute the same sums up to the
order of float additions. With ``cutoff = inf`` every splat reaches every pixel and nothing can be
culled: ``rasterize_triton_tiled`` then calls the dense kernels.

Works on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (set before import).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.rasterize_triton import _cutoff_args, _load_splats, _splat_weights, rasterize_triton
from kernels.tiling import TileBins, bin_splats_to_tiles

DEFAULT_TILE_SIZE = 16
TILE_SIZES = (4, 8, 16, 32)  # powers of two: a tile's pixels are one tl.arange block
# Backward: pixels of a splat's box per inner-loop step.
_BWD_BLOCK_P = 128


def forward_block_n(tile_size: int) -> int:
    """Splats per forward inner-loop step: keeps the [tile^2, BLOCK_N, C_PAD] broadcast near the
    dense kernel's 64 x 32 pixel-splat tile (2,048 pairs)."""
    return min(32, max(2, 2048 // (tile_size * tile_size)))


@triton.jit
def _tiled_fwd_kernel(
    positions_ptr,  # *fp32 [B, N, 2] contiguous
    cholesky_ptr,  # *fp32 [B, N, 3] contiguous
    colours_ptr,  # *fp32 [B, N, C] contiguous
    valid_ptr,  # *u8 [B, N] contiguous, 1 = valid
    tile_offsets_ptr,  # *i64 [B * TILES + 1]: list bounds of every (image, tile)
    tile_splats_ptr,  # *i32 [K]: splat indices, ascending within a list
    out_ptr,  # *fp32 [B, C, H, W] contiguous, written (not accumulated) by this kernel
    N,  # splats per image
    H,  # image height in pixels
    W,  # image width in pixels
    TILES_X,  # tiles per tile row
    TILES,  # tiles per image
    cutoff_sq,  # fp32 squared Mahalanobis cutoff
    C: tl.constexpr,  # channel count
    C_PAD: tl.constexpr,  # next power of two >= C
    TILE: tl.constexpr,  # tile side in pixels, a power of two
    BLOCK_N: tl.constexpr,  # splats per inner-loop step
):
    # Flat grid (B * TILES,): program = image * TILES + tile, the index of its splat list.
    list_id = tl.program_id(0).to(tl.int64)
    pid_b = list_id // TILES
    tile = list_id % TILES
    tile_y = tile // TILES_X
    tile_x = tile % TILES_X

    offs_t = tl.arange(0, TILE * TILE)
    pix_x = tile_x * TILE + offs_t % TILE  # [TILE * TILE]
    pix_y = tile_y * TILE + offs_t // TILE
    mask_p = (pix_x < W) & (pix_y < H)  # edge tiles hang over the image
    px = pix_x.to(tl.float32) + 0.5
    py = pix_y.to(tl.float32) + 0.5

    offs_c = tl.arange(0, C_PAD)
    mask_c = offs_c < C

    start = tl.load(tile_offsets_ptr + list_id)
    end = tl.load(tile_offsets_ptr + list_id + 1)
    acc = tl.zeros((TILE * TILE, C_PAD), dtype=tl.float32)
    for k0 in range(start, end, BLOCK_N):
        offs_k = k0 + tl.arange(0, BLOCK_N)
        # Lanes past the list read splat N, which _load_splats treats as a dead padding splat.
        offs_n = tl.load(tile_splats_ptr + offs_k, mask=offs_k < end, other=N)
        mu_x, mu_y, inv_l11, l21, inv_l22, live = _load_splats(
            positions_ptr, cholesky_ptr, valid_ptr, pid_b, offs_n, N
        )
        w, _z1, _z2 = _splat_weights(
            px, py, mu_x, mu_y, inv_l11, l21, inv_l22, live, cutoff_sq, True
        )  # [TILE * TILE, BLOCK_N]
        col_offs = (pid_b * N + offs_n)[:, None] * C + offs_c[None, :]
        col_mask = (offs_n < N)[:, None] & mask_c[None, :]
        col = tl.load(colours_ptr + col_offs, mask=col_mask, other=0.0)  # [BLOCK_N, C_PAD]
        col = tl.where(live[:, None], col, 0.0)
        acc += tl.sum(w[:, :, None] * col[None, :, :], axis=1)

    pix = pix_y * W + pix_x
    out_offs = pid_b * C * H * W + offs_c[None, :] * (H * W) + pix[:, None]
    tl.store(out_ptr + out_offs, acc, mask=mask_p[:, None] & mask_c[None, :])


@triton.jit
def _tiled_bwd_kernel(
    grad_out_ptr,  # *fp32 [B, C, H, W] contiguous, cotangent of the image
    positions_ptr,  # *fp32 [B, N, 2] contiguous
    cholesky_ptr,  # *fp32 [B, N, 3] contiguous
    colours_ptr,  # *fp32 [B, N, C] contiguous
    valid_ptr,  # *u8 [B, N] contiguous
    boxes_ptr,  # *i32 [B, N, 4] (first column, first row, columns, rows), inside the image
    grad_positions_ptr,  # *fp32 [B, N, 2], written by this kernel
    grad_cholesky_ptr,  # *fp32 [B, N, 3], written by this kernel
    grad_colours_ptr,  # *fp32 [B, N, C], written by this kernel
    N,  # splats per image
    W,  # image width in pixels
    HW,  # H * W
    cutoff_sq,  # fp32 squared Mahalanobis cutoff
    C: tl.constexpr,
    C_PAD: tl.constexpr,
    BLOCK_P: tl.constexpr,  # box pixels per inner-loop step
):
    # Flat grid (B * N,): program = image * N + splat, the splat's row in every [B, N, ...] tensor.
    row = tl.program_id(0).to(tl.int64)
    pid_b = row // N
    offs_n = (row % N) + tl.arange(0, 1)  # [1]: the dense helpers take a block of splats
    mu_x, mu_y, inv_l11, l21, inv_l22, live = _load_splats(
        positions_ptr, cholesky_ptr, valid_ptr, pid_b, offs_n, N
    )
    offs_c = tl.arange(0, C_PAD)
    mask_c = offs_c < C
    col = tl.load(colours_ptr + row * C + offs_c, mask=mask_c, other=0.0)[None, :]  # [1, C_PAD]
    col = tl.where(live[:, None], col, 0.0)

    first_col = tl.load(boxes_ptr + row * 4 + 0)
    first_row = tl.load(boxes_ptr + row * 4 + 1)
    box_cols = tl.load(boxes_ptr + row * 4 + 2)
    box_pixels = box_cols * tl.load(boxes_ptr + row * 4 + 3)  # 0 for an invalid or unseen splat

    g_col = tl.zeros((1, C_PAD), dtype=tl.float32)
    g_dx = tl.zeros((1,), dtype=tl.float32)
    g_dy = tl.zeros((1,), dtype=tl.float32)
    g_l11 = tl.zeros((1,), dtype=tl.float32)
    g_l21 = tl.zeros((1,), dtype=tl.float32)
    g_l22 = tl.zeros((1,), dtype=tl.float32)

    grad_base = pid_b * C * HW + offs_c[None, :] * HW  # [1, C_PAD]
    for k0 in range(0, box_pixels, BLOCK_P):
        # The box's pixels in row-major order; lanes past its end read a zero cotangent.
        offs_k = k0 + tl.arange(0, BLOCK_P)
        mask_k = offs_k < box_pixels
        pix_x = first_col + offs_k % box_cols
        pix_y = first_row + offs_k // box_cols
        px = pix_x.to(tl.float32) + 0.5
        py = pix_y.to(tl.float32) + 0.5
        g = tl.load(
            grad_out_ptr + grad_base + (pix_y * W + pix_x)[:, None],
            mask=mask_k[:, None] & mask_c[None, :],
            other=0.0,
        )  # [BLOCK_P, C_PAD]
        w, z1, z2 = _splat_weights(
            px, py, mu_x, mu_y, inv_l11, l21, inv_l22, live, cutoff_sq, True
        )  # [BLOCK_P, 1]

        # The dense backward's terms (kernels/rasterize_triton.py derives them), for one splat.
        g_col += tl.sum(w[:, :, None] * g[:, None, :], axis=0)
        g_w = tl.sum(g[:, None, :] * col[None, :, :], axis=2)  # [BLOCK_P, 1]
        g_dsq = -0.5 * w * g_w
        g_z2 = 2.0 * g_dsq * z2
        g_z1 = 2.0 * g_dsq * z1 - g_z2 * (l21 * inv_l22)[None, :]
        g_dx += tl.sum(g_z1, axis=0)
        g_l11 -= tl.sum(g_z1 * z1, axis=0)
        g_dy += tl.sum(g_z2, axis=0)
        g_l21 -= tl.sum(g_z2 * z1, axis=0)
        g_l22 -= tl.sum(g_z2 * z2, axis=0)

    g_dx = g_dx * inv_l11
    g_l11 = g_l11 * inv_l11
    g_dy = g_dy * inv_l22
    g_l21 = g_l21 * inv_l22
    g_l22 = g_l22 * inv_l22

    rows = row + tl.arange(0, 1)  # [1]
    tl.store(grad_positions_ptr + rows * 2 + 0, -g_dx)
    tl.store(grad_positions_ptr + rows * 2 + 1, -g_dy)
    tl.store(grad_cholesky_ptr + rows * 3 + 0, g_l11)
    tl.store(grad_cholesky_ptr + rows * 3 + 1, g_l21)
    tl.store(grad_cholesky_ptr + rows * 3 + 2, g_l22)
    tl.store(grad_colours_ptr + row * C + offs_c[None, :], g_col, mask=mask_c[None, :])


def _tiled_fwd(
    positions: Tensor,  # [B, N, 2] fp32 contiguous
    cholesky: Tensor,  # [B, N, 3] fp32 contiguous
    colours: Tensor,  # [B, N, C] fp32 contiguous
    valid: Tensor,  # [B, N] uint8 contiguous
    bins: TileBins,
    height: int,
    width: int,
    cutoff: float,
) -> Tensor:  # [B, C, H, W] fp32
    batch, n_splats, channels = colours.shape
    out = torch.empty((batch, channels, height, width), device=colours.device, dtype=torch.float32)
    if out.numel() == 0:
        return out
    cutoff_sq, _ = _cutoff_args(cutoff)
    _tiled_fwd_kernel[(batch * bins.tiles_per_image,)](
        positions,
        cholesky,
        colours,
        valid,
        bins.tile_offsets,
        bins.tile_splats,
        out,
        n_splats,
        height,
        width,
        bins.tiles_x,
        bins.tiles_per_image,
        cutoff_sq,
        C=channels,
        C_PAD=triton.next_power_of_2(channels),
        TILE=bins.tile_size,
        BLOCK_N=forward_block_n(bins.tile_size),
    )
    return out


def _tiled_bwd(
    grad_out: Tensor,  # [B, C, H, W] fp32 contiguous
    positions: Tensor,  # [B, N, 2] fp32 contiguous
    cholesky: Tensor,  # [B, N, 3] fp32 contiguous
    colours: Tensor,  # [B, N, C] fp32 contiguous
    valid: Tensor,  # [B, N] uint8 contiguous
    boxes: Tensor,  # [B, N, 4] int32 contiguous
    height: int,
    width: int,
    cutoff: float,
) -> tuple[Tensor, Tensor, Tensor]:  # fp32 grads of positions, cholesky, colours
    batch, n_splats, channels = colours.shape
    grad_positions = torch.empty_like(positions)
    grad_cholesky = torch.empty_like(cholesky)
    grad_colours = torch.empty_like(colours)
    if batch * n_splats == 0:
        return grad_positions, grad_cholesky, grad_colours
    if height * width == 0:
        return grad_positions.zero_(), grad_cholesky.zero_(), grad_colours.zero_()
    cutoff_sq, _ = _cutoff_args(cutoff)
    _tiled_bwd_kernel[(batch * n_splats,)](
        grad_out,
        positions,
        cholesky,
        colours,
        valid,
        boxes,
        grad_positions,
        grad_cholesky,
        grad_colours,
        n_splats,
        width,
        height * width,
        cutoff_sq,
        C=channels,
        C_PAD=triton.next_power_of_2(channels),
        BLOCK_P=_BWD_BLOCK_P,
    )
    return grad_positions, grad_cholesky, grad_colours


class _RasterizeTritonTiled(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        positions: Tensor,  # [B, N, 2]
        cholesky: Tensor,  # [B, N, 3]
        colours: Tensor,  # [B, N, C]
        valid: Tensor,  # [B, N] bool
        height: int,
        width: int,
        cutoff: float,
        tile_size: int,
    ) -> Tensor:  # [B, C, H, W]
        pos32 = positions.detach().to(torch.float32).contiguous()
        chol32 = cholesky.detach().to(torch.float32).contiguous()
        col32 = colours.detach().to(torch.float32).contiguous()
        valid8 = valid.detach().to(torch.uint8).contiguous()
        # Binned from the fp32 copies the kernels read, so boxes and kernel agree on every splat.
        bins = bin_splats_to_tiles(pos32, chol32, valid8.bool(), height, width, cutoff, tile_size)
        out = _tiled_fwd(pos32, chol32, col32, valid8, bins, height, width, cutoff)
        boxes = bins.boxes.contiguous()
        ctx.save_for_backward(pos32, chol32, col32, valid8, boxes)
        ctx.height, ctx.width, ctx.cutoff = height, width, cutoff
        ctx.dtypes = (positions.dtype, cholesky.dtype, colours.dtype)
        return out.to(colours.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        pos32, chol32, col32, valid8, boxes = ctx.saved_tensors
        g32 = grad_out.to(torch.float32).contiguous()
        grads = _tiled_bwd(g32, pos32, chol32, col32, valid8, boxes, ctx.height, ctx.width, ctx.cutoff)
        grad_positions, grad_cholesky, grad_colours = (
            g.to(dtype) for g, dtype in zip(grads, ctx.dtypes)
        )
        return grad_positions, grad_cholesky, grad_colours, None, None, None, None, None


def check_rasterizer_inputs(
    positions: Tensor, cholesky: Tensor, colours: Tensor, valid: Tensor
) -> None:
    """ValueError unless the four tensors have the rasterizers' shapes and dtypes."""
    if positions.dim() != 3 or positions.shape[-1] != 2:
        raise ValueError(f"positions must be [B, N, 2], got {tuple(positions.shape)}")
    batch, n_splats = positions.shape[:2]
    if cholesky.shape != (batch, n_splats, 3):
        raise ValueError(
            f"cholesky must be [B, N, 3] = {(batch, n_splats, 3)}, got {tuple(cholesky.shape)}"
        )
    if colours.dim() != 3 or colours.shape[:2] != (batch, n_splats) or colours.shape[-1] < 1:
        raise ValueError(f"colours must be [B, N, C] with C >= 1, got {tuple(colours.shape)}")
    if valid.shape != (batch, n_splats):
        raise ValueError(f"valid must be [B, N] = {(batch, n_splats)}, got {tuple(valid.shape)}")
    for name, tensor in (("positions", positions), ("cholesky", cholesky), ("colours", colours)):
        if not tensor.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
    if valid.dtype != torch.bool:
        raise ValueError(f"valid must be a bool tensor, got {valid.dtype}")


def rasterize_triton_tiled(
    positions: Tensor,  # [B, N, 2] (x, y) in pixels
    cholesky: Tensor,  # [B, N, 3] (l11, l21, l22) in pixels
    colours: Tensor,  # [B, N, C]
    valid: Tensor,  # [B, N] bool
    height: int,
    width: int,
    cutoff: float = math.inf,  # Mahalanobis radius beyond which a splat contributes nothing
    tile_size: int = DEFAULT_TILE_SIZE,  # tile side in pixels, one of TILE_SIZES
) -> Tensor:  # [B, C, H, W]
    """Render a batch of splat sets by accumulated sum, culling splats to the tiles they reach.

    Same signature (plus ``tile_size``) and result as ``rasterize_triton`` and
    ``rasterize_dense_torch``; differentiable in all but ``valid``; computes in fp32. With
    ``cutoff = inf`` nothing can be culled and the dense kernels run instead.
    """
    check_rasterizer_inputs(positions, cholesky, colours, valid)
    if tile_size not in TILE_SIZES:
        raise ValueError(f"tile_size must be one of {TILE_SIZES}, got {tile_size}")
    cutoff = float(cutoff)
    _cutoff_args(cutoff)  # the ValueError for a negative or NaN cutoff
    if math.isinf(cutoff):
        return rasterize_triton(positions, cholesky, colours, valid, height, width, cutoff)
    return _RasterizeTritonTiled.apply(
        positions, cholesky, colours, valid, int(height), int(width), cutoff, int(tile_size)
    )
