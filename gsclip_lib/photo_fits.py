"""The photo stage: fit real photographs at the paper's splat counts and compare with JPEG.

PAPER.md section 1 fits 224x224 RGB images with N in {3136, 1600, 900, 400} splats (3.00x to 23.52x
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
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import Tensor

from gsclip_lib import codec
from gsclip_lib.fit import FitResult, FitSettings, fit_splats
from gsclip_lib.image_quality import psnr
from gsclip_lib.jpeg_baseline import jpeg_psnr_at_budget
from gsclip_lib.photos import PHOTO_NAMES, load_photos
from gsclip_lib.prune import PruneSettings, prune_and_finetune
from gsclip_lib.render import render_splats
from gsclip_lib.splats import Splats


@dataclass(frozen=True)
class PhotoFitConfig:
    """The ``fit_photos`` group of params.yaml."""

    photos: tuple[str, ...] = ("astronaut", "chelsea", "coffee", "rocket")  # scikit-image photos
    image_size: int = 224  # square side the photos are resized to
    splat_counts: tuple[int, ...] = (3136, 1600, 900, 400)  # fitted directly, one batch each
    optimizer: FitSettings = field(default_factory=FitSettings)
    prune_finetune_iterations: int = 100  # fit-large-then-prune comparison; 0 skips it

    def __post_init__(self) -> None:
        unknown = [name for name in self.photos if name not in PHOTO_NAMES]
        if not self.photos or unknown:
            raise ValueError(f"photos must name some of {PHOTO_NAMES}; unknown: {unknown}")
        if not self.splat_counts or any(count <= 0 for count in self.splat_counts):
            raise ValueError(f"splat_counts must be positive, got {self.splat_counts}")
        if self.prune_finetune_iterations < 0:
            raise ValueError("prune_finetune_iterations must be >= 0")


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


def run_photo_fits(config: PhotoFitConfig, *, progress: bool = True) -> PhotoFitOutcome:
    images = load_photos(config.photos, config.image_size)
    channels, size = images.shape[1], config.image_size
    source = codec.source_bytes(size, size, channels)
    uint8_images = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
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
                images,
                fits[largest].splats,
                PruneSettings(target_count=count, finetune_iterations=config.prune_finetune_iterations),
                settings,
                progress=progress,
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
        metrics[f"N{count}"] = {
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
