"""The colour adjoint ``(W^T image, sum_p w^2)``: the tile-culled Triton kernel (under
TRITON_INTERPRET=1, set by tests/conftest.py) and the C++ CPU kernel against the PyTorch twin, and
the twin against the render it is the adjoint of.

Odd shapes (B=3, N=37, 19x23), ~20 % invalid slots holding NaN, splats hanging over the border.
"""

from __future__ import annotations

import math

import pytest
import torch

from kernels.colour_adjoint_triton import colour_adjoint_triton
from kernels.rasterize_cpu import colour_adjoint as colour_adjoint_cpu
from kernels.rasterize_cpu import cpu_kernel_available
from kernels.rasterize_torch import colour_adjoint_dense_torch, rasterize_dense_torch

B, N, H, W = 3, 37, 19, 23
# fp32 sums over a few hundred pixels in different orders (the C++ kernel sums in fp64); observed
# differences are a few 1e-6 on values up to ~40.
FP32 = dict(rtol=1e-4, atol=1e-4)
IMPLEMENTATIONS = {"triton": colour_adjoint_triton, "cpp": colour_adjoint_cpu}


def implementation(name: str):
    if name == "cpp" and not cpu_kernel_available():
        pytest.skip("the C++ kernel does not build on this machine (no compiler)")
    return IMPLEMENTATIONS[name]


@pytest.fixture
def splats(random_splats):
    """``splats(channels)``: positions, cholesky, valid of B x N random splats, invalid slots NaN, and
    two valid splats half outside the image (top-left and bottom-right corners)."""

    def make(channels: int, seed: int = 0):
        made = random_splats(B, N, channels, height=H, width=W, shear=0.25, invalid=0.2, seed=seed)
        positions, cholesky, valid = made.positions.clone(), made.cholesky.clone(), made.valid.clone()
        positions[:, 1], cholesky[:, 1], valid[:, 1] = torch.tensor([-1.5, 2.0]), torch.tensor([3.0, 1.0, 2.0]), True
        positions[:, 2], cholesky[:, 2], valid[:, 2] = torch.tensor([W + 1.0, H - 0.5]), torch.tensor([2.5, -1.0, 3.0]), True
        positions[~valid] = math.nan
        cholesky[~valid] = math.nan
        return positions, cholesky, valid

    return make


@pytest.mark.parametrize("name", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("cutoff", [3.0, math.inf])
def test_matches_the_twin(splats, name, channels, cutoff) -> None:
    adjoint_of = implementation(name)
    positions, cholesky, valid = splats(channels)
    image = torch.randn(B, channels, H, W)

    adjoint, norms = adjoint_of(image, positions, cholesky, valid, cutoff)
    expected_adjoint, expected_norms = colour_adjoint_dense_torch(image, positions, cholesky, valid, cutoff)

    assert adjoint.shape == (B, N, channels) and norms.shape == (B, N)
    assert adjoint.dtype == norms.dtype == torch.float32
    torch.testing.assert_close(adjoint, expected_adjoint, **FP32)
    torch.testing.assert_close(norms, expected_norms, **FP32)
    # The NaN in invalid slots does not leak: their rows are exact zeros. Not vacuous: the valid
    # splats reach the image (a few random ones only just), the two over the border included.
    assert torch.isfinite(expected_adjoint).all() and torch.isfinite(expected_norms).all()
    assert torch.all(adjoint[~valid] == 0) and torch.all(norms[~valid] == 0)
    assert torch.all(norms[valid] > 0) and (norms[valid] > 0.1).float().mean() > 0.9
    assert torch.all(norms[:, 1:3] > 1.0) and adjoint.abs().amax() > 1.0


def test_the_twin_is_the_adjoint_of_the_render(splats) -> None:
    # <W c, r> == <c, W^T r> for random c, r; and the norms are <W e_i, W e_i>.
    positions, cholesky, valid = splats(3, seed=1)
    colours = torch.randn(B, N, 3, dtype=torch.float64)
    residual = torch.randn(B, 3, H, W, dtype=torch.float64)
    for cutoff in (3.5, math.inf):
        render = rasterize_dense_torch(positions.double(), cholesky.double(), colours, valid, H, W, cutoff)
        adjoint, norms = colour_adjoint_dense_torch(residual, positions, cholesky, valid, cutoff)
        torch.testing.assert_close((colours * adjoint.double()).sum(), (render * residual).sum(), rtol=1e-6, atol=1e-6)

        one = torch.zeros(B, N, 1, dtype=torch.float64)
        one[:, 5] = 1.0
        alone = rasterize_dense_torch(positions.double(), cholesky.double(), one, valid, H, W, cutoff)
        torch.testing.assert_close(norms[:, 5].double(), alone.square().sum((1, 2, 3)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", list(IMPLEMENTATIONS))
def test_kernel_is_the_adjoint_of_the_render(splats, name) -> None:
    adjoint_of = implementation(name)
    positions, cholesky, valid = splats(3, seed=2)
    colours = torch.randn(B, N, 3)
    residual = torch.randn(B, 3, H, W)
    render = rasterize_dense_torch(positions, cholesky, colours, valid, H, W, 3.5)
    adjoint, _ = adjoint_of(residual, positions, cholesky, valid, 3.5)
    # Two fp32 sums of ~1,300 products of unit size, in different orders.
    torch.testing.assert_close((colours * adjoint).sum(), (render * residual).sum(), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("name", ["twin", *IMPLEMENTATIONS])
def test_empty_batches_and_no_valid_splat_give_zeros(name) -> None:
    adjoint_of = colour_adjoint_dense_torch if name == "twin" else implementation(name)
    for batch, n in ((0, 4), (2, 0)):
        adjoint, norms = adjoint_of(torch.rand(batch, 3, 5, 6), torch.rand(batch, n, 2) * 5, torch.ones(batch, n, 3),
                                    torch.ones(batch, n, dtype=torch.bool), 3.5)
        assert adjoint.shape == (batch, n, 3) and norms.shape == (batch, n)
    adjoint, norms = adjoint_of(torch.rand(2, 1, 5, 6), torch.rand(2, 4, 2) * 5, torch.ones(2, 4, 3),
                                torch.zeros(2, 4, dtype=torch.bool), 3.5)
    assert adjoint.shape == (2, 4, 1) and torch.all(adjoint == 0) and torch.all(norms == 0)


def test_other_dtypes_and_layouts_compute_in_fp32_without_autograd(splats) -> None:
    positions, cholesky, valid = splats(3)
    image = torch.randn(B, H, W, 3, dtype=torch.float64).permute(0, 3, 1, 2)  # not contiguous
    leaf = positions.double().requires_grad_()
    adjoint, norms = colour_adjoint_triton(image, leaf, cholesky.double(), valid, 3.0)
    expected = colour_adjoint_dense_torch(image, positions, cholesky, valid, 3.0)
    assert adjoint.dtype == norms.dtype == torch.float32 and not adjoint.requires_grad
    torch.testing.assert_close((adjoint, norms), expected, **FP32)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(image=torch.zeros(2, 3, H, W)), r"image must be \[B, C, H, W\] with B = 3"),
        (dict(image=torch.zeros(B, H, W)), r"image must be a floating-point \[B, C, H, W\] tensor"),
        (dict(cholesky=torch.ones(B, N, 2)), r"cholesky must be \[B, N, 3\]"),
        (dict(valid=torch.ones(B, N)), "valid must be a bool tensor"),
        (dict(cutoff=-1.0), "cutoff must be a non-negative number or inf"),
    ],
)
@pytest.mark.parametrize("adjoint_of", [colour_adjoint_triton, colour_adjoint_dense_torch])
def test_bad_arguments_raise_one_clear_error(adjoint_of, change, message) -> None:
    arguments = dict(image=torch.zeros(B, 3, H, W), positions=torch.zeros(B, N, 2), cholesky=torch.ones(B, N, 3),
                     valid=torch.ones(B, N, dtype=torch.bool), cutoff=3.0) | change
    with pytest.raises(ValueError, match=message):
        adjoint_of(**arguments)
