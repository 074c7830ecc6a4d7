"""Fast CPU path of the accumulated-sum rasterizer: each splat touches only a window of pixels.

Same function and signature as ``rasterize_dense_torch`` (kernels/rasterize_torch.py), but it never
builds the ``[B, N, H, W]`` tensor. A splat's weight is zero beyond ``cutoff`` standard deviations
(Mahalanobis radius), so its support is an ellipse whose bounding box has half-extents
``cutoff * sqrt(Sigma_xx)`` and ``cutoff * sqrt(Sigma_yy)``. Each valid splat gets a square window of
``(2R + 1)^2`` pixels centred on the pixel holding its centre, with R just large enough to cover that
box. R is rounded up to one of a few size classes, and all splats of a class are rendered at once:
their weights form one ``[M, 2R + 1, 2R + 1]`` tensor that is scattered into the image with
``index_add``; the backward pass gathers the output gradient back through the same indices.

Cutoff and its error: the weight at the cutoff is ``exp(-cutoff^2 / 2)``; at the project's default
cutoff of 3.5 that is 2.2e-3 of the splat's colour. Inside the cutoff the result equals the dense twin
with the same cutoff to float rounding (tested). Against the exact, untruncated sum the error at a
pixel is the sum of the tails it misses; tests/kernels/test_rasterize_windowed.py measures it on a
photograph. Splats are fitted through the same truncated render, so a fit compensates for the cut.

When windows would cover about as much as the whole image (small images such as 28x28, very large
splats, or an infinite cutoff) the dense evaluation is cheaper, and this function uses it instead, as
batched matrix products; the result is the same. Both paths have hand-written backward passes.
"""

from __future__ import annotations

import functools
import logging
import math
import os

import torch
from torch import Tensor

from kernels.arguments import rasterizer_args
from kernels.rasterize_torch import pixel_centres

# Window half-sizes R (in pixels) that splats are rounded up to. Few enough classes to keep the
# number of batched calls small, close enough together that padding wastes at most ~(4/3)^2 of the
# area.
WINDOW_RADII = (1, 2, 3, 4, 6, 8, 11, 16, 22, 32, 45, 64, 90, 128, 181, 256, 362, 512)

# Use windows only when they save at least this factor of work over the dense evaluation.
DENSE_FALLBACK_RATIO = 0.5


def window_radius_needed(cholesky: Tensor, cutoff: float) -> Tensor:  # [...] int64
    """Smallest R such that a (2R+1)^2 window centred on the splat's pixel covers its cutoff ellipse.

    The box half-extents are cutoff*|l11| (x) and cutoff*sqrt(l21^2 + l22^2) (y); call the larger h.
    With the centre mu = f + r (f = floor(mu), 0 <= r < 1), the pixel centres j + 0.5 within h of mu
    run from j = ceil(mu - h - 0.5) to floor(mu + h - 0.5), which lie in [f - R, f + R] for every r
    exactly when R >= floor(h + 0.5).
    """
    half_x = cutoff * cholesky[..., 0].abs()
    half_y = cutoff * torch.sqrt(cholesky[..., 1] ** 2 + cholesky[..., 2] ** 2)
    return torch.floor(torch.maximum(half_x, half_y) + 0.5).to(torch.int64)


def _weights(
    dx: Tensor,  # [..., P] pixel centre minus splat centre, x
    dy: Tensor,  # [..., P]
    cholesky: Tensor,  # [..., 1, 3] broadcastable against dx
    keep: Tensor | None,  # [..., P] bool, pixels that exist; None for all
    cutoff: float,
) -> tuple[Tensor, Tensor, Tensor]:  # weights, z1, z2, each [..., P]
    l11, l21, l22 = cholesky[..., 0], cholesky[..., 1], cholesky[..., 2]
    z1 = dx / l11
    z2 = (dy - l21 * z1) / l22
    d_sq = z1 * z1 + z2 * z2
    inside_cutoff = d_sq <= cutoff * cutoff
    keep = inside_cutoff if keep is None else keep & inside_cutoff
    weights = torch.where(keep, torch.exp(-0.5 * d_sq), torch.zeros((), dtype=d_sq.dtype))
    return weights, z1, z2


def _shape_grads(
    grad_weights: Tensor,  # [..., P] dLoss/dweight
    weights: Tensor,  # [..., P]
    z1: Tensor,  # [..., P]
    z2: Tensor,  # [..., P]
    cholesky: Tensor,  # [..., 1, 3]
) -> tuple[Tensor, Tensor]:  # grads of positions [..., 2] and cholesky [..., 3]
    """Chain rule from the weights to the centre and the Cholesky factor, summed over pixels.

    w = exp(-(z1^2 + z2^2) / 2), z1 = dx / l11, z2 = (dy - l21 z1) / l22, dx = px - mu_x.
    Pixels beyond the cutoff have w = 0, so their terms vanish with it.
    """
    l11, l21, l22 = cholesky[..., 0], cholesky[..., 1], cholesky[..., 2]
    grad_d_sq = -0.5 * grad_weights * weights
    grad_z2 = 2.0 * grad_d_sq * z2
    grad_z1 = 2.0 * grad_d_sq * z1 - grad_z2 * (l21 / l22)
    grad_mu_x = -(grad_z1.sum(-1, keepdim=True) / l11)
    grad_mu_y = -(grad_z2.sum(-1, keepdim=True) / l22)
    grad_l11 = -((grad_z1 * z1).sum(-1, keepdim=True) / l11)
    grad_l21 = -((grad_z2 * z1).sum(-1, keepdim=True) / l22)
    grad_l22 = -((grad_z2 * z2).sum(-1, keepdim=True) / l22)
    return (
        torch.cat([grad_mu_x, grad_mu_y], -1),
        torch.cat([grad_l11, grad_l21, grad_l22], -1),
    )


def _window_geometry(
    positions: Tensor,  # [M, 2]
    cholesky: Tensor,  # [M, 3]
    image_index: Tensor,  # [M] int64
    window_origin: Tensor,  # [M, 2] int64 (column, row) of each window's top-left pixel
    row_offsets: Tensor,  # [Sr] int64
    col_offsets: Tensor,  # [Sc] int64
    height: int,
    width: int,
    cutoff: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # weights, z1, z2, flat_index: each [M, Sr * Sc]
    rows = window_origin[:, 1, None, None] + row_offsets[None, :, None]  # [M, Sr, 1]
    cols = window_origin[:, 0, None, None] + col_offsets[None, None, :]  # [M, 1, Sc]
    inside = (cols >= 0) & (cols < width) & (rows >= 0) & (rows < height)  # [M, Sr, Sc]
    dx = cols.to(positions.dtype) + 0.5 - positions[:, 0, None, None]
    dy = rows.to(positions.dtype) + 0.5 - positions[:, 1, None, None]
    weights, z1, z2 = _weights(dx, dy, cholesky[:, None, None, :], inside, cutoff)
    # Pixels outside the image have weight zero; clamping their index keeps the scatter in bounds.
    flat_index = (
        image_index[:, None, None] * (height * width)
        + rows.clamp(0, height - 1) * width
        + cols.clamp(0, width - 1)
    )
    # z1 depends on the column only; broadcast it to the whole window before flattening.
    return tuple(t.expand(weights.shape).reshape(weights.shape[0], -1) for t in (weights, z1, z2, flat_index))


def _window_contributions(
    positions: Tensor,  # [M, 2]
    cholesky: Tensor,  # [M, 3]
    colours: Tensor,  # [M, C]
    *window,  # the rest of _window_geometry's arguments, from image_index to cutoff
) -> tuple[Tensor, Tensor]:  # contributions [M * P, C], flat_index [M * P]
    weights, _, _, flat_index = _window_geometry(positions, cholesky, *window)
    contributions = weights[:, :, None] * colours[:, None, :]  # [M, P, C]
    return contributions.reshape(-1, colours.shape[1]), flat_index.reshape(-1)


def _window_backward(
    grad_out: Tensor,  # [B * H * W, C]
    positions: Tensor,  # [M, 2]
    cholesky: Tensor,  # [M, 3]
    colours: Tensor,  # [M, C]
    *window,  # the rest of _window_geometry's arguments, from image_index to cutoff
) -> tuple[Tensor, Tensor, Tensor]:  # grads of positions [M, 2], cholesky [M, 3], colours [M, C]
    # The weights are recomputed rather than saved: with the compiled path that is cheaper than
    # reading three [M, P] tensors back from memory, and it keeps the forward's memory small.
    weights, z1, z2, flat_index = _window_geometry(positions, cholesky, *window)
    grad_pixels = grad_out[flat_index]  # [M, P, C]
    grad_colours = (weights[:, :, None] * grad_pixels).sum(1)
    grad_weights = (grad_pixels * colours[:, None, :]).sum(-1)  # [M, P]
    grad_positions, grad_cholesky = _shape_grads(grad_weights, weights, z1, z2, cholesky[:, None, :])
    return grad_positions, grad_cholesky, grad_colours


def _dense_forward(
    positions: Tensor,  # [B, N, 2]
    cholesky: Tensor,  # [B, N, 3]
    colours: Tensor,  # [B, N, C], invalid splats already zeroed
    pixel_x: Tensor,  # [P] pixel centres, P = H * W
    pixel_y: Tensor,  # [P]
    cutoff: float,
) -> Tensor:  # [B, C, P]
    weights, _, _ = _weights(
        pixel_x - positions[..., 0:1], pixel_y - positions[..., 1:2], cholesky[:, :, None, :], None,
        cutoff,
    )  # [B, N, P]
    return torch.bmm(colours.transpose(1, 2), weights)


def _dense_backward(
    grad_out: Tensor,  # [B, C, P]
    positions: Tensor,  # [B, N, 2]
    cholesky: Tensor,  # [B, N, 3]
    colours: Tensor,  # [B, N, C], invalid splats already zeroed
    pixel_x: Tensor,  # [P]
    pixel_y: Tensor,  # [P]
    cutoff: float,
) -> tuple[Tensor, Tensor, Tensor]:  # grads of positions, cholesky, colours
    chol = cholesky[:, :, None, :]
    weights, z1, z2 = _weights(
        pixel_x - positions[..., 0:1], pixel_y - positions[..., 1:2], chol, None, cutoff
    )
    grad_colours = torch.bmm(weights, grad_out.transpose(1, 2))  # [B, N, C]
    grad_weights = torch.bmm(colours, grad_out)  # [B, N, P]
    grad_positions, grad_cholesky = _shape_grads(grad_weights, weights, z1, z2, chol)
    return grad_positions, grad_cholesky, grad_colours


def compile_enabled() -> bool:
    """Whether the math above runs through ``torch.compile`` (env ``GSCLIP_COMPILE``, default on).

    Compiling fuses the elementwise chains into single loops, about 10x faster on the CPU than eager
    PyTorch. The first call of each shape family pays tens of seconds of compilation; inductor caches
    the result on disk for later processes. ``GSCLIP_COMPILE=0`` runs the same code eagerly.
    """
    return os.environ.get("GSCLIP_COMPILE", "1") != "0"


@functools.cache
def _compiled(function):
    # Inductor's C++ build checks for CUDA on every new graph and logs "No CUDA runtime is found"
    # on a CPU machine: expected here, so that one logger is kept to errors.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    return torch.compile(function, dynamic=True)


def _run(function, *args):
    return (_compiled(function) if compile_enabled() else function)(*args)


class _WindowRender(torch.autograd.Function):
    """Splats of one window size rendered into their windows and scattered into the image batch."""

    @staticmethod
    def forward(ctx, positions, cholesky, colours, image_index, window_origin, row_offsets,
                col_offsets, height, width, num_pixels, cutoff):
        ctx.save_for_backward(
            positions, cholesky, colours, image_index, window_origin, row_offsets, col_offsets
        )
        ctx.geometry = (height, width, cutoff)
        contributions, flat_index = _run(
            _window_contributions, positions, cholesky, colours, image_index, window_origin,
            row_offsets, col_offsets, height, width, cutoff,
        )
        # The scatter runs eagerly: a compiled scatter adds with atomics from several threads, in
        # an order that changes from run to run, and fits must be reproducible to the bit.
        out = colours.new_zeros((num_pixels, colours.shape[1]))
        return out.index_add_(0, flat_index, contributions)

    @staticmethod
    def backward(ctx, grad_out):
        grads = _run(_window_backward, grad_out.contiguous(), *ctx.saved_tensors, *ctx.geometry)
        return (*grads, None, None, None, None, None, None, None, None)


class _DenseRender(torch.autograd.Function):
    """Every splat evaluated at every pixel of its image, as batched matrix products."""

    @staticmethod
    def forward(ctx, positions, cholesky, colours, pixel_x, pixel_y, cutoff):
        ctx.save_for_backward(positions, cholesky, colours, pixel_x, pixel_y)
        ctx.cutoff = cutoff
        return _run(_dense_forward, positions, cholesky, colours, pixel_x, pixel_y, cutoff)

    @staticmethod
    def backward(ctx, grad_out):
        grads = _run(_dense_backward, grad_out.contiguous(), *ctx.saved_tensors, ctx.cutoff)
        return (*grads, None, None, None)


def _window_classes(
    cholesky: Tensor,  # [M, 3] valid splats only
    height: int,
    width: int,
    cutoff: float,
) -> Tensor:  # [M] int64 window radius of each splat; max(H, W) means "the whole image"
    needed = window_radius_needed(cholesky, cutoff)
    radii = torch.tensor(WINDOW_RADII, device=cholesky.device)
    class_of = torch.bucketize(needed, radii)  # index into WINDOW_RADII; len() means larger
    whole_image = max(height, width)
    radius = torch.where(
        class_of < len(WINDOW_RADII),
        radii[class_of.clamp(max=len(WINDOW_RADII) - 1)],
        torch.full_like(needed, whole_image),
    )
    # A window at least as wide as the image is replaced by the image itself.
    return torch.where(2 * radius + 1 >= whole_image, whole_image, radius)


def rasterize_windowed_torch(positions: Tensor, cholesky: Tensor, colours: Tensor, valid: Tensor, height: int, width: int,
                             cutoff: float = math.inf) -> Tensor:  # [B, C, H, W]; arguments as in kernels.arguments
    """The accumulated-sum render of ``rasterize_dense_torch``, through windows or densely (module
    docstring); differentiable in all but ``valid``."""
    height, width, cutoff = rasterizer_args(positions, cholesky, colours, valid, height, width, cutoff)
    batch, num_slots, channels = colours.shape
    image_index, slot_index = valid.nonzero(as_tuple=True)
    whole_image = max(height, width)
    window_work = math.inf  # an untruncated splat covers the whole image: dense
    if math.isfinite(cutoff):
        with torch.no_grad():
            radius = _window_classes(cholesky[image_index, slot_index].detach(), height, width, cutoff)
            side = torch.where(radius == whole_image, 0, 2 * radius + 1)
            whole = radius == whole_image
            window_work = float((side**2).sum()) + float(whole.sum()) * height * width
    if window_work > DENSE_FALLBACK_RATIO * batch * num_slots * height * width:
        # Invalid slots become unit splats of colour zero: harmless whatever they held.
        unit = torch.tensor([1.0, 0.0, 1.0], dtype=cholesky.dtype, device=cholesky.device)
        slot_valid = valid[..., None]
        grid_x, grid_y = pixel_centres(height, width, positions)
        out = _DenseRender.apply(
            torch.where(slot_valid, positions, torch.zeros_like(positions)),
            torch.where(slot_valid, cholesky, unit),
            torch.where(slot_valid, colours, torch.zeros_like(colours)),
            grid_x.reshape(-1),
            grid_y.reshape(-1),
            cutoff,
        )
        return out.reshape(batch, channels, height, width)

    flat_positions = positions[image_index, slot_index]
    flat_cholesky = cholesky[image_index, slot_index]
    flat_colours = colours[image_index, slot_index]
    # Start from a zero image that still depends on the colours, so an image without any valid splat
    # renders black and gradients flow (as zeros) to every input.
    safe_colours = torch.where(valid[..., None], colours, torch.zeros_like(colours))
    out = colours.new_zeros((batch * height * width, channels)) + 0.0 * safe_colours.sum()
    device = positions.device
    for class_radius in torch.unique(radius).tolist():
        members = (radius == class_radius).nonzero().flatten()
        member_positions = flat_positions[members]
        if class_radius == whole_image:
            origin = torch.zeros((len(members), 2), dtype=torch.int64, device=device)
            row_offsets = torch.arange(height, device=device)
            col_offsets = torch.arange(width, device=device)
        else:
            origin = torch.floor(member_positions.detach()).to(torch.int64) - class_radius
            row_offsets = col_offsets = torch.arange(2 * class_radius + 1, device=device)
        member_cholesky, member_colours = flat_cholesky[members], flat_colours[members]
        member_images = image_index[members]
        padding = -len(members) % 8
        if padding:
            # torch.compile specializes on sizes 0 and 1 and guards on sizes that equal other
            # dimensions (2, 3, C, the odd window side), each costing a recompile. Padding M to a
            # multiple of 8 with colourless unit splats keeps one shape family for every class.
            member_positions = torch.cat([member_positions, member_positions.new_zeros((padding, 2))])
            member_cholesky = torch.cat([member_cholesky, member_cholesky.new_ones((padding, 3))])
            member_colours = torch.cat([member_colours, member_colours.new_zeros((padding, channels))])
            member_images = torch.cat([member_images, member_images.new_zeros(padding)])
            origin = torch.cat([origin, origin.new_zeros((padding, 2))])
        out = out + _WindowRender.apply(
            member_positions,
            member_cholesky,
            member_colours,
            member_images,
            origin,
            row_offsets,
            col_offsets,
            height,
            width,
            batch * height * width,
            cutoff,
        )
    return out.reshape(batch, height, width, channels).permute(0, 3, 1, 2)
