"""The best colours for a fixed geometry: the render is linear in the colours (METHOD.md section 1).

For one image, ``render = W(geometry) @ colours`` with ``W [H W, N]`` the splats' weights. For fixed
centres and Cholesky factors the colours that minimize the squared error solve the normal equations
``(W^T W + shift I) c = W^T y``, one right-hand side per channel, with a small ridge
``shift = ridge * mean(diag(W^T W))`` that keeps splats covering no pixel at colour zero. Solving them
removes the slowest-converging part of the fit: Adam needs many steps to balance the colours of
overlapping splats that a solve balances at once. The fitter (:mod:`gsclip_lib.splats.fitting`) solves
at the start, after re-seeding and at the end, or at every step ("variable projection": Adam then
moves only the geometry, and the geometry's gradient at optimal colours is the gradient of the
projected objective).

Two solvers, chosen by size:

- small problems (a weight matrix of at most :data:`DENSE_SOLVE_MAX_ENTRIES` splat-pixel pairs per
  image, e.g. 28x28 with up to 83 splats): the dense normal equations, built from
  the twin's weights (:func:`kernels.rasterize_torch.splat_weights_dense`) and solved by batched
  Cholesky in float64, exactly;
- larger ones (photos, thousands of splats): Jacobi-preconditioned conjugate gradients, matrix-free:
  ``W`` is the render itself, ``W^T`` its adjoint in the colours (a kernel that computes only that,
  the C++ one on the CPU and the tile-culled Triton one on CUDA; autograd of the render on the
  PyTorch backends), warm-started from the current colours for a fixed number of steps.

The L1 penalty of the fitting loss is left out of the solves (at the paper's lambda it changes
nothing measurable); Adam's steps between solves still feel it.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from gsclip_lib.splats.container import Splats, check_renderable
from gsclip_lib.splats.render import RenderPasses, render_splats, resolve_backend
from kernels.rasterize_torch import splat_weights_dense

# Problems whose weight matrix has at most this many entries (splats x pixels) per image are solved
# exactly; the dense solve costs N^2 P, which at 64x64 with 256 splats is 0.3 s a step on this CPU
# against 10 ms for three CG steps on the C++ kernel.
DENSE_SOLVE_MAX_ENTRIES = 65536


def solved_densely(num_splats: int, height: int, width: int) -> bool:
    """Whether :func:`solve_colours` takes the exact dense path for this size."""
    return num_splats * height * width <= DENSE_SOLVE_MAX_ENTRIES
MIN_SHIFT = 1e-8  # floor of the ridge, so an image without a visible splat stays solvable


def _native_adjoint(backend: str, device: torch.device) -> Callable | None:
    """The kernel that computes ``(W^T image, sum_p w^2)`` alone on this backend, if it has one: the
    C++ kernel on the CPU, the tile-culled Triton kernel on CUDA (both Triton backends)."""
    chosen = resolve_backend(backend, device)
    if chosen == "cpu":
        from kernels.rasterize_cpu import colour_adjoint

        return colour_adjoint
    if chosen.startswith("triton"):
        from kernels.colour_adjoint_triton import colour_adjoint_triton

        return colour_adjoint_triton
    return None


def splat_weight_norms(splats: Splats, height: int, width: int, cutoff: float, backend: str,
                       passes: RenderPasses | None = None) -> Tensor:  # [B, N]
    """``sum_p w_i(p)^2`` of every splat: the diagonal of ``W^T W`` (zero for invalid splats).

    Exact with an adjoint kernel (the CPU's, the GPU's) and for small problems; on the PyTorch
    backends, larger ones use the integral ``pi |l11 l22|`` of a squared Gaussian, which ignores the
    cutoff and the image border.
    """
    adjoint = _native_adjoint(backend, splats.device)
    if adjoint is not None:
        if passes is not None:
            passes.adjoint += 1
        empty = splats.colours.new_zeros((splats.batch_size, 1, height, width))
        return adjoint(empty, splats.positions, splats.cholesky, splats.valid, cutoff)[1].to(splats.colours)
    if solved_densely(splats.num_slots, height, width):
        weights = splat_weights_dense(splats.positions, splats.cholesky, splats.valid, height, width, cutoff)
        return weights.square().flatten(2).sum(-1)
    area = math.pi * (splats.cholesky[..., 0] * splats.cholesky[..., 2]).abs()
    return torch.where(splats.valid, area, torch.zeros_like(area))


def _solve_dense(
    splats: Splats,
    images: Tensor,  # [B, C, H, W]
    ridge: float,
    cutoff: float,
) -> Tensor:  # [B, N, C]
    """Exact ridge least squares by batched Cholesky; invalid splats get colour 0."""
    _, channels, height, width = images.shape
    valid = splats.valid
    weights = splat_weights_dense(splats.positions, splats.cholesky, valid, height, width, cutoff)
    weights = weights.flatten(2).double()  # [B, N, P]
    gram = weights @ weights.transpose(1, 2)  # [B, N, N]
    rhs = weights @ images.flatten(2).transpose(1, 2).double()  # [B, N, C]
    diagonal = torch.diagonal(gram, dim1=-2, dim2=-1)
    scale = (diagonal * valid).sum(-1) / valid.sum(-1).clamp(min=1)
    shift = (ridge * scale).clamp(min=MIN_SHIFT)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    # An invalid splat's row and column are zero: a unit diagonal there keeps its colour at zero.
    system = gram + (shift[:, None, None] + (~valid)[:, :, None].to(gram.dtype)) * eye
    factor, info = torch.linalg.cholesky_ex(system)
    colours = torch.cholesky_solve(rhs * valid[..., None], factor)
    failed = info != 0
    if bool(failed.any()):  # not positive definite: cannot happen with the ridge, but never silently
        colours[failed] = torch.linalg.lstsq(system[failed], rhs[failed]).solution
    return (colours * valid[..., None]).to(images.dtype)


class ColourOperator:
    """``W``, the render as a linear map of the colours for one fixed, checked geometry, and its
    adjoint ``W^T``: the two products of the conjugate-gradient solve. Neither checks the geometry
    again (it was checked once, in :func:`solve_colours`); both count their passes."""

    def __init__(self, geometry: Splats, height: int, width: int, cutoff: float, backend: str,
                 passes: RenderPasses | None) -> None:
        self.geometry, self.height, self.width, self.cutoff, self.backend = geometry, height, width, cutoff, backend
        self.passes = passes
        self.native_adjoint = _native_adjoint(backend, geometry.device)

    def render(self, colours: Tensor) -> Tensor:  # [B, N, C] -> [B, C, H, W]
        geometry = self.geometry
        return render_splats(Splats(geometry.positions, geometry.cholesky, colours, geometry.valid), self.height,
                             self.width, backend=self.backend, cutoff=self.cutoff, validate=False, passes=self.passes)

    def adjoint(self, image: Tensor) -> Tensor:  # [B, C, H, W] -> [B, N, C]
        """``W^T image``: the backend's adjoint kernel, or the gradient of ``<render(c), image>`` in ``c``
        (a render and its full backward) where it has none."""
        if self.native_adjoint is not None:
            return self._native(image)[0]
        return self._autograd_adjoint(image)

    def adjoint_and_norms(self, image: Tensor) -> tuple[Tensor, Tensor]:  # [B, N, C], [B, N]
        """``W^T image`` and ``sum_p w^2`` of every splat: one pass of a native adjoint kernel, which
        computes both; :func:`splat_weight_norms` beside the autograd adjoint elsewhere."""
        if self.native_adjoint is not None:
            return self._native(image)
        norms = splat_weight_norms(self.geometry, self.height, self.width, self.cutoff, self.backend)
        return self._autograd_adjoint(image), norms

    def _native(self, image: Tensor) -> tuple[Tensor, Tensor]:
        geometry = self.geometry
        if self.passes is not None:
            self.passes.adjoint += 1
        adjoint, norms = self.native_adjoint(image, geometry.positions, geometry.cholesky, geometry.valid, self.cutoff)
        return adjoint.to(image), norms.to(image)

    def _autograd_adjoint(self, image: Tensor) -> Tensor:  # [B, C, H, W] -> [B, N, C]
        geometry = self.geometry
        with torch.enable_grad():
            probe = torch.zeros_like(geometry.colours, requires_grad=True)
            return torch.autograd.grad(self.render(probe), probe, image)[0]


def _solve_conjugate_gradients(splats: Splats, images: Tensor, ridge: float, cutoff: float, backend: str,
                               iterations: int, passes: RenderPasses | None = None) -> Tensor:  # [B, N, C]
    """Preconditioned CG on ``(W^T W + shift I) c = W^T y``, warm-started from ``splats.colours``;
    one independent solve per image and channel, run together."""
    _, _, height, width = images.shape
    geometry = splats.detach()
    operator = ColourOperator(geometry, height, width, cutoff, backend, passes)
    mask = geometry.valid[..., None].to(images.dtype)  # [B, N, 1]
    colours = geometry.colours * mask
    with torch.no_grad():
        image_residual = images - operator.render(colours)  # y - W c
    # One adjoint pass gives the start's residual W^T (y - W c) and, on the native kernels, the
    # diagonal of W^T W with it.
    data_residual, diagonal = operator.adjoint_and_norms(image_residual)  # [B, N, C], [B, N]
    shift = ridge * (diagonal * geometry.valid).sum(1) / geometry.valid.sum(1).clamp(min=1)
    shift = shift.clamp(min=MIN_SHIFT)[:, None, None]
    inverse_preconditioner = mask / (diagonal[..., None] + shift)
    residual = (data_residual - shift * colours) * mask
    preconditioned = inverse_preconditioner * residual
    direction = preconditioned.clone()
    rho = _inner(residual, preconditioned)
    for _ in range(iterations):
        applied = _normal(operator, direction, shift, mask)
        alpha = rho / _inner(direction, applied).clamp(min=1e-30)
        colours = colours + alpha * direction
        residual = residual - alpha * applied
        preconditioned = inverse_preconditioner * residual
        next_rho = _inner(residual, preconditioned)
        direction = preconditioned + (next_rho / rho.clamp(min=1e-30)) * direction
        rho = next_rho
    return colours


def _normal(operator: ColourOperator, colours: Tensor, shift: Tensor, mask: Tensor) -> Tensor:  # [B, N, C]
    """``(W^T W + shift I) colours`` over the valid splats."""
    with torch.no_grad():
        rendered = operator.render(colours)
    return (operator.adjoint(rendered) + shift * colours) * mask


def _inner(a: Tensor, b: Tensor) -> Tensor:  # [B, N, C] twice -> [B, 1, C]
    return (a * b).sum(1, keepdim=True)


def solve_colours(
    splats: Splats,  # the geometry, and the colours to warm-start from
    images: Tensor,  # [B, C, H, W]
    *,
    ridge: float,
    cutoff: float,
    backend: str,
    cg_iterations: int,
    passes: RenderPasses | None = None,
) -> Tensor:  # [B, N, C]: the least-squares colours of this geometry (zero for invalid splats)
    """The colours that minimize the squared error for ``splats``' geometry (module docstring);
    the geometry is checked once here, not in every product of the solve."""
    with torch.no_grad():
        if solved_densely(splats.num_slots, images.shape[-2], images.shape[-1]):
            return _solve_dense(splats, images, ridge, cutoff)
        check_renderable(splats)
        return _solve_conjugate_gradients(splats, images, ridge, cutoff, backend, cg_iterations, passes)
