"""Stage ``fit``: every image of every split fitted once, at the largest level (METHOD.md section 1).

For each split of :meth:`gsclip_lib.params.Params.splat_splits` (train, eval, and the ImageNet-style
folder when set), every input image shard becomes one splat shard of the same name
(:mod:`gsclip_lib.data.splat_shards`) in ``fit.out_dir/fitted/N<num_splats>/<split>/``. Images are read as
``data`` says (size, channels, resize mode; bad samples skipped and counted) and fitted
``fit.batch_size`` at a time with :func:`gsclip_lib.splats.fitting.fit_splats`.

Resuming: a shard complete under its final name is skipped, so a killed fit continues where it
stopped, and its statistics are read back from the file written beside it
(``<shard>.stats.json``), so the stage's metrics describe the whole split however often it was
resumed. Only shards made from the same inputs, with the same settings, by the same code may be
kept: a split folder records what it was made from (``config.json``: the settings, the input
shards' sizes and times, and a hash of the fitting code) and is emptied when that changed. Under ``torchrun``
ranks take disjoint input shards (shard ``i`` goes to rank ``i % world_size``) and rank 0 decides
about resetting a folder while the others wait.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from gsclip_lib import distributed
from gsclip_lib.atomic_files import write_json, write_text
from gsclip_lib.data.image_text_shards import EncodedImage, ImageTextSample, ImageTextShards, SkipCounts, expand_shard_spec
from gsclip_lib.data.splat_shards import (
    SplatShardWriter,
    open_splat_shard,
    shard_is_complete,
    shards_of_this_rank,
    splat_shard_name,
)
from gsclip_lib.params import DataConfig, FitSettings, Params, level_name
from gsclip_lib.progress import progress_bar
from gsclip_lib.splats.codec import CodecError, compression_ratio, encode_splats, payload_bytes, source_bytes
from gsclip_lib.splats.fitting import fit_splats
from gsclip_lib.stages.dependencies import code_fingerprint
from gsclip_lib.stages.runner import StageResult

logger = logging.getLogger(__name__)


@dataclass
class SplatShardStats:
    """What one rank did for one split of one level; :func:`level_metrics` reports it."""

    shards_written: int = 0
    shards_skipped: int = 0  # already complete under their final name
    images: int = 0  # samples written
    dropped_fits: int = 0  # fits dropped as non-finite (or that could not be stored)
    no_source_image: int = 0  # pruning with a refit: no image with the sample's key
    skip_counts: SkipCounts = field(default_factory=SkipCounts)  # samples skipped while reading
    seconds: float = 0.0  # wall time of the whole split
    fit_seconds: float = 0.0  # time spent in the optimizer
    record_bytes: int = 0  # stored bytes of all records written
    psnr_sum: float = 0.0
    psnr_square_sum: float = 0.0  # for the spread of the per-image PSNR
    psnr_count: int = 0
    psnr_before_sum: float = 0.0  # pruning: the same images' PSNR at the level above
    psnr_before_count: int = 0
    psnr_pruned_sum: float = 0.0  # pruning: their PSNR after pruning, before the refit
    psnr_pruned_count: int = 0

    @property
    def mean_psnr(self) -> float:
        return self.psnr_sum / self.psnr_count if self.psnr_count else math.nan

    @property
    def psnr_interval(self) -> tuple[float, float]:
        """95 % interval of the mean PSNR (normal approximation over the images), dB."""
        if self.psnr_count < 2:
            return math.nan, math.nan
        variance = max(self.psnr_square_sum / self.psnr_count - self.mean_psnr**2, 0.0) * self.psnr_count / (self.psnr_count - 1)
        half = 1.96 * math.sqrt(variance / self.psnr_count)
        return self.mean_psnr - half, self.mean_psnr + half

    # The fields that describe the samples themselves: what a finished shard's stats file keeps.
    SAMPLE_FIELDS = ("images", "dropped_fits", "no_source_image", "fit_seconds", "record_bytes", "psnr_sum",
                     "psnr_square_sum", "psnr_count", "psnr_before_sum", "psnr_before_count", "psnr_pruned_sum", "psnr_pruned_count")

    def shard_record(self) -> dict[str, Any]:
        """What one shard's stats file holds."""
        record = {name: getattr(self, name) for name in self.SAMPLE_FIELDS}
        record["skip_counts"] = self.skip_counts.as_dict()
        return record

    def merge(self, record: dict[str, Any]) -> None:
        """Add one shard's statistics (as :meth:`shard_record` wrote them)."""
        for name in self.SAMPLE_FIELDS:
            setattr(self, name, getattr(self, name) + record[name])
        self.skip_counts = self.skip_counts + SkipCounts(**record["skip_counts"])

    def summed_over_ranks(self) -> "SplatShardStats":
        """Every rank's statistics of the split added up (the slowest rank's seconds); itself in one
        process. Every rank must call it: under torchrun a rank may hold none of a small split's shards."""
        records = distributed.all_gather_objects(
            (self.shard_record(), self.shards_written, self.shards_skipped, self.seconds)
        )
        if len(records) == 1:
            return self
        total = SplatShardStats()
        for record, written, skipped, seconds in records:
            total.merge(record)
            total.shards_written += written
            total.shards_skipped += skipped
            total.seconds = max(total.seconds, seconds)
        return total

    def add_sample(self, writer: SplatShardWriter, key: str, record: bytes, caption: str,
                   metadata: dict[str, Any], quality: float, image: EncodedImage | None) -> None:
        writer.write(key, record, caption, metadata, image)
        self.images += 1
        self.record_bytes += len(record)
        if math.isfinite(quality):
            self.psnr_sum += quality
            self.psnr_square_sum += quality * quality
            self.psnr_count += 1


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """``items`` in lists of ``size`` (the last one shorter)."""
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def group_by_shape(shapes: Sequence[tuple[int, ...]]) -> dict[tuple[int, ...], list[int]]:
    """Positions grouped by shape: a fit batches only same-sized images."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for position, shape in enumerate(shapes):
        groups.setdefault(tuple(shape), []).append(position)
    return groups


def finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def level_metrics(stats: SplatShardStats, count: int, data: DataConfig) -> dict:
    """One split's line of a fit or prune stage's metrics."""
    payload = payload_bytes(count, data.channels)
    source = source_bytes(data.image_size, data.image_size, data.channels)
    return {
        "splats": count,
        "images": stats.images,
        "mean_psnr": stats.mean_psnr,
        "mean_psnr_low": stats.psnr_interval[0],
        "mean_psnr_high": stats.psnr_interval[1],
        "payload_bytes": payload,
        "ratio_payload": round(compression_ratio(source, payload), 4),
        "record_bytes_mean": stats.record_bytes / max(stats.images, 1),
        "seconds": round(stats.seconds, 2),
        "images_per_second": round(stats.images / stats.fit_seconds, 2) if stats.fit_seconds else None,
        "shards_written": stats.shards_written,
        "shards_skipped": stats.shards_skipped,
        "dropped_fits": stats.dropped_fits,
        "skipped": stats.skip_counts.as_dict(),
    }


def skipped_total(metrics: dict) -> int:
    """All samples skipped anywhere in a stage's metrics."""
    total = 0
    for value in metrics.values():
        if isinstance(value, dict):
            total += sum(v for k, v in value.get("skipped", {}).items() if k != "good") + skipped_total(value)
    return total


def input_signature(spec: str) -> list[list]:
    """What identifies a split's input shards: each path with its size and modification time.

    A shard that is not a local file (a URL, ``pipe:``) is identified by its name alone.
    """
    signature = []
    for url in expand_shard_spec(spec):
        if os.path.isfile(url):
            info = os.stat(url)
            signature.append([url, info.st_size, info.st_mtime_ns])
        else:
            signature.append([url])
    return signature


STATS_SUFFIX = ".stats.json"


def stats_path(shard: Path) -> Path:
    """Where a finished shard's statistics are kept: ``<shard>.stats.json`` beside it (not a shard)."""
    return shard.with_name(shard.name + STATS_SUFFIX)


def finished_shard_stats(shard: Path) -> dict[str, Any] | None:
    """The statistics of a complete shard, or None when the shard or its statistics are missing."""
    sidecar = stats_path(shard)
    if not (shard_is_complete(str(shard)) and sidecar.is_file()):
        return None
    return json.loads(sidecar.read_text())


def reset_if_changed(folder: Path, fingerprint: dict) -> bool:
    """Empty ``folder`` unless it was written under the same ``fingerprint``; return whether it was kept.

    Under ``torchrun`` rank 0 decides and the other ranks wait for it.
    """
    record = folder / "config.json"
    wanted = json.dumps(fingerprint, sort_keys=True)
    kept = record.is_file() and record.read_text() == wanted
    if distributed.is_main() and not kept:
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        write_text(record, wanted)
    distributed.barrier()
    return kept


def fit_split(
    image_spec: str,
    out_dir: Path,
    num_splats: int,
    settings: FitSettings,
    batch_size: int,
    data: DataConfig,
    *,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> SplatShardStats:
    """Fit every image of this rank's input shards of ``image_spec``; one splat shard per input shard."""
    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = SplatShardStats()
    for source_shard in progress_bar(shards_of_this_rank(image_spec), desc=f"fit {level_name(num_splats)}",
                                     disable=not progress):
        final = out_dir / splat_shard_name(source_shard)
        finished = finished_shard_stats(final)
        if finished is not None:
            stats.merge(finished)
            stats.shards_skipped += 1
            continue
        reader = ImageTextShards(
            [source_shard], image_size=data.image_size, resize_mode=data.resize_mode, channels=data.channels,
            rank=0, world_size=1, split_by_worker=False,
        )
        shard = SplatShardStats()
        with open_splat_shard(final) as writer:
            for batch in batched(reader, batch_size):
                _fit_and_write(batch, writer, num_splats, settings, device, source_shard, data, shard)
            shard.skip_counts = reader.skip_counts.copy()
            write_json(stats_path(final), shard.shard_record())  # before the shard itself is published
        stats.merge(shard.shard_record())
        stats.shards_written += 1
    stats.seconds = time.perf_counter() - start
    return stats.summed_over_ranks()


def _fit_and_write(
    batch: list[ImageTextSample],
    writer: SplatShardWriter,
    num_splats: int,
    settings: FitSettings,
    device: torch.device | str,
    source_shard: str,
    data: DataConfig,
    stats: SplatShardStats,
) -> None:
    records: list[tuple[bytes, int, float] | None] = [None] * len(batch)
    for (channels, height, width), positions in group_by_shape([s.image.shape for s in batch]).items():
        if num_splats > height * width:
            logger.warning("skipping %d images of %dx%d: fewer pixels than %d splats", len(positions), height,
                           width, num_splats)
            continue
        images = torch.stack([batch[p].image for p in positions]).to(device)
        result = fit_splats(images, num_splats, settings, progress=False)
        stats.fit_seconds += result.seconds
        splats = result.splats.to("cpu")
        dropped = set(result.dropped)
        for index, position in enumerate(positions):
            if index in dropped:
                continue
            try:
                record = encode_splats(splats, index, height, width)
            except CodecError as error:
                logger.warning("dropping %s: its splats cannot be stored (%s)", batch[position].key, error)
                continue
            records[position] = (record, int(splats.valid[index].sum()), float(result.psnr[index]))
    for sample, stored in zip(batch, records):
        if stored is None:
            stats.dropped_fits += 1
            continue
        record, count, quality = stored
        channels, height, width = sample.image.shape
        metadata = {
            "N": count,
            "C": channels,
            "H": height,
            "W": width,
            "psnr": finite_or_none(quality),
            "bytes": len(record),
            "payload_bytes": payload_bytes(count, channels),
            "source_key": sample.key,
            "source_shard": os.path.basename(source_shard),
            "label": sample.label,
            "image_size": data.image_size,
            "resize_mode": data.resize_mode,
        }
        stats.add_sample(writer, sample.key, record, sample.caption, metadata, quality, sample.encoded)


def fit_level(params: Params, *, progress: bool = True) -> dict:
    """Fit every split at ``fit.num_splats``; return the stage's metrics (one entry per split).

    Resumes an interrupted fit made from the same inputs with the same settings; a split whose
    inputs or settings changed starts afresh. A folder left from a split no longer fitted is removed.
    """
    count = params.fit.num_splats
    splits = params.splat_splits()
    for spec in splits.values():
        expand_shard_spec(spec)  # a spec that names no shard is an error before anything is written
    fitted_root = Path(params.fit.out_dir) / "fitted"
    if distributed.is_main() and fitted_root.is_dir():  # other counts, and splits no longer fitted, go
        wanted = {params.splat_dir(count, split) for split in splits}
        for level_folder in fitted_root.iterdir():
            for entry in (level_folder.iterdir() if level_folder.name == level_name(count) else [level_folder]):
                if entry not in wanted:
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
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
        metrics[split] = level_metrics(stats, count, params.data)
    metrics["skipped_total"] = skipped_total(metrics)
    return metrics


def run(params: Params, *, progress: bool = True) -> StageResult:
    """The ``fit`` stage: every split fitted at the largest level."""
    metrics = fit_level(params, progress=progress)
    empty = [split for split in params.splat_splits() if metrics[split]["images"] == 0]
    if empty:
        raise RuntimeError(f"the fit stage wrote no image for the split(s) {empty}: {metrics}")
    return StageResult(metrics=metrics)


__all__ = ["SplatShardStats", "batched", "fit_level", "fit_split", "level_metrics", "run", "skipped_total"]
