"""The C++ CPU rasterizer against its PyTorch twin: forward, backward, adjoint, any thread count."""

from __future__ import annotations

import math

import pytest
import torch

from kernels.rasterize_cpu import colour_adjoint, cpu_kernel_available, rasterize_cpu
from kernels.rasterize_torch import mahalanobis_sq, pixel_centres, rasterize_dense_torch

pytestmark = pytest.mark.skipif(not cpu_kernel_available(), reason="no C++ compiler to build the CPU kernel")
B, N, H, W = 3, 37, 19, 23
# Both sum in fp32 in different orders (the C++ exp is a polynomial within 2e-7 of expf); observed
# differences are below 1e-6 of each tensor's largest entry.
RTOL, ATOL = 1e-4, 1e-4


def splat_tensors(random_splats, channels: int, height: int = H, width: int = W, count: int = N):
    splats = random_splats(B, count, channels, height=height, width=width, scale=(0.6, 5.0), beyond=0.2, invalid=0.2)
    cholesky, valid = splats.cholesky.clone(), splats.valid.clone()
    cholesky[:, 1] = torch.tensor([1.4, -0.7, 1.1]) * max(height, width)  # wider than the image
    cholesky[:, 2, 0] *= -1  # a negative diagonal is the same covariance
    valid[:, 1:3] = True
    positions, colours = splats.positions.clone(), splats.colours.clone()
    positions[~valid] = math.nan  # garbage in invalid slots must be inert
    cholesky[~valid] = 0.0
    colours[~valid] = math.inf
    return positions, cholesky, colours, valid


def through(render, positions, cholesky, colours, valid, height, width, cutoff, cotangent):
    leaves = [t.detach().clone().requires_grad_() for t in (positions, cholesky, colours)]
    image = render(*leaves, valid, height, width, cutoff)
    return (image.detach(), *torch.autograd.grad(image, leaves, cotangent))


@pytest.mark.parametrize("cutoff", [2.0, 3.5, math.inf])
@pytest.mark.parametrize("channels", [1, 3])
def test_forward_and_backward_match_the_twin(random_splats, channels, cutoff):
    tensors = splat_tensors(random_splats, channels)
    cotangent = torch.randn(B, channels, H, W)
    ours = through(rasterize_cpu, *tensors, H, W, cutoff, cotangent)
    twin = through(rasterize_dense_torch, *tensors, H, W, cutoff, cotangent)
    valid = tensors[3]
    for name, got, expected in zip(["image", "positions", "cholesky", "colours"], ours, twin):
        expected = expected if name == "image" else torch.where(valid[..., None], expected, torch.zeros_like(expected))
        scale = max(float(expected.abs().max()), 1e-6)
        torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL * scale, msg=lambda m, n=name: f"{n}: {m}")
        if name != "image":
            assert torch.all(got[~valid] == 0), f"{name}: an invalid splat got a gradient"


def test_results_do_not_depend_on_the_thread_count(random_splats):
    tensors = splat_tensors(random_splats, 3, height=40, width=37, count=120)
    cotangent = torch.randn(B, 3, 40, 37)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = through(rasterize_cpu, *tensors, 40, 37, 3.5, cotangent)
        torch.set_num_threads(2)
        two = through(rasterize_cpu, *tensors, 40, 37, 3.5, cotangent)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


def test_adjoint_is_the_colour_gradient_and_norms_are_the_squared_weights(random_splats):
    positions, cholesky, colours, valid = splat_tensors(random_splats, 3)
    image = torch.rand(B, 3, H, W)
    adjoint, norms = colour_adjoint(image, positions, cholesky, valid, 3.5)
    zeros = torch.zeros_like(colours).requires_grad_()
    rendered = rasterize_dense_torch(positions, cholesky, zeros, valid, H, W, 3.5)
    expected = torch.autograd.grad(rendered, zeros, image)[0] * valid[..., None]
    torch.testing.assert_close(adjoint, expected, rtol=RTOL, atol=ATOL * float(expected.abs().max()))
    safe = torch.where(valid[..., None], cholesky, torch.tensor([1.0, 0.0, 1.0]))
    grid_x, grid_y = pixel_centres(H, W, positions)
    dx = grid_x - torch.nan_to_num(positions[..., 0, None, None])
    dy = grid_y - torch.nan_to_num(positions[..., 1, None, None])
    d_sq = mahalanobis_sq(dx, dy, safe[:, :, None, None, :])
    weights = torch.where(d_sq <= 3.5**2, torch.exp(-0.5 * d_sq), 0.0) * valid[..., None, None]
    torch.testing.assert_close(norms, weights.square().sum((-1, -2)), rtol=RTOL, atol=1e-5)


def test_an_empty_batch_and_no_valid_splat_render_black():
    assert rasterize_cpu(torch.zeros(0, 4, 2), torch.ones(0, 4, 3), torch.zeros(0, 4, 1),
                         torch.zeros(0, 4, dtype=torch.bool), 5, 6).shape == (0, 1, 5, 6)
    image = rasterize_cpu(torch.rand(2, 4, 2) * 5, torch.ones(2, 4, 3), torch.ones(2, 4, 3),
                          torch.zeros(2, 4, dtype=torch.bool), 5, 6, 3.5)
    assert image.shape == (2, 3, 5, 6) and torch.all(image == 0)
