"""Stage ``prune@N``: a smaller level derived from the fitted one (METHOD.md section 1).

Every splat shard of the fitted level becomes a shard of the same name in
``fit.out_dir/N<level>/<split>/``: each image keeps its ``level`` brightest splats by luminance
(:func:`gsclip_lib.splats.pruning.prune_by_luminance`), then the survivors are refitted against the
image for ``prune.finetune_iterations`` steps (0: kept as pruned) and the PSNR of what is stored is
measured. The images are those the splats were fitted from, found by the splat sample's
``source_shard`` and key and read with the same preprocessing. Resuming works as in the fit stage:
finished shards and their statistics are kept, unless the fitted level, the settings or the code
changed since they were written.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import torch
from torch import Tensor

from gsclip_lib import distributed
from gsclip_lib.data.image_text_shards import ImageTextShards, expand_shard_spec
from gsclip_lib.data.splat_shards import (
    SplatSample,
    SplatShards,
    SplatShardWriter,
    open_splat_shard,
    shards_of_this_rank,
    splat_shard_name,
)
from gsclip_lib.errors import InputError
from gsclip_lib.params import DataConfig, FitSettings, Params, level_name
from gsclip_lib.progress import progress_bar
from gsclip_lib.reporting import paper
from gsclip_lib.splats.codec import CodecError, decode_batch, encode_splats, payload_bytes
from gsclip_lib.splats.fitting import fit_splats
from gsclip_lib.splats.pruning import prune_by_luminance
from gsclip_lib.atomic_files import write_json
from gsclip_lib.stages.dependencies import code_fingerprint
from gsclip_lib.stages.fit import (
    SplatShardStats,
    batched,
    example_figure,
    finished_shard_stats,
    finite_or_none,
    group_by_shape,
    level_metrics,
    reset_if_changed,
    skipped_total,
    splits_summary,
    stats_path,
)
from gsclip_lib.stages.runner import StageResult

logger = logging.getLogger(__name__)


class SourceImages:
    """The images of one image shard, looked up by key in the order the splats were written.

    A splat shard lists a subsequence of its source shard's keys in the same order, so one forward
    pass finds them all while holding one image at a time; a key that is not found ends the pass
    (every later key then counts as missing).
    """

    def __init__(self, reader: ImageTextShards | None) -> None:
        self._samples = iter(reader) if reader is not None else iter(())

    def take(self, key: str) -> Tensor | None:
        for sample in self._samples:
            if sample.key == key:
                return sample.image
        return None


def prune_split(
    fitted_dir: Path,
    out_dir: Path,
    target_count: int,
    settings: FitSettings,
    batch_size: int,
    image_spec: str,
    data: DataConfig,
    *,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> SplatShardStats:
    """Prune (and refit) this rank's splat shards of ``fitted_dir`` to ``target_count`` splats."""
    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    image_shards = {os.path.basename(url): url for url in expand_shard_spec(image_spec)}
    stats = SplatShardStats()
    for splat_shard in progress_bar(shards_of_this_rank(str(fitted_dir)), desc=f"prune to {level_name(target_count)}",
                                    disable=not progress):
        final = out_dir / splat_shard_name(splat_shard)
        finished = finished_shard_stats(final)
        if finished is not None:
            stats.merge(finished)
            stats.shards_skipped += 1
            continue
        reader = SplatShards([splat_shard], rank=0, world_size=1, split_by_worker=False)
        images: SourceImages | None = None
        shard = SplatShardStats()
        with open_splat_shard(final) as writer:
            for batch in batched(reader, batch_size):
                if images is None:
                    images = _source_images(batch[0], image_shards, data)
                _prune_and_write(batch, writer, target_count, settings, images, device, shard)
            shard.skip_counts = reader.skip_counts.copy()
            write_json(stats_path(final), shard.shard_record())  # before the shard itself is published
        stats.merge(shard.shard_record())
        stats.shards_written += 1
    stats.seconds = time.perf_counter() - start
    return stats


def _source_images(first: SplatSample, image_shards: dict[str, str], data: DataConfig) -> SourceImages:
    source = first.metadata.get("source_shard")
    url = image_shards.get(source)
    if url is None:
        logger.warning("no image shard named %r in the split's image shards; its samples are skipped", source)
        return SourceImages(None)
    reader = ImageTextShards(
        [url], image_size=data.image_size, resize_mode=data.resize_mode, channels=data.channels,
        rank=0, world_size=1, split_by_worker=False,
    )
    return SourceImages(reader)


def _prune_and_write(
    batch: list[SplatSample],
    writer: SplatShardWriter,
    target_count: int,
    settings: FitSettings,
    source: SourceImages,
    device: torch.device | str,
    stats: SplatShardStats,
) -> None:
    outputs: list[tuple[bytes, int, float] | None] = [None] * len(batch)
    images: list[Tensor | None] = [source.take(sample.key) for sample in batch]
    shapes = [(sample.splats.channels, sample.height, sample.width) for sample in batch]
    for (channels, height, width), positions in group_by_shape(shapes).items():
        found = [i for i, p in enumerate(positions) if images[p] is not None]
        stats.no_source_image += len(positions) - len(found)
        if not found:
            continue
        splats, _, _ = decode_batch([batch[positions[i]].record for i in found])
        pruned = prune_by_luminance(splats, target_count=target_count)
        stack = torch.stack([images[positions[i]] for i in found]).to(device)
        if tuple(stack.shape[1:]) != (channels, height, width):
            raise InputError(
                f"the source images are {tuple(stack.shape[1:])}, the splats describe {(channels, height, width)}: "
                "data.image_size, data.channels and data.resize_mode must be those the splats were fitted with"
            )
        result = fit_splats(stack, pruned.num_slots, settings, initial=pruned.to(device), progress=False,
                            description="refit")
        stats.fit_seconds += result.seconds
        refitted = result.splats.to("cpu")
        dropped = set(result.dropped)
        for index, i in enumerate(found):
            if index in dropped:
                stats.dropped_fits += 1
                continue
            try:
                record = encode_splats(refitted, index, height, width)
            except CodecError as error:
                logger.warning("dropping %s: its splats cannot be stored (%s)", batch[positions[i]].key, error)
                stats.dropped_fits += 1
                continue
            outputs[positions[i]] = (record, int(refitted.valid[index].sum()), float(result.psnr[index]))
    for sample, stored in zip(batch, outputs):
        if stored is None:
            continue
        record, count, quality = stored
        before = sample.metadata.get("psnr")
        if isinstance(before, (int, float)) and math.isfinite(quality):
            stats.psnr_before_sum += before
            stats.psnr_before_count += 1
        metadata = dict(sample.metadata)
        metadata.update(
            N=count,
            psnr=finite_or_none(quality),
            bytes=len(record),
            payload_bytes=payload_bytes(count, sample.splats.channels),
            pruned_from=sample.num_splats,
            refit_iterations=settings.iterations,
        )
        stats.add_sample(writer, sample.key, record, sample.caption, metadata, quality)


def prune_level(params: Params, level: int, *, progress: bool = True) -> dict:
    """Derive the ``level`` of every split from the fitted level; return the stage's metrics."""
    if level not in params.prune.levels:
        raise InputError(f"level {level} is not one of prune.levels {params.prune.levels}")
    settings = params.fit.optimizer.replace(iterations=params.prune.finetune_iterations)
    device = distributed.default_device()
    metrics: dict = {}
    for split, spec in params.splat_splits().items():
        fitted = params.splat_dir(params.fit.num_splats, split) / "config.json"
        fingerprint = {
            "prune": {"level": level, "refit": settings.model_dump(mode="json")},
            "fitted": fitted.read_text() if fitted.is_file() else None,
            "code": code_fingerprint(__name__),
        }
        reset_if_changed(params.splat_dir(level, split), fingerprint)
        stats = prune_split(
            params.splat_dir(params.fit.num_splats, split), params.splat_dir(level, split), level, settings,
            params.fit.batch_size, spec, params.data, device=device, progress=progress,
        )
        metrics[split] = level_metrics(stats, level, params.data)
        metrics[split]["no_source_image"] = stats.no_source_image
        # The PSNR the same images had at the fitted level, and what pruning (and the refit) cost.
        before = stats.psnr_before_sum / stats.psnr_before_count if stats.psnr_before_count else math.nan
        metrics[split]["mean_psnr_fitted"] = before
        metrics[split]["psnr_cost"] = before - metrics[split]["mean_psnr"]
        metrics[split]["pruned_fraction"] = round(1 - level / params.fit.num_splats, 4)
    metrics["skipped_total"] = skipped_total(metrics)
    return metrics


def run(params: Params, *, level: int, progress: bool = True) -> StageResult:
    """The ``prune@N`` stage: one pruned level of every split, and a figure beside the fitted level."""
    metrics = prune_level(params, level, progress=progress)
    empty = [split for split in params.splat_splits() if metrics[split]["images"] == 0]
    if empty:
        raise RuntimeError(f"the prune stage wrote no image for the split(s) {empty}: {metrics}")
    figures_made = {}
    if distributed.is_main():
        figures_made["examples"] = example_figure(params, [params.fit.num_splats, level])
    split = params.shown_split()
    low, high = paper.PRUNE_COST_DB["cost_db"]
    comparison = paper.comparison([{
        "what": f"PSNR cost of pruning {100 * metrics[split]['pruned_fraction']:.0f} % of the splats (dB, {split})",
        "ours": round(metrics[split]["psnr_cost"], 2),
        "paper": f"{low:g}-{high:g}",
        "note": f"paper: 60-80 % pruned, 224x224 photos; ours: {params.fit.num_splats} -> {level} splats at "
        f"{params.data.image_size}x{params.data.image_size}, refit {params.prune.finetune_iterations} steps",
    }])
    return StageResult(metrics=metrics, figures=figures_made, summary=splits_summary(metrics, params.splat_splits()),
                       comparison=comparison)

