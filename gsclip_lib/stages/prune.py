"""Stage ``prune``: the smaller levels, each derived from the next larger one (METHOD.md section 1).

The levels form a cascade, largest first (22 -> 11 -> 6 -> 3 by default): every splat shard of the
level above becomes a shard of the same name in ``fit.out_dir/pruned/N<level>/<split>/``, each image
keeping its ``level`` best splats by ``prune.score`` (:func:`gsclip_lib.splats.pruning.keep_best`),
their colours re-solved and the survivors refitted against the image for ``prune.refit_iterations``
steps with the fit's settings. The images are those the splats were fitted from, found by the splat
sample's ``source_shard`` and key and read with the same preprocessing. The metrics give every
level's PSNR before pruning (the level above) and after the refit.

``prune.compare_fit_small`` also fits each level's count directly on the evaluation split (its first
``prune.fit_small_images`` images; all when 0), with as many steps in all as the cascade spent on
it: the paper's claim that pruning a large fit beats fitting few splats from the start, measured
here. It runs on rank 0 alone, so at paper scale it runs on a sample.

Resuming works as in the fit stage: finished shards and their statistics are kept, unless the level
above, the settings or the code changed since they were written.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from gsclip_lib import distributed
from gsclip_lib.atomic_files import finite_or_none
from gsclip_lib.data.image_text_shards import ImageTextShards
from gsclip_lib.data.resumable_shards import (
    ShardStats,
    batched,
    convert_shards,
    group_by_shape,
    level_metrics,
    reset_if_changed,
    skipped_total,
)
from gsclip_lib.data.splat_shards import (
    SplatSample,
    SplatShards,
    SplatShardWriter,
    collate_splats,
    shards_of_this_rank,
    splat_dataset,
)
from gsclip_lib.data.tar_shards import expand_shard_spec
from gsclip_lib.errors import InputError
from gsclip_lib.params import DataConfig, FitSettings, Params, level_name
from gsclip_lib.pipeline.dependencies import code_fingerprint
from gsclip_lib.pipeline.runner import StageResult
from gsclip_lib.progress import report
from gsclip_lib.splats.codec import CodecError, decode_batch, encode_splats, payload_bytes
from gsclip_lib.splats.container import Splats
from gsclip_lib.splats.fitting import FitResult, fit_splats
from gsclip_lib.splats.pruning import SCORES, prune
from gsclip_lib.splats.quality import psnr
from gsclip_lib.splats.render import render_splats

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


class SplatPruner:
    """The prune stage's :class:`~gsclip_lib.data.resumable_shards.ShardConverter`: a splat shard of
    the level above in, each image's ``target_count`` best splats refitted against its image out.

    The source images of a shard are found from its first sample's ``source_shard`` among
    ``image_shards`` (file name -> URL) when its first batch arrives.
    """

    def __init__(self, target_count: int, settings: FitSettings, score: str, image_spec: str, data: DataConfig,
                 device: torch.device | str) -> None:
        if score not in SCORES:
            raise InputError(f"unknown prune score {score!r}; choose one of {SCORES}")
        self.target_count, self.settings, self.score = target_count, settings, score
        self.data, self.device = data, device
        self.image_shards = {os.path.basename(url): url for url in expand_shard_spec(image_spec)}
        self.images: SourceImages | None = None  # the current shard's source images, found at its first batch

    def open_reader(self, source_shard: str) -> SplatShards:
        self.images = None
        return SplatShards([source_shard], rank=0, world_size=1, split_by_worker=False)

    def source_images(self, first: SplatSample) -> SourceImages:
        source = first.metadata.get("source_shard")
        url = self.image_shards.get(source)
        if url is None:
            logger.warning("no image shard named %r in the split's image shards; its samples are skipped", source)
            return SourceImages(None)
        data = self.data
        return SourceImages(ImageTextShards([url], image_size=data.image_size, resize_mode=data.resize_mode,
                                            channels=data.channels, rank=0, world_size=1, split_by_worker=False))

    def prune_and_refit(self, splats: Splats, images: Tensor, stats: ShardStats) -> FitResult:  # images [B, C, H, W]
        """Keep the best ``target_count`` splats of each image, then refit them; counts the PSNR that
        pruning alone keeps (before the colours are re-solved and refitted)."""
        height, width = images.shape[-2:]
        settings = self.settings
        pruned = prune(splats, self.target_count, self.score, height, width, settings)
        with torch.no_grad():
            kept = psnr(images, render_splats(pruned, height, width, backend=settings.backend, cutoff=settings.cutoff))
        stats.add("psnr_pruned_sum", float(kept[torch.isfinite(kept)].sum()))
        stats.add("psnr_pruned_count", int(torch.isfinite(kept).sum()))
        result = fit_splats(images, self.target_count, settings, initial=pruned, progress=False, description="refit")
        stats.fit_seconds += result.seconds
        return result

    def refit_records(self, batch: list[SplatSample], stats: ShardStats) -> list[tuple[bytes, int, float] | None]:
        """Each sample's ``(record, splats kept, PSNR)``, or None where it has no image or its fit was dropped."""
        outputs: list[tuple[bytes, int, float] | None] = [None] * len(batch)
        images: list[Tensor | None] = [self.images.take(sample.key) for sample in batch]
        shapes = [(sample.splats.channels, sample.height, sample.width) for sample in batch]
        for shape, positions in group_by_shape(shapes).items():
            found = [p for p in positions if images[p] is not None]
            stats.add("no_source_image", len(positions) - len(found))
            if not found:
                continue
            stack = torch.stack([images[p] for p in found]).to(self.device)
            if tuple(stack.shape[1:]) != shape:
                raise InputError(
                    f"the source images are {tuple(stack.shape[1:])}, the splats describe {shape}: "
                    "data.image_size, data.channels and data.resize_mode must be those the splats were fitted with"
                )
            splats, _, _ = decode_batch([batch[p].record for p in found])
            result = self.prune_and_refit(splats.to(self.device), stack, stats)
            refitted = result.splats.to("cpu")
            dropped = set(result.dropped)
            for index, position in enumerate(found):
                if index in dropped:
                    stats.dropped_fits += 1
                    continue
                try:
                    record = encode_splats(refitted, index, shape[1], shape[2])
                except CodecError as error:
                    logger.warning("dropping %s: its splats cannot be stored (%s)", batch[position].key, error)
                    stats.dropped_fits += 1
                    continue
                outputs[position] = (record, int(refitted.valid[index].sum()), float(result.psnr[index]))
        return outputs

    def convert(self, batch: list[SplatSample], writer: SplatShardWriter, stats: ShardStats) -> None:
        if self.images is None:
            self.images = self.source_images(batch[0])
        for sample, stored in zip(batch, self.refit_records(batch, stats)):
            if stored is None:
                continue
            record, count, quality = stored
            before = sample.metadata.get("psnr")
            if isinstance(before, (int, float)) and math.isfinite(quality):
                stats.add("psnr_before_sum", before)
                stats.add("psnr_before_count", 1)
            metadata = dict(sample.metadata)
            metadata.update(
                N=count,
                psnr=finite_or_none(quality),
                bytes=len(record),
                payload_bytes=payload_bytes(count, sample.splats.channels),
                pruned_from=sample.num_splats,
                refit_iterations=self.settings.iterations,
            )
            stats.add_sample(writer, sample.key, record, sample.caption, metadata, quality, sample.image)


def prune_split(fitted_dir: Path, out_dir: Path, target_count: int, settings: FitSettings, score: str, batch_size: int,
                image_spec: str, data: DataConfig, *, device: torch.device | str = "cpu",
                progress: bool = True) -> ShardStats:
    """Prune (and refit) this rank's splat shards of ``fitted_dir`` to ``target_count`` splats."""
    pruner = SplatPruner(target_count, settings, score, image_spec, data, device)
    return convert_shards(shards_of_this_rank(str(fitted_dir)), out_dir, pruner, batch_size,
                          description=f"prune to {level_name(target_count)}", progress=progress)


def pruned_level_metrics(stats: ShardStats, level: int, parent: int, total_steps: int, data: DataConfig) -> dict:
    """One split's line of the prune metrics: the fit's line, and what pruning cost."""
    row = level_metrics(stats, level, data.image_size, data.channels)
    before = stats.mean("psnr_before_sum", "psnr_before_count")
    row.update(
        pruned_from=parent,
        no_source_image=int(stats.sums.get("no_source_image", 0)),
        mean_psnr_before=before,  # the same images at the level above
        mean_psnr_pruned=stats.mean("psnr_pruned_sum", "psnr_pruned_count"),  # after pruning, before the refit
        psnr_cost=before - row["mean_psnr"],
        total_steps=total_steps,
    )
    return row


def prune_cascade(params: Params, *, progress: bool = True) -> dict:
    """Every pruned level of every split, largest first, each from the level above; the metrics."""
    settings = params.fit.optimizer.replace(iterations=params.prune.refit_iterations)
    device = distributed.default_device()
    metrics: dict = {"levels": {}}
    parent = params.fit.num_splats
    for position, level in enumerate(sorted(params.prune.levels, reverse=True), start=1):
        level_metrics_by_split: dict = {}
        for split, spec in params.splat_splits().items():
            source = params.splat_dir(parent, split)
            made_from = source / "config.json"
            fingerprint = {
                "prune": {"level": level, "score": params.prune.score, "refit": settings.model_dump(mode="json")},
                "source": made_from.read_text() if made_from.is_file() else None,
                "code": code_fingerprint(__name__),
            }
            reset_if_changed(params.splat_dir(level, split), fingerprint)
            stats = prune_split(source, params.splat_dir(level, split), level, settings, params.prune.score,
                                params.fit.batch_size, spec, params.data, device=device, progress=progress)
            total_steps = params.fit.optimizer.iterations + params.prune.refit_iterations * position
            row = pruned_level_metrics(stats, level, parent, total_steps, params.data)
            level_metrics_by_split[split] = row
        metrics["levels"][level_name(level)] = level_metrics_by_split
        parent = level
    metrics["skipped_total"] = skipped_total(metrics["levels"])
    return metrics


FIT_SMALL_COLUMNS = ("key", "level", "pruned_psnr", "direct_psnr")  # the per-image table of the comparison


def _pruned_psnr(samples: list, splats_by_key: dict[str, SplatSample], settings: FitSettings, device) -> Tensor:  # [B]
    """PSNR of each image of ``samples`` rendered from its stored pruned splats."""
    images = torch.stack([sample.image for sample in samples]).to(device)
    splats = collate_splats([splats_by_key[sample.key] for sample in samples]).splats.to(device)
    renders = render_splats(splats, images.shape[-2], images.shape[-1], backend=settings.backend,
                            cutoff=settings.cutoff)
    return psnr(images, renders).cpu()


def fit_small_comparison(params: Params, metrics: dict, *, progress: bool = True) -> tuple[dict, pd.DataFrame]:
    """Each pruned level's count fitted directly on the evaluation split, with the cascade's total
    steps: ``{level: {"pruned": dB, "fit_small": dB, "steps": n}}`` (means), and the per-image table
    (``key``, ``level``, ``pruned_psnr``, ``direct_psnr``) that the page's paired comparison reads."""
    split = params.shown_split()
    reader = ImageTextShards(params.splat_splits()[split], image_size=params.data.image_size,
                             resize_mode=params.data.resize_mode, channels=params.data.channels, rank=0, world_size=1)
    device = distributed.default_device()
    comparison, frames = {}, []
    for level in sorted(params.prune.levels, reverse=True):
        row = metrics["levels"][level_name(level)][split]
        settings = params.fit.optimizer.replace(iterations=row["total_steps"])
        stored = {sample.key: sample for sample in splat_dataset(str(params.splat_dir(level, split)), rank=0, world_size=1)}
        chosen = (sample for sample in reader if sample.key in stored)
        for batch in batched(itertools.islice(chosen, params.prune.fit_small_images or None), params.fit.batch_size):
            images = torch.stack([sample.image for sample in batch]).to(device)
            direct = fit_splats(images, level, settings, progress=False).psnr.cpu()
            pruned = _pruned_psnr(batch, stored, settings, device)
            frames.append(pd.DataFrame({"key": [sample.key for sample in batch], "level": level_name(level),
                                        "pruned_psnr": pruned.numpy(), "direct_psnr": direct.numpy()}))
        level_rows = pd.concat([frame for frame in frames if (frame["level"] == level_name(level)).all()])
        finite = level_rows[np.isfinite(level_rows[["pruned_psnr", "direct_psnr"]]).all(axis=1)]
        comparison[level_name(level)] = {
            "split": split, "steps": row["total_steps"], "images": len(finite),
            "pruned": float(finite["pruned_psnr"].mean()) if len(finite) else math.nan,
            "fit_small": float(finite["direct_psnr"].mean()) if len(finite) else math.nan,
        }
        if progress:
            small = comparison[level_name(level)]
            report(f"{split}: {level_name(level)} pruned {small['pruned']:.2f} dB, fit directly "
                   f"{small['fit_small']:.2f} dB ({row['total_steps']} steps each)")
    return comparison, pd.concat(frames, ignore_index=True)


def run(params: Params, *, progress: bool = True) -> StageResult:
    """The ``prune`` stage: the cascade of pruned levels and, when asked, the direct fits beside them."""
    metrics = prune_cascade(params, progress=progress)
    for name, splits in metrics["levels"].items():
        empty = [split for split, row in splits.items() if row["images"] == 0]
        if empty:
            raise RuntimeError(f"the prune stage wrote no image of {name} for the split(s) {empty}")
    tables = {"fit_small": pd.DataFrame(columns=FIT_SMALL_COLUMNS)}  # empty when not compared
    if params.prune.compare_fit_small and distributed.is_main():
        metrics["fit_small"], tables["fit_small"] = fit_small_comparison(params, metrics, progress=progress)
    return StageResult(metrics=metrics, tables=tables)
