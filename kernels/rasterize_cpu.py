"""The fused C++ CPU rasterizer (kernels/csrc/splat_raster.cpp) behind the project's rasterizer signature.

``rasterize_cpu(positions, cholesky, colours, valid, height, width, cutoff)`` computes exactly what
``kernels.rasterize_torch.rasterize_dense_torch`` computes (tests/kernels/test_rasterize_cpu.py,
forward and backward), with a hand-written backward that recomputes the weights. Every splat touches
only the pixels of its cutoff ellipse (a closed-form column span per row, then the exact test), eight
pixels at a time with AVX2 and FMA, so the same kernel serves batches of 28x28 images and 224x224
photos. Results do not depend on the number of threads: every output value is summed by one thread
in a fixed order.

Build: the source has a plain C ABI and no torch headers, so g++ compiles it in a few seconds (the
torch extension route took minutes). It is compiled on first use into ``$GSCLIP_KERNEL_CACHE``
(default ``~/.cache/gsclip/kernels``) under a name hashing the source, the flags and the compiler
version, and loaded with ctypes; later processes only load it. A machine without a C++ compiler
cannot build it: :func:`cpu_kernel_available` says so, and ``render_splats(backend="auto")`` then
takes the windowed PyTorch path instead.

:func:`colour_adjoint` is the render's adjoint in the colours (``W^T image`` per image, with
``render = W @ colours``) and the squared norms of the splats' weights: what a least-squares colour
solve and the energy pruning score need.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import subprocess
from pathlib import Path

import torch
from torch import Tensor

from kernels.arguments import (
    KernelInputs,
    check_cutoff,
    fp32_copy,
    grads_for_inputs,
    kernel_inputs,
    rasterizer_args,
    save_for_kernel_backward,
    saved_kernel_inputs,
)

SOURCE = Path(__file__).resolve().parent / "csrc" / "splat_raster.cpp"
MAX_CHANNELS = 16  # the backward and the adjoint keep per-channel sums in fixed arrays


class KernelBuildError(RuntimeError):
    """The C++ kernel could not be compiled or loaded on this machine."""


def _cpu_has_avx2_fma() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx2" in flags and "fma" in flags


def cache_folder() -> Path:
    return Path(os.environ.get("GSCLIP_KERNEL_CACHE", Path.home() / ".cache" / "gsclip" / "kernels"))


@functools.cache
def library() -> ctypes.CDLL:
    """The compiled kernels: built on the first call of a fresh machine, then taken from the cache."""
    compiler = os.environ.get("CXX", "g++")
    flags = ["-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp"]
    if _cpu_has_avx2_fma():
        flags += ["-mavx2", "-mfma"]
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        raise KernelBuildError(f"no C++ compiler ({compiler}) to build the CPU rasterizer: {error}") from None
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode() + version.encode()).hexdigest()[:16]
    target = cache_folder() / f"splat_raster_{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial")  # parallel builds race safely
        built = subprocess.run([compiler, *flags, str(SOURCE), "-o", str(partial)], capture_output=True, text=True)
        if built.returncode != 0:
            partial.unlink(missing_ok=True)
            raise KernelBuildError(f"{compiler} could not build {SOURCE.name}: {built.stderr.strip()[-2000:]}")
        os.replace(partial, target)
    lib = ctypes.CDLL(str(target))
    pointer, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    geometry = [pointer, pointer, pointer, pointer, i64, i64, i64, i64, i64, f32]  # pos chol col valid B N C H W cutoff
    lib.splat_forward.argtypes = geometry + [pointer, i32]
    lib.splat_backward.argtypes = [pointer] + geometry + [pointer, pointer, pointer, i32]
    lib.splat_colour_adjoint.argtypes = [pointer] + geometry[:2] + geometry[3:] + [pointer, pointer, i32]
    for function in (lib.splat_forward, lib.splat_backward, lib.splat_colour_adjoint):
        function.restype = None
    return lib


@functools.cache
def cpu_kernel_available() -> bool:
    """Whether the C++ kernel builds and loads here (compiling it now if needed)."""
    try:
        library()
    except KernelBuildError:
        return False
    return True


def _require_cpu(*tensors: Tensor) -> None:
    for tensor in tensors:
        if tensor.device.type != "cpu":
            raise ValueError(f"the C++ rasterizer runs on CPU tensors, got one on {tensor.device}")


def _forward(inputs: KernelInputs, height: int, width: int, cutoff: float) -> Tensor:  # [B, C, H, W] fp32
    batch, num, channels = inputs.colours.shape
    out = torch.empty((batch, channels, height, width), dtype=torch.float32)
    if out.numel():
        library().splat_forward(*(t.data_ptr() for t in inputs), batch, num, channels, height, width, cutoff,
                                out.data_ptr(), torch.get_num_threads())
    return out


def _backward(grad_image: Tensor, inputs: KernelInputs, height: int, width: int,
              cutoff: float) -> tuple[Tensor, Tensor, Tensor]:  # fp32 grads of positions, cholesky, colours
    batch, num, channels = inputs.colours.shape
    grads = (torch.zeros_like(inputs.positions), torch.zeros_like(inputs.cholesky), torch.zeros_like(inputs.colours))
    if batch * num:
        library().splat_backward(grad_image.data_ptr(), *(t.data_ptr() for t in inputs), batch, num, channels,
                                 height, width, cutoff, *(g.data_ptr() for g in grads), torch.get_num_threads())
    return grads


class _CpuRender(torch.autograd.Function):
    # Arguments as rasterize_cpu's, checked there. The C code reads the mask as bool.
    @staticmethod
    def forward(ctx, positions, cholesky, colours, valid, height, width, cutoff):
        inputs = kernel_inputs(positions, cholesky, colours, valid, valid_dtype=torch.bool)
        save_for_kernel_backward(ctx, (positions, cholesky, colours), inputs, (height, width, cutoff))
        return _forward(inputs, height, width, cutoff).to(colours.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_image):
        grad_image, inputs, _ = saved_kernel_inputs(ctx, grad_image)
        return grads_for_inputs(ctx, _backward(grad_image, inputs, *ctx.geometry))


def rasterize_cpu(positions: Tensor, cholesky: Tensor, colours: Tensor, valid: Tensor, height: int, width: int,
                  cutoff: float = math.inf) -> Tensor:  # [B, C, H, W]
    """Render by accumulated sum; differentiable in all but ``valid``. Computes in fp32. The arguments
    are the rasterizers' (:mod:`kernels.arguments`), on the CPU, with at most 16 channels."""
    height, width, cutoff = rasterizer_args(positions, cholesky, colours, valid, height, width, cutoff)
    _require_cpu(positions)  # the other three are on its device
    if colours.shape[-1] > MAX_CHANNELS:
        raise ValueError(f"colours must be [B, N, C] with C <= {MAX_CHANNELS}, got {tuple(colours.shape)}")
    return _CpuRender.apply(positions, cholesky, colours, valid, height, width, cutoff)


def colour_adjoint(
    image: Tensor,  # [B, C, H, W]
    positions: Tensor,  # [B, N, 2]
    cholesky: Tensor,  # [B, N, 3]
    valid: Tensor,  # [B, N] bool
    cutoff: float,
) -> tuple[Tensor, Tensor]:  # W^T image [B, N, C]; sum_p w(p)^2 [B, N]
    """The render's adjoint in the colours, and each splat's squared weight norm (the diagonal of
    ``W^T W``); zeros for invalid splats."""
    _require_cpu(image, positions, cholesky, valid)
    if positions.dim() != 3 or positions.shape[-1] != 2 or tuple(cholesky.shape) != (*positions.shape[:2], 3):
        raise ValueError(f"positions must be [B, N, 2] and cholesky [B, N, 3], got {tuple(positions.shape)}, "
                         f"{tuple(cholesky.shape)}")
    positions, cholesky, image = (fp32_copy(t) for t in (positions, cholesky, image))
    valid = valid.to(torch.bool).contiguous()
    batch, channels, height, width = image.shape
    num = positions.shape[1]
    if channels > MAX_CHANNELS:
        raise ValueError(f"the adjoint handles at most {MAX_CHANNELS} channels, got {channels}")
    adjoint = torch.zeros((batch, num, channels), dtype=torch.float32)
    squared_norms = torch.zeros((batch, num), dtype=torch.float32)
    if batch * num:
        library().splat_colour_adjoint(image.data_ptr(), positions.data_ptr(), cholesky.data_ptr(), valid.data_ptr(),
                                       batch, num, channels, height, width, check_cutoff(cutoff), adjoint.data_ptr(),
                                       squared_norms.data_ptr(), torch.get_num_threads())
    return adjoint, squared_norms
