"""One-command GPU check of the Triton rasterizers: correctness at paper shapes, speed, and a roofline.

``python -m benchmarks.gpu_check --out benchmarks/gpu_check.json`` (``make gpu-check``) writes one JSON
file. Two parts:

CPU part (always computed, no GPU needed):

- ``evaluation_counts``: splat-pixel evaluations (weights computed) per 224x224 image for the paper's
  four splat counts (3136, 1600, 900, 400) at params.yaml's cutoff of 3.5: dense kernels (N * H * W,
  both directions) against the tile-culled ones (forward: each tile's pixels times its list's length;
  backward: each splat's pixel box), counted by ``kernels.tiling``. The splats are placed as a fitter
  leaves them (see :func:`fitted_like_splats`): the paper's grid initialization (one splat per cell,
  one-sigma radius half a cell) with each centre jittered by up to 0.3 cell, each axis' sigma scaled
  by a log-normal factor (sigma of the log 0.3) and a uniform random rotation, so that neighbours
  overlap as in a fitted image and their boxes vary in size and shape.
- ``roofline_estimate``: images per second for a 1000-step fit (forward + backward per step, no
  optimizer update), dense against tiled, at the four counts, on an assumed H100 SXM (67 TFLOP/s fp32
  without tensor cores, 3.35 TB/s HBM3). Each pass takes ``max(flops / peak, bytes / bandwidth)``,
  with flops and bytes from the evaluation counts and the model in ``METHOD`` below, twice: with
  every byte the kernels request served by DRAM (``no_cache_reuse``) and with each byte once
  (``cache_reuse``). Both are optimistic in compute: exp is counted as one flop, padding lanes,
  the binning's flops and launch overhead are left out.

GPU part (only with CUDA; otherwise one line says it was skipped and an earlier GPU section in the
output file is kept):

1. ``correctness``: the dense and the tiled Triton kernels against the float64 PyTorch twin at
   224x224 with 400 and 3136 splats, batches 1, 64 and 4096, forward and backward (gradients of
   centres, Cholesky factors and colours of <image, random cotangent>). Both Triton kernels run on
   the whole batch and are compared with each other there; the twin materializes ``[B, N, H, W]``
   and runs one image at a time on the first and last image of each batch (images are independent,
   so that is the same as slicing a full-batch run). A case passes when every error is at most
   ``TOLERANCE`` times max(1, the largest reference entry); any failure makes the exit status 1.
2. ``benchmark``: 4096 images of 400 splats, 100 forward+backward steps of each kernel after a
   warm-up, forward and backward timed separately with CUDA events; images per second for a
   100-step fit and, scaled, a 1000-step fit; achieved FLOP/s and bytes/s against the device's peak
   from ``DEVICE_PEAKS`` (matched on the device name; unknown devices fall back to the H100's
   figures, marked as such).

``--smoke`` runs the GPU part on the CPU under the Triton interpreter at tiny shapes (the test suite
uses it); its figures say nothing about speed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from benchmarks.machine import machine_info
from gsclip_lib.atomic_files import write_json
from kernels.tiling import bin_splats_to_tiles, count_evaluations

PAPER_SPLAT_COUNTS = (3136, 1600, 900, 400)
IMAGE_SIZE = 224
CHANNELS = 3
CUTOFF = 3.5  # params.yaml's fit_photos.optimizer.cutoff
TILE_SIZE = 16  # kernels.rasterize_triton_tiled.DEFAULT_TILE_SIZE
TOLERANCE = 1e-4  # max error allowed, relative to max(1, the reference's largest entry)

# Peak fp32 (non-tensor-core) FLOP/s and memory bandwidth in bytes/s, from NVIDIA's data sheets.
# Matched in order on the CUDA device name, so the more specific names come first.
DEVICE_PEAKS: tuple[tuple[str, float, float], ...] = (
    ("H200", 67e12, 4.8e12),
    ("H100 PCIe", 51e12, 2.0e12),
    ("H100 NVL", 60e12, 3.9e12),
    ("H100", 67e12, 3.35e12),  # SXM5
    ("A100-SXM4-80GB", 19.5e12, 2.039e12),
    ("A100 80GB PCIe", 19.5e12, 1.935e12),
    ("A100", 19.5e12, 1.555e12),  # 40 GB
    ("L40S", 91.6e12, 0.864e12),
    ("L4", 30.3e12, 0.3e12),
    ("RTX 4090", 82.6e12, 1.008e12),
)
ROOFLINE_DEVICE = "H100"  # the assumed device of the CPU-side estimate (H100 SXM5)

# Flops per splat-pixel evaluation, counted from the Triton kernels' inner loops (an add or a
# multiply is 1, exp is 1, compares and selects 0; the hoisted per-splat factors are not counted):
# the weight is 11 (dx, dy: 2; z1: 1; z2: 3; d^2: 3; -d^2/2: 1; exp: 1), the forward adds a
# multiply-add per channel; the backward recomputes the weight, then per channel 2 for the colour
# gradient and 2 for dL/dw (less 1: the channel sum has C - 1 adds), then 16 for the chain to
# (mu, L) and its five pixel sums: 26 + 4C.
def flops_forward(channels: int) -> int:
    return 11 + 2 * channels


def flops_backward(channels: int) -> int:
    return 11 + 4 * channels - 1 + 16


def splat_record_bytes(channels: int) -> int:
    """Bytes a kernel reads per splat: centre (2 fp32), Cholesky factor (3), colour (C), valid (1 byte)."""
    return 4 * (5 + channels) + 1


# Kernel block sizes the byte model needs (kernels/rasterize_triton.py).
DENSE_FWD_BLOCK_P = 64
DENSE_BWD_BLOCK_N = 32
SORT_BYTES_PER_PAIR = 128  # binning: radix sort of 8-byte keys, ~8 passes reading and writing

METHOD = {
    "evaluation": "one splat's weight computed at one pixel (padding lanes not counted)",
    "flops_per_evaluation": {
        "forward": f"11 + 2C = {flops_forward(CHANNELS)} at C = {CHANNELS}",
        "backward": f"26 + 4C = {flops_backward(CHANNELS)} at C = {CHANNELS}",
        "counting": "add, multiply and exp count 1 each; compares, selects, integer work 0",
    },
    "bytes_model": {
        "meaning": "bytes requested from global memory, as if no cache served any of them",
        "splat_record": f"4 * (5 + C) + 1 = {splat_record_bytes(CHANNELS)} bytes (centre, factor, colour, valid)",
        "dense_forward": f"every {DENSE_FWD_BLOCK_P}-pixel program reads all N records; + the image written",
        "dense_backward": (
            f"every {DENSE_BWD_BLOCK_N}-splat program reads the whole image cotangent (4C bytes a pixel); "
            "+ records read and gradients written once"
        ),
        "tiled_forward": (
            f"per (tile, splat) pair: a record and a 4-byte index; {SORT_BYTES_PER_PAIR} bytes of binning "
            "sort per pair; records read once for the boxes; + the image written"
        ),
        "tiled_backward": (
            "every evaluation reads its pixel's cotangent (4C bytes: one splat per program); "
            "+ per splat its record, its 16-byte box, its gradients written"
        ),
    },
    "bytes_unique": (
        "each tensor once per pass per image (cotangent, records, image, gradients, boxes) plus the binning's "
        "sort and lists: what DRAM sees when caches hold one image's working set"
    ),
    "roofline": (
        "time of a pass = max(flops / peak FLOP/s, bytes / peak bandwidth), with bytes_model's requested "
        "bytes (no_cache_reuse, pessimistic) or bytes_unique (cache_reuse, optimistic); no launch overhead"
    ),
    "achieved_bandwidth": "bytes_model's requested bytes over the measured time: may exceed DRAM peak where caches serve",
}


def device_peaks(name: str) -> dict[str, Any]:
    """Peak fp32 FLOP/s and bandwidth of a CUDA device, by name; the H100's, marked, when unknown."""
    for key, flops, bandwidth in DEVICE_PEAKS:
        if key.lower() in name.lower():
            return {"device": name, "table_key": key, "peak_fp32_flops": flops, "peak_bytes_per_s": bandwidth,
                    "source": "table"}
    _, flops, bandwidth = next(entry for entry in DEVICE_PEAKS if entry[0] == ROOFLINE_DEVICE)
    return {"device": name, "table_key": None, "peak_fp32_flops": flops, "peak_bytes_per_s": bandwidth,
            "source": f"FALLBACK: {name!r} is not in DEVICE_PEAKS; {ROOFLINE_DEVICE} SXM figures assumed"}


@dataclass(frozen=True)
class SplatBatch:
    positions: Tensor  # [B, N, 2]
    cholesky: Tensor  # [B, N, 3]
    colours: Tensor  # [B, N, C]
    valid: Tensor  # [B, N] bool

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.positions, self.cholesky, self.colours, self.valid

    def to(self, device: str | torch.device) -> "SplatBatch":
        return SplatBatch(*(t.to(device) for t in self.tensors()))

    def images(self, index: int) -> "SplatBatch":
        """The one-image batch of image ``index``."""
        return SplatBatch(*(t[index : index + 1] for t in self.tensors()))


def fitted_like_splats(
    batch: int, n_splats: int, height: int, width: int, channels: int = CHANNELS, seed: int = 0
) -> SplatBatch:
    """Splats laid out as a fit leaves them (module docstring): a jittered grid, varied anisotropic
    scales around half a cell, random rotations; colours uniform in [0, 1) times the grid
    initialization's flat-image gain, so images are of order 1. Deterministic in ``seed``; CPU."""
    generator = torch.Generator().manual_seed(seed)
    rows = max(1, min(n_splats, round(math.sqrt(n_splats * height / width))))
    cols = max(1, n_splats // rows)
    cell_h, cell_w = height / rows, width / cols
    grid_y, grid_x = torch.meshgrid(
        (torch.arange(rows) + 0.5) * cell_h, (torch.arange(cols) + 0.5) * cell_w, indexing="ij"
    )
    centres = torch.stack([grid_x, grid_y], -1).reshape(-1, 2)[None].expand(batch, -1, -1)  # [B, R*C, 2]
    spare = n_splats - rows * cols  # where N is not a grid: uniform centres
    spare_centres = torch.rand(batch, spare, 2, generator=generator) * torch.tensor([width, height])
    centres = torch.cat([centres, spare_centres], 1)
    cell = torch.tensor([cell_w, cell_h])
    positions = centres + (torch.rand(batch, n_splats, 2, generator=generator) - 0.5) * 0.6 * cell

    base_sigma = min(cell_h, cell_w) / 2
    sigmas = base_sigma * torch.exp(0.3 * torch.randn(batch, n_splats, 2, generator=generator))  # [B, N, 2]
    angle = torch.rand(batch, n_splats, generator=generator) * math.pi
    cos, sin = torch.cos(angle), torch.sin(angle)
    var_u, var_v = sigmas[..., 0] ** 2, sigmas[..., 1] ** 2
    # Sigma = R diag(var_u, var_v) R^T, then its Cholesky factor in closed form.
    sigma_xx = cos**2 * var_u + sin**2 * var_v
    sigma_xy = cos * sin * (var_u - var_v)
    sigma_yy = sin**2 * var_u + cos**2 * var_v
    l11 = torch.sqrt(sigma_xx)
    l21 = sigma_xy / l11
    l22 = torch.sqrt(sigma_yy - l21**2)
    cholesky = torch.stack([l11, l21, l22], -1)

    gain = cell_h * cell_w / (2 * math.pi * base_sigma**2)
    colours = torch.rand(batch, n_splats, channels, generator=generator) * gain
    valid = torch.ones(batch, n_splats, dtype=torch.bool)
    return SplatBatch(positions.contiguous(), cholesky.contiguous(), colours, valid)


# CPU part: evaluation counts and the roofline estimate.


def evaluation_counts(
    n_splats: int, image_size: int = IMAGE_SIZE, images: int = 4, tile_size: int = TILE_SIZE, cutoff: float = CUTOFF
) -> dict[str, Any]:
    """Dense and tiled evaluations per image (mean over ``images`` fitted-like images)."""
    splats = fitted_like_splats(images, n_splats, image_size, image_size)
    bins = bin_splats_to_tiles(
        splats.positions, splats.cholesky, splats.valid, image_size, image_size, cutoff, tile_size
    )
    counts = count_evaluations(bins, n_splats, image_size, image_size)
    per_image = {
        key: counts[key] / images
        for key in ("dense_forward", "dense_backward", "tiled_forward", "tiled_backward", "pairs")
    }
    return {
        "num_splats": n_splats,
        "image_size": image_size,
        "tile_size": tile_size,
        "cutoff": cutoff,
        "images_averaged": images,
        "per_image": per_image,
        "forward_ratio_dense_over_tiled": counts["forward_ratio_dense_over_tiled"],
        "backward_ratio_dense_over_tiled": counts["backward_ratio_dense_over_tiled"],
        "mean_splats_per_tile": per_image["pairs"] / bins.tiles_per_image,
    }


def pass_costs(counts: dict[str, Any], channels: int = CHANNELS) -> dict[str, dict[str, float]]:
    """Flops and bytes per image of each pass (dense/tiled x forward/backward), from the model.

    ``bytes_requested``: every global-memory read and write the kernels issue, as if no cache helped
    (the pessimistic bound). ``bytes_unique``: each tensor's bytes once per pass (one image's
    cotangent and splat records fit in L2 many times over, and a launch's programs run image by
    image), plus the binning's sort and lists, which do not fit.
    """
    per_image = counts["per_image"]
    n_splats, size = counts["num_splats"], counts["image_size"]
    pixels = size * size
    record = splat_record_bytes(channels)
    image_bytes = 4 * channels * pixels
    grad_bytes = 4 * (5 + channels)
    binning = per_image["pairs"] * (4 + SORT_BYTES_PER_PAIR)
    return {
        "dense_forward": {
            "flops": per_image["dense_forward"] * flops_forward(channels),
            "bytes_requested": n_splats * record * math.ceil(pixels / DENSE_FWD_BLOCK_P) + image_bytes,
            "bytes_unique": n_splats * record + image_bytes,
        },
        "dense_backward": {
            "flops": per_image["dense_backward"] * flops_backward(channels),
            "bytes_requested": image_bytes * math.ceil(n_splats / DENSE_BWD_BLOCK_N) + n_splats * (record + grad_bytes),
            "bytes_unique": image_bytes + n_splats * (record + grad_bytes),
        },
        "tiled_forward": {
            "flops": per_image["tiled_forward"] * flops_forward(channels),
            "bytes_requested": per_image["pairs"] * (record + 4) + binning + n_splats * record + image_bytes,
            "bytes_unique": binning + n_splats * record + image_bytes,
        },
        "tiled_backward": {
            "flops": per_image["tiled_backward"] * flops_backward(channels),
            "bytes_requested": per_image["tiled_backward"] * 4 * channels + n_splats * (record + 16 + grad_bytes),
            "bytes_unique": image_bytes + n_splats * (record + 16 + grad_bytes),
        },
    }


def roofline(counts: dict[str, Any], peaks: dict[str, Any], steps: int = 1000) -> dict[str, Any]:
    """Estimated images/s of a ``steps``-step fit, dense and tiled, from the costs and the peaks:
    with every requested byte from DRAM (``no_cache_reuse``, a lower bound on speed) and with each
    byte from DRAM once (``cache_reuse``, an upper bound)."""
    costs = pass_costs(counts)
    result: dict[str, Any] = {"num_splats": counts["num_splats"], "steps": steps, "per_image_pass": {}}
    for model, byte_key in (("no_cache_reuse", "bytes_requested"), ("cache_reuse", "bytes_unique")):
        step_seconds = {"dense": 0.0, "tiled": 0.0}
        for name, cost in costs.items():
            compute = cost["flops"] / peaks["peak_fp32_flops"]
            memory = cost[byte_key] / peaks["peak_bytes_per_s"]
            entry = result["per_image_pass"].setdefault(name, {**cost})
            entry[model] = {"seconds": max(compute, memory), "bound": "compute" if compute >= memory else "memory",
                            "flops_per_byte": cost["flops"] / cost[byte_key]}
            step_seconds[name.split("_")[0]] += max(compute, memory)
        result[model] = {
            "dense_images_per_s": 1.0 / (steps * step_seconds["dense"]),
            "tiled_images_per_s": 1.0 / (steps * step_seconds["tiled"]),
            "speedup_tiled_over_dense": step_seconds["dense"] / step_seconds["tiled"],
        }
    return result


def cpu_part(splat_counts=PAPER_SPLAT_COUNTS, image_size: int = IMAGE_SIZE, images: int = 4) -> dict[str, Any]:
    counts = [evaluation_counts(n, image_size, images) for n in splat_counts]
    peaks = device_peaks(ROOFLINE_DEVICE)
    peaks["source"] = "assumed for the estimate: H100 SXM5 data sheet, fp32 without tensor cores, HBM3"
    return {
        "evaluation_counts": counts,
        "roofline_estimate": {"assumed_device": peaks, "per_count": [roofline(c, peaks) for c in counts]},
    }


# GPU part (also runs on the CPU under TRITON_INTERPRET=1, for --smoke and the tests).


def _grads_through(render: Callable, splats: SplatBatch, height: int, width: int, cutoff: float,
                   cotangent: Tensor, dtype: torch.dtype | None = None) -> list[Tensor]:
    """[image, grad positions, grad cholesky, grad colours] of <render(splats), cotangent>."""
    leaves = [t.detach().to(dtype or t.dtype).clone().requires_grad_()
              for t in (splats.positions, splats.cholesky, splats.colours)]
    image = render(*leaves, splats.valid, height, width, cutoff)
    grads = torch.autograd.grad(image, leaves, cotangent.to(image.dtype))
    return [image.detach(), *grads]


OUTPUT_NAMES = ("image", "grad_positions", "grad_cholesky", "grad_colours")


def compare(got: list[Tensor], reference: list[Tensor]) -> dict[str, dict[str, float | bool]]:
    """Max abs error and the reference's scale per output; passes at TOLERANCE * max(1, scale)."""
    result = {}
    for name, a, b in zip(OUTPUT_NAMES, got, reference):
        b = b.to(a.dtype)
        error = float((a - b).abs().max()) if a.numel() else 0.0
        scale = float(b.abs().max()) if b.numel() else 0.0
        result[name] = {"max_abs_error": error, "reference_max_abs": scale,
                        "passed": bool(error <= TOLERANCE * max(1.0, scale))}
    return result


def check_case(batch: int, n_splats: int, image_size: int, device: str, tile_size: int = TILE_SIZE,
               cutoff: float = CUTOFF, seed: int = 0) -> dict[str, Any]:
    """One correctness case: tiled vs dense Triton on the whole batch, both vs the twin on the first
    and last image."""
    from kernels.rasterize_torch import rasterize_dense_torch
    from kernels.rasterize_triton import rasterize_triton
    from kernels.rasterize_triton_tiled import rasterize_triton_tiled

    def tiled(*args):
        return rasterize_triton_tiled(*args, tile_size=tile_size)

    splats = fitted_like_splats(batch, n_splats, image_size, image_size, seed=seed).to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    cotangent = torch.randn(batch, CHANNELS, image_size, image_size, generator=generator, device=device)
    started = time.perf_counter()
    ours_tiled = _grads_through(tiled, splats, image_size, image_size, cutoff, cotangent)
    ours_dense = _grads_through(rasterize_triton, splats, image_size, image_size, cutoff, cotangent)
    tiled_vs_dense = compare(ours_tiled, ours_dense)
    checked = sorted({0, batch - 1})
    versus_twin: dict[str, dict[str, Any]] = {"tiled": {}, "dense": {}}
    for index in checked:  # one image at a time: the twin holds [1, N, H, W] float64 tensors
        twin = _grads_through(rasterize_dense_torch, splats.images(index), image_size, image_size, cutoff,
                              cotangent[index : index + 1], dtype=torch.float64)
        for kind, ours in (("tiled", ours_tiled), ("dense", ours_dense)):
            errors = compare([t[index : index + 1] for t in ours], twin)
            for name, entry in errors.items():  # worst over the checked images
                worst = versus_twin[kind].get(name)
                if worst is None or entry["max_abs_error"] > worst["max_abs_error"]:
                    versus_twin[kind][name] = entry
        del twin
    passed = all(entry["passed"] for group in (tiled_vs_dense, *versus_twin.values()) for entry in group.values())
    return {
        "batch": batch, "num_splats": n_splats, "image_size": image_size, "tile_size": tile_size,
        "cutoff": cutoff, "twin_images": checked, "tiled_vs_dense_whole_batch": tiled_vs_dense,
        "tiled_vs_twin": versus_twin["tiled"], "dense_vs_twin": versus_twin["dense"],
        "passed": passed, "seconds": time.perf_counter() - started,
    }


class _Timer:
    """Elapsed seconds of a region: CUDA events on a GPU, the wall clock on the CPU."""

    def __init__(self, device: str) -> None:
        self.cuda = torch.device(device).type == "cuda"

    def __call__(self, run: Callable[[], Any]) -> tuple[Any, float]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = run()
            end.record()
            end.synchronize()
            return result, start.elapsed_time(end) / 1e3
        started = time.perf_counter()
        result = run()
        return result, time.perf_counter() - started


def time_kernel(render: Callable, splats: SplatBatch, image_size: int, cutoff: float, steps: int,
                warmup: int, device: str) -> dict[str, float]:
    """Mean forward and backward seconds per step of ``render`` on ``splats``."""
    timer = _Timer(device)
    leaves = [t.detach().clone().requires_grad_() for t in (splats.positions, splats.cholesky, splats.colours)]
    generator = torch.Generator(device=device).manual_seed(1)
    batch = splats.positions.shape[0]
    cotangent = torch.randn(batch, CHANNELS, image_size, image_size, generator=generator, device=device)
    forward_seconds = backward_seconds = 0.0

    def forward_pass() -> Tensor:
        return render(*leaves, splats.valid, image_size, image_size, cutoff)

    for step in range(warmup + steps):
        rendered, forward = timer(forward_pass)
        _, backward = timer(lambda: torch.autograd.grad(rendered, leaves, cotangent))
        if step >= warmup:
            forward_seconds += forward
            backward_seconds += backward
    return {"forward_seconds_per_step": forward_seconds / steps, "backward_seconds_per_step": backward_seconds / steps}


def benchmark(batch: int, n_splats: int, image_size: int, steps: int, warmup: int, device: str,
              peaks: dict[str, Any], tile_size: int = TILE_SIZE, cutoff: float = CUTOFF) -> dict[str, Any]:
    """Both kernels: images/s for ``steps``- and 1000-step fits, achieved FLOP/s and bytes/s vs peak."""
    from kernels.rasterize_triton import rasterize_triton
    from kernels.rasterize_triton_tiled import rasterize_triton_tiled

    splats = fitted_like_splats(batch, n_splats, image_size, image_size, seed=2).to(device)
    counts = evaluation_counts(n_splats, image_size, images=min(batch, 4), tile_size=tile_size, cutoff=cutoff)
    costs = pass_costs(counts)
    kernels = {
        "dense": rasterize_triton,
        "tiled": lambda *args: rasterize_triton_tiled(*args, tile_size=tile_size),
    }
    result: dict[str, Any] = {
        "batch": batch, "num_splats": n_splats, "image_size": image_size, "tile_size": tile_size,
        "cutoff": cutoff, "steps_timed": steps, "warmup_steps": warmup, "peaks": peaks,
        "note": "per step: the render forward (tiled: including binning) and its backward; no optimizer update",
    }
    for kind, render in kernels.items():
        times = time_kernel(render, splats, image_size, cutoff, steps, warmup, device)
        step_seconds = times["forward_seconds_per_step"] + times["backward_seconds_per_step"]
        entry: dict[str, Any] = {**times}
        for fit_steps in (steps, 1000):
            entry[f"images_per_s_{fit_steps}_step_fit"] = batch / (fit_steps * step_seconds)
        for direction in ("forward", "backward"):
            cost = costs[f"{kind}_{direction}"]
            seconds = times[f"{direction}_seconds_per_step"]
            flops_per_s = batch * cost["flops"] / seconds
            bytes_per_s = batch * cost["bytes_requested"] / seconds
            entry[direction] = {
                "evaluations_per_image": counts["per_image"][f"{kind}_{direction}"],
                "flops_per_s": flops_per_s, "bytes_requested_per_s": bytes_per_s,
                "fraction_of_peak_flops": flops_per_s / peaks["peak_fp32_flops"],
                "fraction_of_peak_bandwidth": bytes_per_s / peaks["peak_bytes_per_s"],
            }
        result[kind] = entry
    result["speedup_tiled_over_dense"] = (
        (result["dense"]["forward_seconds_per_step"] + result["dense"]["backward_seconds_per_step"])
        / (result["tiled"]["forward_seconds_per_step"] + result["tiled"]["backward_seconds_per_step"])
    )
    return result


@dataclass(frozen=True)
class GpuSettings:
    image_size: int = IMAGE_SIZE
    splat_counts: tuple[int, ...] = (400, 3136)
    batches: tuple[int, ...] = (1, 64, 4096)
    bench_batch: int = 4096
    bench_splats: int = 400
    bench_steps: int = 100
    warmup_steps: int = 3

    @classmethod
    def smoke(cls) -> "GpuSettings":
        """Interpreter-sized: exercises every code path in seconds; says nothing about speed."""
        return cls(image_size=19, splat_counts=(9,), batches=(1, 3), bench_batch=2, bench_splats=9,
                   bench_steps=2, warmup_steps=1)


def gpu_part(settings: GpuSettings, device: str) -> dict[str, Any]:
    peaks = device_peaks(torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu")
    cases = []
    for n_splats in settings.splat_counts:
        for batch in settings.batches:
            case = check_case(batch, n_splats, settings.image_size, device)
            print(f"check B={batch} N={n_splats} {settings.image_size}x{settings.image_size}: "
                  f"{'pass' if case['passed'] else 'FAIL'} ({case['seconds']:.1f} s)", flush=True)
            cases.append(case)
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    bench = benchmark(settings.bench_batch, settings.bench_splats, settings.image_size, settings.bench_steps,
                      settings.warmup_steps, device, peaks)
    for kind in ("dense", "tiled"):
        entry = bench[kind]
        print(f"bench {kind}: forward {entry['forward_seconds_per_step'] * 1e3:.2f} ms, backward "
              f"{entry['backward_seconds_per_step'] * 1e3:.2f} ms per step of {settings.bench_batch} images; "
              f"{entry['images_per_s_1000_step_fit']:.1f} images/s for a 1000-step fit", flush=True)
    return {
        "device": peaks["device"],
        "machine": {**machine_info(), "cuda_device": peaks["device"],
                    "cuda_version": torch.version.cuda,
                    "triton_interpret": os.environ.get("TRITON_INTERPRET", "0")},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": settings.__dict__ | {"splat_counts": list(settings.splat_counts), "batches": list(settings.batches)},
        "tolerance": f"max abs error <= {TOLERANCE} * max(1, max abs reference), per output",
        "correctness": cases,
        "passed": all(case["passed"] for case in cases),
        "benchmark": bench,
    }


def run(out: str | os.PathLike, smoke: bool = False) -> int:
    """Write the report to ``out``; the exit status (1 on a correctness failure)."""
    started = time.perf_counter()
    out = Path(out)
    previous: dict[str, Any] = {}
    if out.is_file():
        try:
            previous = json.loads(out.read_text())
        except json.JSONDecodeError:
            previous = {}
    report: dict[str, Any] = {
        "description": __doc__.split("\n")[0],
        "method": METHOD,
        "splat_layout": (
            "fitted_like_splats: the grid initialization (one splat per cell, one-sigma radius half a cell), "
            "centres jittered uniformly by up to 0.3 cell, per-axis sigma times exp(0.3 * normal), uniform "
            "rotation; colours uniform [0, 1) times the flat-image gain"
        ),
        "machine": machine_info(),
    }
    report.update(cpu_part(image_size=IMAGE_SIZE))
    status = 0
    if smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are first imported
        report["gpu"] = gpu_part(GpuSettings.smoke(), "cpu") | {"smoke": True}
        status = 0 if report["gpu"]["passed"] else 1
    elif torch.cuda.is_available():
        report["gpu"] = gpu_part(GpuSettings(), "cuda")
        status = 0 if report["gpu"]["passed"] else 1
    else:
        print("no CUDA device: GPU check skipped (the CPU-side evaluation counts and roofline estimate were written)")
        # Keep an earlier GPU run's section: it carries its own machine description.
        report["gpu"] = previous.get("gpu") if not (previous.get("gpu") or {}).get("smoke") else None
    report["runtime_seconds"] = time.perf_counter() - started
    write_json(out, report)
    for entry in report["roofline_estimate"]["per_count"]:
        counts = next(c for c in report["evaluation_counts"] if c["num_splats"] == entry["num_splats"])
        print(f"N={entry['num_splats']:>4}: evaluations saved forward {counts['forward_ratio_dense_over_tiled']:.1f}x, "
              f"backward {counts['backward_ratio_dense_over_tiled']:.1f}x; roofline (H100, 1000-step fit) images/s "
              f"dense {entry['cache_reuse']['dense_images_per_s']:.1f} vs tiled "
              f"{entry['no_cache_reuse']['tiled_images_per_s']:.0f} to {entry['cache_reuse']['tiled_images_per_s']:.0f}")
    if status:
        print("GPU check FAILED: see 'correctness' in", out, file=sys.stderr)
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/gpu_check.json", help="JSON file to write")
    parser.add_argument("--smoke", action="store_true",
                        help="the GPU part on the CPU under the Triton interpreter, tiny shapes (for tests)")
    args = parser.parse_args(argv)
    return run(args.out, smoke=args.smoke)


if __name__ == "__main__":
    sys.exit(main())
