"""One-command GPU check of the Triton rasterizers: correctness at the paper's shapes, speed, a roofline.

``python -m benchmarks.gpu_check --out benchmarks/gpu_check.json`` (``make gpu-check``) writes one
JSON file, at the shapes of ``profiles/paper.yaml`` (its splat counts, image size, channels, cutoff).

CPU part (always computed, no GPU needed):

- ``evaluation_counts``: splat-pixel evaluations per image at each paper count, dense kernels
  (N * H * W) against the tile-culled ones (forward: each tile's pixels times its list's length;
  backward: each splat's pixel box), counted by ``kernels.tiling`` on splats placed as a fitter
  leaves them (:func:`fitted_like_splats`).
- ``roofline_estimate``: images per second of a 1000-step fit (forward + backward per step, no
  optimizer update), dense against tiled, on an assumed H100 SXM, by :mod:`benchmarks.cost_model`.
- ``kernel_resources``: every kernel compiled for sm_80 and sm_90 (:mod:`kernels.aot_compile`):
  registers, spills, shared memory, blocks per SM and occupancy; a spill or a budget broken fails.

GPU part (only with CUDA; otherwise one line says it was skipped and an earlier GPU section of the
output file is kept):

1. ``correctness``: each kernel of :data:`KERNELS` against the float64 PyTorch twin with the
   smallest and the largest paper count, batches 1, 64 and 4096, forward and backward (gradients
   of <image, random cotangent>); the Triton kernels compared on the whole batch, the twin on the
   first and last image. A case passes when every error is at most ``TOLERANCE`` times max(1, the
   largest reference entry); any failure makes the exit status 1.
2. ``benchmark``: 4096 images at the smallest paper count, 100 forward+backward steps of each kernel
   after a warm-up, timed with CUDA events: images per second for a 100- and a 1000-step fit,
   achieved FLOP/s and bytes/s against the device's peak.

``--smoke`` runs the GPU part on the CPU under the Triton interpreter at tiny shapes (for the tests);
its figures say nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from benchmarks.cost_model import METHOD, ROOFLINE_DEVICE, device_peaks, pass_costs, roofline
from benchmarks.harness import format_table, machine_info, paper_params, paper_splat_counts, run_in_child
from gsclip_lib.atomic_files import write_json
from gsclip_lib.splats.container import Splats
from kernels.tiling import bin_splats_to_tiles, count_evaluations

PAPER_SPLAT_COUNTS = paper_splat_counts()
IMAGE_SIZE = paper_params().data.image_size
CHANNELS = paper_params().data.channels
CUTOFF = paper_params().fit.optimizer.cutoff
TILE_SIZE = 16  # kernels.rasterize_triton_tiled.DEFAULT_TILE_SIZE
TOLERANCE = 1e-4  # max error allowed, relative to max(1, the reference's largest entry)


def _tiled(*args: Any, tile_size: int = TILE_SIZE) -> Tensor:
    from kernels.rasterize_triton_tiled import rasterize_triton_tiled

    return rasterize_triton_tiled(*args, tile_size=tile_size)


def _dense(*args: Any, tile_size: int | None = None) -> Tensor:  # no tiles
    from kernels.rasterize_triton import rasterize_triton

    return rasterize_triton(*args)


# The kernels checked and timed, by the name their cost model uses ("dense" / "tiled" in
# cost_model.pass_costs). Imported on first call: TRITON_INTERPRET must be decided before.
KERNELS: dict[str, Callable[..., Tensor]] = {"dense": _dense, "tiled": _tiled}


def fitted_like_splats(
    batch: int, n_splats: int, height: int, width: int, channels: int = CHANNELS, seed: int = 0
) -> Splats:
    """Splats laid out as a fit leaves them: the grid initialization (one splat per cell, one-sigma
    radius half a cell), each centre jittered by up to 0.3 cell, each axis' sigma times
    exp(0.3 * normal) and a uniform rotation, so that neighbours overlap as in a fitted image;
    colours uniform in [0, 1) times the flat-image gain, so images are of order 1. Deterministic in
    ``seed``; on the CPU."""
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
    return Splats(positions.contiguous(), cholesky.contiguous(), colours, valid)


# CPU part: evaluation counts and the roofline estimate.


def evaluation_counts(n_splats: int, image_size: int = IMAGE_SIZE, images: int = 4, tile_size: int = TILE_SIZE,
                      cutoff: float = CUTOFF) -> dict[str, Any]:
    """Dense and tiled evaluations per image (mean over ``images`` fitted-like images)."""
    splats = fitted_like_splats(images, n_splats, image_size, image_size)
    bins = bin_splats_to_tiles(splats.positions, splats.cholesky, splats.valid, image_size, image_size, cutoff,
                               tile_size)
    counts = count_evaluations(bins, n_splats, image_size, image_size)
    keys = ("dense_forward", "dense_backward", "tiled_forward", "tiled_backward", "box", "pairs")
    per_image = {key: counts[key] / images for key in keys}
    return {
        "num_splats": n_splats, "image_size": image_size, "tile_size": tile_size, "cutoff": cutoff,
        "images_averaged": images, "per_image": per_image,
        "forward_ratio_dense_over_tiled": counts["forward_ratio_dense_over_tiled"],
        "backward_ratio_dense_over_tiled": counts["backward_ratio_dense_over_tiled"],
        "mean_splats_per_tile": per_image["pairs"] / bins.tiles_per_image,
    }


def cpu_part(splat_counts=PAPER_SPLAT_COUNTS, image_size: int = IMAGE_SIZE, images: int = 4) -> dict[str, Any]:
    counts = [evaluation_counts(n, image_size, images) for n in splat_counts]
    peaks = device_peaks(ROOFLINE_DEVICE)
    peaks["source"] = "assumed for the estimate: H100 SXM5 data sheet, fp32 without tensor cores, HBM3"
    return {
        "evaluation_counts": counts,
        "roofline_estimate": {"assumed_device": peaks, "per_count": [roofline(c, peaks) for c in counts]},
    }


# GPU part (also runs on the CPU under TRITON_INTERPRET=1, for --smoke and the tests).


def _grads_through(render: Callable, splats: Splats, height: int, width: int, cutoff: float,
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
    """One correctness case: tiled vs dense Triton on the whole batch, each vs the twin on the first
    and last image."""
    from kernels.rasterize_torch import rasterize_dense_torch

    splats = fitted_like_splats(batch, n_splats, image_size, image_size, seed=seed).to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    cotangent = torch.randn(batch, CHANNELS, image_size, image_size, generator=generator, device=device)
    started = time.perf_counter()
    ours = {kind: _grads_through(partial(render, tile_size=tile_size), splats, image_size, image_size, cutoff,
                                 cotangent) for kind, render in KERNELS.items()}
    record: dict[str, Any] = {"batch": batch, "num_splats": n_splats, "image_size": image_size,
                              "tile_size": tile_size, "cutoff": cutoff, "twin_images": sorted({0, batch - 1}),
                              "tiled_vs_dense_whole_batch": compare(ours["tiled"], ours["dense"])}
    versus_twin: dict[str, dict[str, Any]] = {kind: {} for kind in KERNELS}
    for index in record["twin_images"]:  # one image at a time: the twin holds [1, N, H, W] float64 tensors
        twin = _grads_through(rasterize_dense_torch, splats.index(slice(index, index + 1)), image_size, image_size, cutoff,
                              cotangent[index : index + 1], dtype=torch.float64)
        for kind, outputs in ours.items():
            errors = compare([t[index : index + 1] for t in outputs], twin)
            for name, entry in errors.items():  # worst over the checked images
                worst = versus_twin[kind].get(name)
                if worst is None or entry["max_abs_error"] > worst["max_abs_error"]:
                    versus_twin[kind][name] = entry
        del twin
    record.update({f"{kind}_vs_twin": errors for kind, errors in versus_twin.items()})
    groups = [record["tiled_vs_dense_whole_batch"], *versus_twin.values()]
    record["passed"] = all(entry["passed"] for group in groups for entry in group.values())
    record["seconds"] = time.perf_counter() - started
    return record


def timed(run: Callable[[], Any], cuda: bool) -> tuple[Any, float]:
    """``run()`` and its elapsed seconds: CUDA events on a GPU, the wall clock on the CPU."""
    if not cuda:
        started = time.perf_counter()
        return run(), time.perf_counter() - started
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    result = run()
    end.record()
    end.synchronize()
    return result, start.elapsed_time(end) / 1e3


def time_kernel(render: Callable, splats: Splats, image_size: int, cutoff: float, steps: int,
                warmup: int, device: str) -> dict[str, float]:
    """Mean forward and backward seconds per step of ``render`` on ``splats``."""
    cuda = torch.device(device).type == "cuda"
    leaves = [t.detach().clone().requires_grad_() for t in (splats.positions, splats.cholesky, splats.colours)]
    generator = torch.Generator(device=device).manual_seed(1)
    batch = splats.positions.shape[0]
    cotangent = torch.randn(batch, CHANNELS, image_size, image_size, generator=generator, device=device)
    forward_seconds = backward_seconds = 0.0

    def forward_pass() -> Tensor:
        return render(*leaves, splats.valid, image_size, image_size, cutoff)

    for step in range(warmup + steps):
        rendered, forward = timed(forward_pass, cuda)
        _, backward = timed(lambda: torch.autograd.grad(rendered, leaves, cotangent), cuda)
        if step >= warmup:
            forward_seconds += forward
            backward_seconds += backward
    return {"forward_seconds_per_step": forward_seconds / steps, "backward_seconds_per_step": backward_seconds / steps}


def benchmark(batch: int, n_splats: int, image_size: int, steps: int, warmup: int, device: str,
              peaks: dict[str, Any], tile_size: int = TILE_SIZE, cutoff: float = CUTOFF) -> dict[str, Any]:
    """Every kernel: images/s for ``steps``- and 1000-step fits, achieved FLOP/s and bytes/s vs peak."""
    splats = fitted_like_splats(batch, n_splats, image_size, image_size, seed=2).to(device)
    counts = evaluation_counts(n_splats, image_size, images=min(batch, 4), tile_size=tile_size, cutoff=cutoff)
    costs = pass_costs(counts, CHANNELS)
    result: dict[str, Any] = {
        "batch": batch, "num_splats": n_splats, "image_size": image_size, "tile_size": tile_size,
        "cutoff": cutoff, "steps_timed": steps, "warmup_steps": warmup, "peaks": peaks,
        "note": "per step: the render forward (tiled: including binning) and its backward; no optimizer update",
    }
    for kind, render in KERNELS.items():
        times = time_kernel(partial(render, tile_size=tile_size), splats, image_size, cutoff, steps, warmup, device)
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
    splat_counts: tuple[int, ...] = (min(PAPER_SPLAT_COUNTS), max(PAPER_SPLAT_COUNTS))
    batches: tuple[int, ...] = (1, 64, 4096)
    bench_batch: int = 4096
    bench_splats: int = min(PAPER_SPLAT_COUNTS)
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
    print(format_table(["kernel", "forward ms", "backward ms", "images/s (1000-step fit)"],
                       [[kind, bench[kind]["forward_seconds_per_step"] * 1e3, bench[kind]["backward_seconds_per_step"]
                         * 1e3, bench[kind]["images_per_s_1000_step_fit"]] for kind in KERNELS],
                       ["", ".2f", ".2f", ".1f"]), flush=True)
    return {
        "device": peaks["device"],
        "machine": {**machine_info(), "cuda_device": peaks["device"], "cuda_version": torch.version.cuda,
                    "triton_interpret": os.environ.get("TRITON_INTERPRET", "0")},
        "settings": asdict(settings),
        "tolerance": f"max abs error <= {TOLERANCE} * max(1, max abs reference), per output",
        "correctness": cases,
        "passed": all(case["passed"] for case in cases),
        "benchmark": bench,
    }


def _previous_gpu_section(out: Path) -> dict[str, Any] | None:
    """An earlier real GPU run's section of ``out`` (it carries its own machine), not a smoke run's."""
    try:
        previous = json.loads(out.read_text()).get("gpu") if out.is_file() else None
    except json.JSONDecodeError:
        return None
    return None if not previous or previous.get("smoke") else previous


def kernel_resources() -> dict[str, Any]:
    """:func:`kernels.aot_compile.resources_report`, in a child process (the smoke run interprets)."""
    return run_in_child("kernels.aot_compile:resources_report", env={"TRITON_INTERPRET": "0"}, timeout=900).value


def run(out: str | os.PathLike, smoke: bool = False) -> int:
    """Write the report to ``out``; the exit status (1 on a correctness failure)."""
    started = time.perf_counter()
    out = Path(out)
    report: dict[str, Any] = {
        "description": __doc__.split("\n")[0],
        "method": METHOD,
        "splat_layout": "fitted_like_splats: " + " ".join(fitted_like_splats.__doc__.split()),
        "machine": machine_info(),
        **cpu_part(),
        "kernel_resources": kernel_resources(),
    }
    if smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are first imported
        report["gpu"] = gpu_part(GpuSettings.smoke(), "cpu") | {"smoke": True}
    elif torch.cuda.is_available():
        report["gpu"] = gpu_part(GpuSettings(), "cuda")
    else:
        print("no CUDA device: GPU check skipped (the CPU-side evaluation counts and roofline estimate were written)")
        report["gpu"] = _previous_gpu_section(out)
    status = 1 if (smoke or torch.cuda.is_available()) and not report["gpu"]["passed"] else 0
    status = status or int(bool(report["kernel_resources"]["problems"]))
    report["runtime_seconds"] = time.perf_counter() - started
    write_json(out, report)
    rows = []
    for counts, estimate in zip(report["evaluation_counts"], report["roofline_estimate"]["per_count"]):
        rows.append([counts["num_splats"], counts["forward_ratio_dense_over_tiled"],
                     counts["backward_ratio_dense_over_tiled"], estimate["cache_reuse"]["dense_images_per_s"],
                     estimate["no_cache_reuse"]["tiled_images_per_s"], estimate["cache_reuse"]["tiled_images_per_s"]])
    print(f"roofline on an {ROOFLINE_DEVICE}, images/s of a 1000-step fit (benchmarks/cost_model.py):")
    print(format_table(["N", "fewer evals fwd", "bwd", "dense", "tiled (no reuse)", "tiled (reuse)"], rows,
                       ["d", ".1f", ".1f", ".1f", ".0f", ".0f"]))
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
