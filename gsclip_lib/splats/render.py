"""Render splats to images through the fastest rasterizer the tensors' device allows (METHOD.md 1).

Five implementations compute the same accumulated sum (kernels/):

- ``triton``: the batched Triton kernels, for CUDA tensors: every splat against every pixel;
- ``triton_tiled``: the tile-culled Triton kernels: each 16x16 tile reads only the splats whose
  cutoff box touches it (18x to 60x fewer evaluations at 224x224, ``benchmarks/gpu_check.json``);
  the paper profile's choice once ``make gpu-check`` has passed on the machine;
- ``cpu``: the fused C++ kernel (AVX2, OpenMP), compiled with g++ on first use;
- ``windowed``: the PyTorch path that evaluates each splat only inside its cutoff window (falls back
  to a dense evaluation with hand-written backward when windows would be as large as the image);
- ``dense``: the pure-PyTorch twin that builds ``[B, N, H, W]``, the readable reference.

``auto`` takes ``triton`` for CUDA tensors (the dense kernels: the tiled ones have not yet run
compiled on a GPU of this project's), else ``cpu``, or ``windowed`` on a machine that cannot
build the C++ kernel. All take the same cutoff: a splat's weight is zero beyond ``cutoff`` standard
deviations (Mahalanobis radius). The project default is 3.5, where the weight has fallen to 2.2e-3;
``math.inf`` gives the exact, untruncated sum.
"""

from __future__ import annotations

import math
import os
import typing
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from gsclip_lib.errors import InputError, positive_int
from gsclip_lib.params import RenderBackend
from gsclip_lib.splats.container import Splats, check_renderable
from kernels.rasterize_cpu import cpu_kernel_available, rasterize_cpu
from kernels.rasterize_torch import rasterize_dense_torch
from kernels.rasterize_windowed import rasterize_windowed_torch

BACKENDS = typing.get_args(RenderBackend)
DEFAULT_CUTOFF = 3.5


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete rasterizer ``backend`` means for tensors on ``device``."""
    if backend not in BACKENDS:
        raise InputError(f"unknown render backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        if device.type == "cuda":
            return "triton"
        return "cpu" if cpu_kernel_available() else "windowed"
    return backend


def check_cutoff(cutoff: float) -> None:
    if not (isinstance(cutoff, (int, float)) and cutoff > 0) or math.isnan(cutoff):
        raise InputError(f"the render cutoff must be a positive number of standard deviations, got {cutoff!r}")


@dataclass
class RenderPasses:
    """The rasterizer passes a computation ran, counted where they run (pass one to
    :func:`render_splats` and the colour solve): renders (``forward``), gradients of a render
    (``backward``: geometry and colours together), and colour adjoints ``W^T r`` on their own
    (``adjoint``: a kernel that computes nothing else). What a fitting step costs is their sum,
    each weighted by its kernel's time."""

    forward: int = 0
    backward: int = 0
    adjoint: int = 0

    def count_backward(self, grad: Tensor) -> None:  # a tensor hook: the gradient reached a render
        self.backward += 1

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def render_splats(
    splats: Splats,
    height: int,
    width: int,
    *,
    backend: str = "auto",
    cutoff: float = DEFAULT_CUTOFF,
    validate: bool = True,
    passes: RenderPasses | None = None,
) -> Tensor:  # [B, C, H, W]
    """I(p) = sum_i c_i exp(-1/2 (p - mu_i)^T Sigma_i^-1 (p - mu_i)) over the valid splats.

    Valid splats must be renderable (:func:`gsclip_lib.splats.container.check_renderable`): a NaN
    centre or a zero Cholesky diagonal is an error here, never a splat that silently vanishes. A
    caller that renders the same checked geometry many times (the colour solve's products) checks
    it once and passes ``validate=False``: the check costs a host-device sync. ``passes`` counts
    this render, and its backward when a gradient reaches it.
    """
    if validate:
        for name, value in (("height", height), ("width", width)):
            positive_int(value, f"render {name}")
        check_cutoff(cutoff)
        check_renderable(splats)
    rendered = _rasterize(splats, height, width, backend, cutoff)
    if passes is not None:
        passes.forward += 1
        if rendered.requires_grad:
            rendered.register_hook(passes.count_backward)
    return rendered


def _rasterize(splats: Splats, height: int, width: int, backend: str, cutoff: float) -> Tensor:  # [B, C, H, W]
    chosen = resolve_backend(backend, splats.device)
    if chosen.startswith("triton") and splats.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise InputError(
            f"the {chosen} backend needs CUDA tensors, these are on {splats.device}; use backend 'auto', "
            "'cpu' or 'windowed' on the CPU (or set TRITON_INTERPRET=1 before importing it, to run Triton's interpreter)"
        )
    args = (splats.positions, splats.cholesky, splats.colours, splats.valid, height, width, cutoff)
    if chosen == "triton":
        # Imported here: the Triton module needs TRITON_INTERPRET decided before its import, and a
        # CPU-only user should not pay for importing Triton at all.
        from kernels.rasterize_triton import rasterize_triton

        return rasterize_triton(*args)
    if chosen == "triton_tiled":
        from kernels.rasterize_triton_tiled import rasterize_triton_tiled

        return rasterize_triton_tiled(*args)
    if chosen == "cpu":
        if splats.device.type != "cpu":
            raise InputError(f"the cpu backend needs CPU tensors, these are on {splats.device}")
        if not cpu_kernel_available():
            raise InputError("the cpu backend needs a C++ compiler (g++) to build its kernel; use 'windowed'")
        return rasterize_cpu(*args)
    if chosen == "windowed":
        return rasterize_windowed_torch(*args)
    return rasterize_dense_torch(*args)
