"""Stage ``fit_photos``: real photographs at the paper's splat counts, beside JPEG (METHOD.md section 1).

The paper fits 224x224 RGB images with N in {3136, 1600, 900, 400} splats (3.00x to 23.52x
compression). This stage fits scikit-image's bundled photographs at those counts, one batch per
count, and reports for each count:

- PSNR of the fit, and PSNR after a save/load through the fp16 codec (what a receiver decodes);
- the bytes two ways (the paper's payload ``N (5 + C) 2`` and the whole record) and the compression
  ratios against the ``H W C`` uint8 source;
- JPEG's PSNR at the same payload budget (the highest quality whose file fits it);
- the fitting time and the PSNR curve against steps.

It also measures two of the paper's findings (METHOD.md section 1):

- **pruning a large fit against fitting few splats** (``prune_refit_iterations``): each smaller
  count is pruned from the next larger one (3136 -> 1600 -> 900 -> 400) by the pipeline's
  ``prune.score`` and refitted, and every
  smaller count is fitted directly with as many steps in all as the cascade spent on it, so the two
  routes are compared at equal steps;
- **the structured grid init against a random one** (``compare_random_init``): the largest count
  fitted from random centres and colours with the same steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd
from torch import Tensor

from gsclip_lib.atomic_files import save_torch
from gsclip_lib.data.image_decoding import images_to_uint8
from gsclip_lib.data.photos import load_photos
from gsclip_lib.evaluation.jpeg_baseline import jpeg_psnr_at_budget
from gsclip_lib.params import Params, PhotoFitConfig, level_name
from gsclip_lib.splats import codec
from gsclip_lib.splats.container import Splats
from gsclip_lib.splats.fitting import FitResult, fit_splats
from gsclip_lib.splats.pruning import prune_and_refit
from gsclip_lib.splats.quality import psnr
from gsclip_lib.splats.render import render_splats
from gsclip_lib.pipeline.runner import StageResult


@dataclass
class PhotoFitOutcome:
    images: Tensor  # [B, 3, S, S]
    table: pd.DataFrame  # one row per (photo, count)
    fits: dict[int, FitResult]  # by splat count: the direct fits
    renders: dict[int, Tensor]  # [B, 3, S, S] clamped render of the direct fits, by splat count
    pruned: dict[int, FitResult] = field(default_factory=dict)  # by count: pruned from the next larger, refitted
    random_init: FitResult | None = None  # the largest count from a random start


def _codec_round_trip(splats: Splats, size: int) -> tuple[Splats, list[int]]:
    records = codec.encode_batch(splats, size, size)
    decoded, _, _ = codec.decode_batch(records, num_slots=splats.num_slots)
    return decoded.to(splats.device), [len(record) for record in records]


def steps_for(config: PhotoFitConfig, count: int) -> int:
    """The steps a count's direct fit gets: the largest fit's, plus one refit per cascade level
    above it when pruning is compared (so both routes spend the same steps)."""
    position = sorted(config.splat_counts, reverse=True).index(count)
    return config.optimizer.iterations + config.prune_refit_iterations * position


def fit_photos(config: PhotoFitConfig, score: str, *, progress: bool = True) -> PhotoFitOutcome:
    """Fit every photo at every count of ``config`` (largest first), one batch per count; the pruned
    route keeps the splats ``score`` ranks best (the pipeline's ``prune.score``)."""
    images = load_photos(config.photos, config.image_size)
    channels, size = images.shape[1], config.image_size
    source = codec.source_bytes(size, size, channels)
    uint8_images = images_to_uint8(images)
    settings = config.optimizer
    counts = sorted(config.splat_counts, reverse=True)
    fits, renders, pruned = {}, {}, {}
    for count in counts:
        fits[count] = fit_splats(images, count, settings.replace(iterations=steps_for(config, count)),
                                 progress=progress, description=f"fit {level_name(count)}")
        renders[count] = render_splats(fits[count].splats, size, size, backend=settings.backend,
                                       cutoff=settings.cutoff).clamp(0, 1)
    if config.prune_refit_iterations:
        refit = settings.replace(iterations=config.prune_refit_iterations)
        parent = fits[counts[0]]
        for count in counts[1:]:
            pruned[count] = prune_and_refit(images, parent.splats, count, refit, score, progress=progress)
            parent = pruned[count]
    random_init = None
    if config.compare_random_init:
        random_init = fit_splats(images, counts[0], settings.replace(init="random"), progress=progress,
                                 description=f"fit {level_name(counts[0])} from random")
    rows = []
    for count in counts:
        fit = fits[count]
        decoded, record_sizes = _codec_round_trip(fit.splats, size)
        after_codec = psnr(images, render_splats(decoded, size, size, backend=settings.backend, cutoff=settings.cutoff))
        for index, name in enumerate(config.photos):
            payload = codec.payload_bytes(int(fit.splats.valid[index].sum()), channels)
            jpeg_db, jpeg = jpeg_psnr_at_budget(uint8_images[index], payload)
            rows.append({
                "photo": name,
                "splats": count,
                "steps": fit.iterations,
                "psnr": float(fit.psnr[index]),
                "psnr_after_codec": float(after_codec[index]),
                "psnr_pruned_from_larger": float(pruned[count].psnr[index]) if count in pruned else math.nan,
                "psnr_random_init": float(random_init.psnr[index]) if random_init and count == counts[0] else math.nan,
                "payload_bytes": payload,
                "record_bytes": record_sizes[index],
                "ratio_payload": codec.compression_ratio(source, payload),
                "ratio_record": codec.compression_ratio(source, record_sizes[index]),
                "jpeg_psnr": jpeg_db,
                "jpeg_bytes": jpeg.num_bytes,
                "jpeg_quality": jpeg.quality,
                "fit_seconds_per_image": fit.seconds / len(config.photos),
                "seconds_per_iteration": fit.seconds / max(fit.iterations, 1),
            })
    return PhotoFitOutcome(images=images, table=pd.DataFrame(rows), fits=fits, renders=renders, pruned=pruned,
                           random_init=random_init)


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
    """Long table of the direct fits' PSNR curves: iteration, seconds, psnr, the render passes run so
    far (forward, backward, adjoint), splats."""
    columns = ("iteration", "seconds", "psnr", "forward_passes", "backward_passes", "adjoint_passes")
    frames = [pd.DataFrame({**{name: fit.history[name] for name in columns}, "splats": count})
              for count, fit in outcome.fits.items()]
    return pd.concat(frames, ignore_index=True)


def fitted_photos(outcome: PhotoFitOutcome, photos: list[str]) -> dict:
    """What the page draws the gallery from: the photos and every count's direct fit, as plain tensors."""
    return {
        "photos": list(photos),
        "images": outcome.images.cpu(),  # [B, 3, S, S] float in [0, 1]
        "splats": {count: {name: getattr(fit.splats, name).cpu() for name in ("positions", "cholesky", "colours", "valid")}
                   for count, fit in outcome.fits.items()},
    }


def run(params: Params, *, progress: bool = True) -> StageResult:
    """The ``fit_photos`` stage: the fits, their table, PSNR curves and the fitted splats (``fits.pt``)."""
    config = params.fit_photos
    outcome = fit_photos(config, params.prune.score, progress=progress)
    metrics = photo_fit_metrics(outcome)
    metrics["dropped"] = {str(count): fit.dropped for count, fit in outcome.fits.items() if fit.dropped}
    save_torch(fitted_photos(outcome, list(config.photos)), params.stage_dir("fit_photos") / "fits.pt")
    return StageResult(metrics=metrics, tables={"table": outcome.table, "history": photo_fit_history(outcome)})
