"""CPU benchmark of splat fitting: the new fitter against the old one, in the same run (issue 11).

``python -m benchmarks.fitting --out benchmarks/fitting.json [--quick] [--sections a,b] [--threads 1]``
(``make bench``) writes one JSON file with five sections:

- ``small_gray``: the first 1,000 Fashion-MNIST training images, 22 splats: mean PSNR against steps,
  wall time and CPU time for the old fitter (70 and 300 steps) and the new one (params.yaml's
  ``fit.optimizer``: 150 steps; and 300 steps). Derived: the new fitter's PSNR at the CPU time the
  old one needs for 70 steps (target: at least +2 dB), and the CPU time the new one needs to reach
  the old 70-step PSNR (target: at most a third of the old time).
- ``photos``: scikit-image's astronaut and coffee at 224x224 with 3136/1600/900/400 splats: the old
  fitter for 80 steps against the new one (``fit_photos.optimizer``) for 1000 steps, as curves.
  Target: at least 37.4 dB (the paper's figure) at 3136 splats within 1000 steps.
- ``prune_small``: the same 1,000 images fitted at 22 splats, then the cascade 22 -> 11 -> 6 -> 3
  (each level pruned from the previous level's refit) for the luminance and the energy score: PSNR
  right after pruning (kept colours, and least-squares colours), after ``prune.refit_iterations``
  refit steps, against fitting each count directly with the same total number of steps ("fit-small").
  Targets: halving (22 -> 11) costs at most 3 dB after the refit; prune-from-large beats fit-small at
  every level.
- ``prune_photos``: the same for the two photos, 3136 -> 1600 -> 900 -> 400 (luminance), a 400-step
  large fit and 100 refit steps per level.
- ``rasterizer``: forward and forward+backward time of the C++ kernel and of the old windowed path
  at 28x28 (1,000 images, 22 splats, gray) and 224x224 (one photo, 3136 splats, RGB): splat-pixel
  evaluations per second, useful GFLOP/s and the fraction of the machine's fp32 peak (target: 10 %).

Every timing runs single-threaded by default (``--threads``): the machine is shared, and with one
thread this process's CPU time (``time.process_time``) is the time the work itself took, whatever
else runs. Old and new run in the same process, one after the other. The JSON records the machine,
the load average before and after each section, how each figure is measured (``method``) and, for
every target, the measured value and whether it is met, computed from the measured numbers only. It
is written (atomically) after each section, so a crash loses only the section it happened in.
``--quick`` shrinks everything for the test suite; its figures are not the benchmark's.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from benchmarks.machine import machine_info as common_machine_info
from gsclip_lib.atomic_files import write_json
from gsclip_lib.data.fashion_mnist import IDX_IMAGES_MAGIC, read_idx
from gsclip_lib.data.photos import load_photos
from gsclip_lib.params import FitSettings, load_params
from gsclip_lib.progress import progress_bar, report
from gsclip_lib.splats.container import Splats
from gsclip_lib.splats.fitting import FitResult, fit_splats
from gsclip_lib.splats.initialization import init_grid
from gsclip_lib.splats.pruning import keep_best, prune_and_refit, prune_score
from gsclip_lib.splats.quality import psnr
from gsclip_lib.splats.render import render_splats, resolve_backend
from kernels.rasterize_cpu import cpu_kernel_available, rasterize_cpu
from kernels.rasterize_windowed import compile_enabled, rasterize_windowed_torch

ROOT = Path(__file__).resolve().parents[1]
PARAMS = load_params(ROOT / "params.yaml")
FASHION_MNIST = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"
SECTIONS = ("small_gray", "photos", "prune_small", "prune_photos", "rasterizer")

# The new fitter: params.yaml as it stands (least-squares colours, re-seeding, the C++ kernel).
NEW_SMALL = PARAMS.fit.optimizer
NEW_PHOTO = PARAMS.fit_photos.optimizer
# The old fitter. These two settings reproduce the algorithm of the landed main's fit.optimizer and
# fit_photos.optimizer: Adam on everything, no colour solve, no re-seeding, the windowed PyTorch
# rasterizer, the old step counts (70 and 80), the old L1 weight at 28x28 (1e-6); the photo learning
# rates 0.2 / 0.1 / 0.005 are the old ones.
OLD_SMALL = NEW_SMALL.replace(iterations=70, colour_solve="none", reseed_every=0, colour_l1=1e-6, backend="windowed")
OLD_PHOTO = NEW_PHOTO.replace(iterations=80, colour_solve="none", reseed_every=0, backend="windowed")

# Targets of issue 11.
GAIN_AT_EQUAL_TIME_DB = 2.0  # new PSNR at the old 70-step CPU time, minus the old 70-step PSNR
TIME_FRACTION = 1 / 3  # new CPU time to the old 70-step PSNR, over the old 70-step CPU time
PAPER_PSNR_DB = 37.4  # the paper's 3136-splat figure at 224x224
PAPER_PHOTO_SETTING = {"image_size": 224, "num_splats": 3136, "max_steps": 1000}
HALVING_COST_DB = 3.0  # PSNR lost from the large fit to half its count, after the refit
PEAK_FRACTION_TARGET = 0.10  # the rasterizer's useful GFLOP/s over the machine's fp32 peak

# Floating-point operations per splat-pixel evaluation of the C++ kernel with C channels, counted
# from its AVX2 loop (an FMA counts 2; compares, masks and integer work count 0): the weight with its
# exp polynomial is 30, the forward adds an FMA per channel; the backward recomputes the weight and
# adds 11 + 4 per channel.
def flops_forward(channels: int) -> int:
    return 30 + 2 * channels


def flops_backward(channels: int) -> int:
    return 41 + 4 * channels


# fp32 peak: 2 FMA units x 8 lanes x 2 flops x ~3 GHz = ~95 GFLOP/s per core (AVX2), 190 for the two.
PEAK_GFLOPS = {"two_cores": 190.0, "one_core": 95.0}


@dataclass(frozen=True)
class BenchmarkSettings:
    """What is measured; :meth:`quick_settings` gives the test suite's shrunken version."""

    images: int = 1000  # the first images of Fashion-MNIST's training file
    small_splats: int = 22
    old_steps: int = 70  # the old fitter's step count at 28x28
    long_steps: int = 300  # old and new both run this long too
    new_steps: int = NEW_SMALL.iterations  # params.yaml fit.optimizer (150)
    small_log_every: int = 5  # steps between curve points at 28x28 (only the logging: not the algorithm)
    photos: tuple[str, ...] = ("astronaut", "coffee")
    photo_size: int = 224
    photo_counts: tuple[int, ...] = (3136, 1600, 900, 400)
    old_photo_steps: int = OLD_PHOTO.iterations  # 80
    new_photo_steps: int = 1000
    photo_log_every: int = 25
    prune_levels: tuple[int, ...] = (22, 11, 6, 3)
    prune_scores: tuple[str, ...] = ("luminance", "energy")
    prune_refit_steps: int = PARAMS.prune.refit_iterations  # 50
    prune_target_score: str = PARAMS.prune.score  # the pipeline's score decides the targets
    prune_photo_levels: tuple[int, ...] = (3136, 1600, 900, 400)
    prune_photo_large_steps: int = 400
    prune_photo_refit_steps: int = 100
    prune_photo_scores: tuple[str, ...] = ("luminance",)
    raster_photo: str = "astronaut"
    raster_photo_splats: int = 3136
    raster_repeats: int = 3  # timed calls after one warm-up; the best counts
    warmup_steps: int = 2  # an untimed fit of the same shapes before each timed one
    fashion_mnist: str = FASHION_MNIST
    quick: bool = False

    @classmethod
    def quick_settings(cls) -> "BenchmarkSettings":
        return cls(
            images=64,
            old_steps=10,
            long_steps=20,
            new_steps=15,
            photo_size=64,
            photo_counts=(256, 128, 64, 32),
            old_photo_steps=10,
            new_photo_steps=20,
            photo_log_every=5,
            prune_refit_steps=5,
            prune_photo_levels=(256, 128, 64, 32),
            prune_photo_large_steps=20,
            prune_photo_refit_steps=5,
            raster_photo_splats=256,
            warmup_steps=1,
            quick=True,
        )


# --- inputs -----------------------------------------------------------------------------------


def fashion_mnist_images(path: str | Path, count: int) -> Tensor:  # [count, 1, 28, 28] in [0, 1]
    """The first ``count`` images of a Fashion-MNIST idx file."""
    pixels = read_idx(path, IDX_IMAGES_MAGIC)[:count]
    if pixels.shape[0] < count:
        raise ValueError(f"{path} holds {pixels.shape[0]} images, the benchmark needs {count}")
    return torch.from_numpy(pixels.copy())[:, None].float() / 255.0


# --- curves and what is read off them ---------------------------------------------------------

CLOCKS = ("seconds", "cpu_seconds")


def mean_psnr(values: Tensor) -> float:
    return float(values.float().nanmean())


def curve_of(result: FitResult, steps: int, wall: float, cpu: float) -> dict[str, list[float]]:
    """PSNR against steps and both clocks: the fit's history, then the returned fit at ``steps``.

    A history point at step i is the render after i optimizer steps, with the clocks read after the
    step that follows it (so every point is timed a step late: conservative). The last point is the
    fit ``fit_splats`` returns (after its final colour solve, where it solves), timed around the
    whole call, which also holds the initialization and the final render.
    """
    history = result.history
    curve = {
        "step": [int(step) for step in history["iteration"]],
        "seconds": [float(value) for value in history["seconds"]],
        "cpu_seconds": [float(value) for value in history["cpu_seconds"]],
        "psnr": [float(value) for value in history["psnr"]],
    }
    curve["step"].append(int(steps))
    curve["seconds"].append(float(wall))
    curve["cpu_seconds"].append(float(cpu))
    curve["psnr"].append(mean_psnr(result.psnr))
    return curve


def psnr_at_time(curve: dict[str, list[float]], budget: float, clock: str = "cpu_seconds") -> float | None:
    """The PSNR of the last curve point reached within ``budget`` seconds of ``clock``; None if none."""
    reached = [value for value, seconds in zip(curve["psnr"], curve[clock]) if seconds <= budget]
    return reached[-1] if reached else None


def first_reaching(curve: dict[str, list[float]], target_db: float) -> int | None:
    """Index of the first curve point whose PSNR is at least ``target_db``; None if none is."""
    return next((index for index, value in enumerate(curve["psnr"]) if value >= target_db), None)


def time_to_reach(curve: dict[str, list[float]], target_db: float, clock: str = "cpu_seconds") -> float | None:
    index = first_reaching(curve, target_db)
    return None if index is None else curve[clock][index]


def _difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or not b > 0 else a / b


# --- timed fits -------------------------------------------------------------------------------


def timed_fit(
    images: Tensor,
    count: int,
    settings: FitSettings,
    *,
    label: str,
    progress: bool,
    initial: Splats | None = None,
    prune_from: tuple[Splats, str] | None = None,  # (splats, score): prune_and_refit instead
    keep_curve: bool = True,
) -> tuple[FitResult, dict[str, Any]]:
    """One fit (or prune-and-refit) timed on both clocks; its record for the JSON."""
    gc.collect()
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    if prune_from is not None:
        result = prune_and_refit(images, prune_from[0], count, settings, prune_from[1])
    else:
        result = fit_splats(images, count, settings, initial=initial, progress=progress, description=label)
    wall, cpu = time.perf_counter() - wall_start, time.process_time() - cpu_start
    record: dict[str, Any] = {
        "steps": settings.iterations,
        "num_splats": count,
        "psnr_db": mean_psnr(result.psnr),
        "seconds": wall,
        "cpu_seconds": cpu,
        "reseeded": result.reseeded,
        "retried": len(result.retried),
        "dropped": len(result.dropped),
    }
    if images.shape[0] <= 8:
        record["per_image_psnr_db"] = [float(value) for value in result.psnr]
    if keep_curve:
        record["curve"] = curve_of(result, settings.iterations, wall, cpu)
    return result, record


def warm_up(images: Tensor, count: int, settings: FitSettings, steps: int) -> None:
    """An untimed short fit of the same shapes: compiles the windowed path, builds the C++ kernel."""
    if steps > 0:
        fit_splats(images, count, settings.replace(iterations=steps), progress=False)


def section_bar(total: int, name: str, progress: bool):
    return progress_bar(total=total, desc=name, disable=not progress, leave=True)


# --- small_gray -------------------------------------------------------------------------------


def small_gray_benchmark(images: Tensor, settings: BenchmarkSettings, progress: bool) -> dict[str, Any]:
    count, log = settings.small_splats, settings.small_log_every
    runs = {
        f"old_{settings.old_steps}": OLD_SMALL.replace(iterations=settings.old_steps, log_every=log),
        f"old_{settings.long_steps}": OLD_SMALL.replace(iterations=settings.long_steps, log_every=log),
        f"new_{settings.new_steps}": NEW_SMALL.replace(iterations=settings.new_steps, log_every=log),
        f"new_{settings.long_steps}": NEW_SMALL.replace(iterations=settings.long_steps, log_every=log),
    }
    bar = section_bar(len(runs) + 2, "small_gray", progress)
    warm_up(images, count, OLD_SMALL, settings.warmup_steps)
    warm_up(images, count, NEW_SMALL, settings.warmup_steps)
    bar.update(2)
    records = {}
    for name, fit_settings in runs.items():
        _, records[name] = timed_fit(images, count, fit_settings, label=f"small_gray {name}", progress=progress)
        records[name]["fitter"] = name.split("_")[0]
        bar.update(1)
        report(f"small_gray {name}: {records[name]['psnr_db']:.2f} dB, {records[name]['cpu_seconds']:.1f} CPU s")
    bar.close()
    section: dict[str, Any] = {
        "images": int(images.shape[0]),
        "image_size": int(images.shape[-1]),
        "channels": int(images.shape[1]),
        "num_splats": count,
        "source": {"name": "fashion-mnist", "path": str(settings.fashion_mnist), "images": "the first of the file"},
        "backends": {"old": resolve_backend(OLD_SMALL.backend, images.device),
                     "new": resolve_backend(NEW_SMALL.backend, images.device)},
        "runs": records,
        "method": (
            "fit_splats on the whole batch under one optimizer, after an untimed "
            f"{settings.warmup_steps}-step fit of the same shapes for each fitter (compiles the old "
            "windowed path, builds the C++ kernel). Curves: the fit's history every "
            f"{log} steps (mean PSNR over the images of the clamped render after that many steps; "
            "wall and this process's CPU time read after the following step), then the returned fit "
            "at the last step, timed around the whole fit_splats call. Derived figures are read off "
            "the curves without interpolation: 'PSNR at a time' is the last point reached within "
            "that time, 'time to reach' the first point at or above that PSNR; both are conservative "
            "for the new fitter."
        ),
    }
    section["derived"] = small_gray_derived(section, settings)
    section["targets"] = small_gray_targets(section["derived"])
    return section


def small_gray_derived(section: dict[str, Any], settings: BenchmarkSettings) -> dict[str, Any]:
    """Equal-time and equal-quality comparisons, read off the curves of ``section['runs']``."""
    runs = section["runs"]
    old, old_long = runs[f"old_{settings.old_steps}"], runs[f"old_{settings.long_steps}"]
    new, new_long = runs[f"new_{settings.new_steps}"], runs[f"new_{settings.long_steps}"]
    derived: dict[str, Any] = {
        "old_run": f"old_{settings.old_steps}",
        "old_psnr_db": old["psnr_db"],
        "old_cpu_seconds": old["cpu_seconds"],
        "old_seconds": old["seconds"],
        # The longest new run spans the most time: the new fitter given the old fitter's budget.
        "equal_time_run": f"new_{settings.long_steps}",
        "equal_time_beyond_curve": new_long["curve"]["cpu_seconds"][-1] < old["cpu_seconds"],
        # The params.yaml run: how soon the pipeline's setting reaches the old quality.
        "equal_quality_run": f"new_{settings.new_steps}",
    }
    for clock in CLOCKS:
        at_time = psnr_at_time(new_long["curve"], old[clock], clock)
        to_reach = time_to_reach(new["curve"], old["psnr_db"], clock)
        derived[f"new_psnr_at_old_{clock}_db"] = at_time
        derived[f"gain_at_old_{clock}_db"] = _difference(at_time, old["psnr_db"])
        derived[f"new_{clock}_to_old_psnr"] = to_reach
        derived[f"time_fraction_{clock}"] = _ratio(to_reach, old[clock])
    index = first_reaching(new["curve"], old["psnr_db"])
    derived["new_step_reaching_old_psnr"] = None if index is None else new["curve"]["step"][index]
    derived["cpu_seconds_per_step"] = {
        name: run["cpu_seconds"] / run["steps"] for name, run in runs.items() if run["steps"] > 0
    }
    derived[f"psnr_gain_at_{settings.long_steps}_steps_db"] = new_long["psnr_db"] - old_long["psnr_db"]
    return derived


def small_gray_targets(derived: dict[str, Any]) -> dict[str, Any]:
    gain = derived["gain_at_old_cpu_seconds_db"]
    fraction = derived["time_fraction_cpu_seconds"]
    return {
        "gain_at_equal_cpu_time": {
            "description": "new PSNR at the old fitter's 70-step CPU time, minus the old 70-step PSNR",
            "threshold": GAIN_AT_EQUAL_TIME_DB,
            "comparison": ">=",
            "measured": gain,
            "met": gain is not None and gain >= GAIN_AT_EQUAL_TIME_DB,
        },
        "time_to_equal_quality": {
            "description": "new CPU time to reach the old 70-step PSNR, over the old 70-step CPU time",
            "threshold": TIME_FRACTION,
            "comparison": "<=",
            "measured": fraction,
            "met": fraction is not None and fraction <= TIME_FRACTION,
        },
    }


# --- photos -----------------------------------------------------------------------------------


def photos_benchmark(photos: Tensor, settings: BenchmarkSettings, progress: bool) -> dict[str, Any]:
    log = settings.photo_log_every
    old_settings = OLD_PHOTO.replace(iterations=settings.old_photo_steps, log_every=log)
    new_settings = NEW_PHOTO.replace(iterations=settings.new_photo_steps, log_every=log)
    bar = section_bar(2 * len(settings.photo_counts), "photos", progress)
    rows = []
    for count in settings.photo_counts:
        row: dict[str, Any] = {"num_splats": count}
        for role, fit_settings in (("old", old_settings), ("new", new_settings)):
            warm_up(photos, count, fit_settings, settings.warmup_steps)
            _, row[role] = timed_fit(photos, count, fit_settings, label=f"photos {role} N={count}", progress=progress)
            bar.update(1)
        old, new = row["old"], row["new"]
        index = first_reaching(new["curve"], old["psnr_db"])
        row["derived"] = {
            "gain_db": new["psnr_db"] - old["psnr_db"],
            "new_psnr_at_old_cpu_seconds_db": psnr_at_time(new["curve"], old["cpu_seconds"]),
            "new_step_reaching_old_psnr": None if index is None else new["curve"]["step"][index],
            "new_cpu_seconds_to_old_psnr": time_to_reach(new["curve"], old["psnr_db"]),
        }
        rows.append(row)
        report(f"photos N={count}: old {old['psnr_db']:.2f} dB ({old['cpu_seconds']:.1f} CPU s), "
               f"new {new['psnr_db']:.2f} dB ({new['cpu_seconds']:.1f} CPU s)")
    bar.close()
    section = {
        "photos": list(settings.photos),
        "image_size": int(photos.shape[-1]),
        "channels": int(photos.shape[1]),
        "steps": {"old": settings.old_photo_steps, "new": settings.new_photo_steps},
        "backends": {"old": resolve_backend(OLD_PHOTO.backend, photos.device),
                     "new": resolve_backend(NEW_PHOTO.backend, photos.device)},
        "counts": rows,
        "method": (
            "all photos fitted together (one batch) at each count, old then new, each after an "
            f"untimed {settings.warmup_steps}-step fit of the same shapes; curves as in small_gray, "
            f"every {log} steps. The old windowed path may recompile as the splats change size; that "
            "is part of its cost. PSNR is the mean over the photos."
        ),
    }
    section["targets"] = photos_targets(section)
    return section


def photos_targets(section: dict[str, Any]) -> dict[str, Any]:
    largest = max(section["counts"], key=lambda row: row["num_splats"])
    new = largest["new"]
    index = first_reaching(new["curve"], PAPER_PSNR_DB)
    setting = {"image_size": section["image_size"], "num_splats": largest["num_splats"], "max_steps": new["steps"]}
    return {
        "paper_psnr_within_1000_steps": {
            "description": "new fitter at 3136 splats, 224x224: mean PSNR after at most 1000 steps",
            "threshold": PAPER_PSNR_DB,
            "comparison": ">=",
            "measured": new["psnr_db"],
            "first_step_reaching": None if index is None else new["curve"]["step"][index],
            "setting": setting,
            "at_target_setting": setting == PAPER_PHOTO_SETTING,
            "met": new["psnr_db"] >= PAPER_PSNR_DB,
        }
    }


# --- pruning ----------------------------------------------------------------------------------


def prune_benchmark(
    images: Tensor,
    levels: tuple[int, ...],
    large_settings: FitSettings,
    refit_settings: FitSettings,  # its ``iterations`` refit steps per level
    scores: tuple[str, ...],
    target_score: str,
    name: str,
    progress: bool,
) -> dict[str, Any]:
    """The cascade ``levels[0] -> levels[1] -> ...`` (each level pruned from the previous level's
    refit) for each score, against fitting each count directly with the same total steps."""
    height, width = images.shape[-2:]
    backend, cutoff = refit_settings.backend, refit_settings.cutoff
    refit_steps = refit_settings.iterations
    bar = section_bar(1 + (len(levels) - 1) * (1 + 2 * len(scores)), name, progress)
    large_result, large = timed_fit(images, levels[0], large_settings, label=f"{name} N={levels[0]}",
                                    progress=progress, keep_curve=False)
    bar.update(1)
    fit_small: dict[str, Any] = {}
    total = large_settings.iterations
    for count in levels[1:]:
        total += refit_steps
        _, fit_small[str(count)] = timed_fit(images, count, large_settings.replace(iterations=total),
                                             label=f"{name} fit-small N={count}", progress=progress,
                                             keep_curve=False)
        bar.update(1)
    cascades: dict[str, Any] = {}
    for score in scores:
        source, parent_db, total = large_result.splats, large["psnr_db"], large_settings.iterations
        steps = []
        for count in levels[1:]:
            total += refit_steps
            with torch.no_grad():
                kept = keep_best(source, prune_score(source, score, height, width, cutoff, backend), count)
                kept_db = mean_psnr(psnr(images, render_splats(kept, height, width, backend=backend, cutoff=cutoff)))
            solved = prune_and_refit(images, source, count, refit_settings.replace(iterations=0), score)
            bar.update(1)
            refit_result, refit = timed_fit(images, count, refit_settings, label=f"{name} refit N={count}",
                                            progress=False, prune_from=(source, score), keep_curve=False)
            bar.update(1)
            small_db = fit_small[str(count)]["psnr_db"]
            steps.append({
                "num_splats": count,
                "total_steps": total,
                "pruned_no_refit_db": kept_db,
                "pruned_solved_colours_db": mean_psnr(solved.psnr),
                "refit": refit,
                "refit_db": refit["psnr_db"],
                "fit_small_db": small_db,
                "margin_over_fit_small_db": refit["psnr_db"] - small_db,
                "drop_from_parent_db": parent_db - refit["psnr_db"],
            })
            report(f"{name} {score} N={count}: pruned {kept_db:.2f} / solved {mean_psnr(solved.psnr):.2f} / "
                   f"refit {refit['psnr_db']:.2f} dB, fit-small {small_db:.2f} dB ({total} steps)")
            source, parent_db = refit_result.splats, refit["psnr_db"]
        cascades[score] = steps
    bar.close()
    section = {
        "images": int(images.shape[0]),
        "image_size": int(width),
        "channels": int(images.shape[1]),
        "levels": list(levels),
        "large": large,
        "refit_steps": refit_steps,
        "scores": list(scores),
        "target_score": target_score,
        "cascades": cascades,
        "fit_small": fit_small,
        "settings": {"large_and_fit_small": large_settings.model_dump(), "refit": refit_settings.model_dump()},
        "method": (
            "large fit at the first level; then per score a cascade, each level pruned from the "
            "previous level's refit (the first from the large fit): pruned_no_refit_db keeps the "
            "best-scoring splats with the colours they had (keep_best, then render); "
            "pruned_solved_colours_db is prune_and_refit with 0 steps (least-squares colours only); "
            f"refit_db is prune_and_refit with {refit_steps} steps of the large fit's settings. "
            "fit_small_db fits the count directly from the grid with the large fit's settings and as "
            "many steps as the cascade spent to reach that level (large + refits)."
        ),
    }
    section["targets"] = prune_targets(section)
    return section


def prune_targets(section: dict[str, Any]) -> dict[str, Any]:
    """The pruning targets, on the pipeline's score; every score's figures are listed beside."""
    large_db = section["large"]["psnr_db"]
    halving = {score: large_db - steps[0]["refit_db"] for score, steps in section["cascades"].items()}
    margins = {score: min(step["margin_over_fit_small_db"] for step in steps) for score, steps in section["cascades"].items()}
    score = section["target_score"]
    levels = section["levels"]
    return {
        "halving_cost_after_refit": {
            "description": f"large fit PSNR minus the refit PSNR at {levels[1]} splats (from {levels[0]})",
            "threshold": HALVING_COST_DB,
            "comparison": "<=",
            "score": score,
            "measured": halving[score],
            "by_score": halving,
            "met": halving[score] <= HALVING_COST_DB,
        },
        "prune_beats_fit_small": {
            "description": "smallest margin over the levels of prune-and-refit over fit-small at equal total steps",
            "threshold": 0.0,
            "comparison": ">",
            "score": score,
            "measured": margins[score],
            "by_score": margins,
            "met": margins[score] > 0.0,
        },
    }


# --- rasterizer -------------------------------------------------------------------------------


def count_within_cutoff(splats: Splats, height: int, width: int, cutoff: float, chunk_pixels: int = 1 << 24) -> int:
    """Splat-pixel pairs with Mahalanobis distance <= cutoff (valid splats, pixel centres)."""
    positions = splats.positions[splats.valid].float()  # [M, 2]
    cholesky = splats.cholesky[splats.valid].float()  # [M, 3]
    xs = torch.arange(width, dtype=torch.float32) + 0.5
    ys = torch.arange(height, dtype=torch.float32) + 0.5
    step = max(1, chunk_pixels // (height * width))
    inside = 0
    for start in range(0, positions.shape[0], step):
        centre, factor = positions[start : start + step], cholesky[start : start + step]
        # Sigma = L L^T with L = [[l11, 0], [l21, l22]]; d^2 = |L^-1 (p - mu)|^2 by forward substitution.
        z1 = (xs[None, None, :] - centre[:, 0, None, None]) / factor[:, 0, None, None]  # [m, 1, W]
        z2 = (ys[None, :, None] - centre[:, 1, None, None] - factor[:, 1, None, None] * z1) / factor[:, 2, None, None]
        inside += int((z1.square() + z2.square() <= cutoff * cutoff).sum())
    return inside


def best_time(function: Callable[[], Any], repeats: int, clock: Callable[[], float]) -> float:
    function()  # warm-up: compiles the old path, touches the memory
    best = math.inf
    for _ in range(repeats):
        start = clock()
        function()
        best = min(best, clock() - start)
    return best


def rasterizer_case(images: Tensor, num_splats: int, repeats: int, cutoff: float) -> dict[str, Any]:
    batch, channels, height, width = images.shape
    splats = init_grid(images, num_splats)
    leaves = [t.clone().requires_grad_(True) for t in (splats.positions, splats.cholesky, splats.colours)]
    cotangent = torch.randn((batch, channels, height, width), generator=torch.Generator().manual_seed(0))
    one_thread = torch.get_num_threads() == 1
    clock = time.process_time if one_thread else time.perf_counter
    dense = batch * num_splats * height * width
    inside = count_within_cutoff(splats, height, width, cutoff)
    case: dict[str, Any] = {
        "batch": batch,
        "num_splats": num_splats,
        "height": height,
        "width": width,
        "channels": channels,
        "cutoff": cutoff,
        "dense_equivalent_evaluations": dense,
        "evaluations_within_cutoff": inside,
        "flops_per_evaluation": {"forward": flops_forward(channels), "backward": flops_backward(channels)},
        "clock": "cpu (time.process_time)" if one_thread else "wall (time.perf_counter)",
    }
    renders = {}
    for name, rasterize in (("cpp", rasterize_cpu), ("old_windowed", rasterize_windowed_torch)):
        def forward(rasterize=rasterize) -> Tensor:
            with torch.no_grad():
                return rasterize(*leaves, splats.valid, height, width, cutoff)

        def forward_backward(rasterize=rasterize) -> None:
            image = rasterize(*leaves, splats.valid, height, width, cutoff)
            torch.autograd.grad(image, leaves, cotangent)

        renders[name] = forward()
        seconds_forward = best_time(forward, repeats, clock)
        seconds_both = best_time(forward_backward, repeats, clock)
        flops_fwd = inside * flops_forward(channels)
        flops_both = inside * (flops_forward(channels) + flops_backward(channels))
        gflops_fwd, gflops_both = flops_fwd / seconds_forward / 1e9, flops_both / seconds_both / 1e9
        case[name] = {
            "forward_seconds": seconds_forward,
            "forward_backward_seconds": seconds_both,
            "dense_equivalent_evaluations_per_second_forward": dense / seconds_forward,
            "dense_equivalent_evaluations_per_second_forward_backward": dense / seconds_both,
            "within_cutoff_evaluations_per_second_forward": inside / seconds_forward,
            "within_cutoff_evaluations_per_second_forward_backward": inside / seconds_both,
            "useful_gflops_forward": gflops_fwd,
            "useful_gflops_forward_backward": gflops_both,
            "fraction_of_peak_two_cores_forward": gflops_fwd / PEAK_GFLOPS["two_cores"],
            "fraction_of_peak_two_cores_forward_backward": gflops_both / PEAK_GFLOPS["two_cores"],
            "fraction_of_peak_one_core_forward": gflops_fwd / PEAK_GFLOPS["one_core"],
            "fraction_of_peak_one_core_forward_backward": gflops_both / PEAK_GFLOPS["one_core"],
        }
    case["max_abs_difference_cpp_vs_old"] = float((renders["cpp"] - renders["old_windowed"]).abs().max())
    case["speedup_forward"] = case["old_windowed"]["forward_seconds"] / case["cpp"]["forward_seconds"]
    case["speedup_forward_backward"] = (
        case["old_windowed"]["forward_backward_seconds"] / case["cpp"]["forward_backward_seconds"]
    )
    return case


def rasterizer_benchmark(gray: Tensor, photo: Tensor, settings: BenchmarkSettings, progress: bool) -> dict[str, Any]:
    cutoff = NEW_SMALL.cutoff
    bar = section_bar(2, "rasterizer", progress)
    cases = {}
    for name, images, count in (("small_gray", gray, settings.small_splats),
                                ("photo", photo, settings.raster_photo_splats)):
        cases[name] = rasterizer_case(images, count, settings.raster_repeats, cutoff)
        bar.update(1)
        case = cases[name]
        report(f"rasterizer {name}: C++ {case['cpp']['forward_backward_seconds'] * 1e3:.1f} ms, old "
               f"{case['old_windowed']['forward_backward_seconds'] * 1e3:.1f} ms forward+backward")
    bar.close()
    section = {
        "cases": cases,
        "peak_gflops": PEAK_GFLOPS,
        "method": (
            "grid-initialized splats (init_grid) of the images, leaves requiring grad; forward under "
            "no_grad, forward+backward = render + torch.autograd.grad with a fixed random cotangent. "
            f"One warm-up call, then the best of {settings.raster_repeats} calls, on this process's "
            "CPU time when single-threaded (else wall time). Dense-equivalent evaluations = B*N*H*W "
            "per pass; within-cutoff evaluations are the splat-pixel pairs with Mahalanobis distance "
            "<= cutoff at pixel centres, counted here in torch. Useful FLOPs = within-cutoff "
            "evaluations x the C++ kernel's flop count per evaluation (forward 30+2C, backward 41+4C, "
            "an FMA counting 2), for both kernels: the work either must do, not what it does. The "
            "peaks are nominal (2 AVX2 FMA units x 8 fp32 lanes x 2 flops x ~3 GHz = ~95 GFLOP/s per "
            "core, 190 for both), not measured."
        ),
    }
    section["targets"] = rasterizer_targets(section)
    return section


def rasterizer_targets(section: dict[str, Any]) -> dict[str, Any]:
    case = section["cases"]["small_gray"]["cpp"]
    measured = case["fraction_of_peak_two_cores_forward_backward"]
    return {
        "fraction_of_peak": {
            "description": "C++ kernel, 28x28 forward+backward: useful GFLOP/s over the machine's 2-core fp32 peak",
            "threshold": PEAK_FRACTION_TARGET,
            "comparison": ">=",
            "measured": measured,
            "one_core_fraction": case["fraction_of_peak_one_core_forward_backward"],
            "photo_fraction": section["cases"]["photo"]["cpp"]["fraction_of_peak_two_cores_forward_backward"],
            "note": "measured on one thread against the two-core peak; one_core_fraction is against one core's",
            "met": measured >= PEAK_FRACTION_TARGET,
        }
    }


# --- machine, summary, main -------------------------------------------------------------------


def _git(*args: str) -> subprocess.CompletedProcess | None:
    try:  # read-only: no index refresh is written (--no-optional-locks)
        return subprocess.run(["git", "--no-optional-locks", *args], cwd=ROOT, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None


def git_describe() -> str | None:
    described = _git("describe", "--always")
    if described is None or described.returncode != 0:
        return None
    changed = _git("diff", "--quiet", "HEAD", "--")
    dirty = changed is not None and changed.returncode == 1
    return described.stdout.strip() + ("-dirty" if dirty else "")


def machine_info() -> dict[str, Any]:
    return {
        **common_machine_info(),
        "cpu_kernel_available": cpu_kernel_available(),
        "GSCLIP_COMPILE": os.environ.get("GSCLIP_COMPILE", "unset (compiled)"),
        "compile_enabled": compile_enabled(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git": git_describe(),
        "load_average_at_start": list(os.getloadavg()),
    }


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return format(value, spec)


def summary_table(report: dict[str, Any]) -> str:
    lines = [f"benchmarks.fitting ({report['mode']}), {report['machine']['torch_threads']} thread(s), "
             f"{report['machine']['cpu_model']}, git {report['machine']['git']}"]
    if "small_gray" in report:
        small = report["small_gray"]
        lines.append(f"small_gray: {small['images']} images {small['image_size']}x{small['image_size']}, "
                     f"{small['num_splats']} splats")
        lines.append(f"  {'run':<9} {'steps':>5} {'PSNR dB':>8} {'CPU s':>8} {'wall s':>8} {'CPU s/step':>10}")
        for name, run in small["runs"].items():
            lines.append(f"  {name:<9} {run['steps']:>5} {run['psnr_db']:>8.2f} {run['cpu_seconds']:>8.1f} "
                         f"{run['seconds']:>8.1f} {run['cpu_seconds'] / max(1, run['steps']):>10.4f}")
        derived = small["derived"]
        lines.append(f"  new at the {derived['old_run']} CPU time ({derived['old_cpu_seconds']:.1f} s): "
                     f"{_fmt(derived['new_psnr_at_old_cpu_seconds_db'], '.2f')} dB "
                     f"({_fmt(derived['gain_at_old_cpu_seconds_db'], '+.2f')} dB); new CPU time to "
                     f"{derived['old_psnr_db']:.2f} dB: {_fmt(derived['new_cpu_seconds_to_old_psnr'], '.1f')} s "
                     f"(step {derived['new_step_reaching_old_psnr']}, {_fmt(derived['time_fraction_cpu_seconds'], '.3f')}"
                     " of the old)")
    if "photos" in report:
        photos = report["photos"]
        lines.append(f"photos: {', '.join(photos['photos'])} at {photos['image_size']}x{photos['image_size']}, "
                     f"old {photos['steps']['old']} steps vs new {photos['steps']['new']}")
        lines.append(f"  {'N':>5} {'old dB':>7} {'old CPU s':>9} {'new dB':>7} {'new CPU s':>9} {'per photo':>15} "
                     f"{'new@old CPU':>11} {'new step>=old':>13}")
        for row in photos["counts"]:
            old, new, derived = row["old"], row["new"], row["derived"]
            per_photo = "/".join(f"{value:.2f}" for value in new.get("per_image_psnr_db", []))
            lines.append(f"  {row['num_splats']:>5} {old['psnr_db']:>7.2f} {old['cpu_seconds']:>9.1f} "
                         f"{new['psnr_db']:>7.2f} {new['cpu_seconds']:>9.1f} {per_photo:>15} "
                         f"{_fmt(derived['new_psnr_at_old_cpu_seconds_db'], '11.2f')} "
                         f"{_fmt(derived['new_step_reaching_old_psnr'], '13d')}")
    for name in ("prune_small", "prune_photos"):
        if name not in report:
            continue
        section = report[name]
        large = section["large"]
        lines.append(f"{name}: large fit N={large['num_splats']} {large['steps']} steps {large['psnr_db']:.2f} dB, "
                     f"{section['refit_steps']} refit steps per level")
        lines.append(f"  {'score':<9} {'N':>5} {'steps':>5} {'pruned':>7} {'solved':>7} {'refit':>7} "
                     f"{'fit-small':>9} {'margin':>7} {'drop':>6}")
        for score, steps in section["cascades"].items():
            for step in steps:
                lines.append(f"  {score:<9} {step['num_splats']:>5} {step['total_steps']:>5} "
                             f"{step['pruned_no_refit_db']:>7.2f} {step['pruned_solved_colours_db']:>7.2f} "
                             f"{step['refit_db']:>7.2f} {step['fit_small_db']:>9.2f} "
                             f"{step['margin_over_fit_small_db']:>+7.2f} {step['drop_from_parent_db']:>6.2f}")
    if "rasterizer" in report:
        lines.append("rasterizer (one thread, best of the timed calls):")
        lines.append(f"  {'case':<10} {'kernel':<12} {'fwd ms':>8} {'fwd+bwd ms':>10} {'dense ev/s':>10} "
                     f"{'in-cut ev/s':>11} {'GFLOP/s':>7} {'% 2-core':>8} {'% 1-core':>8}")
        for name, case in report["rasterizer"]["cases"].items():
            for kernel in ("cpp", "old_windowed"):
                entry = case[kernel]
                lines.append(
                    f"  {name:<10} {kernel:<12} {entry['forward_seconds'] * 1e3:>8.2f} "
                    f"{entry['forward_backward_seconds'] * 1e3:>10.2f} "
                    f"{entry['dense_equivalent_evaluations_per_second_forward_backward']:>10.2e} "
                    f"{entry['within_cutoff_evaluations_per_second_forward_backward']:>11.2e} "
                    f"{entry['useful_gflops_forward_backward']:>7.2f} "
                    f"{100 * entry['fraction_of_peak_two_cores_forward_backward']:>8.2f} "
                    f"{100 * entry['fraction_of_peak_one_core_forward_backward']:>8.2f}")
            lines.append(f"  {name:<10} C++ speedup forward {case['speedup_forward']:.1f}x, "
                         f"forward+backward {case['speedup_forward_backward']:.1f}x")
    for name, target in report.get("targets", {}).items():
        setting = "" if target.get("at_target_setting", True) else " (not at the target's setting)"
        lines.append(f"target {name}: measured {_fmt(target['measured'], '.3f')} {target['comparison']} "
                     f"{_fmt(target['threshold'], '.3f')}: {'met' if target['met'] else 'NOT met'}{setting}")
    return "\n".join(lines)


def gather_targets(report: dict[str, Any]) -> dict[str, Any]:
    return {f"{name}.{key}": target for name in SECTIONS if name in report
            for key, target in report[name]["targets"].items()}


def run_benchmark(settings: BenchmarkSettings, sections: list[str], out: str | Path, argv: list[str],
                  progress: bool = True) -> dict[str, Any]:
    started = time.perf_counter()
    if not cpu_kernel_available():
        report("the C++ kernel cannot be built here: the new fitter falls back to the windowed path")
    report_: dict[str, Any] = {
        "benchmark": "gsclip splat fitting on the CPU: the new fitter (params.yaml) against the old one (issue 11)",
        "mode": "quick" if settings.quick else "full",
        "command": " ".join(["python", "-m", "benchmarks.fitting", *argv]),
        "sections": sections,
        "settings": asdict(settings),
        "threads": {
            "torch_threads": torch.get_num_threads(),
            "why": (
                "single-threaded by default (--threads 1): the machine is shared, and with one thread "
                "this process's CPU time is the time the work itself took, whatever else runs; "
                "comparisons and derived figures use CPU time, wall time is recorded beside it. With "
                "more threads CPU time adds the threads up, so the rasterizer section then times wall "
                "clock instead."
            ),
        },
        "fitters": {
            "old_small": OLD_SMALL.model_dump(),
            "new_small": NEW_SMALL.model_dump(),
            "old_photo": OLD_PHOTO.model_dump(),
            "new_photo": NEW_PHOTO.model_dump(),
            "note": (
                "old = the landed main's algorithm (Adam on everything, no colour solve, no re-seeding, "
                "the windowed PyTorch rasterizer); new = params.yaml's fit.optimizer and "
                "fit_photos.optimizer. Step counts and log_every are set per run (log_every changes "
                "only how often the curve is sampled)."
            ),
        },
        "machine": machine_info(),
    }

    def save() -> None:  # targets and runtime last, after the sections
        report_.pop("targets", None)
        report_.pop("runtime_seconds", None)
        report_["targets"] = gather_targets(report_)
        report_["runtime_seconds"] = time.perf_counter() - started
        write_json(out, report_)

    gray: Tensor | None = None
    photos: Tensor | None = None

    def gray_images() -> Tensor:
        nonlocal gray
        if gray is None:
            gray = fashion_mnist_images(settings.fashion_mnist, settings.images)
        return gray

    def photo_images() -> Tensor:
        nonlocal photos
        if photos is None:
            photos = load_photos(list(settings.photos), settings.photo_size)
        return photos

    for name in sections:
        load_before = list(os.getloadavg())
        section_start = time.perf_counter()
        if name == "small_gray":
            section = small_gray_benchmark(gray_images(), settings, progress)
        elif name == "photos":
            section = photos_benchmark(photo_images(), settings, progress)
        elif name == "prune_small":
            large = NEW_SMALL.replace(iterations=settings.new_steps)
            section = prune_benchmark(gray_images(), settings.prune_levels, large,
                                      NEW_SMALL.replace(iterations=settings.prune_refit_steps),
                                      settings.prune_scores, settings.prune_target_score, name, progress)
        elif name == "prune_photos":
            large = NEW_PHOTO.replace(iterations=settings.prune_photo_large_steps)
            section = prune_benchmark(photo_images(), settings.prune_photo_levels, large,
                                      NEW_PHOTO.replace(iterations=settings.prune_photo_refit_steps),
                                      settings.prune_photo_scores, settings.prune_photo_scores[0], name, progress)
        else:
            photo = photo_images()[[list(settings.photos).index(settings.raster_photo)]]
            section = rasterizer_benchmark(gray_images(), photo, settings, progress)
        section["load_average"] = {"before": load_before, "after": list(os.getloadavg())}
        section["section_seconds"] = time.perf_counter() - section_start
        report_[name] = section
        save()
    return report_


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/fitting.json", help="JSON file to write")
    parser.add_argument("--quick", action="store_true", help="tiny sizes for the tests; not the benchmark's figures")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    sections = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown or not sections:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    torch.set_num_threads(args.threads)
    settings = BenchmarkSettings.quick_settings() if args.quick else BenchmarkSettings()
    if "rasterizer" in sections and settings.raster_photo not in settings.photos:
        settings = replace(settings, photos=(*settings.photos, settings.raster_photo))
    report_ = run_benchmark(settings, sections, args.out, argv, progress=not args.no_progress)
    print(summary_table(report_))
    print(f"wrote {args.out} in {report_['runtime_seconds']:.0f} s")


if __name__ == "__main__":
    main()
