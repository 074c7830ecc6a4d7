"""The photo stage: fit real photographs at the paper's splat counts and compare with JPEG.

METHOD.md section 1: the paper fits 224x224 RGB images with N in {3136, 1600, 900, 400} splats (3.00x to 23.52x
compression). This stage fits scikit-image's bundled photographs at those counts in one batch per
count, and reports for each count:

- PSNR of the fitted render, and PSNR after a save/load through the fp16 codec (what a receiver
  would see);
- the bytes two ways (the paper's payload N*(5+C)*2, and the whole record with its header) and the
  compression ratios against the H*W*C uint8 source;
- JPEG's PSNR at the same payload budget (the highest quality whose file fits it);
- fitting wall time;
- optionally the paper's "fit large, then prune" route: the largest count's splats pruned by
  luminance to the smaller count and fine-tuned briefly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor

from gsclip_lib.data.image_decoding import images_to_uint8
from gsclip_lib.data.photos import load_photos
from gsclip_lib.evaluation.jpeg_baseline import jpeg_psnr_at_budget
from gsclip_lib.params import Params, PhotoFitConfig, level_name
from gsclip_lib.reporting import figures, paper, splat_figures
from gsclip_lib.splats import codec
from gsclip_lib.splats.container import Splats
from gsclip_lib.splats.fitting import FitResult, fit_splats
from gsclip_lib.splats.pruning import prune_and_finetune
from gsclip_lib.splats.quality import psnr
from gsclip_lib.splats.render import render_splats
from gsclip_lib.stages.runner import StageResult


@dataclass
class PhotoFitOutcome:
    images: Tensor  # [B, 3, S, S]
    table: pd.DataFrame  # one row per (photo, count)
    fits: dict[int, FitResult]  # by splat count
    renders: dict[int, Tensor]  # [B, 3, S, S] clamped render, by splat count


def _codec_round_trip(splats: Splats, size: int) -> tuple[Splats, list[int]]:
    records = codec.encode_batch(splats, size, size)
    decoded, _, _ = codec.decode_batch(records, num_slots=splats.num_slots)
    return decoded.to(splats.device), [len(record) for record in records]


def fit_photos(config: PhotoFitConfig, *, progress: bool = True) -> PhotoFitOutcome:
    """Fit every photo at every count of ``config`` (largest first), one batch per count."""
    images = load_photos(config.photos, config.image_size)
    channels, size = images.shape[1], config.image_size
    source = codec.source_bytes(size, size, channels)
    uint8_images = images_to_uint8(images)
    settings = config.optimizer
    rows, fits, renders = [], {}, {}
    largest = max(config.splat_counts)
    for count in sorted(config.splat_counts, reverse=True):
        fit = fit_splats(images, count, settings, progress=progress, description=f"fit N={count}")
        fits[count] = fit
        render = render_splats(fit.splats, size, size, backend=settings.backend, cutoff=settings.cutoff)
        renders[count] = render.clamp(0, 1)
        decoded, record_sizes = _codec_round_trip(fit.splats, size)
        after_codec = psnr(
            images, render_splats(decoded, size, size, backend=settings.backend, cutoff=settings.cutoff)
        )
        pruned_psnr = torch.full((len(config.photos),), math.nan)
        if config.prune_finetune_iterations and count < largest:
            pruned = prune_and_finetune(
                images, fits[largest].splats, count, settings, config.prune_finetune_iterations, progress=progress
            )
            pruned_psnr = pruned.psnr
        for index, name in enumerate(config.photos):
            num_valid = int(fit.splats.valid[index].sum())
            payload = codec.payload_bytes(num_valid, channels)
            jpeg_db, jpeg = jpeg_psnr_at_budget(uint8_images[index], payload)
            rows.append(
                {
                    "photo": name,
                    "splats": count,
                    "psnr": float(fit.psnr[index]),
                    "psnr_after_codec": float(after_codec[index]),
                    "psnr_pruned_from_largest": float(pruned_psnr[index]),
                    "payload_bytes": payload,
                    "record_bytes": record_sizes[index],
                    "ratio_payload": codec.compression_ratio(source, payload),
                    "ratio_record": codec.compression_ratio(source, record_sizes[index]),
                    "jpeg_psnr": jpeg_db,
                    "jpeg_bytes": jpeg.num_bytes,
                    "jpeg_quality": jpeg.quality,
                    "fit_seconds_per_image": fit.seconds / len(config.photos),
                    "seconds_per_iteration": fit.seconds / max(fit.iterations, 1),
                }
            )
    return PhotoFitOutcome(images=images, table=pd.DataFrame(rows), fits=fits, renders=renders)


def photo_fit_metrics(outcome: PhotoFitOutcome) -> dict:
    """Per-count means for the stage's metrics JSON (``dvc metrics show`` flattens the nesting)."""
    summary = outcome.table.drop(columns=["photo"]).groupby("splats").mean()
    metrics = {}
    for count, row in summary.iterrows():
        metrics[level_name(count)] = {
            key: (None if isinstance(value, float) and math.isnan(value) else round(float(value), 4))
            for key, value in row.items()
        }
    return {"photos": len(outcome.table["photo"].unique()), "levels": metrics}


def photo_fit_history(outcome: PhotoFitOutcome) -> pd.DataFrame:
    """Long table of the fits' PSNR curves: iteration, psnr, splats."""
    frames = [
        pd.DataFrame({"iteration": fit.history["iteration"], "psnr": fit.history["psnr"], "splats": count})
        for count, fit in outcome.fits.items()
    ]
    return pd.concat(frames, ignore_index=True)


def run(params: Params, *, progress: bool = True) -> StageResult:
    """The ``fit_photos`` stage: fits, the gallery, PSNR against size and steps, the metrics."""
    config = params.fit_photos
    outcome = fit_photos(config, progress=progress)
    history = photo_fit_history(outcome)
    metrics = photo_fit_metrics(outcome)
    dropped = {count: fit.dropped for count, fit in outcome.fits.items() if fit.dropped}
    metrics["dropped"] = {str(count): images for count, images in dropped.items()}
    gallery = splat_figures.plot_fit_gallery(
        outcome.images,
        outcome.renders,
        splats={count: fit.splats for count, fit in outcome.fits.items()},
        titles=list(config.photos),
        psnr_by_count={count: fit.psnr for count, fit in outcome.fits.items()},
    )
    largest = max(config.splat_counts)
    reference = paper.PHOTO_PSNR
    ours = metrics["levels"][level_name(largest)]["psnr"]
    return StageResult(
        metrics=metrics,
        figures={
            "gallery": gallery,
            "psnr_vs_size": figures.plot_psnr_against_size(outcome.table),
            "psnr_history": figures.plot_psnr_history(history),
        },
        tables={"table": outcome.table, "history": history},
        summary=outcome.table.drop(columns=["seconds_per_iteration"]).round(2),
        comparison=paper.comparison([
            {
                "what": f"PSNR at {largest} splats (dB)",
                "ours": round(ours, 2),
                "paper": reference["psnr_db"],
                "note": f"ours after {config.optimizer.iterations} steps on {len(config.photos)} photo(s) at "
                f"{config.image_size}px; the paper's after {reference['iterations']} on 224px",
            },
        ]),
    )
