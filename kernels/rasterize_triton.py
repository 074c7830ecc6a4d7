"""Triton kernels of the accumulated-sum splat rasterizer (METHOD.md section 1).

Computes exactly what the PyTorch twin ``kernels.rasterize_torch.rasterize_dense_torch`` computes,

    I[b, c, p] = sum_i valid[b, i] * colours[b, i, c] * w(p; mu_i, L_i)
    w = exp(-d^2 / 2) if d^2 <= cutoff^2 else 0,   d^2 = |L_i^{-1} (p - mu_i)|^2,

without materializing the ``[B, N, H, W]`` weight tensor: the forward kernel streams the splats past
a block of pixels, the backward kernel streams the pixels past a block of splats. Every program
owns its outputs, so neither direction needs atomics and both are deterministic. One launch covers
the whole batch (the batch index is the first grid axis).

Layered as the Triton tutorials and Liger-Kernel do: private ``@triton.jit`` kernels, a launcher
per direction, a ``torch.autograd.Function`` and one public function, ``rasterize_triton``.
Works on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (set before import).

An invalid splat is fully inert, even when its parameters are garbage (a zero Cholesky factor,
NaNs): like the twin, the kernels swap in a colourless unit splat for it.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

# Forward: a program owns BLOCK_P pixels of one image and streams splats BLOCK_N at a time.
# Backward: a program owns BLOCK_N splats of one image and streams pixels BLOCK_P at a time.
# The [BLOCK_P, BLOCK_N, C_PAD] broadcast used for the channel contraction is the largest live
# tensor, so these stay modest; they are also the interpreter's vector width, which keeps the
# CPU tests fast.
_FWD_BLOCK_P = 64
_FWD_BLOCK_N = 32
_BWD_BLOCK_P = 64
_BWD_BLOCK_N = 32


@triton.jit
def _splat_weights(
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
def _load_splats(
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

    acc = tl.zeros((BLOCK_P, C_PAD), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mu_x, mu_y, inv_l11, l21, inv_l22, live = _load_splats(
            positions_ptr, cholesky_ptr, valid_ptr, pid_b, offs_n, N
        )
        w, _z1, _z2 = _splat_weights(
            px, py, mu_x, mu_y, inv_l11, l21, inv_l22, live, cutoff_sq, HAS_CUTOFF
        )  # [BLOCK_P, BLOCK_N]

        # colours[b, n, c] as a [BLOCK_N, C_PAD] tile; padded channels and splats read 0.
        col_offs = (pid_b * N + offs_n)[:, None] * C + offs_c[None, :]
        col_mask = (offs_n < N)[:, None] & mask_c[None, :]
        col = tl.load(colours_ptr + col_offs, mask=col_mask, other=0.0)
        # A dead splat's colour may be garbage too, and 0 * NaN is NaN: zero it outright.
        col = tl.where(live[:, None], col, 0.0)

        # acc[p, c] += sum_n w[p, n] * col[n, c]. A broadcast-and-reduce rather than tl.dot: C is
        # tiny (1 or 3), far below tl.dot's 16-wide minimum, and tl.dot's TF32 default on GPUs
        # would cost the fp32 accuracy the twin is compared at.
        acc += tl.sum(w[:, :, None] * col[None, :, :], axis=1)

    # out[b, c, p]: channel-major image, so consecutive pixels of one channel are contiguous.
    out_offs = pid_b * C * HW + offs_c[None, :] * HW + offs_p[:, None]
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
    mask_n = offs_n < N
    mu_x, mu_y, inv_l11, l21, inv_l22, live = _load_splats(
        positions_ptr, cholesky_ptr, valid_ptr, pid_b, offs_n, N
    )

    offs_c = tl.arange(0, C_PAD)
    mask_c = offs_c < C
    col_offs = (pid_b * N + offs_n)[:, None] * C + offs_c[None, :]
    col_mask = mask_n[:, None] & mask_c[None, :]
    col = tl.load(colours_ptr + col_offs, mask=col_mask, other=0.0)  # [BLOCK_N, C_PAD]
    col = tl.where(live[:, None], col, 0.0)  # garbage in a dead slot must not reach g_w

    # Per-splat gradient accumulators, summed over pixels.
    g_col = tl.zeros((BLOCK_N, C_PAD), dtype=tl.float32)
    g_dx = tl.zeros((BLOCK_N,), dtype=tl.float32)  # dL/d(dx) summed; dL/dmu_x = -this
    g_dy = tl.zeros((BLOCK_N,), dtype=tl.float32)
    g_l11 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    g_l21 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    g_l22 = tl.zeros((BLOCK_N,), dtype=tl.float32)

    offs_c_g = pid_b * C * HW + offs_c[None, :] * HW  # [1, C_PAD] channel bases in grad_out
    for p0 in range(0, HW, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask_p = offs_p < HW
        px = (offs_p % W).to(tl.float32) + 0.5
        py = (offs_p // W).to(tl.float32) + 0.5

        # Out-of-image pixels read a zero cotangent, which zeroes every term they would add
        # below (w and z stay finite there, so 0 * w cannot make a NaN).
        g = tl.load(
            grad_out_ptr + offs_c_g + offs_p[:, None],
            mask=mask_p[:, None] & mask_c[None, :],
            other=0.0,
        )  # [BLOCK_P, C_PAD]

        w, z1, z2 = _splat_weights(
            px, py, mu_x, mu_y, inv_l11, l21, inv_l22, live, cutoff_sq, HAS_CUTOFF
        )  # [BLOCK_P, BLOCK_N]

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
        # The per-splat factors 1/l11, 1/l22 are pulled out of the pixel sums and applied once
        # after the loop.
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

    row = pid_b * N + offs_n
    # dx = px - mu_x, so the centre's gradient is minus the offset's.
    tl.store(grad_positions_ptr + row * 2 + 0, -g_dx, mask=mask_n)
    tl.store(grad_positions_ptr + row * 2 + 1, -g_dy, mask=mask_n)
    tl.store(grad_cholesky_ptr + row * 3 + 0, g_l11, mask=mask_n)
    tl.store(grad_cholesky_ptr + row * 3 + 1, g_l21, mask=mask_n)
    tl.store(grad_cholesky_ptr + row * 3 + 2, g_l22, mask=mask_n)
    tl.store(grad_colours_ptr + col_offs, g_col, mask=col_mask)


def _cutoff_args(cutoff: float) -> tuple[float, bool]:
    """(cutoff^2, has_cutoff) as the kernels take them; cutoff = inf compiles the test away."""
    if math.isnan(cutoff) or cutoff < 0:
        raise ValueError(f"cutoff must be a non-negative number or inf, got {cutoff}")
    if math.isinf(cutoff):
        return 0.0, False
    return float(cutoff) * float(cutoff), True


def _rasterize_fwd(
    positions: Tensor,  # [B, N, 2] fp32 contiguous
    cholesky: Tensor,  # [B, N, 3] fp32 contiguous
    colours: Tensor,  # [B, N, C] fp32 contiguous
    valid: Tensor,  # [B, N] uint8 contiguous
    height: int,
    width: int,
    cutoff: float,
) -> Tensor:  # [B, C, H, W] fp32
    batch, n_splats, channels = colours.shape
    hw = height * width
    out = torch.empty((batch, channels, height, width), device=colours.device, dtype=torch.float32)
    if out.numel() == 0:
        return out
    cutoff_sq, has_cutoff = _cutoff_args(cutoff)
    grid = (batch, triton.cdiv(hw, _FWD_BLOCK_P))
    _rasterize_fwd_kernel[grid](
        positions,
        cholesky,
        colours,
        valid,
        out,
        n_splats,
        width,
        hw,
        cutoff_sq,
        C=channels,
        C_PAD=triton.next_power_of_2(channels),
        HAS_CUTOFF=has_cutoff,
        BLOCK_P=_FWD_BLOCK_P,
        BLOCK_N=_FWD_BLOCK_N,
    )
    return out


def _rasterize_bwd(
    grad_out: Tensor,  # [B, C, H, W] fp32 contiguous
    positions: Tensor,  # [B, N, 2] fp32 contiguous
    cholesky: Tensor,  # [B, N, 3] fp32 contiguous
    colours: Tensor,  # [B, N, C] fp32 contiguous
    valid: Tensor,  # [B, N] uint8 contiguous
    height: int,
    width: int,
    cutoff: float,
) -> tuple[Tensor, Tensor, Tensor]:  # fp32 grads of positions, cholesky, colours
    batch, n_splats, channels = colours.shape
    hw = height * width
    # Every entry is written by the kernel, so empty (not zeros) is enough when it runs.
    grad_positions = torch.empty_like(positions)
    grad_cholesky = torch.empty_like(cholesky)
    grad_colours = torch.empty_like(colours)
    if batch * n_splats == 0:
        return grad_positions, grad_cholesky, grad_colours
    if hw == 0:
        # No pixels, nothing to differentiate; the kernel would still be correct, but skip it.
        return grad_positions.zero_(), grad_cholesky.zero_(), grad_colours.zero_()
    cutoff_sq, has_cutoff = _cutoff_args(cutoff)
    grid = (batch, triton.cdiv(n_splats, _BWD_BLOCK_N))
    _rasterize_bwd_kernel[grid](
        grad_out,
        positions,
        cholesky,
        colours,
        valid,
        grad_positions,
        grad_cholesky,
        grad_colours,
        n_splats,
        width,
        hw,
        cutoff_sq,
        C=channels,
        C_PAD=triton.next_power_of_2(channels),
        HAS_CUTOFF=has_cutoff,
        BLOCK_P=_BWD_BLOCK_P,
        BLOCK_N=_BWD_BLOCK_N,
    )
    return grad_positions, grad_cholesky, grad_colours


class _RasterizeTriton(torch.autograd.Function):
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
    ) -> Tensor:  # [B, C, H, W]
        # The kernels read contiguous fp32; results go back to the callers' dtypes.
        pos32 = positions.detach().to(torch.float32).contiguous()
        chol32 = cholesky.detach().to(torch.float32).contiguous()
        col32 = colours.detach().to(torch.float32).contiguous()
        valid8 = valid.detach().to(torch.uint8).contiguous()
        out = _rasterize_fwd(pos32, chol32, col32, valid8, height, width, cutoff)
        ctx.save_for_backward(pos32, chol32, col32, valid8)
        ctx.height, ctx.width, ctx.cutoff = height, width, cutoff
        ctx.dtypes = (positions.dtype, cholesky.dtype, colours.dtype)
        return out.to(colours.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        pos32, chol32, col32, valid8 = ctx.saved_tensors
        g32 = grad_out.to(torch.float32).contiguous()
        grads = _rasterize_bwd(g32, pos32, chol32, col32, valid8, ctx.height, ctx.width, ctx.cutoff)
        grad_positions, grad_cholesky, grad_colours = (
            g.to(dtype) for g, dtype in zip(grads, ctx.dtypes)
        )
        return grad_positions, grad_cholesky, grad_colours, None, None, None, None


def rasterize_triton(
    positions: Tensor,  # [B, N, 2] (x, y) in pixels
    cholesky: Tensor,  # [B, N, 3] (l11, l21, l22) in pixels
    colours: Tensor,  # [B, N, C]
    valid: Tensor,  # [B, N] bool
    height: int,
    width: int,
    cutoff: float = math.inf,  # Mahalanobis radius beyond which a splat contributes nothing
) -> Tensor:  # [B, C, H, W]
    """Render a batch of splat sets by accumulated sum; differentiable in all but ``valid``.

    Same signature and result as ``rasterize_dense_torch``, in one Triton launch per direction for
    the whole batch and without the ``[B, N, H, W]`` intermediate. Computes in fp32.
    """
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
    return _RasterizeTriton.apply(
        positions, cholesky, colours, valid, int(height), int(width), float(cutoff)
    )
