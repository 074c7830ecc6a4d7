"""The Triton rasterizer against its PyTorch twin, forward and backward.

Runs under TRITON_INTERPRET=1 on the CPU by default (tests/conftest.py), so shapes stay small and
odd: B=3, N=37 (one full splat block of 32 plus a ragged one), 19x23 pixels (not a multiple of the
64-pixel block). The GPU test at the end checks the compiled kernel on a realistic size.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from kernels.rasterize_torch import rasterize_dense_torch
from kernels.rasterize_triton import rasterize_triton

B, N, H, W = 3, 37, 19, 23
# Both kernels compute in fp32 but sum in different orders; observed differences are ~1e-6.
FP32 = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture
def splat_tensors(random_splats):
    """``splat_tensors(batch, n, channels, height, width)``: well-conditioned random splats (centres
    a bit beyond the image, ~20 % invalid) as the kernels' four tensors."""

    def make(batch: int, n: int, channels: int, height: int, width: int, device: str = "cpu"):
        splats = random_splats(batch, n, channels, height=height, width=width, shear=0.25, invalid=0.2)
        return tuple(t.to(device) for t in (splats.positions, splats.cholesky, splats.colours, splats.valid))

    return make


def grads_through(render, positions, cholesky, colours, valid, height, width, cutoff, cotangent):
    """(image, grad positions, grad cholesky, grad colours) of <render(...), cotangent>."""
    leaves = [t.detach().clone().requires_grad_() for t in (positions, cholesky, colours)]
    image = render(*leaves, valid, height, width, cutoff)
    return (image, *torch.autograd.grad(image, leaves, cotangent))


@pytest.mark.parametrize("cutoff", [3.0, math.inf])
@pytest.mark.parametrize("channels", [1, 3])
def test_forward_and_backward_match_twin(splat_tensors, channels: int, cutoff: float) -> None:
    splats = splat_tensors(B, N, channels, H, W)
    cotangent = torch.randn(B, channels, H, W)

    ours = grads_through(rasterize_triton, *splats, H, W, cutoff, cotangent)
    twin = grads_through(rasterize_dense_torch, *splats, H, W, cutoff, cotangent)

    assert ours[0].shape == (B, channels, H, W)
    for name, got, expected in zip(["image", "positions", "cholesky", "colours"], ours, twin):
        torch.testing.assert_close(got, expected, **FP32, msg=lambda m: f"{name}: {m}")


def test_cutoff_truncates(splat_tensors) -> None:
    # Guards against the cutoff being silently ignored: a tight cutoff must change the image.
    splats = splat_tensors(B, N, 1, H, W)
    tight = rasterize_triton(*splats, H, W, cutoff=1.0)
    full = rasterize_triton(*splats, H, W)
    assert (tight - full).abs().max() > 1e-2
    torch.testing.assert_close(tight, rasterize_dense_torch(*splats, H, W, cutoff=1.0), **FP32)


def test_invalid_splats_are_inert(splat_tensors) -> None:
    positions, cholesky, colours, valid = splat_tensors(B, N, 3, H, W)
    cotangent = torch.randn(B, 3, H, W)
    image, g_pos, g_chol, g_col = grads_through(
        rasterize_triton, positions, cholesky, colours, valid, H, W, 3.0, cotangent
    )

    invalid = ~valid
    assert invalid.sum() >= 1
    for grad in (g_pos, g_chol, g_col):
        assert torch.all(grad[invalid] == 0)
        assert torch.any(grad[valid] != 0)

    # Garbage in an invalid slot (a singular factor, NaNs) must neither change nor poison the image.
    garbage_cholesky = cholesky.clone()
    garbage_cholesky[invalid] = 0.0
    garbage_positions = positions.clone()
    garbage_positions[invalid] = math.nan
    garbage_colours = colours.clone()
    garbage_colours[invalid] = math.nan
    garbage = rasterize_triton(garbage_positions, garbage_cholesky, garbage_colours, valid, H, W, 3.0)
    assert torch.isfinite(garbage).all()
    torch.testing.assert_close(garbage, image, rtol=0, atol=0)


def test_dtype_and_layout_follow_inputs(splat_tensors) -> None:
    # float64, non-contiguous inputs: the launcher makes fp32 contiguous copies and casts results
    # back. Compared at fp32 tolerance because the kernel computes in fp32 whatever it is given.
    positions, cholesky, colours, valid = splat_tensors(2, 5, 3, 7, 9)
    colours_t = colours.double().transpose(1, 2).contiguous().transpose(1, 2)  # strided view
    assert not colours_t.is_contiguous()
    splats = (positions.double(), cholesky.double(), colours_t, valid)
    cotangent = torch.randn(2, 3, 7, 9, dtype=torch.float64)

    ours = grads_through(rasterize_triton, *splats, 7, 9, 2.5, cotangent)
    twin = grads_through(rasterize_dense_torch, *splats, 7, 9, 2.5, cotangent)
    for got, expected in zip(ours, twin):
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, expected, **FP32)


def test_no_splats_renders_black(splat_tensors) -> None:
    empty = splat_tensors(2, 0, 3, H, W)
    image = rasterize_triton(*empty, H, W)
    assert image.shape == (2, 3, H, W)
    assert torch.all(image == 0)


def test_rejects_mismatched_shapes(splat_tensors) -> None:
    positions, cholesky, colours, valid = splat_tensors(B, N, 3, H, W)
    with pytest.raises(ValueError, match="cholesky must be"):
        rasterize_triton(positions, cholesky[:, :-1], colours, valid, H, W)


# The compiled kernel needs a GPU, and TRITON_INTERPRET unset or 0 (conftest defaults it to 1).
if not torch.cuda.is_available():
    _NO_COMPILED_KERNEL = "needs a CUDA GPU"
elif os.environ.get("TRITON_INTERPRET", "0") == "1":
    _NO_COMPILED_KERNEL = "TRITON_INTERPRET=1 interprets the kernel; export TRITON_INTERPRET=0"
else:
    _NO_COMPILED_KERNEL = ""


@pytest.mark.skipif(bool(_NO_COMPILED_KERNEL), reason=_NO_COMPILED_KERNEL)
def test_compiled_kernel_on_gpu(splat_tensors) -> None:
    batch, n, size, cutoff = 2, 400, 224, 3.0
    splats = splat_tensors(batch, n, 3, size, size, device="cuda")
    cotangent = torch.randn(batch, 3, size, size, device="cuda")

    ours = grads_through(rasterize_triton, *splats, size, size, cutoff, cotangent)
    # The reference runs in float64, so the comparison measures only the kernel's fp32 error
    # (and no TF32 the twin's einsum might pick up on a GPU).
    splats64 = [t.double() if t.is_floating_point() else t for t in splats]
    twin = grads_through(rasterize_dense_torch, *splats64, size, size, cutoff, cotangent.double())

    # Measured under the interpreter on one 224x224 image of 400 splats: at most 4e-6 absolute
    # on values up to ~20, well inside FP32.
    for name, got, expected in zip(["image", "positions", "cholesky", "colours"], ours, twin):
        torch.testing.assert_close(got, expected.float(), **FP32, msg=lambda m: f"{name}: {m}")
