"""What every rasterizer in kernels/ does with its arguments before and after its kernel runs.

All of them share one signature, the PyTorch twin's (``kernels.rasterize_torch``)::

    rasterize_*(positions, cholesky, colours, valid, height, width, cutoff=math.inf) -> [B, C, H, W]

    positions [B, N, 2], cholesky [B, N, 3], colours [B, N, C >= 1]: floating point
    valid [B, N] bool, all four on one device; height, width >= 0; cutoff >= 0 or inf

Here, once for all of them:

- :func:`rasterizer_args` checks that call (shapes, dtypes, devices, sizes, the cutoff) and gives
  back the sizes and cutoff as plain numbers; :func:`colour_adjoint_args` checks the colour
  adjoints' call, ``(image, positions, cholesky, valid, cutoff)``, the same way; :func:`cutoff_args` is the cutoff as the Triton
  kernels take it;
- :func:`kernel_inputs` makes the copies a compiled kernel reads: contiguous fp32 splat tensors and
  a one-byte mask;
- :func:`save_for_kernel_backward`, :func:`saved_kernel_inputs` and :func:`grads_for_inputs` are the
  save and restore that every ``torch.autograd.Function`` around such a kernel does: keep the fp32
  copies, hand the backward kernel an fp32 contiguous cotangent, and give the gradients back in the
  callers' dtypes.

Plain PyTorch: no Triton import, so the CPU rasterizers can use it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor


def check_cutoff(cutoff: float) -> float:
    """``cutoff`` as a float; ValueError unless it is a non-negative number or inf."""
    cutoff = float(cutoff)
    if math.isnan(cutoff) or cutoff < 0:
        raise ValueError(f"cutoff must be a non-negative number or inf, got {cutoff}")
    return cutoff


def cutoff_args(cutoff: float) -> tuple[float, bool]:
    """(cutoff^2, has_cutoff) as the Triton kernels take them; cutoff = inf compiles the test away."""
    cutoff = check_cutoff(cutoff)
    if math.isinf(cutoff):
        return 0.0, False
    return cutoff * cutoff, True


def check_rasterizer_inputs(
    positions: Tensor, cholesky: Tensor, colours: Tensor, valid: Tensor
) -> None:
    """ValueError naming the problem unless the four splat tensors fit together (module docstring)."""
    for name, tensor in (("positions", positions), ("cholesky", cholesky), ("colours", colours)):
        if not isinstance(tensor, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if not tensor.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
    if positions.dim() != 3 or positions.shape[-1] != 2:
        raise ValueError(f"positions must be [B, N, 2], got {tuple(positions.shape)}")
    batch, n_splats = positions.shape[:2]
    if cholesky.shape != (batch, n_splats, 3):
        raise ValueError(
            f"cholesky must be [B, N, 3] = {(batch, n_splats, 3)}, got {tuple(cholesky.shape)}"
        )
    if colours.dim() != 3 or colours.shape[:2] != (batch, n_splats) or colours.shape[-1] < 1:
        raise ValueError(
            f"colours must be [B, N, C] with [B, N] = {(batch, n_splats)} and C >= 1, "
            f"got {tuple(colours.shape)}"
        )
    if not isinstance(valid, Tensor) or valid.dtype != torch.bool:
        raise ValueError(f"valid must be a bool tensor, got {getattr(valid, 'dtype', type(valid).__name__)}")
    if valid.shape != (batch, n_splats):
        raise ValueError(f"valid must be [B, N] = {(batch, n_splats)}, got {tuple(valid.shape)}")
    devices = {positions.device, cholesky.device, colours.device, valid.device}
    if len(devices) != 1:
        raise ValueError(f"positions, cholesky, colours and valid must share one device, got {sorted(map(str, devices))}")


def rasterizer_args(positions: Tensor, cholesky: Tensor, colours: Tensor, valid: Tensor, height: int, width: int,
                    cutoff: float) -> tuple[int, int, float]:
    """Check a rasterizer's arguments (module docstring); (height, width, cutoff) as int, int, float."""
    check_rasterizer_inputs(positions, cholesky, colours, valid)
    for name, size in (("height", height), ("width", width)):
        if int(size) != size or size < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {size!r}")
    return int(height), int(width), check_cutoff(cutoff)


class KernelInputs(NamedTuple):
    """The copies a kernel reads, in the kernels' argument order; unpack them into a launch."""

    positions: Tensor  # [B, N, 2] fp32 contiguous
    cholesky: Tensor  # [B, N, 3] fp32 contiguous
    colours: Tensor  # [B, N, C] fp32 contiguous
    valid: Tensor  # [B, N] one byte a splat (uint8 or bool), contiguous


def fp32_copy(tensor: Tensor) -> Tensor:
    """``tensor`` detached, as contiguous fp32: itself when it already is."""
    return tensor.detach().to(torch.float32).contiguous()


def kernel_inputs(
    positions: Tensor,
    cholesky: Tensor,
    colours: Tensor,
    valid: Tensor,
    valid_dtype: torch.dtype = torch.uint8,
) -> KernelInputs:
    """Detached contiguous fp32 copies of the splat tensors (the tensors themselves when they already
    are), and ``valid`` as ``valid_dtype``."""
    return KernelInputs(
        fp32_copy(positions), fp32_copy(cholesky), fp32_copy(colours), valid.detach().to(valid_dtype).contiguous()
    )


def save_for_kernel_backward(
    ctx,
    differentiable: tuple[Tensor, Tensor, Tensor],  # the caller's positions, cholesky, colours
    inputs: KernelInputs,
    geometry: tuple,  # the launchers' trailing arguments, (height, width, cutoff)
    *extra: Tensor,  # further tensors the backward launcher reads
) -> None:
    """In an autograd ``forward``: keep what :func:`saved_kernel_inputs` and
    :func:`grads_for_inputs` give back in ``backward``."""
    ctx.save_for_backward(*inputs, *extra)
    ctx.geometry = geometry
    ctx.dtypes = tuple(tensor.dtype for tensor in differentiable)


def saved_kernel_inputs(ctx, grad_out: Tensor) -> tuple[Tensor, KernelInputs, tuple[Tensor, ...]]:
    """In an autograd ``backward``: the fp32 contiguous cotangent, the saved kernel inputs and the
    extra tensors; the geometry is ``ctx.geometry``."""
    saved = ctx.saved_tensors
    return grad_out.to(torch.float32).contiguous(), KernelInputs(*saved[:4]), saved[4:]


def grads_for_inputs(ctx, grads: tuple[Tensor, Tensor, Tensor]) -> tuple:
    """``backward``'s result: the fp32 gradients of positions, cholesky and colours (the first three
    inputs) in the callers' dtypes, then None for every other input of ``forward``."""
    others = len(ctx.needs_input_grad) - len(grads)
    return (*(grad.to(dtype) for grad, dtype in zip(grads, ctx.dtypes)), *(None,) * others)


def colour_adjoint_args(
    image: Tensor,  # [B, C, H, W] floating point
    positions: Tensor,  # [B, N, 2]
    cholesky: Tensor,  # [B, N, 3]
    valid: Tensor,  # [B, N] bool
    cutoff: float,
) -> float:  # the cutoff as a float
    """ValueError naming the problem unless a colour adjoint's arguments fit together: the splat
    tensors as a render takes them (:func:`kernels.arguments.check_rasterizer_inputs`), and a
    floating-point ``[B, C >= 1, H, W]`` image of the same batch on the same device."""
    if not isinstance(image, Tensor) or not image.is_floating_point() or image.dim() != 4 or image.shape[1] < 1:
        got = f"{tuple(image.shape)} {image.dtype}" if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"image must be a floating-point [B, C, H, W] tensor with C >= 1, got {got}")
    # The splat tensors are checked as a render's, with a memory-less stand-in for the colours
    # shaped to agree with them, so that every complaint names the tensor that is wrong.
    splat_shape = tuple(positions.shape[:2]) if isinstance(positions, Tensor) and positions.dim() == 3 else (0, 0)
    stand_in = torch.zeros((), dtype=image.dtype, device=getattr(positions, "device", image.device))
    check_rasterizer_inputs(positions, cholesky, stand_in.expand(*splat_shape, image.shape[1]), valid)
    if image.shape[0] != positions.shape[0]:
        raise ValueError(f"image must be [B, C, H, W] with B = {positions.shape[0]}, got {tuple(image.shape)}")
    if image.device != positions.device:
        raise ValueError(f"image must be on the splats' device {positions.device}, got {image.device}")
    return check_cutoff(cutoff)
