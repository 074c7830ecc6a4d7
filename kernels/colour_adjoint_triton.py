"""The render's adjoint in the colours as a tile-culled Triton kernel: the linear operator ``W^T`` of
the least-squares colour solve (METHOD.md section 1), and the squared weight norms that precondition it.

With ``render = W @ colours`` (``W[p, i] = w_i(p)``, :func:`kernels.rasterize_torch.splat_weights_dense`)
the conjugate-gradient colour solve applies ``W`` (a forward render) and ``W^T``:

    adjoint[b, i, c] = sum_p w_i(p) image[b, c, p],      squared_norms[b, i] = sum_p w_i(p)^2

(the second is the diagonal of ``W^T W``). Through autograd, ``W^T r`` costs a forward render and a
full backward that also computes the geometry gradients, only to throw them away. Here it is one
kernel with the shape of the tile-culled backward (``kernels.rasterize_triton_tiled``): the splats are
binned to tiles (``kernels.tiling.bin_splats_to_tiles``), one program per (image, tile) reads the
tile's pixels once and streams its splat list past them, ``BLOCK_N`` splats at a time, writing each
(tile, splat) pair's two sums; ``TileBins.sum_over_tiles`` adds each splat's pairs in a fixed order.
Tiles a splat's cutoff box misses hold only pixels where its weight is exactly zero, so nothing is
lost; with ``cutoff = inf`` every splat is on every tile and the kernel is the dense adjoint. No
atomics: deterministic.

The pure-PyTorch twin is :func:`kernels.rasterize_torch.colour_adjoint_dense_torch`, the C++ CPU
kernel :func:`kernels.rasterize_cpu.colour_adjoint`; all three share the signature and the contract
(fp32 results, zeros for invalid splats). Not differentiable: it is the solve's operator, not a
layer. Works on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (set before import).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.arguments import colour_adjoint_args, cutoff_args, fp32_copy
from kernels.tiling import TileBins, bin_splats_to_tiles
from kernels.triton_common import list_block_weights, tile_image_and_list

TILE_SIZE = 16  # the tiled rasterizer's default tile
# Splats per inner-loop step and warps a program: one pixel a thread, its [256, BLOCK_N, C_PAD]
# product within kernels/aot_compile.py's 128 registers.
_BLOCK_N = 4
NUM_WARPS = 8


@triton.jit
def _colour_adjoint_kernel(
    image_ptr,  # *fp32 [B, C, H, W] contiguous, the vector W^T is applied to
    positions_ptr,  # *fp32 [B, N, 2] contiguous
    cholesky_ptr,  # *fp32 [B, N, 3] contiguous
    valid_ptr,  # *u8 [B, N] contiguous, 1 = valid
    tile_offsets_ptr,  # *i64 [B * TILES + 1]: list bounds of every (image, tile)
    tile_splats_ptr,  # *i32 [K]: splat indices, ascending within a list
    pair_sums_ptr,  # *fp32 [K, C + 1]: per (tile, splat) pair, sum_p w r per channel then sum_p w^2; written here
    N,  # splats per image
    H,  # image height in pixels
    W,  # image width in pixels
    TILES_X,  # tiles per tile row
    TILES,  # tiles per image
    cutoff_sq,  # fp32 squared Mahalanobis cutoff, used only if HAS_CUTOFF
    C: tl.constexpr,  # channel count
    C_PAD: tl.constexpr,  # next power of two >= C
    HAS_CUTOFF: tl.constexpr,  # False when cutoff = inf (every splat is then on every tile)
    TILE: tl.constexpr,  # tile side in pixels, a power of two
    BLOCK_N: tl.constexpr,  # splats per inner-loop step
):
    pid_b, mask_p, px, py, img, offs_c, mask_c, start, end = tile_image_and_list(
        image_ptr, tile_offsets_ptr, H, W, TILES_X, TILES, C, C_PAD, TILE)  # one program per (image, tile)
    for k0 in range(start, end, BLOCK_N):
        offs_k, _, _, _, _, _, w, _, _ = list_block_weights(
            tile_splats_ptr, positions_ptr, cholesky_ptr, valid_ptr, pid_b, k0, end, N, px, py, cutoff_sq, HAS_CUTOFF,
            BLOCK_N)
        # Lanes past the image's edge read a 0 image, but w^2 must be dropped there explicitly.
        w = tl.where(mask_p[:, None], w, 0.0)  # [TILE * TILE, BLOCK_N]
        sums = tl.sum(w[:, :, None] * img[:, None, :], axis=0)  # [BLOCK_N, C_PAD]
        squares = tl.sum(w * w, axis=0)  # [BLOCK_N]
        in_list = offs_k < end
        tl.store(pair_sums_ptr + offs_k[:, None] * (C + 1) + offs_c[None, :], sums,
                 mask=in_list[:, None] & mask_c[None, :])
        tl.store(pair_sums_ptr + offs_k * (C + 1) + C, squares, mask=in_list)


def _colour_adjoint(
    image: Tensor,  # [B, C, H, W] fp32 contiguous
    positions: Tensor,  # [B, N, 2] fp32 contiguous
    cholesky: Tensor,  # [B, N, 3] fp32 contiguous
    valid: Tensor,  # [B, N] uint8 contiguous
    bins: TileBins,
    cutoff: float,
) -> tuple[Tensor, Tensor]:  # [B, N, C] fp32, [B, N] fp32
    batch, channels, height, width = image.shape
    n_splats = positions.shape[1]
    pairs = bins.tile_splats.shape[0]
    if batch * n_splats == 0 or pairs == 0:  # nothing to sum: every sum is empty
        return (torch.zeros((batch, n_splats, channels), device=image.device, dtype=torch.float32),
                torch.zeros((batch, n_splats), device=image.device, dtype=torch.float32))
    pair_sums = torch.empty((pairs, channels + 1), device=image.device, dtype=torch.float32)
    cutoff_sq, has_cutoff = cutoff_args(cutoff)
    _colour_adjoint_kernel[(batch * bins.tiles_per_image,)](
        image,
        positions,
        cholesky,
        valid,
        bins.tile_offsets,
        bins.tile_splats,
        pair_sums,
        n_splats,
        height,
        width,
        bins.tiles_x,
        bins.tiles_per_image,
        cutoff_sq,
        C=channels,
        C_PAD=triton.next_power_of_2(channels),
        HAS_CUTOFF=has_cutoff,
        TILE=bins.tile_size,
        BLOCK_N=_BLOCK_N,
        num_warps=NUM_WARPS,
    )
    sums = bins.sum_over_tiles(pair_sums).reshape(batch, n_splats, channels + 1)
    return sums[..., :channels].contiguous(), sums[..., channels].contiguous()


def colour_adjoint_triton(
    image: Tensor,  # [B, C, H, W]
    positions: Tensor,  # [B, N, 2] (x, y) in pixels
    cholesky: Tensor,  # [B, N, 3] (l11, l21, l22) in pixels
    valid: Tensor,  # [B, N] bool
    cutoff: float,  # Mahalanobis radius beyond which a splat contributes nothing; inf for none
) -> tuple[Tensor, Tensor]:  # W^T image [B, N, C] fp32; sum_p w(p)^2 [B, N] fp32
    """The render's adjoint in the colours, ``W^T image`` per image and channel, and each splat's
    squared weight norm ``sum_p w(p)^2`` (the diagonal of ``W^T W``); zeros for invalid splats.

    Same signature and result as ``kernels.rasterize_cpu.colour_adjoint`` and the twin
    ``kernels.rasterize_torch.colour_adjoint_dense_torch``: computes in fp32 and returns fp32
    whatever the inputs' dtypes; not differentiable (inputs are detached). Each splat meets only the
    tiles of its cutoff box. ValueError for arguments that do not fit together.
    """
    cutoff = colour_adjoint_args(image, positions, cholesky, valid, cutoff)
    image, positions, cholesky = (fp32_copy(t) for t in (image, positions, cholesky))
    valid = valid.detach().to(torch.uint8).contiguous()
    height, width = image.shape[-2:]
    # Binned from the fp32 copies the kernel reads, so bins and kernel agree on every splat.
    bins = bin_splats_to_tiles(positions, cholesky, valid.bool(), height, width, cutoff, TILE_SIZE)
    return _colour_adjoint(image, positions, cholesky, valid, bins, cutoff)
