"""Triton kernels of the accumulated-sum splat rasterizer (METHOD.md section 1).

Computes exactly what the PyTorch twin ``kernels.rasterize_torch.rasterize_dense_torch`` computes,

    I[b, c, p] = sum_i valid[b, i] * colours[b, i, c] * w(p; mu_i, L_i)
    w = exp(-d^2 / 2) if d^2 <= cutoff^2 else 0,   d^2 = |L_i^{-1} (p - mu_i)|^2,

without materializing the ``[B, N, H, W]`` weight tensor: the forward kernel streams the splats past
a block of pixels, the backward kernel streams the pixels past a block of splats. Every program
owns its outputs, so neither direction needs atomics and both are deterministic. One launch covers
the whole batch (the batch index is the first grid axis).

Layered as the Triton tutorials and Liger-Kernel do: private ``@triton.jit`` kernels, a launcher
per direction, a ``torch.autograd.Function`` and one public function, ``rasterize_triton``. The
kernels are built from the pieces they share with the tile-culled ones (``kernels.triton_common``,
which also derives the backward's terms); the argument check and the autograd save and restore are
every rasterizer's (``kernels.arguments``). Works on CUDA tensors, and on CPU tensors under
``TRITON_INTERPRET=1`` (set before import).

An invalid splat is fully inert, even when its parameters are garbage (a zero Cholesky factor,
NaNs): like the twin, the kernels swap in a colourless unit splat for it.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.arguments import (KernelInputs, grads_for_inputs, kernel_inputs, rasterizer_args,
                               save_for_kernel_backward, saved_kernel_inputs)
from kernels.triton_common import (accumulate_splat_grads, image_buffer, image_offsets, load_colours, load_splats,
                                   splat_block_colour, splat_grad_buffers, splat_weights, store_splat_grads,
                                   zero_splat_grads)

# Forward: a program owns BLOCK_P pixels of one image and streams splats BLOCK_N at a time.
# Backward: a program owns BLOCK_N splats of one image and streams pixels BLOCK_P at a time.
# The [BLOCK_P, BLOCK_N, C_PAD] broadcast used for the channel contraction is the largest live
# tensor. At 64 x 16 both kernels fit in 128 registers a thread for RGB (kernels/aot_compile.py's
# budget: 4 resident blocks an SM); 64 x 32 took the forward to the hardware's 255 (2 blocks).
_FWD_BLOCK_P = 64
_FWD_BLOCK_N = 16
_BWD_BLOCK_P = 64
_BWD_BLOCK_N = 16


@triton.jit
def _rasterize_fwd_kernel(
    positions_ptr,  # *fp32 [B, N, 2] contiguous, (x, y) in pixels
    cholesky_ptr,  # *fp32 [B, N, 3] contiguous, (l11, l21, l22) in pixels
    colours_ptr,  # *fp32 [B, N, C] contiguous
    valid_ptr,  # *u8 [B, N] contiguous, 1 = valid
    out_ptr,  # *fp32 [B, C, H, W] contiguous, written (not accumulated) by this kernel
    N,  # splats per image
    W,  # image width in pixels
    HW,  # H * W, pixels per image
    cutoff_sq,  # fp32 squared Mahalanobis cutoff, used only if HAS_CUTOFF
    C: tl.constexpr,  # channel count, any value >= 1
    C_PAD: tl.constexpr,  # next power of two >= C (tl.arange needs a power of two)
    HAS_CUTOFF: tl.constexpr,  # False when cutoff = inf
    BLOCK_P: tl.constexpr,  # pixels per program
    BLOCK_N: tl.constexpr,  # splats per inner-loop step
):
    # Grid (B, cdiv(HW, BLOCK_P)): image on axis 0, block of flattened pixels on axis 1.
    pid_b = tl.program_id(0).to(tl.int64)
    pid_p = tl.program_id(1)

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < HW
    # Flattened row-major pixel index -> pixel centre (j + 0.5, i + 0.5).
    px = (offs_p % W).to(tl.float32) + 0.5
    py = (offs_p // W).to(tl.float32) + 0.5

    offs_c = tl.arange(0, C_PAD)
    mask_c = offs_c < C

    # acc[p, c] = sum_n w[p, n] col[n, c], over every splat of the image.
    acc = tl.zeros((BLOCK_P, C_PAD), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        acc += splat_block_colour(
            positions_ptr, cholesky_ptr, colours_ptr, valid_ptr, pid_b, offs_n, N,
            px, py, offs_c, cutoff_sq, C, HAS_CUTOFF,
        )

    out_offs = image_offsets(pid_b, offs_p, offs_c, HW, C)
    tl.store(out_ptr + out_offs, acc, mask=mask_p[:, None] & mask_c[None, :])


@triton.jit
def _rasterize_bwd_kernel(
    grad_out_ptr,  # *fp32 [B, C, H, W] contiguous, cotangent of the image
    positions_ptr,  # *fp32 [B, N, 2] contiguous
    cholesky_ptr,  # *fp32 [B, N, 3] contiguous
    colours_ptr,  # *fp32 [B, N, C] contiguous
    valid_ptr,  # *u8 [B, N] contiguous, 1 = valid
    grad_positions_ptr,  # *fp32 [B, N, 2] contiguous, written by this kernel
    grad_cholesky_ptr,  # *fp32 [B, N, 3] contiguous, written by this kernel
    grad_colours_ptr,  # *fp32 [B, N, C] contiguous, written by this kernel
    N,  # splats per image
    W,  # image width in pixels
    HW,  # H * W, pixels per image
    cutoff_sq,  # fp32 squared Mahalanobis cutoff, used only if HAS_CUTOFF
    C: tl.constexpr,  # channel count, any value >= 1
    C_PAD: tl.constexpr,  # next power of two >= C
    HAS_CUTOFF: tl.constexpr,  # False when cutoff = inf
    BLOCK_P: tl.constexpr,  # pixels per inner-loop step
    BLOCK_N: tl.constexpr,  # splats per program
):
    # Grid (B, cdiv(N, BLOCK_N)). Each program owns a block of splats and reduces over every pixel
    # of its image, so each gradient entry is written by exactly one program: no atomics, and
    # the result does not depend on scheduling.
    pid_b = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mu_x, mu_y, inv_l11, l21, inv_l22, live = load_splats(
        positions_ptr, cholesky_ptr, valid_ptr, pid_b, offs_n, N
    )
    offs_c = tl.arange(0, C_PAD)
    mask_c = offs_c < C
    # Garbage in a dead slot must not reach the gradients: its colour reads 0.
    col, col_offs, col_mask = load_colours(colours_ptr, pid_b, offs_n, N, live, offs_c, C)

    g_col, g_dx, g_dy, g_l11, g_l21, g_l22 = zero_splat_grads(BLOCK_N, C_PAD)
    for p0 in range(0, HW, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask_p = offs_p < HW
        px = (offs_p % W).to(tl.float32) + 0.5
        py = (offs_p // W).to(tl.float32) + 0.5
        # Out-of-image pixels read a zero cotangent, which zeroes every term they would add.
        g = tl.load(
            grad_out_ptr + image_offsets(pid_b, offs_p, offs_c, HW, C),
            mask=mask_p[:, None] & mask_c[None, :],
            other=0.0,
        )  # [BLOCK_P, C_PAD]
        w, z1, z2 = splat_weights(
            px, py, mu_x, mu_y, inv_l11, l21, inv_l22, live, cutoff_sq, HAS_CUTOFF
        )  # [BLOCK_P, BLOCK_N]
        g_col, g_dx, g_dy, g_l11, g_l21, g_l22 = accumulate_splat_grads(
            g_col, g_dx, g_dy, g_l11, g_l21, g_l22, g, w, z1, z2, col, l21, inv_l22
        )

    store_splat_grads(
        grad_positions_ptr, grad_cholesky_ptr, grad_colours_ptr, pid_b, offs_n, N, col_offs, col_mask,
        g_col, g_dx, g_dy, g_l11, g_l21, g_l22, inv_l11, inv_l22,
    )


def _rasterize_fwd(
    inputs: KernelInputs, height: int, width: int, cutoff: float
) -> Tensor:  # [B, C, H, W] fp32
    out, sizes = image_buffer(inputs, height, width, cutoff)
    if sizes is not None:
        grid = (sizes.batch, triton.cdiv(sizes.pixels, _FWD_BLOCK_P))
        _rasterize_fwd_kernel[grid](*inputs, out, sizes.n_splats, width, sizes.pixels, sizes.cutoff_sq,
                                    **sizes.channel_constexprs, HAS_CUTOFF=sizes.has_cutoff,
                                    BLOCK_P=_FWD_BLOCK_P, BLOCK_N=_FWD_BLOCK_N)
    return out


def _rasterize_bwd(
    grad_out: Tensor,  # [B, C, H, W] fp32 contiguous
    inputs: KernelInputs,
    height: int,
    width: int,
    cutoff: float,
) -> tuple[Tensor, Tensor, Tensor]:  # fp32 grads of positions, cholesky, colours
    grads, sizes = splat_grad_buffers(inputs, height, width, cutoff)
    if sizes is not None:
        grid = (sizes.batch, triton.cdiv(sizes.n_splats, _BWD_BLOCK_N))
        _rasterize_bwd_kernel[grid](grad_out, *inputs, *grads, sizes.n_splats, width, sizes.pixels, sizes.cutoff_sq,
                                    **sizes.channel_constexprs, HAS_CUTOFF=sizes.has_cutoff,
                                    BLOCK_P=_BWD_BLOCK_P, BLOCK_N=_BWD_BLOCK_N)
    return grads


class _RasterizeTriton(torch.autograd.Function):
    # Arguments as rasterize_triton's, checked there.
    @staticmethod
    def forward(ctx, positions, cholesky, colours, valid, height, width, cutoff):
        inputs = kernel_inputs(positions, cholesky, colours, valid)
        save_for_kernel_backward(ctx, (positions, cholesky, colours), inputs, (height, width, cutoff))
        return _rasterize_fwd(inputs, height, width, cutoff).to(colours.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        grad_out, inputs, _ = saved_kernel_inputs(ctx, grad_out)
        return grads_for_inputs(ctx, _rasterize_bwd(grad_out, inputs, *ctx.geometry))


def rasterize_triton(positions: Tensor, cholesky: Tensor, colours: Tensor, valid: Tensor, height: int, width: int,
                     cutoff: float = math.inf) -> Tensor:  # [B, C, H, W]; arguments as in kernels.arguments
    """Render a batch of splat sets by accumulated sum; differentiable in all but ``valid``.

    Same signature and result as ``rasterize_dense_torch``, in one Triton launch per direction for
    the whole batch and without the ``[B, N, H, W]`` intermediate. Computes in fp32.
    """
    height, width, cutoff = rasterizer_args(positions, cholesky, colours, valid, height, width, cutoff)
    return _RasterizeTriton.apply(positions, cholesky, colours, valid, height, width, cutoff)
