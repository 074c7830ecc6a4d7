"""The render's adjoint in the colours as a tile-culled Triton kernel: the linear operator ``W^T`` of
the least-squares colour solve (METHOD.md section 1), and the squared weight norms that precondition it.

With ``render = W @ colours`` (``W[p, i] = w_i(p)``, :func:`kernels.rasterize_torch.splat_weights_dense`)
the conjugate-gradient colour solve applies ``W`` (a forward render) and ``W^T``:

    adjoint[b, i, c] = sum_p w_i(p) image[b, c, p],      squared_norms[b, i] = sum_p w_i(p)^2

(the second is the diagonal of ``W^T W``). Through autograd, ``W^T r`` costs a forward render and a
full backward that also computes the geometry gradients, only to throw them away. Here it is one
kernel with the shape of the tile-culled backward (``kernels.rasterize_triton_tiled``): one program
per (image, splat), walking the splat's own pixel box (``kernels.tiling.splat_pixel_boxes``, clipped
to the image) ``BLOCK_P`` pixels at a time and reducing the two sums over those pixels only. Pixels
outside the box are beyond the cutoff, where the weight is exactly zero, so nothing is lost; with
``cutoff = inf`` the box is the whole image and the kernel is the dense adjoint. Every output entry
has one writer and a fixed summation order: no atomics, deterministic.

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
from kernels.tiling import splat_pixel_boxes
from kernels.triton_common import box_block_weights, load_program_splat, load_splat_box

# Box pixels per inner-loop step: 2 per thread at 4 warps. The per-lane accumulators are summed
# once, after the loop, so a step costs no cross-warp reduction; kernels/aot_compile.py holds the
# kernel to 128 registers.
_BLOCK_P = 256


@triton.jit
def _colour_adjoint_kernel(
    image_ptr,  # *fp32 [B, C, H, W] contiguous, the vector W^T is applied to
    positions_ptr,  # *fp32 [B, N, 2] contiguous
    cholesky_ptr,  # *fp32 [B, N, 3] contiguous
    valid_ptr,  # *u8 [B, N] contiguous, 1 = valid
    boxes_ptr,  # *i32 [B, N, 4] (first column, first row, columns, rows), inside the image
    adjoint_ptr,  # *fp32 [B, N, C], written (every entry) by this kernel
    squared_norms_ptr,  # *fp32 [B, N], written (every entry) by this kernel
    N,  # splats per image
    W,  # image width in pixels
    HW,  # H * W
    cutoff_sq,  # fp32 squared Mahalanobis cutoff, used only if HAS_CUTOFF
    C: tl.constexpr,  # channel count
    C_PAD: tl.constexpr,  # next power of two >= C
    HAS_CUTOFF: tl.constexpr,  # False when cutoff = inf (the box is then the whole image)
    BLOCK_P: tl.constexpr,  # box pixels per inner-loop step
):
    row, pid_b, offs_n, mu_x, mu_y, inv_l11, l21, inv_l22, live = load_program_splat(
        positions_ptr, cholesky_ptr, valid_ptr, N)  # one program per (image, splat)
    offs_c = tl.arange(0, C_PAD)
    mask_c = offs_c < C

    first_col, first_row, box_cols, box_pixels = load_splat_box(boxes_ptr, row)

    # Per-lane partial sums, reduced once after the loop (fewer rounding steps than a running scalar,
    # and no cross-warp reduction inside the loop).
    acc = tl.zeros((BLOCK_P, C_PAD), dtype=tl.float32)
    acc_sq = tl.zeros((BLOCK_P, 1), dtype=tl.float32)
    for k0 in range(0, box_pixels, BLOCK_P):
        img, mask_k, w, _z1, _z2 = box_block_weights(
            image_ptr, pid_b, first_col, first_row, box_cols, box_pixels, k0, offs_c, W, HW,
            mu_x, mu_y, inv_l11, l21, inv_l22, live, cutoff_sq, HAS_CUTOFF, C, BLOCK_P,
        )  # img [BLOCK_P, C_PAD], w [BLOCK_P, 1]
        # Lanes past the box's end lie below it, possibly outside the image, where the weight need
        # not be zero (always with no cutoff): their image reads are 0, but w^2 must be dropped.
        w = tl.where(mask_k[:, None], w, 0.0)
        acc += w * img
        acc_sq += w * w

    mask_n = offs_n < N  # always true: one real splat per program
    out_offs = (pid_b * N + offs_n)[:, None] * C + offs_c[None, :]  # [1, C_PAD]
    tl.store(adjoint_ptr + out_offs, tl.sum(acc, axis=0)[None, :], mask=mask_n[:, None] & mask_c[None, :])
    tl.store(squared_norms_ptr + pid_b * N + offs_n, tl.sum(acc_sq, axis=0), mask=mask_n)


def _colour_adjoint(
    image: Tensor,  # [B, C, H, W] fp32 contiguous
    positions: Tensor,  # [B, N, 2] fp32 contiguous
    cholesky: Tensor,  # [B, N, 3] fp32 contiguous
    valid: Tensor,  # [B, N] uint8 contiguous
    boxes: Tensor,  # [B, N, 4] int32 contiguous, from splat_pixel_boxes
    cutoff: float,
) -> tuple[Tensor, Tensor]:  # [B, N, C] fp32, [B, N] fp32
    batch, channels, height, width = image.shape
    n_splats = positions.shape[1]
    adjoint = torch.empty((batch, n_splats, channels), device=image.device, dtype=torch.float32)
    squared_norms = torch.empty((batch, n_splats), device=image.device, dtype=torch.float32)
    if batch * n_splats == 0:
        return adjoint, squared_norms
    if height * width == 0:  # no pixels: every sum is empty
        return adjoint.zero_(), squared_norms.zero_()
    cutoff_sq, has_cutoff = cutoff_args(cutoff)
    _colour_adjoint_kernel[(batch * n_splats,)](
        image,
        positions,
        cholesky,
        valid,
        boxes,
        adjoint,
        squared_norms,
        n_splats,
        width,
        height * width,
        cutoff_sq,
        C=channels,
        C_PAD=triton.next_power_of_2(channels),
        HAS_CUTOFF=has_cutoff,
        BLOCK_P=_BLOCK_P,
    )
    return adjoint, squared_norms


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
    whatever the inputs' dtypes; not differentiable (inputs are detached). Each splat reads only the
    pixels of its cutoff box. ValueError for arguments that do not fit together.
    """
    cutoff = colour_adjoint_args(image, positions, cholesky, valid, cutoff)
    image, positions, cholesky = (fp32_copy(t) for t in (image, positions, cholesky))
    valid = valid.detach().to(torch.uint8).contiguous()
    height, width = image.shape[-2:]
    # Boxed from the fp32 copies the kernel reads, so box and kernel agree on every splat.
    boxes = splat_pixel_boxes(positions, cholesky, valid.bool(), height, width, cutoff).contiguous()
    return _colour_adjoint(image, positions, cholesky, valid, boxes, cutoff)
