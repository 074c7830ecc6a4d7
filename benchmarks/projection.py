"""A projection, on paper, of the paper-scale run: time and GPU-hours from measured per-image costs.

``python -m benchmarks.projection --out benchmarks/projection.json`` turns measured per-image costs
into the time and GPU-hours of the paper-scale run (``profiles/paper.yaml``: 12.8 M DataComp images,
224x224 RGB, its four splat levels, a ViT-B-16 teacher) on 8 GPUs:

- **Fitting.** Each image is fitted once at the top level (``fit.optimizer.iterations`` steps),
  then refitted down the prune cascade (``prune.refit_iterations`` steps a level). A pass costs the
  :mod:`benchmarks.cost_model` roofline on ``gpu_check.json``'s evaluation counts, or the kernel
  times of a measured CUDA run there; a fit costs the passes the fitter counts itself over that many
  steps (:func:`fit_passes`: renders, backwards, colour adjoints). Beside it, the bottom level fitted
  alone for the steps ``benchmarks/fitting.json`` found it needs to reach the paper recipe's PSNR:
  the setting of the paper's 25.6 GPU-hours. The CPU-only figure uses that file's CPU seconds per step.
- **Training.** FLOPs per sample counted with ``FlopCounterMode`` on the profile's models (random
  weights): the teacher's image forward, the splat tower's forward and backward, the text forward;
  GPU time at an assumed peak and model FLOP utilization (:data:`PEAK_FLOPS`, :data:`MFU`).
- **Data.** One JPEG decode per sample per epoch, measured here, gives the loader's cores per GPU.

Everything is per image times 12.8 M times epochs, perfectly data-parallel over the 8 GPUs; what is
measured and what is assumed is written into the JSON beside the numbers.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks.cost_model import ROOFLINE_DEVICE, device_peaks, roofline
from benchmarks.harness import command_line, file_provenance, format_table, machine_info
from gsclip_lib.atomic_files import write_json
from gsclip_lib.splats.fitting import fit_splats

PAPER_IMAGES = 12_800_000  # DataComp's small pool as the paper uses it
NUM_GPUS = 8
PAPER_FIT_400_GPU_HOURS = 25.6  # the paper: the 400-splat setting, 12.8 M images (about 7 ms an image)
PEAK_FLOPS = 989e12  # assumed: H100 SXM, bf16 dense tensor-core peak (data sheet, no sparsity)
PEAK_NAME = "H100 SXM bf16 dense tensor-core peak, 989 TFLOP/s (data sheet)"
MFU = {"expected": 0.40, "pessimistic": 0.25}  # assumed model FLOP utilization of the training steps
HEADLINE_MODEL = "no_cache_reuse"  # the roofline variant the headline figures use (the slower one)
SECONDS_PER_HOUR = 3600.0


# --- Fitting --------------------------------------------------------------------------------------


def fit_plan(params: Any, fitting: dict[str, Any]) -> list[dict[str, Any]]:
    """The fits one image goes through (the top level, then one refit per pruned level), each with the
    passes the fitter counts for it; and, for the paper's own figure, the bottom level fitted alone for
    as many steps as fitting.json's schedules section found it needs."""
    settings = params.fit.optimizer
    plan = [{"num_splats": params.fit.num_splats, "steps": settings.iterations, "role": "top"}]
    plan += [{"num_splats": level, "steps": params.prune.refit_iterations, "role": "refit"}
             for level in params.prune.levels]
    bottom = min(params.levels())
    needed = [entry["steps_to_needed"]["chosen"] for group in fitting["schedules"]["sets"].values()
              for entry in group["counts"] if entry["num_splats"] == bottom]
    steps = None if not needed or None in needed else max(needed)
    alone = {"num_splats": bottom, "steps": steps, "role": "alone", "needed_db": {
        name: entry["needed_db"] for name, group in fitting["schedules"]["sets"].items()
        for entry in group["counts"] if entry["num_splats"] == bottom}}
    for fit in [*plan, alone]:
        fit["passes"] = fit_passes(settings, fit["steps"] or 0)
    return plan + [alone]


def fit_passes(settings: Any, steps: int) -> dict[str, int]:
    """The render passes one fit of ``steps`` steps runs with ``settings`` (its solves, re-seedings and
    final solve included), as the fitter counts them (``FitResult.passes``): a fit of one 48x48 image
    with 64 splats (a CG solve, as on the paper's photos) on the C++ backend, whose adjoint is a kernel
    of its own as on the GPU. The counts depend on the schedule and the step count, not the size."""
    image = torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    return fit_splats(image, 64, settings.replace(iterations=steps, backend="cpu"), progress=False).passes


def render_only(steps: int) -> dict[str, int]:
    return {"forward": steps, "backward": steps, "adjoint": 0}


def roofline_pass_seconds(gpu_check: dict[str, Any]) -> dict[int, dict[str, dict[str, dict[str, float]]]]:
    """``{N: {kernel: {model: {forward, backward, adjoint}}}}``: seconds of one pass of one image, the
    cost model's roofline on gpu_check.json's evaluation counts (the adjoint: the tile-culled one)."""
    table: dict[int, dict[str, dict[str, dict[str, float]]]] = {}
    peaks = device_peaks(ROOFLINE_DEVICE)
    for counts in gpu_check["evaluation_counts"]:
        entry = roofline(counts, peaks)
        per_pass = entry["per_image_pass"]
        table[int(entry["num_splats"])] = {
            kernel: {model: {**{direction: float(per_pass[f"{kernel}_{direction}"][model]["seconds"])
                                for direction in ("forward", "backward")},
                             "adjoint": float(per_pass["adjoint"][model]["seconds"])}
                     for model in ("no_cache_reuse", "cache_reuse")}
            for kernel in ("dense", "tiled")
        }
    return table


def measured_gpu(gpu_check: dict[str, Any]) -> dict[str, Any] | None:
    """The kernel times of a real CUDA run of ``make gpu-check``, per image and pass, or None."""
    gpu = gpu_check.get("gpu")
    if not gpu or gpu.get("smoke") or not gpu.get("passed") or "benchmark" not in gpu:
        return None
    bench = gpu["benchmark"]
    batch = float(bench["batch"])
    return {
        "device": gpu.get("device"),
        "num_splats": int(bench["num_splats"]),
        "batch": int(bench["batch"]),
        "per_image_pass": {kernel: {"forward": bench[kernel]["forward_seconds_per_step"] / batch,
                                    "backward": bench[kernel]["backward_seconds_per_step"] / batch}
                           for kernel in ("dense", "tiled")},
    }


def gpu_pass_seconds(gpu_check: dict[str, Any]) -> tuple[dict, str]:
    """Per-pass seconds used for the projection, and where they came from. With a measured CUDA run
    both roofline variants are replaced by the measured times, carried to the other counts by the
    ratio measured / roofline (no cache reuse) at the measured count."""
    table = roofline_pass_seconds(gpu_check)
    measured = measured_gpu(gpu_check)
    if measured is None or measured["num_splats"] not in table:
        return table, "roofline (benchmarks/cost_model.py on gpu_check.json evaluation_counts; no measured CUDA run recorded)"
    anchor = table[measured["num_splats"]]
    scaled: dict[int, dict[str, dict[str, dict[str, float]]]] = {}
    for count, kernels in table.items():
        scaled[count] = {}
        for kernel, models in kernels.items():
            values = {direction: models["no_cache_reuse"][direction]
                      * measured["per_image_pass"][kernel][direction] / anchor[kernel]["no_cache_reuse"][direction]
                      for direction in ("forward", "backward")}
            values["adjoint"] = models["no_cache_reuse"]["adjoint"] * values["backward"] / models["no_cache_reuse"][
                "backward"]  # not timed by gpu_check: the backward's measured / roofline ratio
            scaled[count][kernel] = {"no_cache_reuse": values, "cache_reuse": dict(values)}
    return scaled, (f"measured on {measured['device']} at {measured['num_splats']} splats, batch {measured['batch']} "
                    "(gpu_check.json gpu.benchmark), scaled to the other counts by the roofline")


def pass_seconds_sum(pass_seconds: dict[str, float], passes: dict[str, float]) -> float:
    return sum(count * pass_seconds[kind] for kind, count in passes.items())


def fit_seconds_per_image(plan: list[dict[str, Any]], pass_table: dict, kernel: str, model: str,
                          step: str = "full_step") -> dict[str, Any]:
    """GPU seconds to fit one image through ``plan``: each fit's counted passes (``full_step``), or its
    renders and backwards alone (``render_only``), priced per pass."""
    levels = []
    for fit in plan:
        passes = fit["passes"] if step == "full_step" else render_only(fit["steps"])
        seconds = pass_seconds_sum(pass_table[fit["num_splats"]][kernel][model], passes)
        levels.append({"num_splats": fit["num_splats"], "steps": fit["steps"], "role": fit["role"], "seconds": seconds})
    return {"levels": levels, "seconds": sum(level["seconds"] for level in levels)}


def cpu_seconds_per_step(fitting: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """CPU core-seconds per step per image at each count, from fitting.json (one thread): the chosen
    schedule's longest fit in the schedules section where it ran at that count (both photo sets), else
    the prune_photos cascade's refit at that level."""
    table: dict[int, dict[str, Any]] = {}
    for cascade in fitting["prune_photos"]["cascades"].values():
        images = fitting["prune_photos"]["images"]
        for level in cascade:
            refit = level["refit"]
            table[int(level["num_splats"])] = {"core_seconds_per_step": refit["cpu_seconds"] / refit["steps"] / images,
                                               "source": "prune_photos refit", "steps": refit["steps"]}
    for group in fitting["schedules"]["sets"].values():
        images = len(group["photos"])
        for entry in group["counts"]:
            chosen = entry["runs"]["chosen"]
            rate = chosen["cpu_seconds"][-1] / chosen["steps"][-1] / images
            known = table.get(entry["num_splats"], {})
            if known.get("source") == "schedules":
                rate = (rate + known["core_seconds_per_step"]) / 2
            table[int(entry["num_splats"])] = {"core_seconds_per_step": rate, "source": "schedules",
                                               "steps": chosen["steps"][-1]}
    return table


def totals(seconds_per_sample: float, samples: float, gpus: int = NUM_GPUS) -> dict[str, float]:
    """GPU-hours and wall hours on ``gpus`` GPUs, perfectly data-parallel."""
    gpu_hours = seconds_per_sample * samples / SECONDS_PER_HOUR
    return {"seconds_per_sample": seconds_per_sample, "samples": samples, "gpu_hours": gpu_hours,
            "wall_hours": gpu_hours / gpus, "gpus": gpus}


def project_fitting(params: Any, fitting: dict[str, Any], gpu_check: dict[str, Any],
                    images: int = PAPER_IMAGES, gpus: int = NUM_GPUS) -> dict[str, Any]:
    settings = params.fit.optimizer
    plan = fit_plan(params, fitting)
    cascade, alone = [fit for fit in plan if fit["role"] != "alone"], plan[-1]
    pass_table, source = gpu_pass_seconds(gpu_check)
    variants = {}
    for kernel in ("tiled", "dense"):
        for model in ("no_cache_reuse", "cache_reuse"):
            for step_name in ("full_step", "render_only"):
                per_image = fit_seconds_per_image(cascade, pass_table, kernel, model, step_name)
                variants[f"{kernel}/{model}/{step_name}"] = {
                    "kernel": kernel, "roofline_model": model, "step": step_name,
                    "per_image": per_image, **totals(per_image["seconds"], images, gpus),
                }
    direct = {}
    if alone["steps"] is not None:
        for kernel in ("tiled", "dense"):
            for model in ("no_cache_reuse", "cache_reuse"):
                per_image = fit_seconds_per_image([alone], pass_table, kernel, model)
                direct[f"{kernel}/{model}"] = {"num_splats": alone["num_splats"], "steps": alone["steps"],
                                               **totals(per_image["seconds"], images, gpus)}
    cpu = cpu_seconds_per_step(fitting)
    cpu_levels = [{**fit, "core_seconds": fit["steps"] * cpu[fit["num_splats"]]["core_seconds_per_step"]}
                  for fit in cascade]
    cpu_per_image = sum(level["core_seconds"] for level in cpu_levels)
    return {
        "plan": plan,
        "passes": {"colour_solve": settings.colour_solve, "solve_every": settings.solve_every,
                   "cg_iterations": settings.cg_iterations,
                   "source": "fit_passes: the fitter's own counts over a fit of each plan entry's steps"},
        "gpu_pass_source": source,
        "pass_seconds_per_image": {str(n): v for n, v in pass_table.items()},
        "variants": variants,
        "headline": f"tiled/{HEADLINE_MODEL}/full_step",
        "alone": {"fit": alone, "projections": direct,
                  "why": ("the paper's GPU-hour figure is for its 400-splat setting: this level fitted on its own for "
                          "the steps the chosen schedule needs to reach the paper recipe's PSNR + margin on both "
                          "photo sets (fitting.json schedules); steps null: not reached within the grid")},
        "paper_fit_400": {"gpu_hours": PAPER_FIT_400_GPU_HOURS, "images": PAPER_IMAGES,
                          "ms_per_image": PAPER_FIT_400_GPU_HOURS * SECONDS_PER_HOUR / PAPER_IMAGES * 1e3,
                          "wall_hours_on_8": PAPER_FIT_400_GPU_HOURS / NUM_GPUS},
        "targets": fitting_targets(variants[f"tiled/{HEADLINE_MODEL}/full_step"], direct.get(f"tiled/{HEADLINE_MODEL}")),
        "cpu_only": {
            "source": "fitting.json: schedules (chosen, longest fit) and prune_photos refits; cpu_seconds / steps / photos",
            "per_step": {str(n): v for n, v in cpu.items()},
            "levels": cpu_levels,
            "core_seconds_per_image": cpu_per_image,
            "core_hours": cpu_per_image * images / SECONDS_PER_HOUR,
        },
    }


def fitting_targets(cascade: dict[str, Any], alone: dict[str, Any] | None) -> dict[str, Any]:
    """The issue's targets for the headline (tiled, no cache reuse): the bottom level alone at most a
    third of the paper's GPU-hours, the top level plus the cascade at most the paper's."""
    alone_hours = None if alone is None else alone["gpu_hours"]
    return {
        "alone_within_a_third": {"measured": alone_hours, "threshold": PAPER_FIT_400_GPU_HOURS / 3,
                                 "met": alone_hours is not None and alone_hours <= PAPER_FIT_400_GPU_HOURS / 3},
        "cascade_within_paper": {"measured": cascade["gpu_hours"], "threshold": PAPER_FIT_400_GPU_HOURS,
                                 "met": cascade["gpu_hours"] <= PAPER_FIT_400_GPU_HOURS},
    }


# --- Training FLOPs -------------------------------------------------------------------------------


def _extra_flop_formulas() -> dict[Any, Callable]:
    """The CPU flash-attention kernels, which FlopCounterMode has no formula for (it knows the CUDA
    ones): without them the attention products of every block would go uncounted."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    formulas = {
        "_scaled_dot_product_flash_attention_for_cpu":
            lambda query, key, value, *args, out_shape=None, **kwargs: sdpa_flop_count(query, key, value),
        "_scaled_dot_product_flash_attention_for_cpu_backward":
            lambda grad_out, query, key, value, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(
                grad_out, query, key, value),
    }
    return {getattr(torch.ops.aten, name): formula for name, formula in formulas.items()
            if getattr(torch.ops.aten, name, None) is not None}


def count_flops(run: Callable[[], Any]) -> dict[str, Any]:
    """FLOPs of ``run()`` as FlopCounterMode counts them (matrix products and attention; a multiply-add
    is 2 FLOPs; element-wise work is not counted), with the per-operator split."""
    from torch.utils.flop_counter import FlopCounterMode

    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused MHA inference kernel hides its FLOPs
    try:
        with FlopCounterMode(display=False, custom_mapping=_extra_flop_formulas()) as counter:
            run()
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return {"flops": int(counter.get_total_flops()), "by_operator": by_op}


def training_flops(params: Any, levels: list[int], batch: int = 1, seed: int = 0) -> dict[str, Any]:
    """FLOPs per sample of the align stages' models, as ``params`` configures them (random weights)."""
    from gsclip_lib.models.rgb_clip import create_rgb_clip
    from gsclip_lib.models.splat_clip import TextTower
    from gsclip_lib.models.splat_encoder import build_splat_encoder
    from gsclip_lib.models.splat_features import fit_feature_statistics
    from gsclip_lib.splats.initialization import init_grid

    started = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    size, channels = params.data.image_size, params.data.channels
    rgb = create_rgb_clip(params.model.replace(pretrained="", checkpoint=""), device="cpu")
    images = torch.rand(batch, channels, size, size, generator=generator)

    def teacher() -> None:
        with torch.no_grad():
            rgb.model.encode_image(rgb.prepare_images(images))

    teacher_count = count_flops(teacher)
    tokens = rgb.tokenize(["a photo of a small dog on a red sofa next to a window"] * batch)
    text = TextTower(rgb.model, train_last_block=params.align.unfreeze_text_last_block)

    def text_forward() -> None:
        with torch.no_grad():
            text.encode_text(tokens)

    text_count = count_flops(text_forward)
    student = {}
    for count in levels:
        torch.manual_seed(seed)
        stats_splats = [init_grid(torch.rand(4, channels, size, size, generator=generator), count) for _ in range(2)]
        stats = fit_feature_statistics(stats_splats, height=size, width=size)
        encoder = build_splat_encoder(rgb, params.align.encoder, stats, (size, size))
        encoder.train()
        splats = init_grid(images, count)

        def forward(encoder=encoder, splats=splats) -> None:  # grad on: under no_grad FlopCounterMode's tracker fails
            encoder(splats)

        def forward_backward(encoder=encoder, splats=splats) -> None:
            encoder(splats).float().square().sum().backward()

        fwd, fwd_bwd = count_flops(forward), count_flops(forward_backward)
        encoder.zero_grad(set_to_none=True)
        trainable = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
        student[str(count)] = {
            "forward_flops": fwd["flops"] / batch, "forward_backward_flops": fwd_bwd["flops"] / batch,
            "backward_over_forward": (fwd_bwd["flops"] - fwd["flops"]) / max(fwd["flops"], 1),
            "trainable_parameters": trainable,
            "by_operator_forward_backward": {k: v / batch for k, v in fwd_bwd["by_operator"].items()},
        }
    return {
        "model": params.model.name, "image_size": size, "channels": channels, "batch": batch,
        "text_context_length": int(tokens.shape[-1]),
        "encoder": params.align.encoder.model_dump(),
        "teacher_forward_flops": teacher_count["flops"] / batch,
        "text_forward_flops": text_count["flops"] / batch,
        "student": student,
        "counting": ("FlopCounterMode, CPU, random weights, fp32, a multiply-add is 2; matrix products, convolutions "
                     "and attention only; the student's backward flows through the frozen blocks"),
        "seconds": time.perf_counter() - started,
    }


def project_training(params: Any, flops: dict[str, Any], images: int = PAPER_IMAGES, gpus: int = NUM_GPUS,
                     peak: float = PEAK_FLOPS, mfu: dict[str, float] = MFU) -> dict[str, Any]:
    """Per level: distillation (teacher forward + student forward/backward) and contrastive (student
    forward/backward + text forward), samples = images x epochs, at each assumed MFU."""
    stages = {"distill": params.align.distill.epochs, "contrastive": params.align.contrastive.epochs}
    levels = {}
    for count, student in flops["student"].items():
        per_sample = {
            "distill": flops["teacher_forward_flops"] + student["forward_backward_flops"],
            "contrastive": student["forward_backward_flops"] + flops["text_forward_flops"],
        }
        levels[count] = {}
        for stage, epochs in stages.items():
            samples = images * epochs
            levels[count][stage] = {
                "epochs": epochs, "flops_per_sample": per_sample[stage],
                "total_flops": per_sample[stage] * samples,
                **{case: totals(per_sample[stage] / (peak * share), samples, gpus) for case, share in mfu.items()},
            }
        levels[count]["both"] = {case: _sum_totals([levels[count][s][case] for s in stages]) for case in mfu}
    all_levels = {case: _sum_totals([levels[c]["both"][case] for c in levels]) for case in mfu}
    return {"epochs": stages, "global_batch": {s: getattr(params.align, s).batch_size * gpus for s in stages},
            "levels": levels, "all_levels": all_levels}


def _sum_totals(parts: list[dict[str, float]]) -> dict[str, float]:
    return {"gpu_hours": sum(p["gpu_hours"] for p in parts), "wall_hours": sum(p["wall_hours"] for p in parts)}


# --- Data loading ---------------------------------------------------------------------------------


def _cpu_time_per_call(run: Callable[[], Any], repeats: int) -> float:
    run()
    start = time.process_time()
    for _ in range(repeats):
        run()
    return (time.process_time() - start) / repeats


def measure_decode(repeats: int = 200, size: int = 224, quality: int = 90) -> dict[str, Any]:
    """CPU seconds per image (one thread) to decode a JPEG: PIL alone, and the loader's decode_image
    (decode, RGB, resize/crop, to a float tensor) on a 224x224 and on a 512x512 source."""
    from PIL import Image

    from gsclip_lib.data.image_text_shards import decode_image
    from gsclip_lib.data.photos import load_photo

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        image, source = Image.fromarray(load_photo("astronaut", size)), "scikit-image astronaut"
        large = image.resize((512, 512), Image.Resampling.BICUBIC)
        encoded = {}
        for name, picture in (("224", image), ("512", large)):
            buffer = io.BytesIO()
            picture.save(buffer, format="JPEG", quality=quality)
            encoded[name] = buffer.getvalue()

        def pil_decode() -> None:
            with Image.open(io.BytesIO(encoded["224"])) as opened:
                opened.convert("RGB").load()

        result = {
            "image": source, "quality": quality, "repeats": repeats, "threads": 1,
            "jpeg_bytes": {k: len(v) for k, v in encoded.items()},
            "pil_decode_224_seconds": _cpu_time_per_call(pil_decode, repeats),
            "loader_decode_224_seconds": _cpu_time_per_call(
                lambda: decode_image(encoded["224"], 3, size, "center_crop"), repeats),
            "loader_decode_512_to_224_seconds": _cpu_time_per_call(
                lambda: decode_image(encoded["512"], 3, size, "center_crop"), max(repeats // 4, 1)),
            "clock": "time.process_time, one torch thread",
        }
    finally:
        torch.set_num_threads(threads)
    return result


def loader_cores(decode: dict[str, Any], fitting: dict[str, Any], training: dict[str, Any]) -> dict[str, Any]:
    """CPU cores per GPU that decoding alone needs to keep each stage fed (one decode per sample)."""
    per_image = decode["loader_decode_224_seconds"]
    per_image_large = decode["loader_decode_512_to_224_seconds"]
    rates = {"fit (" + fitting["headline"] + ")": 1.0 / fitting["variants"][fitting["headline"]]["seconds_per_sample"]}
    for count, stages in training["levels"].items():
        for stage in ("distill", "contrastive"):
            rates[f"{stage} N{count} (MFU {MFU['expected']:.0%})"] = 1.0 / stages[stage]["expected"]["seconds_per_sample"]
    return {
        "decode_seconds_224": per_image, "decode_seconds_512_source": per_image_large,
        "per_stage": {name: {"samples_per_s_per_gpu": rate, "cores_per_gpu_224": rate * per_image,
                             "cores_per_gpu_512_source": rate * per_image_large}
                      for name, rate in rates.items()},
        "note": ("decode only (the loader's decode_image); tar reading, splat records, tokenization and "
                 "collation add to it; the images carried in DataComp-derived shards are usually larger "
                 "than 224x224, hence the 512x512-source column"),
    }


# --- Report ---------------------------------------------------------------------------------------


def summary_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The table: one row per item, GPU-hours and wall hours on the 8 GPUs."""
    fitting, training = report["fitting"], report["training"]

    def row(item: str, gpu_hours: float, wall_hours: float, ms: float | None = None) -> dict[str, Any]:
        return {"item": item, "gpu_hours": gpu_hours, "wall_hours_8_gpus": wall_hours, "ms_per_image_per_gpu": ms}

    top = f"fit {fitting['plan'][0]['num_splats']} + cascade"
    rows = [row(label, v["gpu_hours"], v["wall_hours"], v["seconds_per_sample"] * 1e3)
            for key, label in ((fitting["headline"], f"{top}, tiled Triton, full step (roofline)"),
                               (f"tiled/{HEADLINE_MODEL}/render_only", f"{top}, tiled Triton, render only (roofline)"),
                               (f"dense/{HEADLINE_MODEL}/full_step", f"{top}, dense Triton, full step (roofline)"))
            for v in [fitting["variants"][key]]]
    alone, paper = fitting["alone"], fitting["paper_fit_400"]
    for model in ("no_cache_reuse", "cache_reuse") if alone["projections"] else ():
        direct = alone["projections"][f"tiled/{model}"]
        rows.append(row(f"fit {direct['num_splats']} alone, {direct['steps']} steps, tiled, full step (roofline, {model})",
                        direct["gpu_hours"], direct["wall_hours"], direct["seconds_per_sample"] * 1e3))
    rows.append(row("paper: fit 400 splats (reported)", paper["gpu_hours"], paper["wall_hours_on_8"],
                    paper["ms_per_image"]))
    for stage in ("distill", "contrastive"):
        per_level = [training["levels"][c][stage] for c in training["levels"]]
        rows += [row(f"{stage} ({training['epochs'][stage]} ep), all {len(per_level)} levels, MFU {MFU[case]:.0%}",
                     sum(p[case]["gpu_hours"] for p in per_level), sum(p[case]["wall_hours"] for p in per_level))
                 for case in MFU]
    headline_fit = fitting["variants"][fitting["headline"]]
    rows += [row(f"total: fit (tiled, full step) + both stages at all levels, MFU {MFU[case]:.0%}",
                 headline_fit["gpu_hours"] + training["all_levels"][case]["gpu_hours"],
                 headline_fit["wall_hours"] + training["all_levels"][case]["wall_hours"]) for case in MFU]
    rows.append({"item": f"CPU only: {top} (core-hours, C++ kernel, this CPU)",
                 "core_hours": fitting["cpu_only"]["core_hours"],
                 "ms_per_image_per_core": fitting["cpu_only"]["core_seconds_per_image"] * 1e3})
    return rows


def summary_table(rows: list[dict[str, Any]]) -> str:
    gpu = [[row["item"], row["gpu_hours"], row["wall_hours_8_gpus"], row["ms_per_image_per_gpu"]]
           for row in rows if "gpu_hours" in row]
    lines = [format_table(["item", "GPU-h", f"wall h on {NUM_GPUS}", "ms/image/GPU"], gpu, ["", ".4g", ".4g", ".3g"], 0)]
    lines += [f"{row['item']}: {row['core_hours']:.3g} core-hours ({row['ms_per_image_per_core']:.0f} ms per image "
              "per core)" for row in rows if "core_hours" in row]
    return "\n".join(lines)


def assumptions(params: Any) -> dict[str, str]:
    return {
        "images": f"{PAPER_IMAGES:,} images (DataComp as the paper uses it), each fitted once and seen once per epoch",
        "gpus": f"{NUM_GPUS} GPUs, perfect data-parallel scaling (no communication, loading or checkpoint time)",
        "training_peak": PEAK_NAME,
        "training_mfu": f"model FLOP utilization {MFU['expected']:.0%} expected, {MFU['pessimistic']:.0%} pessimistic; "
                        "FLOPs as FlopCounterMode counts them (matrix products and attention only)",
        "fitting_gpu": ("per-pass times: benchmarks/cost_model.py's H100 SXM roofline (fp32 67 TFLOP/s, 3.35 TB/s, "
                        "no launch overhead, 100 % of peak) on gpu_check.json's evaluation counts, unless "
                        "gpu_check.json records a measured CUDA run; headline: "
                        f"{HEADLINE_MODEL} (every request goes to DRAM, the slower bound); a roofline is a lower "
                        "bound on time, real kernels are slower"),
        "fitting_step": ("a fit is the forward, backward and adjoint passes the fitter counts itself over a fit of "
                         f"that many steps (fit_passes; colour_solve {params.fit.optimizer.colour_solve}, solve_every "
                         f"{params.fit.optimizer.solve_every}, cg {params.fit.optimizer.cg_iterations}), its solves "
                         "and final solve included; Adam, re-seeding and binning beyond the roofline's sort model "
                         "are not counted"),
        "fitting_plan": (f"top level {params.fit.num_splats} splats x {params.fit.optimizer.iterations} steps, then "
                         f"{params.prune.levels} at {params.prune.refit_iterations} refit steps each"),
        "fitting_cpu": "CPU seconds per step measured on 224x224 photos (fitting.json), one thread, applied per image",
        "data": "one JPEG decode per sample per epoch on the CPU (the splat shards carry the source image)",
        "paper": "25.6 GPU-hours for the 400-splat setting over 12.8 M images (PAPER.md); its GPU type and step count are not stated",
    }


def run(out: str | Path, fitting_path: str | Path = "benchmarks/fitting.json",
        gpu_check_path: str | Path = "benchmarks/gpu_check.json", params_path: str | Path = "params.yaml",
        profile: str | Path | None = "profiles/paper.yaml", levels: list[int] | None = None,
        decode_repeats: int = 200, flops_fn: Callable[..., dict[str, Any]] = training_flops,
        decode_fn: Callable[..., dict[str, Any]] = measure_decode, argv: list[str] | None = None) -> dict[str, Any]:
    from gsclip_lib.params import load_params

    started = time.perf_counter()
    params = load_params(params_path, profile=profile)
    fitting_path, gpu_check_path = Path(fitting_path), Path(gpu_check_path)
    fitting, gpu_check = (json.loads(path.read_text()) for path in (fitting_path, gpu_check_path))
    levels = levels or [params.fit.num_splats, *params.prune.levels]
    fit = project_fitting(params, fitting, gpu_check)
    flops = flops_fn(params, levels)
    training = project_training(params, flops)
    decode = decode_fn(repeats=decode_repeats)
    report: dict[str, Any] = {
        "benchmark": "projection of the paper-scale run from measured per-image costs",
        "command": command_line("benchmarks.projection", argv),
        "machine": machine_info(),
        "inputs": {
            "fitting": file_provenance(fitting_path), "gpu_check": file_provenance(gpu_check_path),
            "params": file_provenance(params_path),
            "profile": file_provenance(profile) if profile else None,
            "gpu_check_measured_cuda_run": measured_gpu(gpu_check) is not None,
        },
        "assumptions": assumptions(params),
        "images": PAPER_IMAGES, "gpus": NUM_GPUS,
        "fitting": fit,
        "training_flops": flops,
        "training": training,
        "decode": decode,
    }
    report["loader"] = loader_cores(decode, fit, training)
    report["summary"] = summary_rows(report)
    report["runtime_seconds"] = time.perf_counter() - started
    write_json(out, report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/projection.json")
    parser.add_argument("--fitting", default="benchmarks/fitting.json")
    parser.add_argument("--gpu-check", default="benchmarks/gpu_check.json")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--profile", default="profiles/paper.yaml")
    parser.add_argument("--levels", type=int, nargs="*", default=None,
                        help="splat counts to count training FLOPs at (default: every level of the profile)")
    parser.add_argument("--decode-repeats", type=int, default=200)
    args = parser.parse_args(argv)
    report = run(args.out, args.fitting, args.gpu_check, args.params, args.profile or None, args.levels,
                 args.decode_repeats, argv=argv)
    print(summary_table(report["summary"]))
    loader = report["loader"]
    print(f"\nJPEG decode (loader, 224x224 q90): {loader['decode_seconds_224'] * 1e3:.2f} ms per image per core; "
          f"from a 512x512 source {loader['decode_seconds_512_source'] * 1e3:.2f} ms")
    for name, stage in loader["per_stage"].items():
        print(f"  {name}: {stage['samples_per_s_per_gpu']:.0f} samples/s per GPU -> "
              f"{stage['cores_per_gpu_224']:.1f} cores (224 source), {stage['cores_per_gpu_512_source']:.1f} (512 source)")
    print(f"\nwrote {args.out} ({report['runtime_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
