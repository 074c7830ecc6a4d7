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
  past them, ``BLOCK_N`` splats at a time, with the dense kernel's forward step. It writes its pixels
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

Both directions are built from the pieces the dense kernels use (``kernels.triton_common``); the
argument check and the autograd save and restore are every rasterizer's (``kernels.arguments``).
Works on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (set before import).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.arguments import (KernelInputs, grads_for_inputs, kernel_inputs, rasterizer_args,
                               save_for_kernel_backward, saved_kernel_inputs)
from kernels.rasterize_triton import rasterize_triton
from kernels.tiling import TileBins, bin_splats_to_tiles
from kernels.triton_common import (accumulate_splat_grads, box_block_weights, image_buffer, image_offsets,
                                   load_colours, load_program_splat, load_splat_box, splat_block_colour,
                                   splat_grad_buffers, store_splat_grads, zero_splat_grads)

DEFAULT_TILE_SIZE = 16
TILE_SIZES = (4, 8, 16, 32)  # powers of two: a tile's pixels are one tl.arange block
# Backward: pixels of a splat's box per inner-loop step.
_BWD_BLOCK_P = 128


def forward_block_n(tile_size: int) -> int:
    """Splats per forward inner-loop step: keeps the [tile^2, BLOCK_N, C_PAD] broadcast near the
    2,048 pixel-splat pairs (128 registers a thread for RGB at 16 x 16 tiles)."""
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
        # Lanes past the list read splat N, which the shared loads treat as a dead padding splat.
        offs_n = tl.load(tile_splats_ptr + offs_k, mask=offs_k < end, other=N)
        acc += splat_block_colour(
            positions_ptr, cholesky_ptr, colours_ptr, valid_ptr, pid_b, offs_n, N,
            px, py, offs_c, cutoff_sq, C, True,
        )

    out_offs = image_offsets(pid_b, pix_y * W + pix_x, offs_c, H * W, C)
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
    row, pid_b, offs_n, mu_x, mu_y, inv_l11, l21, inv_l22, live = load_program_splat(
        positions_ptr, cholesky_ptr, valid_ptr, N)  # one program per (image, splat)
    offs_c = tl.arange(0, C_PAD)
    col, col_offs, col_mask = load_colours(colours_ptr, pid_b, offs_n, N, live, offs_c, C)  # [1, C_PAD]

    first_col, first_row, box_cols, box_pixels = load_splat_box(boxes_ptr, row)
    g_col, g_dx, g_dy, g_l11, g_l21, g_l22 = zero_splat_grads(1, C_PAD)
    for k0 in range(0, box_pixels, BLOCK_P):
        # The box's pixels in row-major order; lanes past its end read a zero cotangent.
        g, _, w, z1, z2 = box_block_weights(
            grad_out_ptr, pid_b, first_col, first_row, box_cols, box_pixels, k0, offs_c, W, HW,
            mu_x, mu_y, inv_l11, l21, inv_l22, live, cutoff_sq, True, C, BLOCK_P,
        )  # g [BLOCK_P, C_PAD], w [BLOCK_P, 1]
        g_col, g_dx, g_dy, g_l11, g_l21, g_l22 = accumulate_splat_grads(
            g_col, g_dx, g_dy, g_l11, g_l21, g_l22, g, w, z1, z2, col, l21, inv_l22
        )

    store_splat_grads(
        grad_positions_ptr, grad_cholesky_ptr, grad_colours_ptr, pid_b, offs_n, N, col_offs, col_mask,
        g_col, g_dx, g_dy, g_l11, g_l21, g_l22, inv_l11, inv_l22,
    )


def _tiled_fwd(
    inputs: KernelInputs, bins: TileBins, height: int, width: int, cutoff: float
) -> Tensor:  # [B, C, H, W] fp32
    out, sizes = image_buffer(inputs, height, width, cutoff)
    if sizes is not None:
        _tiled_fwd_kernel[(sizes.batch * bins.tiles_per_image,)](
            *inputs,
            bins.tile_offsets,
            bins.tile_splats,
            out,
            sizes.n_splats,
            height,
            width,
            bins.tiles_x,
            bins.tiles_per_image,
            sizes.cutoff_sq,
            **sizes.channel_constexprs,
            TILE=bins.tile_size,
            BLOCK_N=forward_block_n(bins.tile_size),
        )
    return out


def _tiled_bwd(
    grad_out: Tensor,  # [B, C, H, W] fp32 contiguous
    inputs: KernelInputs,
    boxes: Tensor,  # [B, N, 4] int32 contiguous
    height: int,
    width: int,
    cutoff: float,
) -> tuple[Tensor, Tensor, Tensor]:  # fp32 grads of positions, cholesky, colours
    grads, sizes = splat_grad_buffers(inputs, height, width, cutoff)
    if sizes is not None:
        _tiled_bwd_kernel[(sizes.batch * sizes.n_splats,)](
            grad_out,
            *inputs,
            boxes,
            *grads,
            sizes.n_splats,
            width,
            sizes.pixels,
            sizes.cutoff_sq,
            **sizes.channel_constexprs,
            BLOCK_P=_BWD_BLOCK_P,
        )
    return grads


class _RasterizeTritonTiled(torch.autograd.Function):
    # Arguments as rasterize_triton_tiled's, checked there.
    @staticmethod
    def forward(ctx, positions, cholesky, colours, valid, height, width, cutoff, tile_size):
        inputs = kernel_inputs(positions, cholesky, colours, valid)
        # Binned from the fp32 copies the kernels read, so boxes and kernel agree on every splat.
        bins = bin_splats_to_tiles(
            inputs.positions, inputs.cholesky, inputs.valid.bool(), height, width, cutoff, tile_size
        )
        save_for_kernel_backward(
            ctx, (positions, cholesky, colours), inputs, (height, width, cutoff), bins.boxes.contiguous()
        )
        return _tiled_fwd(inputs, bins, height, width, cutoff).to(colours.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        grad_out, inputs, (boxes,) = saved_kernel_inputs(ctx, grad_out)
        return grads_for_inputs(ctx, _tiled_bwd(grad_out, inputs, boxes, *ctx.geometry))


def rasterize_triton_tiled(positions: Tensor, cholesky: Tensor, colours: Tensor, valid: Tensor, height: int,
                           width: int, cutoff: float = math.inf,
                           tile_size: int = DEFAULT_TILE_SIZE,  # tile side in pixels, one of TILE_SIZES
                           ) -> Tensor:  # [B, C, H, W]; the other arguments as in kernels.arguments
    """Render a batch of splat sets by accumulated sum, culling splats to the tiles they reach.

    Same signature (plus ``tile_size``) and result as ``rasterize_triton`` and
    ``rasterize_dense_torch``; differentiable in all but ``valid``; computes in fp32. With
    ``cutoff = inf`` nothing can be culled and the dense kernels run instead.
    """
    height, width, cutoff = rasterizer_args(positions, cholesky, colours, valid, height, width, cutoff)
    if tile_size not in TILE_SIZES:
        raise ValueError(f"tile_size must be one of {TILE_SIZES}, got {tile_size}")
    if math.isinf(cutoff):
        return rasterize_triton(positions, cholesky, colours, valid, height, width, cutoff)
    return _RasterizeTritonTiled.apply(
        positions, cholesky, colours, valid, height, width, cutoff, int(tile_size)
    )
