"""Stage ``fit``: every image of every split fitted once, at the largest level (METHOD.md section 1).

For each split of :meth:`gsclip_lib.params.Params.splat_splits` (train, eval, and the ImageNet-style
folder when set), every input image shard becomes one splat shard of the same name
(:mod:`gsclip_lib.data.splat_shards`) in ``fit.out_dir/fitted/N<num_splats>/<split>/``. Images are read as
``data`` says (size, channels, resize mode; bad samples skipped and counted) and fitted
``fit.batch_size`` at a time with :func:`gsclip_lib.splats.records.fit_records`.

Resuming (:mod:`gsclip_lib.data.resumable_shards`): a shard complete under its final name is
skipped, so a killed fit continues where it stopped, and the stage's metrics still describe the
whole split. Only shards made from the same inputs, with the same settings, by the same code may be
kept: a split folder records what it was made from (``config.json``: the settings, the input
shards' sizes and times, and a hash of the fitting code) and is emptied when that changed. Under
``torchrun`` ranks take disjoint input shards (shard ``i`` goes to rank ``i % world_size``).
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from gsclip_lib import distributed
from gsclip_lib.data.image_text_shards import ImageTextSample, ImageTextShards
from gsclip_lib.data.resumable_shards import (
    ShardStats,
    convert_shards,
    group_by_shape,
    input_signature,
    level_metrics,
    reset_if_changed,
    skipped_total,
)
from gsclip_lib.data.splat_shards import SplatShardWriter, shards_of_this_rank
from gsclip_lib.data.tar_shards import expand_shard_spec
from gsclip_lib.params import DataConfig, FitSettings, Params, level_name
from gsclip_lib.pipeline.dependencies import code_fingerprint
from gsclip_lib.pipeline.runner import StageResult
from gsclip_lib.splats.records import fit_records, shard_metadata

logger = logging.getLogger(__name__)


@dataclass
class ImageFitter:
    """The fit stage's :class:`~gsclip_lib.data.resumable_shards.ShardConverter`: an image shard in,
    a splat shard out, ``num_splats`` splats an image, fitted a batch of same-sized images at a time."""

    num_splats: int
    settings: FitSettings
    data: DataConfig
    device: torch.device | str = "cpu"
    source_shard: str = ""  # the shard being read

    def open_reader(self, source_shard: str) -> ImageTextShards:
        self.source_shard = source_shard
        return ImageTextShards([source_shard], image_size=self.data.image_size, resize_mode=self.data.resize_mode,
                               channels=self.data.channels, rank=0, world_size=1, split_by_worker=False)

    def fit_records(self, batch: list[ImageTextSample], stats: ShardStats) -> list[tuple[bytes, int, float] | None]:
        """Each sample's ``(record, splats kept, PSNR)``, or None where its fit was dropped."""
        records: list[tuple[bytes, int, float] | None] = [None] * len(batch)
        for (_, height, width), positions in group_by_shape([s.image.shape for s in batch]).items():
            if self.num_splats > height * width:
                logger.warning("skipping %d images of %dx%d: fewer pixels than %d splats", len(positions), height,
                               width, self.num_splats)
                continue
            images = torch.stack([batch[p].image for p in positions]).to(self.device)
            fitted = fit_records(images, self.num_splats, self.settings)
            stats.fit_seconds += fitted.fit.seconds
            for index, reason in fitted.unstorable.items():
                logger.warning("dropping %s: its splats cannot be stored (%s)", batch[positions[index]].key, reason)
            for index, position in enumerate(positions):
                if fitted.records[index] is not None:
                    records[position] = (fitted.records[index], fitted.kept_splats[index], float(fitted.fit.psnr[index]))
        return records

    def convert(self, batch: list[ImageTextSample], writer: SplatShardWriter, stats: ShardStats) -> None:
        for sample, stored in zip(batch, self.fit_records(batch, stats)):
            if stored is None:
                stats.dropped_fits += 1
                continue
            record, count, quality = stored
            channels, height, width = sample.image.shape
            metadata = shard_metadata(record, count, channels, height, width, quality, key=sample.key,
                                      label=sample.label, image_size=self.data.image_size,
                                      resize_mode=self.data.resize_mode,
                                      source_shard=os.path.basename(self.source_shard))
            stats.add_sample(writer, sample.key, record, sample.caption, metadata, quality, sample.encoded)


def fit_split(image_spec: str, out_dir: Path, num_splats: int, settings: FitSettings, batch_size: int,
              data: DataConfig, *, device: torch.device | str = "cpu", progress: bool = True) -> ShardStats:
    """Fit every image of this rank's input shards of ``image_spec``; one splat shard per input shard."""
    fitter = ImageFitter(num_splats, settings, data, device)
    return convert_shards(shards_of_this_rank(image_spec), out_dir, fitter, batch_size,
                          description=f"fit {level_name(num_splats)}", progress=progress)


def remove_stale_levels(params: Params) -> None:
    """Remove what an earlier fit left under ``fit.out_dir/fitted`` that this one does not make:
    other splat counts, and splits no longer fitted (rank 0)."""
    fitted_root = Path(params.fit.out_dir) / "fitted"
    if not (distributed.is_main() and fitted_root.is_dir()):
        return
    count = params.fit.num_splats
    wanted = {params.splat_dir(count, split) for split in params.splat_splits()}
    for level_folder in fitted_root.iterdir():
        for entry in (level_folder.iterdir() if level_folder.name == level_name(count) else [level_folder]):
            if entry not in wanted:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def fit_level(params: Params, *, progress: bool = True) -> dict:
    """Fit every split at ``fit.num_splats``; return the stage's metrics (one entry per split).

    Resumes an interrupted fit made from the same inputs with the same settings; a split whose
    inputs or settings changed starts afresh. A folder left from a split no longer fitted is removed.
    """
    count = params.fit.num_splats
    splits = params.splat_splits()
    for spec in splits.values():
        expand_shard_spec(spec)  # a spec that names no shard is an error before anything is written
    remove_stale_levels(params)
    metrics: dict = {"resumed": {}}
    device = distributed.default_device()
    for split, spec in splits.items():
        folder = params.splat_dir(count, split)
        fingerprint = {
            "fit": params.fit.model_dump(mode="json"),
            "data": {key: getattr(params.data, key) for key in ("image_size", "channels", "resize_mode")},
            "inputs": input_signature(spec),
            "code": code_fingerprint(__name__),
        }
        metrics["resumed"][split] = reset_if_changed(folder, fingerprint)
        stats = fit_split(spec, folder, count, params.fit.optimizer, params.fit.batch_size, params.data,
                          device=device, progress=progress)
        metrics[split] = level_metrics(stats, count, params.data.image_size, params.data.channels)
    metrics["skipped_total"] = skipped_total(metrics)
    return metrics


def run(params: Params, *, progress: bool = True) -> StageResult:
    """The ``fit`` stage: every split fitted at the largest level."""
    metrics = fit_level(params, progress=progress)
    empty = [split for split in params.splat_splits() if metrics[split]["images"] == 0]
    if empty:
        raise RuntimeError(f"the fit stage wrote no image for the split(s) {empty}: {metrics}")
    return StageResult(metrics=metrics)
