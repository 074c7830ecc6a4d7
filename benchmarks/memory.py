"""Peak memory of the streaming training stages at two data set sizes: it should not grow with the data.

``python -m benchmarks.memory --out benchmarks/memory.json [--sizes 10000,100000] [--work DIR]``

The training stages stream their data (:mod:`gsclip_lib.data.streaming`). This benchmark writes
synthetic DataComp-style data once (``--work``, reused when there): tiny RGB JPEGs (8x8), captions
drawn from a word list (almost every one distinct, as web captions are), a ``.json`` with a ``uid``,
1,000 samples per shard; as image-text shards for ``pretrain`` and as splat shards for ``align``
(grid-initialized splats, the image's bytes and the caption carried as the fit stage writes them).
A data set of ``n`` samples is the first ``n / per_shard`` shards.

Each stage and size runs the real stage function (``pretrain_rgb``; ``align_level``: one epoch of
distillation, one of contrastive alignment) for ONE full epoch in a fresh child process
(:func:`benchmarks.harness.run_in_child`, one thread), with ``params.yaml``'s loader and optimizer,
the tiny model :data:`TINY_CLIP` and ``--set`` overrides. The child records its RSS after its
imports (the baseline), its peak (``ru_maxrss``) at the end of each stage, a ``VmRSS`` trace against
the samples read, the steps and the seconds. ``--variant STAGE:GROUP.KEY=VALUE`` runs a stage again
with one more override (default: ``align`` without the caption cache; ``--no-variants`` skips it).

The JSON holds those records per stage (and variant) and size; per stage the ratio of the peaks of
the largest and the smallest size (bound: at most 1.2) and of the growth above the import baseline.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import open_clip
import torch

from benchmarks.harness import (
    command_line, current_rss_kib, format_table, machine_info, peak_rss_kib, ratio, run_in_child, timed_section,
)
from gsclip_lib.atomic_files import write_json
from gsclip_lib.data.image_text_shards import EncodedImage, decode_image, encode_image, write_image_text_shards
from gsclip_lib.data.splat_shards import open_splat_shard
from gsclip_lib.models.rgb_clip import create_rgb_clip
from gsclip_lib.params import load_params
from gsclip_lib.splats.codec import encode_splats, payload_bytes
from gsclip_lib.splats.initialization import init_grid
from gsclip_lib.stages import align as align_stage
from gsclip_lib.stages import pretrain as pretrain_stage

ROOT = Path(__file__).resolve().parents[1]
BOUND = 1.2  # the bound on peak(largest) / peak(smallest)
STAGES = ("pretrain", "align")
# Runs beside the plain ones, ``stage:group.key=value``: the contrastive stage without its caption
# embedding cache (``align.text_cache_size`` entries at most), which holds one entry per distinct caption:
# on web captions, almost all distinct, it grows with the data set up to its capacity.
DEFAULT_VARIANTS = ("align:align.cache_text_embeddings=false",)
DATA_VERSION = 1  # bump when the synthetic data changes: a --work folder of another version is rewritten

# A CLIP small enough that the data path, not the model, is what an epoch costs: 8x8 RGB inputs,
# 2x2 patches of 4x4, one block per tower.
TINY_NAME = "gsclip-bench-memory-tiny"
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 8, "patch_size": 4, "width": 32, "head_width": 16, "layers": 1},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}

WORDS = (
    "red blue green yellow black white small large old new wooden metal glass plastic round square "
    "dog cat bird horse car bus bike boat house tree flower river mountain beach city street road "
    "chair table lamp shoe shirt dress hat bag cup bottle plate phone book clock window door garden "
    "sunset morning night winter summer autumn spring rain snow cloud sky field forest lake bridge "
    "running sitting standing flying sleeping parked open closed empty full bright dark vintage modern "
    "photo picture image view close-up portrait landscape drawing painting illustration sketch poster"
).split()


def thin(trace: list[list[int]], points: int = 24) -> list[list[int]]:
    """At most ``points`` rows of ``trace``, evenly spaced, the first and the last kept."""
    if len(trace) <= points:
        return trace
    picks = sorted({round(i * (len(trace) - 1) / (points - 1)) for i in range(points)})
    return [trace[i] for i in picks]


# --- Synthetic DataComp-style data ----------------------------------------------------------------


def caption(rng: np.random.Generator) -> str:
    words = rng.choice(len(WORDS), size=int(rng.integers(3, 9)), replace=True)
    return "a photo of " + " ".join(WORDS[i] for i in words)


def synthetic_image(rng: np.random.Generator, size: int) -> np.ndarray:  # [size, size, 3] uint8
    """A smooth two-colour gradient with noise: a JPEG of a few hundred bytes."""
    t = np.linspace(0.0, 1.0, size)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(angle) * t[None, :] + np.sin(angle) * t[:, None]
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    start, end = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    image = start + ramp[..., None] * (end - start) + rng.normal(0, 12, (size, size, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def write_data(work: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Image-text and splat shards of ``settings["samples"]`` samples under ``work/data``; its manifest.

    Reused when ``work/data/manifest.json`` says the same settings with at least as many samples.
    """
    folder = work / "data"
    manifest_path = folder / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        same = {k: v for k, v in manifest["settings"].items() if k != "samples"} == \
            {k: v for k, v in settings.items() if k != "samples"}
        if same and manifest["settings"]["samples"] >= settings["samples"]:
            return manifest
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "images").mkdir(parents=True)
    (folder / "splats").mkdir(parents=True)
    size, count, per_shard = settings["image_size"], settings["splats"], settings["per_shard"]
    shards = settings["samples"] // per_shard
    captions: set[str] = set()
    totals = {"image_bytes": 0, "splat_record_bytes": 0}
    started = time.perf_counter()

    def shard_samples(index: int) -> list[tuple[str, EncodedImage, str, dict[str, Any]]]:
        rng = np.random.default_rng([settings["seed"], index])
        out = []
        for position in range(per_shard):
            number = index * per_shard + position
            uid = f"{int(rng.integers(0, 2**63)):016x}{int(rng.integers(0, 2**63)):016x}"
            text = caption(rng)
            jpeg = encode_image(synthetic_image(rng, size), "jpg", jpeg_quality=90)
            out.append((f"{number:09d}", EncodedImage(jpeg, "jpg"), text,
                        {"uid": uid, "original_width": size, "original_height": size}))
        return out

    def all_samples():
        for index in range(shards):
            samples = shard_samples(index)
            name = f"train-{index:06d}.tar"
            pixels = torch.stack([decode_image(image.data, 3, size, "center_crop") for _, image, _, _ in samples])
            splats = init_grid(pixels, count)
            with open_splat_shard(folder / "splats" / name) as writer:
                for position, (key, image, text, metadata) in enumerate(samples):
                    record = encode_splats(splats, position, size, size)
                    writer.write(key, record, text, {
                        "N": count, "C": 3, "H": size, "W": size, "psnr": None, "bytes": len(record),
                        "payload_bytes": payload_bytes(count, 3), "source_key": key, "source_shard": name,
                        "label": None, "image_size": size, "resize_mode": "center_crop", "uid": metadata["uid"],
                    }, image=image)
                    totals["image_bytes"] += len(image.data)
                    totals["splat_record_bytes"] += len(record)
                    captions.add(text)
            yield from samples

    write_image_text_shards(all_samples(), str(folder / "images" / "train-%06d.tar"), per_shard)
    manifest = {
        "settings": settings,
        "shards": shards,
        "distinct_captions": len(captions),
        "mean_jpeg_bytes": round(totals["image_bytes"] / settings["samples"], 1),
        "mean_splat_record_bytes": round(totals["splat_record_bytes"] / settings["samples"], 1),
        "image_shard_bytes": sum(p.stat().st_size for p in (folder / "images").iterdir()),
        "splat_shard_bytes": sum(p.stat().st_size for p in (folder / "splats").iterdir()),
        "seconds_to_write": round(time.perf_counter() - started, 1),
    }
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def shard_spec(work: Path, kind: str, samples: int, per_shard: int) -> str:
    """The first ``samples / per_shard`` shards of ``kind`` (images or splats) as a brace pattern."""
    last = samples // per_shard - 1
    return str(work / "data" / kind / f"train-{{000000..{last:06d}}}.tar")


# --- The child: one stage, one size, one process --------------------------------------------------


def register_tiny_clip(work: Path) -> str:
    path = work / f"{TINY_NAME}.json"
    if not path.is_file() or json.loads(path.read_text()) != TINY_CLIP:
        path.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(path)
    return TINY_NAME


class StageProbe:
    """Wraps a stage module's ``train``: per training stage, the samples the loop consumed, an RSS
    trace against them, the peak RSS at its end, its steps and seconds."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self.records: list[dict[str, Any]] = []

    def wrap(self, real: Callable[..., Any]) -> Callable[..., Any]:
        def train(model, loss_fn, batches, steps_per_epoch, config, checkpoint_dir, **kwargs):
            name = self.names[len(self.records)] if len(self.records) < len(self.names) else f"train{len(self.records)}"
            record: dict[str, Any] = {"stage": name, "rss_at_start_kib": current_rss_kib(),
                                      "peak_rss_before_kib": peak_rss_kib()}
            self.records.append(record)
            seen = {"samples": 0, "batches": 0}
            trace: list[list[int]] = []

            def counted(epoch: int, start: int):
                for batch in batches(epoch, start):
                    seen["samples"] += len(batch.captions)
                    seen["batches"] += 1
                    trace.append([seen["samples"], current_rss_kib()])
                    yield batch

            started = time.perf_counter()
            result = real(model, loss_fn, counted, steps_per_epoch, config, checkpoint_dir, **kwargs)
            record.update({
                "seconds": round(time.perf_counter() - started, 2), "steps_per_epoch": steps_per_epoch,
                "steps": result.steps, "batches_read": seen["batches"], "samples_read": seen["samples"],
                "peak_rss_kib": peak_rss_kib(),  # the process's peak so far: through the end of this stage
                "max_sampled_rss_kib": max((rss for _, rss in trace), default=record["rss_at_start_kib"]),
                "rss_at_end_kib": current_rss_kib(),
                "rss_trace_kib": thin(trace),  # [samples read, VmRSS] as the loop takes batches
            })
            return result

        return train


def run_child(stage: str, size: int, work: str, per_shard: int, image_size: int, splats: int, batch_size: int,
              overrides: list[str]) -> dict[str, Any]:
    """Run ``stage`` on ``size`` samples in this (child) process; the record of the run."""
    baseline = {"baseline_rss_kib": current_rss_kib(), "baseline_peak_rss_kib": peak_rss_kib()}
    started = time.perf_counter()
    folder = Path(work)
    params = load_params(ROOT / "params.yaml", overrides=overrides)
    model = params.model.replace(name=register_tiny_clip(folder), pretrained="", checkpoint="")
    data = params.data.replace(train_shards=shard_spec(folder, "images", size, per_shard), image_size=image_size,
                               channels=3, resize_mode="center_crop")
    runs = folder / "runs" / f"{stage}-{size}"
    shutil.rmtree(runs, ignore_errors=True)  # never resume an earlier run's checkpoint

    def one_epoch(optim):
        return optim.replace(epochs=1, batch_size=batch_size, log_every=max(1, size // batch_size // 10),
                             warmup_steps=min(optim.warmup_steps, max(0, size // batch_size - 1)))

    if stage == "pretrain":
        probe = StageProbe(("pretrain",))
        pretrain_stage.train = probe.wrap(pretrain_stage.train)
        config = params.pretrain.replace(optim=one_epoch(params.pretrain.optim), checkpoint_dir=str(runs / "rgb"))
        metrics = pretrain_stage.pretrain_rgb(model, config, data, progress=False)
        good = {"pretrain": metrics["skipped"]["good"]}
        extra = {"train_images": metrics["train_images"], "final_loss": metrics["final_loss"]}
    elif stage == "align":
        probe = StageProbe(("distill", "contrastive"))
        align_stage.train = probe.wrap(align_stage.train)
        torch.manual_seed(0)
        rgb = create_rgb_clip(model, device="cpu")
        grid = (image_size // TINY_CLIP["vision_cfg"]["patch_size"]) ** 2
        encoder = params.align.encoder.replace(num_latents=grid, resampler_layers=1, resampler_heads=2,
                                               fourier_frequencies=4)
        config = params.align.replace(encoder=encoder, distill=one_epoch(params.align.distill),
                                      contrastive=one_epoch(params.align.contrastive), checkpoint_dir=str(runs / "align"))
        result = align_stage.align_level(rgb, shard_spec(folder, "splats", size, per_shard), config, data,
                                         level=splats, device="cpu")
        metrics = result.metrics
        good = {name: metrics["skipped"][name]["good"] for name in ("distill", "contrastive")}
        extra = {"pairs": metrics["pairs"], "text_cache": metrics["text_cache"],
                 "final_loss": {name: metrics[name]["final_loss"] for name in ("distill", "contrastive")}}
    else:
        raise ValueError(f"unknown stage {stage!r}; one of {STAGES}")
    for record in probe.records:
        record["good_samples_counted_by_stage"] = good.get(record["stage"])
    shutil.rmtree(runs, ignore_errors=True)
    return {
        "stage": stage, "size": size, **baseline, "rss_at_end_kib": current_rss_kib(),
        "samples_read": sum(r["samples_read"] for r in probe.records), "steps": sum(r["steps"] for r in probe.records),
        "seconds": round(time.perf_counter() - started, 2), "stages": probe.records, "metrics": extra,
    }


# --- The parent: data, children, summary ----------------------------------------------------------


def measure(args: argparse.Namespace, stage: str, size: int, work: Path, overrides: list[str]) -> dict[str, Any]:
    """One stage on one size in a fresh child process; its record, with the child's peak RSS."""
    child = run_in_child("benchmarks.memory:run_child", kwargs={
        "stage": stage, "size": size, "work": str(work), "per_shard": args.per_shard, "image_size": args.image_size,
        "splats": args.splats, "batch_size": args.batch_size, "overrides": overrides})
    return {**child.value, "peak_rss_kib": child.peak_rss_kib, "overrides": overrides}


def summarize(runs: dict[str, dict[str, dict[str, Any]]], sizes: list[int]) -> dict[str, Any]:
    """Per stage (and per training stage of align): the peaks by size and the ratios largest / smallest."""
    small, large = str(min(sizes)), str(max(sizes))
    out: dict[str, Any] = {}
    for stage, by_size in runs.items():
        if small not in by_size or large not in by_size:
            continue
        base, _, variant = stage.partition(" ")  # "align" or "align [group.key=value]"
        views = {stage: lambda run: (run["peak_rss_kib"], run["baseline_rss_kib"])}
        if base == "align":
            # Peak through the end of distillation; the highest RSS sampled during the contrastive epoch
            # (ru_maxrss cannot tell the second stage's own peak from the first's).
            views[f"align.distill {variant}".strip()] = lambda run: (run["stages"][0]["peak_rss_kib"],
                                                                     run["baseline_rss_kib"])
            views[f"align.contrastive {variant}".strip()] = lambda run: (run["stages"][1]["max_sampled_rss_kib"],
                                                                         run["baseline_rss_kib"])
        for name, view in views.items():
            (peak_s, base_s), (peak_l, base_l) = view(by_size[small]), view(by_size[large])
            peak_ratio, growth_ratio = ratio(peak_l, peak_s), ratio(peak_l - base_l, peak_s - base_s)
            out[name] = {
                "peak_rss_kib": {size: view(run)[0] for size, run in by_size.items()},
                "baseline_rss_kib": {size: run["baseline_rss_kib"] for size, run in by_size.items()},
                "peak_ratio": None if peak_ratio is None else round(peak_ratio, 4),
                "growth_above_baseline_kib": {small: peak_s - base_s, large: peak_l - base_l},
                "growth_ratio": None if growth_ratio is None else round(growth_ratio, 4),
                "within_bound": peak_ratio is not None and round(peak_ratio, 4) <= BOUND,
            }
    return out


def parse_arguments(argv: list[str] | None) -> tuple[argparse.Namespace, list[int], list[tuple[str, str, list[str]]]]:
    """The arguments, the sizes, and the plan: (name, stage, overrides) per run; errors exit 2."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/memory.json")
    parser.add_argument("--sizes", default="10000,100000", help="data set sizes, comma-separated (multiples of --per-shard)")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--work", default="", help="folder of the synthetic data (reused when present); default: a temporary one")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=8)
    parser.add_argument("--splats", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="GROUP.KEY=VALUE", help="params.yaml override for the stages")
    parser.add_argument("--variant", action="append", metavar="STAGE:GROUP.KEY=VALUE",
                        help=f"also run STAGE with this override (default: {', '.join(DEFAULT_VARIANTS)})")
    parser.add_argument("--no-variants", action="store_true", help="run no variant")
    args = parser.parse_args(argv)
    sizes = sorted({int(part) for part in args.sizes.split(",") if part.strip()})
    if len(sizes) < 2 or sizes[0] < 1:
        parser.error(f"--sizes needs at least two positive sizes, got {args.sizes!r}")
    if any(size % args.per_shard for size in sizes):
        parser.error(f"every size must be a multiple of --per-shard {args.per_shard}: {sizes}")
    if any(size < args.batch_size for size in sizes):
        parser.error(f"every size must hold at least one batch of {args.batch_size}: {sizes}")
    stages = [s for s in args.stages.split(",") if s]
    if any(s not in STAGES for s in stages):
        parser.error(f"unknown stages {[s for s in stages if s not in STAGES]}; known: {list(STAGES)}")
    args.variants = [] if args.no_variants else list(args.variant or DEFAULT_VARIANTS)
    plan = [(stage, stage, list(args.set)) for stage in stages]
    for variant in args.variants:
        stage, _, override = variant.partition(":")
        if stage not in STAGES or "=" not in override:
            parser.error(f"a variant is STAGE:GROUP.KEY=VALUE with STAGE one of {list(STAGES)}, got {variant!r}")
        plan.append((f"{stage} [{override}]", stage, [*args.set, override]))
    return args, sizes, plan


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args, sizes, plan = parse_arguments(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="gsclip-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    runs: dict[str, dict[str, dict[str, Any]]] = {}
    try:
        manifest = write_data(work, {"version": DATA_VERSION, "samples": max(sizes), "per_shard": args.per_shard,
                                     "image_size": args.image_size, "splats": args.splats, "seed": args.seed})
        for name, stage, overrides in plan:
            for size in sizes:
                run = runs.setdefault(name, {})[str(size)] = timed_section(measure, args, stage, size, work, overrides)
                print(f"{name:9s} {size:>8d} samples: peak {run['peak_rss_kib'] / 1024:7.1f} MiB "
                      f"(baseline {run['baseline_rss_kib'] / 1024:6.1f} MiB), read {run['samples_read']}, "
                      f"{run['steps']} steps, {run['seconds']:.1f} s", flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    report = {
        "benchmark": "memory",
        "command": command_line("benchmarks.memory", argv),
        "method": (
            "each stage and size in a fresh child process (benchmarks.harness.run_in_child), one thread, one full "
            "epoch (align: one epoch of distillation, one of contrastive alignment) of the real stage function on "
            "synthetic DataComp-style shards; params.yaml's loader, shuffle buffer and text cache; a tiny open_clip "
            "model; peak = getrusage(RUSAGE_SELF).ru_maxrss of the child (KiB), baseline = its VmRSS right after imports"
        ),
        "bound": BOUND, "sizes": sizes, "batch_size": args.batch_size, "overrides": args.set,
        "variants": args.variants, "model": {"name": TINY_NAME, **TINY_CLIP}, "data": manifest,
        "summary": summarize(runs, sizes), "runs": runs,
        "seconds": round(time.perf_counter() - started, 1), "machine": machine_info(),
    }
    write_json(args.out, report)
    rows = [[name, e["peak_ratio"], e["growth_ratio"], e["within_bound"]] for name, e in report["summary"].items()]
    print(format_table(["stage", "peak ratio", "growth ratio", f"within {BOUND}"], rows, ["", ".4f", ".4f", ""]))
    return report


if __name__ == "__main__":
    main()
