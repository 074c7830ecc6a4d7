"""The argument check every rasterizer shares (kernels/arguments.py): one message for one mistake,
whichever rasterizer is called, before any kernel runs."""

from __future__ import annotations

import math

import pytest
import torch

from kernels.arguments import cutoff_args, kernel_inputs, rasterizer_args
from kernels.rasterize_cpu import rasterize_cpu
from kernels.rasterize_torch import rasterize_dense_torch
from kernels.rasterize_triton import rasterize_triton
from kernels.rasterize_triton_tiled import rasterize_triton_tiled
from kernels.rasterize_windowed import rasterize_windowed_torch

RASTERIZERS = {
    "dense": rasterize_dense_torch,
    "windowed": rasterize_windowed_torch,
    "cpu": rasterize_cpu,
    "triton": rasterize_triton,
    "triton_tiled": rasterize_triton_tiled,
}


def _splats(batch=2, n=5, channels=3):
    return [torch.rand(batch, n, 2), torch.rand(batch, n, 3), torch.rand(batch, n, channels),
            torch.ones(batch, n, dtype=torch.bool)]


def _with(index, value):
    tensors = _splats()
    tensors[index] = value
    return tensors


BAD_CALLS = [
    pytest.param(_with(0, torch.rand(2, 5, 3)), 7, 9, 3.0, r"positions must be \[B, N, 2\], got \(2, 5, 3\)", id="positions"),
    pytest.param(_with(1, torch.rand(2, 4, 3)), 7, 9, 3.0, r"cholesky must be \[B, N, 3\] = \(2, 5, 3\)", id="cholesky"),
    pytest.param(_with(2, torch.rand(2, 5, 0)), 7, 9, 3.0, r"colours must be \[B, N, C\] with .* C >= 1", id="no-channel"),
    pytest.param(_with(2, torch.ones(2, 5, 3, dtype=torch.int64)), 7, 9, 3.0, "colours must be a floating-point", id="int"),
    pytest.param(_with(3, torch.ones(2, 5)), 7, 9, 3.0, "valid must be a bool tensor", id="float-valid"),
    pytest.param(_with(3, torch.ones(2, 4, dtype=torch.bool)), 7, 9, 3.0, r"valid must be \[B, N\] = \(2, 5\)", id="valid-shape"),
    pytest.param(_with(3, torch.ones(2, 5, dtype=torch.bool, device="meta")), 7, 9, 3.0, "share one device", id="device"),
    pytest.param(_splats(), -1, 9, 3.0, "height must be a non-negative integer", id="height"),
    pytest.param(_splats(), 7, 9.5, 3.0, "width must be a non-negative integer", id="width"),
    pytest.param(_splats(), 7, 9, -1.0, "cutoff must be a non-negative number or inf", id="negative-cutoff"),
    pytest.param(_splats(), 7, 9, math.nan, "cutoff must be a non-negative number or inf", id="nan-cutoff"),
]


@pytest.mark.parametrize("name", RASTERIZERS)
@pytest.mark.parametrize("tensors, height, width, cutoff, message", BAD_CALLS)
def test_every_rasterizer_names_the_same_mistake(name, tensors, height, width, cutoff, message) -> None:
    with pytest.raises(ValueError, match=message):
        RASTERIZERS[name](*tensors, height, width, cutoff)


def test_arguments_come_back_as_plain_numbers() -> None:
    assert rasterizer_args(*_splats(), 7.0, 9, 3) == (7, 9, 3.0)
    assert rasterizer_args(*_splats(), 0, 0, math.inf) == (0, 0, math.inf)
    assert cutoff_args(math.inf) == (0.0, False)
    assert cutoff_args(3) == (9.0, True)


def test_kernel_inputs_copy_only_what_they_must() -> None:
    positions, cholesky, colours, valid = _splats()
    inputs = kernel_inputs(positions, cholesky, colours.double().transpose(1, 2).contiguous().transpose(1, 2), valid)
    assert inputs.positions is not positions and inputs.positions.data_ptr() == positions.data_ptr()
    assert inputs.colours.dtype == torch.float32 and inputs.colours.is_contiguous()
    assert inputs.valid.dtype == torch.uint8 and torch.equal(inputs.valid.bool(), valid)
    assert kernel_inputs(positions, cholesky, colours, valid, valid_dtype=torch.bool).valid.dtype == torch.bool
