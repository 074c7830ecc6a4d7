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
- Backward: one program per (image, tile) too. It reads the tile's cotangent once and streams the
  same list past it, ``BLOCK_N`` splats at a time, reducing each splat's gradient terms over the
  tile's pixels into one row per (tile, splat) pair. ``TileBins.sum_over_tiles`` then adds each
  splat's rows in a fixed order (no float atomics), so it is deterministic as well. Every pixel's
  cotangent is read by one program, where a program per splat would read it once per splat
  covering it: at 400 splats on 224 x 224 about 12 times (``benchmarks/cost_model.py``).

Pixels of a tile that a splat's box misses are beyond its cutoff, where the dense kernels' weight
(and every gradient term, all proportional to it) is exactly zero, so the two compute the same sums
up to the order of float additions. With ``cutoff = inf`` every splat reaches every pixel and nothing can be
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
from kernels.triton_common import (accumulate_splat_grads, image_buffer, image_offsets, list_block_weights,
                                   load_colours, splat_block_colour, splat_grad_buffers, store_splat_grads,
                                   tile_image_and_list, tile_pixels, zero_splat_grads)

DEFAULT_TILE_SIZE = 16
TILE_SIZES = (4, 8, 16, 32)  # powers of two: a tile's pixels are one tl.arange block
# Backward: splats per inner-loop step at 16 x 16 tiles, and warps a program: one pixel a thread,
# its [256, BLOCK_N] gradient terms within kernels/aot_compile.py's 128 registers.
_BWD_BLOCK_N = 4
BACKWARD_WARPS = 8


def backward_block_n(tile_size: int) -> int:
    """Splats per backward inner-loop step: ``_BWD_BLOCK_N`` at 16 x 16 tiles, the same
    [tile^2, BLOCK_N] size at the others."""
    return min(32, max(1, _BWD_BLOCK_N * 256 // (tile_size * tile_size)))


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
    list_id, pid_b, pix, mask_p, px, py = tile_pixels(H, W, TILES_X, TILES, TILE)

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

    out_offs = image_offsets(pid_b, pix, offs_c, H * W, C)
    tl.store(out_ptr + out_offs, acc, mask=mask_p[:, None] & mask_c[None, :])


@triton.jit
def _tiled_bwd_kernel(
    grad_out_ptr,  # *fp32 [B, C, H, W] contiguous, cotangent of the image
    positions_ptr,  # *fp32 [B, N, 2] contiguous
    cholesky_ptr,  # *fp32 [B, N, 3] contiguous
    colours_ptr,  # *fp32 [B, N, C] contiguous
    valid_ptr,  # *u8 [B, N] contiguous
    tile_offsets_ptr,  # *i64 [B * TILES + 1]: list bounds of every (image, tile)
    tile_splats_ptr,  # *i32 [K]: splat indices, ascending within a list
    pair_grad_positions_ptr,  # *fp32 [K, 2]: the pair's share of its splat's gradient, written here
    pair_grad_cholesky_ptr,  # *fp32 [K, 3]
    pair_grad_colours_ptr,  # *fp32 [K, C]
    N,  # splats per image
    H,  # image height in pixels
    W,  # image width in pixels
    TILES_X,  # tiles per tile row
    TILES,  # tiles per image
    cutoff_sq,  # fp32 squared Mahalanobis cutoff
    C: tl.constexpr,
    C_PAD: tl.constexpr,
    TILE: tl.constexpr,  # tile side in pixels, a power of two
    BLOCK_N: tl.constexpr,  # splats per inner-loop step
):
    # Flat grid (B * TILES,) as the forward's. The tile's cotangent is read once; lanes past the
    # image read 0, so they add nothing to any sum.
    pid_b, _in_image, px, py, g, offs_c, mask_c, start, end = tile_image_and_list(
        grad_out_ptr, tile_offsets_ptr, H, W, TILES_X, TILES, C, C_PAD, TILE)  # g [TILE * TILE, C_PAD]
    for k0 in range(start, end, BLOCK_N):
        offs_k, offs_n, live, l21, inv_l11, inv_l22, w, z1, z2 = list_block_weights(
            tile_splats_ptr, positions_ptr, cholesky_ptr, valid_ptr, pid_b, k0, end, N, px, py, cutoff_sq, True,
            BLOCK_N)
        col, _, _ = load_colours(colours_ptr, pid_b, offs_n, N, live, offs_c, C)
        g_col, g_dx, g_dy, g_l11, g_l21, g_l22 = zero_splat_grads(BLOCK_N, C_PAD)
        g_col, g_dx, g_dy, g_l11, g_l21, g_l22 = accumulate_splat_grads(
            g_col, g_dx, g_dy, g_l11, g_l21, g_l22, g, w, z1, z2, col, l21, inv_l22
        )
        # The pair rows as "image 0, splats offs_k of `end`": row = offs_k, lanes past the list masked.
        pair_col_offs = offs_k[:, None] * C + offs_c[None, :]
        pair_col_mask = (offs_k < end)[:, None] & mask_c[None, :]
        store_splat_grads(
            pair_grad_positions_ptr, pair_grad_cholesky_ptr, pair_grad_colours_ptr, 0, offs_k, end,
            pair_col_offs, pair_col_mask, g_col, g_dx, g_dy, g_l11, g_l21, g_l22, inv_l11, inv_l22,
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
    bins: TileBins,
    height: int,
    width: int,
    cutoff: float,
) -> tuple[Tensor, Tensor, Tensor]:  # fp32 grads of positions, cholesky, colours
    grads, sizes = splat_grad_buffers(inputs, height, width, cutoff)
    pairs = bins.tile_splats.shape[0]
    if sizes is None:
        return grads
    if pairs == 0:  # no splat reaches any pixel
        return tuple(grad.zero_() for grad in grads)
    pair_grads = tuple(torch.empty((pairs, grad.shape[-1]), device=grad.device, dtype=torch.float32)
                       for grad in grads)
    _tiled_bwd_kernel[(sizes.batch * bins.tiles_per_image,)](
        grad_out,
        *inputs,
        bins.tile_offsets,
        bins.tile_splats,
        *pair_grads,
        sizes.n_splats,
        height,
        width,
        bins.tiles_x,
        bins.tiles_per_image,
        sizes.cutoff_sq,
        **sizes.channel_constexprs,
        TILE=bins.tile_size,
        BLOCK_N=backward_block_n(bins.tile_size),
        num_warps=BACKWARD_WARPS,
    )
    summed = bins.sum_over_tiles(torch.cat(pair_grads, dim=1))  # [B * N, 5 + C]
    return tuple(part.reshape(grad.shape) for part, grad in zip(summed.split([2, 3, sizes.channels], dim=1), grads))


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
            ctx, (positions, cholesky, colours), inputs, (height, width, cutoff),
            bins.tile_offsets, bins.tile_splats, bins.boxes, bins.pair_order, bins.tiles_per_splat,
        )
        ctx.tile_shape = (bins.tile_size, bins.tiles_y, bins.tiles_x)
        return _tiled_fwd(inputs, bins, height, width, cutoff).to(colours.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        grad_out, inputs, lists = saved_kernel_inputs(ctx, grad_out)
        bins = TileBins(*ctx.tile_shape, *lists)
        return grads_for_inputs(ctx, _tiled_bwd(grad_out, inputs, bins, *ctx.geometry))


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
