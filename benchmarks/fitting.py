"""CPU benchmark of the splat fitter as ``params.yaml`` configures it: PSNR against steps and time,
pruning, and the rasterizer's speed.

``python -m benchmarks.fitting --out benchmarks/fitting.json [--quick] [--sections a,b] [--threads 1]``
(``make bench``; about 20 minutes on this 2-core machine) writes one JSON file with five sections:

- ``small_gray``: the first 1,000 Fashion-MNIST training images at ``fit.num_splats`` splats,
  ``fit.optimizer`` for its own step count and for 300 steps: PSNR against steps, wall and CPU time.
- ``schedules``: two photo sets (the paper profile's photo stage photos, and four others) at the
  profile's image size, at its largest and smallest splat counts: the paper's recipe for its 2,000
  steps, params.yaml's photo schedule, and the profile's chosen schedule fitted once per step of a
  grid. Each chosen fit's PSNR against the recipe's on that set + a margin (on the stage's photos at
  the largest count at least the paper's 37.4 dB) gives the steps the profile needs
  (``projection.py`` reads them, and the passes per step the fitter counts).
- ``prune_small`` / ``prune_photos``: a large fit at the first of the levels (``params.yaml``'s, on
  the 1,000 images; the paper's, on the photos), then the cascade down the others, each level pruned
  from the previous level's refit, per pruning score: PSNR right after pruning (kept colours, and
  least-squares colours), after the refit steps, against fitting each count directly with the same
  total steps ("fit-small"). Targets: halving costs at most 3 dB; prune-from-large beats fit-small.
- ``rasterizer``: forward and forward+backward time of the rasterizer the fitter uses on the CPU
  (the C++ kernel where it builds) at 28x28 and on one photo at the paper's largest count: useful
  GFLOP/s by the one FLOP model (:mod:`benchmarks.cost_model`) and the fraction of the machine's
  nominal fp32 peak (target: 10 %).

Timings run single-threaded by default (``--threads``): the machine is shared, and with one thread
this process's CPU time (``time.process_time``) is the time the work itself took. The JSON records
the machine, the load average around each section, how each figure is measured (``method``) and,
per target, the measured value and whether it is met. It is written after each section, so a crash
loses only the section it happened in. ``--quick`` shrinks everything for the tests.
"""

from __future__ import annotations

import argparse
import functools
import gc
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from benchmarks.cost_model import CPU_PEAK_GFLOPS, flops_backward, flops_forward
from benchmarks.harness import (
    ROOT, command_line, format_table, fmt, machine_info, paper_params, paper_splat_counts, timed_section,
)
from gsclip_lib.atomic_files import write_json
from gsclip_lib.data.fashion_mnist import load_fashion_mnist
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

PARAMS = load_params(ROOT / "params.yaml")
PAPER = paper_params()
SECTIONS = ("small_gray", "schedules", "prune_small", "prune_photos", "rasterizer")
SMALL = PARAMS.fit.optimizer  # the fitter at 28x28
PHOTO = PARAMS.fit_photos.optimizer  # the fitter on photographs (the schedules' "previous")
# The paper profile's fitter (the schedules' "chosen"), on this machine's backend (its kernels are twins).
CHOSEN = PAPER.fit.optimizer.replace(backend=PHOTO.backend)
PAPER_RECIPE = PHOTO.replace(colour_solve="none", reseed_every=0)  # the paper's fit as it describes it
PAPER_PSNR_DB = 37.4  # the paper's figure at its largest count, 224x224
HALVING_COST_DB = 3.0  # PSNR lost from the large fit to half its count, after the refit
PEAK_FRACTION_TARGET = 0.10  # the rasterizer's useful GFLOP/s over the machine's fp32 peak
RASTERIZERS: dict[str, Callable[..., Tensor]] = {"cpu": rasterize_cpu, "windowed": rasterize_windowed_torch}


@dataclass(frozen=True)
class BenchmarkSettings:
    """What is measured; :meth:`quick_settings` gives the test suite's shrunken version."""

    images: int = 1000  # the first images of Fashion-MNIST's training split
    small_splats: int = PARAMS.fit.num_splats
    small_steps: tuple[int, ...] = (SMALL.iterations, 300)
    small_log_every: int = 5  # steps between curve points (only the logging: not the algorithm)
    photos: tuple[str, ...] = ("astronaut", "coffee")  # pruning and the rasterizer
    photo_size: int = PAPER.data.image_size
    photo_counts: tuple[int, ...] = paper_splat_counts()  # the photos' pruning levels
    stage_photos: tuple[str, ...] = tuple(PAPER.fit_photos.photos)  # schedules: the photo stage's set ...
    other_photos: tuple[str, ...] = ("hubble_deep_field", "immunohistochemistry", "camera", "coins")  # ... and another
    schedule_counts: tuple[int, ...] = (max(paper_splat_counts()), min(paper_splat_counts()))
    step_grid: tuple[int, ...] = (100, 200, 300, 400, 500, 600, 800, 1000)  # the chosen schedule's fits
    recipe_steps: int = 2000  # the paper's iteration count
    margin_db: float = 0.3
    photo_log_every: int = 25
    prune_levels: tuple[int, ...] = tuple(PARAMS.levels())
    prune_scores: tuple[str, ...] = ("luminance", "energy")
    prune_refit_steps: int = PARAMS.prune.refit_iterations
    prune_target_score: str = PARAMS.prune.score  # the pipeline's score decides the targets
    prune_photo_large_steps: int = 400
    prune_photo_refit_steps: int = PAPER.prune.refit_iterations
    prune_photo_scores: tuple[str, ...] = ("luminance",)
    raster_photo: str = "astronaut"
    raster_photo_splats: int = max(paper_splat_counts())
    raster_repeats: int = 3  # timed calls after one warm-up; the best counts
    warmup_steps: int = 2  # an untimed fit of the same shapes before each timed one
    fashion_mnist_dir: str = PARAMS.data.fashion_mnist_dir
    quick: bool = False

    @classmethod
    def quick_settings(cls) -> "BenchmarkSettings":
        return cls(images=64, small_steps=(15, 20), photo_size=64, photo_counts=(256, 128, 64, 32),
                   schedule_counts=(256, 32), step_grid=(5, 10), recipe_steps=20, photo_log_every=5,
                   stage_photos=("astronaut",), other_photos=("coffee",), prune_refit_steps=5, prune_photo_large_steps=20, prune_photo_refit_steps=5, raster_photo_splats=256, warmup_steps=1,
                   quick=True)


def fashion_mnist_images(folder: str | Path, count: int) -> Tensor:  # [count, 1, 28, 28] in [0, 1]
    """The first ``count`` training images of Fashion-MNIST, read by the library's reader."""
    pixels, _ = load_fashion_mnist(folder, "train")
    if pixels.shape[0] < count:
        raise ValueError(f"{folder} holds {pixels.shape[0]} training images, the benchmark needs {count}")
    return torch.from_numpy(pixels[:count])[:, None].float() / 255.0


# --- timed fits and their curves ------------------------------------------------------------------


def mean_psnr(values: Tensor) -> float:
    return float(values.float().nanmean())


def curve_of(result: FitResult, steps: int, wall: float, cpu: float) -> dict[str, list[float]]:
    """PSNR against steps and both clocks: the fit's history, then the returned fit at ``steps``.

    A history point at step i is the render after i optimizer steps, with the clocks read after the
    step that follows it (every point is timed a step late: conservative). The last point is the fit
    ``fit_splats`` returns (after its final colour solve, where it solves), timed around the whole
    call, which also holds the initialization and the final render.
    """
    history = result.history
    return {
        "step": [int(step) for step in history["iteration"]] + [int(steps)],
        "seconds": [float(value) for value in history["seconds"]] + [float(wall)],
        "cpu_seconds": [float(value) for value in history["cpu_seconds"]] + [float(cpu)],
        "psnr": [float(value) for value in history["psnr"]] + [mean_psnr(result.psnr)],
    }


def first_reaching(curve: dict[str, list[float]], target_db: float) -> int | None:
    """The step of the first curve point whose PSNR is at least ``target_db``; None if none is."""
    return next((step for step, value in zip(curve["step"], curve["psnr"]) if value >= target_db), None)


def timed_fit(images: Tensor, count: int, settings: FitSettings, *, label: str, progress: bool,
              prune_from: tuple[Splats, str] | None = None, keep_curve: bool = True) -> tuple[FitResult, dict[str, Any]]:
    """One fit (or, with ``prune_from`` = (splats, score), a prune-and-refit) timed on both clocks;
    its record for the JSON."""
    gc.collect()
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    if prune_from is not None:
        result = prune_and_refit(images, prune_from[0], count, settings, prune_from[1])
    else:
        result = fit_splats(images, count, settings, progress=progress, description=label)
    wall, cpu = time.perf_counter() - wall_start, time.process_time() - cpu_start
    record: dict[str, Any] = {
        "steps": settings.iterations, "num_splats": count, "psnr_db": mean_psnr(result.psnr), "seconds": wall,
        "cpu_seconds": cpu, "reseeded": result.reseeded, "retried": len(result.retried), "dropped": len(result.dropped),
    }
    if images.shape[0] <= 8:
        record["per_image_psnr_db"] = [float(value) for value in result.psnr]
    if keep_curve:
        record["curve"] = curve_of(result, settings.iterations, wall, cpu)
    return result, record


def warm_up(images: Tensor, count: int, settings: FitSettings, steps: int) -> None:
    """An untimed short fit of the same shapes: builds the C++ kernel, compiles the windowed path."""
    if steps > 0:
        fit_splats(images, count, settings.replace(iterations=steps), progress=False)


def section_bar(total: int, name: str, progress: bool):
    return progress_bar(total=total, desc=name, disable=not progress, leave=True)


def target(description: str, measured: float | None, comparison: str, threshold: float, **extra: Any) -> dict[str, Any]:
    """A target's record: whether ``measured`` meets ``threshold`` (a missing measurement does not)."""
    checks = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b}
    met = measured is not None and checks[comparison](measured, threshold)
    return {"description": description, "threshold": threshold, "comparison": comparison, "measured": measured,
            **extra, "met": met}


# --- sections -------------------------------------------------------------------------------------


def small_gray_benchmark(images: Tensor, settings: BenchmarkSettings, progress: bool) -> dict[str, Any]:
    count, log = settings.small_splats, settings.small_log_every
    bar = section_bar(1 + len(settings.small_steps), "small_gray", progress)
    warm_up(images, count, SMALL, settings.warmup_steps)
    bar.update(1)
    runs = {}
    for steps in settings.small_steps:
        _, runs[f"fit_{steps}"] = timed_fit(images, count, SMALL.replace(iterations=steps, log_every=log),
                                            label=f"small_gray {steps} steps", progress=progress)
        bar.update(1)
        report(f"small_gray {steps} steps: {runs[f'fit_{steps}']['psnr_db']:.2f} dB")
    bar.close()
    return {
        "images": int(images.shape[0]), "image_size": int(images.shape[-1]), "num_splats": count,
        "source": {"name": "fashion-mnist", "folder": settings.fashion_mnist_dir, "images": "the first of train"},
        "backend": resolve_backend(SMALL.backend, images.device), "runs": runs,
        "cpu_seconds_per_step": {name: run["cpu_seconds"] / run["steps"] for name, run in runs.items()},
        "method": (
            f"fit_splats on the whole batch under one optimizer, after an untimed {settings.warmup_steps}-step fit "
            f"of the same shapes. Curves: the fit's history every {log} steps (mean PSNR over the images of the "
            "clamped render after that many steps; wall and this process's CPU time read after the following "
            "step), then the returned fit at the last step, timed around the whole fit_splats call."
        ),
        "targets": {},
    }


def schedule_fits(photos: Tensor, count: int, settings: BenchmarkSettings, progress: bool,
                  published_floor: bool) -> dict[str, Any]:
    """One photo set at one count: the paper's recipe (its curve), the previous schedule (its curve: it
    solves at every step, so each point has solved colours) and the chosen one (a fit per grid step:
    its curve points lack the final solve that a fit of that length ends with). With
    ``published_floor`` the paper's published PSNR (an average over its own images, at its largest
    count) is the least the recipe's reference may be."""
    log = settings.photo_log_every
    recipe = PAPER_RECIPE.replace(iterations=settings.recipe_steps, log_every=log)
    previous = PHOTO.replace(iterations=max(settings.step_grid), log_every=log)
    warm_up(photos, count, CHOSEN, settings.warmup_steps)
    runs = {"paper_recipe": timed_fit(photos, count, recipe, label=f"recipe N={count}", progress=progress)[1],
            "previous": timed_fit(photos, count, previous, label=f"previous N={count}", progress=progress)[1]}
    grid = [timed_fit(photos, count, CHOSEN.replace(iterations=steps), label=f"chosen N={count} {steps}",
                      progress=progress, keep_curve=False)[1] for steps in settings.step_grid]
    runs["chosen"] = {"steps": [run["steps"] for run in grid], "psnr_db": [run["psnr_db"] for run in grid],
                      "cpu_seconds": [run["cpu_seconds"] for run in grid], "per_image_psnr_db":
                      [run.get("per_image_psnr_db") for run in grid]}
    reference, published, needed = needed_psnr(runs["paper_recipe"]["psnr_db"], count, published_floor,
                                               settings.margin_db)
    chosen_curve = {"step": runs["chosen"]["steps"], "psnr": runs["chosen"]["psnr_db"]}
    return {"num_splats": count, "runs": runs, "passes": {name: measured_step_passes(settings_)
                                                          for name, settings_ in (("previous", PHOTO), ("chosen", CHOSEN))},
            "reference_db": reference, "published_db": published, "needed_db": needed,
            "steps_to_needed": {"chosen": first_reaching(chosen_curve, needed),
                                "previous": first_reaching(runs["previous"]["curve"], needed)}}


def needed_psnr(recipe_db: float, count: int, published_floor: bool, margin_db: float) -> tuple[float, float | None, float]:
    """``(reference, published, needed)`` dB: the recipe's PSNR, raised to the paper's published figure
    where it applies (with ``published_floor``, at the paper's largest count), plus the margin."""
    published = PAPER_PSNR_DB if published_floor and count == max(paper_splat_counts()) else None
    reference = max(recipe_db, published if published is not None else -math.inf)
    return reference, published, reference + margin_db


def measured_step_passes(settings: FitSettings) -> dict[str, float]:
    """Render passes per step of a schedule, counted by the fitter on a 64x64 photo (CG size)."""
    short = settings.replace(iterations=20, log_every=20)
    photo = load_photos(["astronaut"], 64)
    longer = fit_splats(photo, 256, short.replace(iterations=40), progress=False).passes
    base = fit_splats(photo, 256, short, progress=False).passes
    return {kind: (longer[kind] - base[kind]) / 20 for kind in base}


def schedules_benchmark(sets: dict[str, Tensor], settings: BenchmarkSettings, progress: bool) -> dict[str, Any]:
    bar = section_bar(len(sets) * len(settings.schedule_counts), "schedules", progress)
    section: dict[str, Any] = {"sets": {}, "targets": {}}
    for name, photos in sets.items():
        entries = []
        for count in settings.schedule_counts:
            entries.append(schedule_fits(photos, count, settings, progress, published_floor=name == "stage"))
            bar.update(1)
            entry = entries[-1]
            report(f"schedules {name} N={count}: needed {entry['needed_db']:.2f} dB, chosen reaches it after "
                   f"{entry['steps_to_needed']['chosen']} steps, previous after {entry['steps_to_needed']['previous']}")
        section["sets"][name] = {"photos": list(getattr(settings, f"{name}_photos")), "counts": entries}
        for entry in entries:
            count, steps = entry["num_splats"], entry["steps_to_needed"]["chosen"]
            section["targets"][f"{name}_{count}_reached"] = target(
                f"the chosen schedule reaches the paper recipe's PSNR on the {name} set (on the stage's photos at "
                f"{max(paper_splat_counts())}: at least the paper's {PAPER_PSNR_DB} dB) + {settings.margin_db} dB at "
                f"{count} splats within the step grid",
                steps, "<=", max(settings.step_grid), needed_db=entry["needed_db"])
    bar.close()
    section.update({
        "image_size": settings.photo_size, "step_grid": list(settings.step_grid), "margin_db": settings.margin_db,
        "schedules": {"previous": PHOTO.model_dump(), "chosen": CHOSEN.model_dump(), "paper_recipe":
                      PAPER_RECIPE.replace(iterations=settings.recipe_steps).model_dump()},
        "method": ("each photo set fitted as one batch at each count. paper_recipe: the paper's fit as it describes it "
                   "(grid init, Adam on every parameter, its lambda, no colour solve, no re-seeding) for its "
                   f"{settings.recipe_steps} iterations, step sizes of fit_photos.optimizer; previous: params.yaml's "
                   "fit_photos.optimizer (a solve before every step); chosen: profiles/paper.yaml's fit.optimizer, one "
                   "fit per grid step. needed_db = the recipe's PSNR on that set (on the stage's photos at the largest "
                   "count at least the paper's published figure, an average over its own images) + margin_db; steps_to_needed: the first step reaching it. passes: per "
                   "step, counted by the fitter over 20 steps of a 64x64 fit with 256 splats."),
    })
    return section


def prune_cascade(images: Tensor, large: tuple[FitResult, dict[str, Any]], levels: tuple[int, ...], score: str,
                  refit_settings: FitSettings, fit_small: dict[str, Any], name: str, bar) -> list[dict[str, Any]]:
    """``levels[0] -> levels[1] -> ...`` with ``score``, each level pruned from the previous one's refit."""
    height, width = images.shape[-2:]
    backend, cutoff = refit_settings.backend, refit_settings.cutoff
    source, parent_db = large[0].splats, large[1]["psnr_db"]
    steps = []
    for count in levels[1:]:
        with torch.no_grad():
            kept = keep_best(source, prune_score(source, score, height, width, cutoff, backend), count)
            kept_db = mean_psnr(psnr(images, render_splats(kept, height, width, backend=backend, cutoff=cutoff)))
        solved_db = mean_psnr(prune_and_refit(images, source, count, refit_settings.replace(iterations=0), score).psnr)
        refit_result, refit = timed_fit(images, count, refit_settings, label=f"{name} refit N={count}",
                                        progress=False, prune_from=(source, score), keep_curve=False)
        bar.update(2)
        small = fit_small[str(count)]
        steps.append({
            "num_splats": count, "total_steps": small["steps"], "pruned_no_refit_db": kept_db,
            "pruned_solved_colours_db": solved_db, "refit": refit, "refit_db": refit["psnr_db"],
            "fit_small_db": small["psnr_db"], "margin_over_fit_small_db": refit["psnr_db"] - small["psnr_db"],
            "drop_from_parent_db": parent_db - refit["psnr_db"],
        })
        report(f"{name} {score} N={count}: pruned {kept_db:.2f} / solved {solved_db:.2f} / refit "
               f"{refit['psnr_db']:.2f} dB, fit-small {small['psnr_db']:.2f} dB ({small['steps']} steps)")
        source, parent_db = refit_result.splats, refit["psnr_db"]
    return steps


def prune_benchmark(images: Tensor, levels: tuple[int, ...], large_settings: FitSettings, refit_settings: FitSettings,
                    scores: tuple[str, ...], target_score: str, name: str, progress: bool) -> dict[str, Any]:
    """The cascade down ``levels`` per score, against fitting each count directly with the same total
    steps; ``refit_settings.iterations`` refit steps per level."""
    bar = section_bar(1 + (len(levels) - 1) * (1 + 2 * len(scores)), name, progress)
    large = timed_fit(images, levels[0], large_settings, label=f"{name} N={levels[0]}", progress=progress,
                      keep_curve=False)
    bar.update(1)
    fit_small: dict[str, Any] = {}
    for depth, count in enumerate(levels[1:], start=1):
        total = large_settings.iterations + depth * refit_settings.iterations
        _, fit_small[str(count)] = timed_fit(images, count, large_settings.replace(iterations=total),
                                             label=f"{name} fit-small N={count}", progress=progress, keep_curve=False)
        bar.update(1)
    cascades = {score: prune_cascade(images, large, levels, score, refit_settings, fit_small, name, bar)
                for score in scores}
    bar.close()
    large_db = large[1]["psnr_db"]
    halving = {score: large_db - steps[0]["refit_db"] for score, steps in cascades.items()}
    margins = {score: min(step["margin_over_fit_small_db"] for step in steps) for score, steps in cascades.items()}
    return {
        "images": int(images.shape[0]), "image_size": int(images.shape[-1]), "channels": int(images.shape[1]),
        "levels": list(levels), "large": large[1], "refit_steps": refit_settings.iterations, "scores": list(scores),
        "target_score": target_score, "cascades": cascades, "fit_small": fit_small,
        "settings": {"large_and_fit_small": large_settings.model_dump(), "refit": refit_settings.model_dump()},
        "method": (
            "large fit at the first level; then per score a cascade, each level pruned from the previous level's "
            "refit: pruned_no_refit_db keeps the best-scoring splats with their colours (keep_best, then render); "
            "pruned_solved_colours_db is prune_and_refit with 0 steps (least-squares colours only); refit_db is "
            "prune_and_refit with refit_steps steps. fit_small_db fits the count directly from the grid with the "
            "large fit's settings and as many steps as the cascade spent to reach that level (large + refits)."
        ),
        "targets": {
            "halving_cost_after_refit": target(
                f"large fit PSNR minus the refit PSNR at {levels[1]} splats (from {levels[0]})",
                halving[target_score], "<=", HALVING_COST_DB, score=target_score, by_score=halving),
            "prune_beats_fit_small": target(
                "smallest margin over the levels of prune-and-refit over fit-small at equal total steps",
                margins[target_score], ">", 0.0, score=target_score, by_score=margins),
        },
    }


# --- rasterizer -----------------------------------------------------------------------------------


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
    function()  # warm-up: builds or compiles the kernel, touches the memory
    best = math.inf
    for _ in range(repeats):
        start = clock()
        function()
        best = min(best, clock() - start)
    return best


def rasterizer_case(images: Tensor, num_splats: int, repeats: int, cutoff: float) -> dict[str, Any]:
    batch, channels, height, width = images.shape
    kernel = resolve_backend(SMALL.backend, images.device)
    rasterize = RASTERIZERS[kernel]
    splats = init_grid(images, num_splats)
    leaves = [t.clone().requires_grad_(True) for t in (splats.positions, splats.cholesky, splats.colours)]
    cotangent = torch.randn((batch, channels, height, width), generator=torch.Generator().manual_seed(0))
    one_thread = torch.get_num_threads() == 1
    clock = time.process_time if one_thread else time.perf_counter

    def forward() -> Tensor:
        with torch.no_grad():
            return rasterize(*leaves, splats.valid, height, width, cutoff)

    def forward_backward() -> None:
        torch.autograd.grad(rasterize(*leaves, splats.valid, height, width, cutoff), leaves, cotangent)

    dense, inside = batch * num_splats * height * width, count_within_cutoff(splats, height, width, cutoff)
    seconds = {"forward": best_time(forward, repeats, clock), "forward_backward": best_time(forward_backward, repeats, clock)}
    flops = {"forward": inside * flops_forward(channels),
             "forward_backward": inside * (flops_forward(channels) + flops_backward(channels))}
    case: dict[str, Any] = {
        "kernel": kernel, "batch": batch, "num_splats": num_splats, "height": height, "width": width,
        "channels": channels, "cutoff": cutoff, "dense_equivalent_evaluations": dense,
        "evaluations_within_cutoff": inside,
        "flops_per_evaluation": {"forward": flops_forward(channels), "backward": flops_backward(channels)},
        "clock": "cpu (time.process_time)" if one_thread else "wall (time.perf_counter)",
    }
    for direction, elapsed in seconds.items():
        gflops = flops[direction] / elapsed / 1e9
        case.update({
            f"{direction}_seconds": elapsed,
            f"dense_equivalent_evaluations_per_second_{direction}": dense / elapsed,
            f"within_cutoff_evaluations_per_second_{direction}": inside / elapsed,
            f"useful_gflops_{direction}": gflops,
            **{f"fraction_of_peak_{cores}_{direction}": gflops / peak for cores, peak in CPU_PEAK_GFLOPS.items()},
        })
    return case


def rasterizer_benchmark(gray: Tensor, photo: Tensor, settings: BenchmarkSettings, progress: bool) -> dict[str, Any]:
    bar = section_bar(2, "rasterizer", progress)
    cases = {}
    for name, images, count in (("small_gray", gray, settings.small_splats), ("photo", photo, settings.raster_photo_splats)):
        cases[name] = rasterizer_case(images, count, settings.raster_repeats, SMALL.cutoff)
        bar.update(1)
    bar.close()
    case = cases["small_gray"]
    measured = case["fraction_of_peak_two_cores_forward_backward"]
    return {
        "cases": cases, "peak_gflops": CPU_PEAK_GFLOPS,
        "method": (
            "grid-initialized splats (init_grid) of the images, leaves requiring grad; forward under no_grad, "
            "forward+backward = render + torch.autograd.grad with a fixed random cotangent. One warm-up call, then "
            f"the best of {settings.raster_repeats} calls, on this process's CPU time when single-threaded (else "
            "wall time). Dense-equivalent evaluations = B*N*H*W per pass; within-cutoff evaluations are the "
            "splat-pixel pairs with Mahalanobis distance <= cutoff at pixel centres. Useful FLOPs = within-cutoff "
            "evaluations x benchmarks/cost_model.py's count (forward 11+2C, backward 26+4C). The peaks are "
            "nominal (2 AVX2 FMA units x 8 fp32 lanes x 2 flops x ~3 GHz per core), not measured."
        ),
        "targets": {"fraction_of_peak": target(
            "28x28 forward+backward: useful GFLOP/s over the machine's 2-core fp32 peak", measured, ">=",
            PEAK_FRACTION_TARGET, one_core_fraction=case["fraction_of_peak_one_core_forward_backward"],
            photo_fraction=cases["photo"]["fraction_of_peak_two_cores_forward_backward"],
            note="measured on one thread against the two-core peak; one_core_fraction is against one core's")},
    }


# --- summary, main --------------------------------------------------------------------------------


def summary_table(result: dict[str, Any]) -> str:
    machine = result["machine"]
    lines = [f"benchmarks.fitting ({result['mode']}), {machine['torch_threads']} thread(s), {machine['cpu_model']}"]
    if "small_gray" in result:
        rows = [[name, run["steps"], run["psnr_db"], run["cpu_seconds"], run["seconds"], run["cpu_seconds"] / run["steps"]]
                for name, run in result["small_gray"]["runs"].items()]
        lines += ["small_gray:", format_table(["run", "steps", "PSNR dB", "CPU s", "wall s", "CPU s/step"], rows,
                                              ["", "d", ".2f", ".1f", ".1f", ".4f"])]
    if "schedules" in result:
        rows = [[name, entry["num_splats"], entry["runs"]["paper_recipe"]["psnr_db"], entry["needed_db"],
                 fmt(entry["steps_to_needed"]["previous"]), fmt(entry["steps_to_needed"]["chosen"]),
                 entry["passes"]["previous"], entry["passes"]["chosen"]]
                for name, group in result["schedules"]["sets"].items() for entry in group["counts"]]
        lines += ["schedules:", format_table(["set", "N", "recipe dB", "needed dB", "previous steps", "chosen steps",
                                              "previous passes/step", "chosen passes/step"], rows,
                                             ["", "d", ".2f", ".2f", "", "", "", ""])]
    for name in ("prune_small", "prune_photos"):
        if name in result:
            rows = [[score, step["num_splats"], step["total_steps"], step["pruned_no_refit_db"],
                     step["pruned_solved_colours_db"], step["refit_db"], step["fit_small_db"],
                     step["margin_over_fit_small_db"]]
                    for score, steps in result[name]["cascades"].items() for step in steps]
            lines += [f"{name} (large fit {result[name]['large']['psnr_db']:.2f} dB):",
                      format_table(["score", "N", "steps", "pruned", "solved", "refit", "fit-small", "margin"], rows,
                                   ["", "d", "d", ".2f", ".2f", ".2f", ".2f", "+.2f"])]
    if "rasterizer" in result:
        rows = [[name, case["kernel"], case["forward_seconds"] * 1e3, case["forward_backward_seconds"] * 1e3,
                 case["useful_gflops_forward_backward"], 100 * case["fraction_of_peak_two_cores_forward_backward"]]
                for name, case in result["rasterizer"]["cases"].items()]
        lines += ["rasterizer:", format_table(["case", "kernel", "fwd ms", "fwd+bwd ms", "GFLOP/s", "% 2-core"], rows,
                                              ["", "", ".2f", ".2f", ".2f", ".2f"])]
    for name, entry in result.get("targets", {}).items():
        setting = "" if entry.get("at_target_setting", True) else " (not at the target's setting)"
        lines.append(f"target {name}: measured {fmt(entry['measured'], '.3f')} {entry['comparison']} "
                     f"{fmt(entry['threshold'], '.3f')}: {'met' if entry['met'] else 'NOT met'}{setting}")
    return "\n".join(lines)


def run_sections(settings: BenchmarkSettings, sections: list[str], save: Callable[[str, dict[str, Any]], None],
                 progress: bool) -> None:
    """Each section in turn, timed with the load average around it, saved as soon as it is done."""
    gray = functools.cache(lambda: fashion_mnist_images(settings.fashion_mnist_dir, settings.images))
    photos = functools.cache(lambda: load_photos(list(settings.photos), settings.photo_size))

    runs: dict[str, Callable[[], dict[str, Any]]] = {
        "small_gray": lambda: small_gray_benchmark(gray(), settings, progress),
        "schedules": lambda: schedules_benchmark(
            {name: load_photos(list(getattr(settings, f"{name}_photos")), settings.photo_size) for name in ("stage", "other")},
            settings, progress),
        "prune_small": lambda: prune_benchmark(
            gray(), settings.prune_levels, SMALL.replace(iterations=settings.small_steps[0]),
            SMALL.replace(iterations=settings.prune_refit_steps), settings.prune_scores, settings.prune_target_score,
            "prune_small", progress),
        "prune_photos": lambda: prune_benchmark(
            photos(), settings.photo_counts, CHOSEN.replace(iterations=settings.prune_photo_large_steps),
            CHOSEN.replace(iterations=settings.prune_photo_refit_steps), settings.prune_photo_scores,
            settings.prune_photo_scores[0], "prune_photos", progress),
        "rasterizer": lambda: rasterizer_benchmark(
            gray(), photos()[[list(settings.photos).index(settings.raster_photo)]], settings, progress),
    }
    for name in sections:
        save(name, timed_section(runs[name]))


def run_benchmark(settings: BenchmarkSettings, sections: list[str], out: str | Path, argv: list[str] | None,
                  progress: bool = True) -> dict[str, Any]:
    started = time.perf_counter()
    if not cpu_kernel_available():
        report("the C++ kernel cannot be built here: the fitter falls back to the windowed path")
    result: dict[str, Any] = {
        "benchmark": "gsclip splat fitting on the CPU, params.yaml's fitter",
        "mode": "quick" if settings.quick else "full",
        "command": command_line("benchmarks.fitting", argv),
        "sections": sections,
        "settings": asdict(settings),
        "threads": {
            "torch_threads": torch.get_num_threads(),
            "why": ("single-threaded by default (--threads 1): the machine is shared, and with one thread this "
                    "process's CPU time is the time the work itself took, whatever else runs; wall time is "
                    "recorded beside it. With more threads the rasterizer section times wall clock instead."),
        },
        "fitters": {"small": SMALL.model_dump(), "photo": PHOTO.model_dump(), "chosen": CHOSEN.model_dump()},
        "machine": {**machine_info(), "cpu_kernel_available": cpu_kernel_available(),
                    "compile_enabled": compile_enabled()},
    }

    def save(name: str, section: dict[str, Any]) -> None:  # targets and runtime last, after the sections
        result[name] = section
        result.pop("targets", None), result.pop("runtime_seconds", None)
        result["targets"] = {f"{key}.{label}": entry for key in SECTIONS if key in result
                             for label, entry in result[key]["targets"].items()}
        result["runtime_seconds"] = time.perf_counter() - started
        write_json(out, result)

    run_sections(settings, sections, save, progress)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/fitting.json", help="JSON file to write")
    parser.add_argument("--quick", action="store_true", help="tiny sizes for the tests; not the benchmark's figures")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
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
    result = run_benchmark(settings, sections, args.out, argv, progress=not args.no_progress)
    print(summary_table(result))
    print(f"wrote {args.out} in {result['runtime_seconds']:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
