"""Shard-to-shard work that survives being killed: what the fit and prune stages share.

Both stages turn every input shard of this rank into one splat shard of the same name
(:func:`gsclip_lib.data.splat_shards.splat_shard_name`), batch by batch, and both must resume a
killed run without redoing finished shards or miscounting them. :func:`convert_shards` is that loop;
what happens to a batch is the stage's :class:`ShardConverter`:

- a shard complete under its final name is skipped, and its statistics are read back from the file
  written beside it (``<shard>.stats.json``, written before the shard is published), so the metrics
  describe the whole split however often it was resumed;
- :func:`reset_if_changed` empties a split's folder when what it was made from changed (the
  settings, the inputs, the code); rank 0 decides while the others wait;
- :class:`ShardStats` holds what one rank did, summed over ranks at the end.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol, Sequence

from gsclip_lib import distributed
from gsclip_lib.atomic_files import write_json, write_text
from gsclip_lib.data.skip_counts import SkipCounts
from gsclip_lib.data.splat_shards import SplatShardWriter, open_splat_shard, shard_is_complete, splat_shard_name
from gsclip_lib.data.tar_shards import expand_shard_spec
from gsclip_lib.progress import progress_bar
from gsclip_lib.splats.codec import compression_ratio, payload_bytes, source_bytes

STATS_SUFFIX = ".stats.json"


@dataclass
class ShardStats:
    """What one rank did for one split of one level; :func:`level_metrics` reports it.

    ``sums`` holds a stage's own counters (the prune stage's PSNR before pruning, its missing source
    images): they are added up across shards and ranks like the fields.
    """

    shards_written: int = 0
    shards_skipped: int = 0  # already complete under their final name
    images: int = 0  # samples written
    dropped_fits: int = 0  # fits dropped as non-finite (or that could not be stored)
    skip_counts: SkipCounts = field(default_factory=SkipCounts)  # samples skipped while reading
    seconds: float = 0.0  # wall time of the whole split
    fit_seconds: float = 0.0  # time spent in the optimizer
    record_bytes: int = 0  # stored bytes of all records written
    psnr_sum: float = 0.0
    psnr_square_sum: float = 0.0  # for the spread of the per-image PSNR
    psnr_count: int = 0
    sums: dict[str, float] = field(default_factory=dict)

    # The fields that describe the samples themselves: what a finished shard's stats file keeps.
    SAMPLE_FIELDS = ("images", "dropped_fits", "fit_seconds", "record_bytes", "psnr_sum", "psnr_square_sum",
                     "psnr_count")

    @property
    def mean_psnr(self) -> float:
        return self.psnr_sum / self.psnr_count if self.psnr_count else math.nan

    @property
    def psnr_interval(self) -> tuple[float, float]:
        """95 % interval of the mean PSNR (normal approximation over the images), dB."""
        if self.psnr_count < 2:
            return math.nan, math.nan
        spread = self.psnr_square_sum / self.psnr_count - self.mean_psnr**2
        variance = max(spread, 0.0) * self.psnr_count / (self.psnr_count - 1)
        half = 1.96 * math.sqrt(variance / self.psnr_count)
        return self.mean_psnr - half, self.mean_psnr + half

    def add(self, name: str, value: float) -> None:
        """Add ``value`` to the stage's own counter ``name``."""
        self.sums[name] = self.sums.get(name, 0) + value

    def mean(self, total: str, count: str) -> float:
        """``sums[total] / sums[count]``, NaN when nothing was counted."""
        return self.sums[total] / self.sums[count] if self.sums.get(count) else math.nan

    def shard_record(self) -> dict[str, Any]:
        """What one shard's stats file holds."""
        record: dict[str, Any] = {name: getattr(self, name) for name in self.SAMPLE_FIELDS}
        record["skip_counts"] = self.skip_counts.as_dict()
        record["sums"] = dict(self.sums)
        return record

    def merge(self, record: dict[str, Any]) -> None:
        """Add one shard's statistics (as :meth:`shard_record` wrote them)."""
        for name in self.SAMPLE_FIELDS:
            setattr(self, name, getattr(self, name) + record[name])
        self.skip_counts = self.skip_counts + SkipCounts(**record["skip_counts"])
        for name, value in record["sums"].items():
            self.add(name, value)

    def summed_over_ranks(self) -> "ShardStats":
        """Every rank's statistics of the split added up (the slowest rank's seconds); itself in one
        process. Every rank must call it: under torchrun a rank may hold none of a small split's shards."""
        records = distributed.all_gather_objects(
            (self.shard_record(), self.shards_written, self.shards_skipped, self.seconds)
        )
        if len(records) == 1:
            return self
        total = ShardStats()
        for record, written, skipped, seconds in records:
            total.merge(record)
            total.shards_written += written
            total.shards_skipped += skipped
            total.seconds = max(total.seconds, seconds)
        return total

    def add_sample(self, writer: SplatShardWriter, key: str, record: bytes, caption: str,
                   metadata: dict[str, Any], quality: float, image: Any) -> None:
        """Write one splat sample and count it (its PSNR ``quality`` when finite)."""
        writer.write(key, record, caption, metadata, image)
        self.images += 1
        self.record_bytes += len(record)
        if math.isfinite(quality):
            self.psnr_sum += quality
            self.psnr_square_sum += quality * quality
            self.psnr_count += 1


class ShardConverter(Protocol):
    """What a stage does to one input shard: read it, and turn each batch into splat samples."""

    def open_reader(self, source_shard: str) -> Iterable[Any]:
        """The samples of ``source_shard``; the reader's ``skip_counts`` are read once it is exhausted."""

    def convert(self, batch: list[Any], writer: SplatShardWriter, stats: ShardStats) -> None:
        """Write the splat samples of ``batch`` and count them in ``stats``."""


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


def stats_path(shard: Path) -> Path:
    """Where a finished shard's statistics are kept: ``<shard>.stats.json`` beside it (not a shard)."""
    return shard.with_name(shard.name + STATS_SUFFIX)


def finished_shard_stats(shard: Path) -> dict[str, Any] | None:
    """The statistics of a complete shard, or None when the shard or its statistics are missing."""
    sidecar = stats_path(shard)
    if not (shard_is_complete(str(shard)) and sidecar.is_file()):
        return None
    return json.loads(sidecar.read_text())


def convert_shard(source_shard: str, final: Path, converter: ShardConverter, batch_size: int) -> dict[str, Any]:
    """One input shard converted into the splat shard ``final``; its statistics record.

    The statistics file is written before the shard is published under its final name, so a
    complete shard always has one.
    """
    reader = converter.open_reader(source_shard)
    stats = ShardStats()
    with open_splat_shard(final) as writer:
        for batch in batched(reader, batch_size):
            converter.convert(batch, writer, stats)
        stats.skip_counts = reader.skip_counts.copy()
        write_json(stats_path(final), stats.shard_record())
    return stats.shard_record()


def convert_shards(source_shards: Sequence[str], out_dir: Path, converter: ShardConverter, batch_size: int, *,
                   description: str, progress: bool = True) -> ShardStats:
    """Every shard of ``source_shards`` (this rank's) converted into ``out_dir``, finished ones kept;
    the statistics of the whole split, summed over ranks."""
    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = ShardStats()
    for source_shard in progress_bar(source_shards, desc=description, disable=not progress):
        final = out_dir / splat_shard_name(source_shard)
        finished = finished_shard_stats(final)
        if finished is None:
            finished = convert_shard(source_shard, final, converter, batch_size)
            stats.shards_written += 1
        else:
            stats.shards_skipped += 1
        stats.merge(finished)
    stats.seconds = time.perf_counter() - start
    return stats.summed_over_ranks()


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


def level_metrics(stats: ShardStats, count: int, image_size: int, channels: int) -> dict:
    """One split's line of a fit or prune stage's metrics."""
    payload = payload_bytes(count, channels)
    source = source_bytes(image_size, image_size, channels)
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
