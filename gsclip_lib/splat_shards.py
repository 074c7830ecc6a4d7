"""Splats as webdataset shards: fit image shards once, derive the smaller levels by pruning (PAPER.md 1, 3).

A splat shard mirrors the image shard it was fitted from, one sample per image, same key:

- ``<key>.gs``: the image's splats as one :mod:`gsclip_lib.codec` record (fp16, 18-byte header);
- ``<key>.txt``: the caption, as in the image shard;
- ``<key>.json``: ``N`` (splats stored), ``C``, ``H``, ``W``, ``psnr`` (dB of the fit, before fp16;
  null when no image was at hand to measure it), ``bytes`` (the whole record), ``payload_bytes``
  (the paper's ``N * (5 + C) * 2``), ``source_key``, ``source_shard``, ``label``, ``image_size`` and
  ``resize_mode`` (the preprocessing the fit saw); pruned levels add ``pruned_from`` (the count they
  were derived from) and ``finetune_iterations``.

As in the paper, splats are fitted once, at the largest count (:func:`fit_shards_to_splats`), and
every smaller level keeps the ``target_count`` brightest splats of each image by luminance
(:func:`prune_splat_shards`), optionally fine-tuned against the images.

Output shard ``name.tar`` corresponds to input shard ``name.tar`` (or ``.tar.gz``), one for one. It
is written under a hidden temporary name in the output folder (``.name.tar.<random>.partial``),
flushed to disk and renamed into place with ``os.replace``, so a shard exists under its final name
only when complete. A rerun skips every output shard that exists (``verify_existing=True`` also reads
it through and refits it if it does not decode), deletes the leftovers of killed writes of the
shards it writes, and so resumes a killed fit where it stopped. Input shards are split among ranks
(shard ``i`` goes to rank ``i % world_size``), so each rank of a ``torchrun`` job writes its own
shards; the returned statistics are the rank's own.

:func:`splat_dataset` reads splat shards through the same machinery as image shards
(:class:`gsclip_lib.shards.ShardDataset`: rank and worker split, shuffling, skip counts), and
:func:`collate_splats` pads a batch to a common splat count with an invalid mask.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import math
import os
import secrets
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import torch
import webdataset as wds
from torch import Tensor

from gsclip_lib.codec import (
    CodecError,
    decode_batch,
    decode_splats,
    encode_splats,
    payload_bytes,
)
from gsclip_lib.fit import FitSettings, fit_splats
from gsclip_lib.progress import progress_bar
from gsclip_lib.prune import prune_by_luminance
from gsclip_lib.shards import (
    CAPTION_EXTENSION,
    METADATA_EXTENSION,
    ImageTextSample,
    ImageTextShards,
    RawSample,
    ShardDataset,
    SkipCounts,
    SkipSample,
    decode_caption,
    decode_metadata,
    expand_shard_spec,
    iter_tar_samples,
    resolve_rank,
    shards_for_rank,
)
from gsclip_lib.splats import Splats

logger = logging.getLogger(__name__)

SPLAT_EXTENSION = "gs"
PARTIAL_SUFFIX = ".partial"
_REPRODUCIBLE_MTIME = 0.0

ShardSpec = str | os.PathLike | Sequence[str | os.PathLike]


# ----------------------------------------------------------------------------------------------
# Reading


@dataclass
class SplatSample:
    key: str
    splats: Splats  # batch of 1, float32 on the CPU, all N slots valid
    record: bytes  # the stored codec record (its length is the stored size)
    height: int
    width: int
    caption: str
    label: int | None
    metadata: dict[str, Any]  # the sample's .json
    url: str
    skips: SkipCounts = field(default_factory=SkipCounts)

    @property
    def num_splats(self) -> int:
        return self.splats.num_slots


@dataclass
class SplatBatch:
    splats: Splats  # [B, N_max, ...], padding slots invalid
    height: int
    width: int
    captions: list[str]
    labels: Tensor  # [B] int64, -1 where a sample has no label
    keys: list[str]
    record_bytes: Tensor  # [B] int64, stored bytes per image
    skips: SkipCounts  # summed over the batch (see gsclip_lib.shards)


def decode_splat_sample(raw: RawSample) -> SplatSample:
    """One stored splat sample; raises :class:`SkipSample` when it is unusable."""
    record = raw.members.get(SPLAT_EXTENSION)
    if record is None:
        raise SkipSample("no_image", f"no .{SPLAT_EXTENSION} member; members {sorted(raw.members)}")
    if len(record) == 0:
        raise SkipSample("empty_image", f"0-byte .{SPLAT_EXTENSION} member")
    caption = decode_caption(raw.members)
    metadata, label = decode_metadata(raw.members)
    try:
        decoded = decode_splats(record)
    except CodecError as error:
        raise SkipSample("bad_splats", str(error)) from None
    return SplatSample(
        key=raw.key,
        splats=decoded.splats,
        record=record,
        height=decoded.height,
        width=decoded.width,
        caption=caption,
        label=label,
        metadata=metadata,
        url=raw.url,
    )


class SplatShards(ShardDataset):
    """Splat samples of any shard spec, split by rank and worker like :class:`ImageTextShards`."""

    def decode_sample(self, raw: RawSample) -> SplatSample:
        return decode_splat_sample(raw)


def splat_dataset(
    spec: ShardSpec,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    shuffle_shards: bool = False,
    shuffle_buffer: int = 0,
    seed: int = 0,
    split_by_worker: bool = True,
) -> SplatShards:
    """An iterable dataset of :class:`SplatSample`; use ``collate_fn=collate_splats`` to batch it."""
    return SplatShards(
        spec,
        rank=rank,
        world_size=world_size,
        shuffle_shards=shuffle_shards,
        shuffle_buffer=shuffle_buffer,
        seed=seed,
        split_by_worker=split_by_worker,
    )


def collate_splats(samples: Sequence[SplatSample], num_slots: int | None = None) -> SplatBatch:
    """Pad a batch to ``num_slots`` splats (default: the batch's largest count), invalid padding.

    All samples must share height, width and channels (:func:`gsclip_lib.codec.decode_batch`).
    Bind ``num_slots`` with ``functools.partial`` for a fixed encoder input size.
    """
    if not samples:
        raise ValueError("cannot collate an empty batch")
    splats, height, width = decode_batch([sample.record for sample in samples], num_slots=num_slots)
    return SplatBatch(
        splats=splats,
        height=height,
        width=width,
        captions=[sample.caption for sample in samples],
        labels=torch.tensor([-1 if s.label is None else s.label for s in samples], dtype=torch.int64),
        keys=[sample.key for sample in samples],
        record_bytes=torch.tensor([len(sample.record) for sample in samples], dtype=torch.int64),
        skips=SkipCounts.total(sample.skips for sample in samples),
    )


def verify_splat_shard(path: str | os.PathLike) -> int:
    """The number of samples of a complete, readable splat shard; raises ValueError otherwise."""
    counts = SkipCounts()
    good = 0
    for raw in iter_tar_samples(os.fspath(path), counts):
        try:
            sample = decode_splat_sample(raw)
        except SkipSample as skip:
            raise ValueError(f"{path}: sample {raw.key!r} is unusable: {skip}") from None
        if sample.metadata.get("N") != sample.num_splats:
            raise ValueError(
                f"{path}: sample {raw.key!r} stores {sample.num_splats} splats, its .json says "
                f"{sample.metadata.get('N')!r}"
            )
        good += 1
    if counts.corrupt_shards or counts.unreadable_shards:
        raise ValueError(f"{path}: the shard is unreadable or its tar stream is broken ({counts.as_dict()})")
    return good


# ----------------------------------------------------------------------------------------------
# Writing


@dataclass
class SplatShardStats:
    """What one call (one rank) did; ``as_dict`` is ready for a metrics JSON."""

    shards_written: int = 0
    shards_skipped: int = 0  # already complete under their final name
    images: int = 0  # samples written
    dropped_fits: int = 0  # fits dropped as non-finite (or that could not be stored)
    no_source_image: int = 0  # pruning with fine-tune: no image with the sample's key
    skip_counts: SkipCounts = field(default_factory=SkipCounts)  # samples skipped while reading
    seconds: float = 0.0  # wall time of the whole call
    fit_seconds: float = 0.0  # time spent in the optimizer
    record_bytes: int = 0  # stored bytes of all records written
    psnr_sum: float = 0.0
    psnr_count: int = 0

    @property
    def mean_psnr(self) -> float:
        return self.psnr_sum / self.psnr_count if self.psnr_count else math.nan

    @property
    def skipped(self) -> int:
        """Images not written: bad input samples, dropped fits, missing source images."""
        return self.skip_counts.skipped + self.dropped_fits + self.no_source_image

    def add_psnr(self, value: float) -> None:
        if math.isfinite(value):
            self.psnr_sum += value
            self.psnr_count += 1

    def as_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["skip_counts"] = self.skip_counts.as_dict()
        values["mean_psnr"] = self.mean_psnr
        values["skipped"] = self.skipped
        return values


def splat_shard_name(source: str) -> str:
    """The output shard name for an input shard: its file name, as a plain ``.tar``."""
    name = os.path.basename(source.rstrip("/"))
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name + ".tar"


def _owned_shards(spec: ShardSpec, rank: int | None, world_size: int | None) -> list[str]:
    """This rank's input shards; refuses inputs whose output names would collide."""
    shards = expand_shard_spec(spec)
    names: dict[str, str] = {}
    for shard in shards:
        other = names.setdefault(splat_shard_name(shard), shard)
        if other != shard:
            raise ValueError(f"input shards {other} and {shard} would both write {splat_shard_name(shard)}")
    return shards_for_rank(shards, *resolve_rank(rank, world_size))


def _existing_shard_is_complete(final: str, verify: bool) -> bool:
    if not os.path.exists(final):
        return False
    if not verify:
        return True
    try:
        verify_splat_shard(final)
    except ValueError as error:
        logger.warning("rewriting %s: %s", final, error)
        return False
    return True


@contextmanager
def _atomic_shard(final: str) -> Iterator[wds.TarWriter]:
    """A TarWriter on a temporary name; renamed to ``final`` when the block completes."""
    folder, name = os.path.split(final)
    # Leftovers of a killed write of this very shard: only the rank that owns it writes it.
    for stale in glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(name)}.*{PARTIAL_SUFFIX}")):
        os.remove(stale)
    temporary = os.path.join(folder, f".{name}.{secrets.token_hex(6)}{PARTIAL_SUFFIX}")
    # os.open rather than mkstemp: mkstemp's mode 0600 would stay on the published shard.
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(handle, "wb") as stream:
            writer = wds.TarWriter(stream, encoder=False, mtime=_REPRODUCIBLE_MTIME)
            yield writer
            writer.close()
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, final)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def _write_sample(
    writer: wds.TarWriter, key: str, record: bytes, caption: str, metadata: dict[str, Any]
) -> None:
    writer.write(
        {
            "__key__": key,
            SPLAT_EXTENSION: record,
            CAPTION_EXTENSION: caption.encode("utf-8"),
            METADATA_EXTENSION: json.dumps(metadata, allow_nan=False).encode("utf-8"),
        }
    )


def _batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _group_by(items: Sequence[Any], key) -> dict[Any, list[int]]:
    """Positions of ``items`` grouped by ``key(item)`` (fits batch only same-sized images)."""
    groups: dict[Any, list[int]] = {}
    for position, item in enumerate(items):
        groups.setdefault(key(item), []).append(position)
    return groups


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _check_common(batch_size: int, out_dir: str | os.PathLike) -> str:
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    return out_dir


def fit_shards_to_splats(
    source: ShardSpec,
    out_dir: str | os.PathLike,
    num_splats: int,
    fit_settings: FitSettings = FitSettings(),
    batch_size: int = 64,
    *,
    image_size: int | None = None,
    resize_mode: str = "center_crop",
    channels: int = 3,
    rank: int | None = None,
    world_size: int | None = None,
    verify_existing: bool = False,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> SplatShardStats:
    """Fit every image of this rank's input shards with ``num_splats`` splats; one output shard each.

    Images are read with :class:`gsclip_lib.shards.ImageTextShards` (``image_size``,
    ``resize_mode``, ``channels``; bad samples skipped and counted) and fitted ``batch_size`` at a
    time on ``device`` with :func:`gsclip_lib.fit.fit_splats` (a batch mixing image sizes is fitted
    per size). An image whose fit was dropped as non-finite, or that has fewer pixels than
    ``num_splats``, is not written and is counted in ``dropped_fits``. See the module docstring for
    atomicity and resuming.
    """
    start = time.perf_counter()
    out_dir = _check_common(batch_size, out_dir)
    shards = _owned_shards(source, rank, world_size)
    stats = SplatShardStats()
    for source_shard in progress_bar(shards, desc=f"fit {num_splats}", disable=not progress):
        final = os.path.join(out_dir, splat_shard_name(source_shard))
        if _existing_shard_is_complete(final, verify_existing):
            stats.shards_skipped += 1
            continue
        reader = ImageTextShards(
            [source_shard],
            image_size=image_size,
            resize_mode=resize_mode,
            channels=channels,
            rank=0,
            world_size=1,
            split_by_worker=False,
        )
        with _atomic_shard(final) as writer:
            for batch in _batched(reader, batch_size):
                _fit_and_write(
                    batch, writer, num_splats, fit_settings, device, source_shard, image_size, resize_mode, stats
                )
        stats.skip_counts = stats.skip_counts + reader.skip_counts
        stats.shards_written += 1
    stats.seconds = time.perf_counter() - start
    return stats


def _fit_and_write(
    batch: list[ImageTextSample],
    writer: wds.TarWriter,
    num_splats: int,
    settings: FitSettings,
    device: torch.device | str,
    source_shard: str,
    image_size: int | None,
    resize_mode: str,
    stats: SplatShardStats,
) -> None:
    records: list[tuple[bytes, int, float] | None] = [None] * len(batch)
    for (channels, height, width), positions in _group_by(batch, lambda s: tuple(s.image.shape)).items():
        if num_splats > height * width:
            logger.warning(
                "skipping %d images of %dx%d: fewer pixels than %d splats", len(positions), height, width, num_splats
            )
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
            "psnr": _finite_or_none(quality),
            "bytes": len(record),
            "payload_bytes": payload_bytes(count, channels),
            "source_key": sample.key,
            "source_shard": os.path.basename(source_shard),
            "label": sample.label,
            "image_size": image_size,
            "resize_mode": resize_mode,
        }
        _write_sample(writer, sample.key, record, sample.caption, metadata)
        stats.images += 1
        stats.record_bytes += len(record)
        stats.add_psnr(quality)


class _ImageCursor:
    """Images of one image shard looked up by key, in the order the splats were written from it.

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


def prune_splat_shards(
    in_spec: ShardSpec,
    out_dir: str | os.PathLike,
    target_count: int,
    *,
    finetune_iterations: int = 0,
    fit_settings: FitSettings = FitSettings(),
    images_for_finetune: ShardSpec | None = None,
    batch_size: int = 64,
    rank: int | None = None,
    world_size: int | None = None,
    verify_existing: bool = False,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> SplatShardStats:
    """Derive a ``target_count`` level from fitted splat shards: keep each image's brightest splats.

    ``prune_by_luminance(..., target_count=...)`` on every record of ``in_spec`` (an image with
    fewer splats keeps them all). With ``images_for_finetune`` (the image shards the splats were
    fitted from, matched by shard name and key, preprocessed as the ``.json`` records), the pruned
    splats are fine-tuned for ``finetune_iterations`` (0: none) and their PSNR measured; without,
    ``finetune_iterations`` must be 0 and ``psnr`` is stored as null. Same output naming, atomicity
    and resume rules as :func:`fit_shards_to_splats`.
    """
    start = time.perf_counter()
    out_dir = _check_common(batch_size, out_dir)
    if isinstance(target_count, bool) or not isinstance(target_count, int) or target_count <= 0:
        raise ValueError(f"target_count must be a positive int, got {target_count!r}")
    if not isinstance(finetune_iterations, int) or finetune_iterations < 0:
        raise ValueError(f"finetune_iterations must be a non-negative int, got {finetune_iterations!r}")
    if finetune_iterations > 0 and images_for_finetune is None:
        raise ValueError("fine-tuning needs the images: pass images_for_finetune (the source image shards)")
    image_shards: dict[str, str] = {}
    if images_for_finetune is not None:
        for url in expand_shard_spec(images_for_finetune):
            image_shards.setdefault(os.path.basename(url), url)
    settings = dataclasses.replace(fit_settings, iterations=finetune_iterations)
    shards = _owned_shards(in_spec, rank, world_size)
    stats = SplatShardStats()
    for splat_shard in progress_bar(shards, desc=f"prune to {target_count}", disable=not progress):
        final = os.path.join(out_dir, splat_shard_name(splat_shard))
        if _existing_shard_is_complete(final, verify_existing):
            stats.shards_skipped += 1
            continue
        reader = SplatShards([splat_shard], rank=0, world_size=1, split_by_worker=False)
        cursor: _ImageCursor | None = None
        with _atomic_shard(final) as writer:
            for batch in _batched(reader, batch_size):
                if images_for_finetune is not None and cursor is None:
                    cursor = _open_source_images(batch[0], image_shards)
                _prune_and_write(batch, writer, target_count, settings, cursor, device, stats)
        stats.skip_counts = stats.skip_counts + reader.skip_counts
        stats.shards_written += 1
    stats.seconds = time.perf_counter() - start
    return stats


def _open_source_images(first: SplatSample, image_shards: dict[str, str]) -> _ImageCursor:
    source = first.metadata.get("source_shard")
    url = image_shards.get(source)
    if url is None:
        logger.warning("no image shard named %r among images_for_finetune; its samples are skipped", source)
        return _ImageCursor(None)
    reader = ImageTextShards(
        [url],
        image_size=first.metadata.get("image_size"),
        resize_mode=first.metadata.get("resize_mode", "center_crop"),
        channels=first.splats.channels,
        rank=0,
        world_size=1,
        split_by_worker=False,
    )
    return _ImageCursor(reader)


def _prune_and_write(
    batch: list[SplatSample],
    writer: wds.TarWriter,
    target_count: int,
    settings: FitSettings,
    cursor: _ImageCursor | None,
    device: torch.device | str,
    stats: SplatShardStats,
) -> None:
    outputs: list[tuple[bytes, int, float] | None] = [None] * len(batch)
    images: list[Tensor | None] = [cursor.take(s.key) if cursor is not None else None for s in batch]
    shape_of = lambda sample: (sample.splats.channels, sample.height, sample.width)  # noqa: E731
    for (channels, height, width), positions in _group_by(batch, shape_of).items():
        splats, _, _ = decode_batch([batch[p].record for p in positions])
        pruned = prune_by_luminance(splats, target_count=target_count)
        if cursor is None:
            for index, position in enumerate(positions):
                count = int(pruned.valid[index].sum())
                outputs[position] = (encode_splats(pruned, index, height, width), count, math.nan)
            continue
        found = [i for i, p in enumerate(positions) if images[p] is not None]
        stats.no_source_image += len(positions) - len(found)
        if not found:
            continue
        stack = torch.stack([images[positions[i]] for i in found]).to(device)
        if tuple(stack.shape[1:]) != (channels, height, width):
            raise ValueError(
                f"source images are {tuple(stack.shape[1:])}, the splats describe "
                f"{(channels, height, width)}: "
                "images_for_finetune must be the shards the splats were fitted from"
            )
        initial = pruned.index(found).to(device)
        result = fit_splats(
            stack, pruned.num_slots, settings, initial=initial, progress=False, description="fine-tune"
        )
        stats.fit_seconds += result.seconds
        tuned = result.splats.to("cpu")
        dropped = set(result.dropped)
        for index, i in enumerate(found):
            if index in dropped:
                stats.dropped_fits += 1
                continue
            try:
                count = int(tuned.valid[index].sum())
                record = encode_splats(tuned, index, height, width)
            except CodecError as error:
                logger.warning("dropping %s: its splats cannot be stored (%s)", batch[positions[i]].key, error)
                stats.dropped_fits += 1
                continue
            outputs[positions[i]] = (record, count, float(result.psnr[index]))
    for sample, stored in zip(batch, outputs):
        if stored is None:
            continue
        record, count, quality = stored
        metadata = dict(sample.metadata)
        metadata.update(
            N=count,
            psnr=_finite_or_none(quality),
            bytes=len(record),
            payload_bytes=payload_bytes(count, sample.splats.channels),
            pruned_from=sample.num_splats,
            finetune_iterations=settings.iterations if cursor is not None else 0,
        )
        _write_sample(writer, sample.key, record, sample.caption, metadata)
        stats.images += 1
        stats.record_bytes += len(record)
        stats.add_psnr(quality)
