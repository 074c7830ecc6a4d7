"""Splat shards: the webdataset format splats are stored in (METHOD.md sections 1 and 3).

A splat shard mirrors the image shard it was fitted from, one sample per image, same key:

- ``<key>.gs``: the image's splats as one :mod:`gsclip_lib.splats.codec` record (fp16, header);
- ``<key>.txt``: the caption, as in the image shard;
- ``<key>.<image extension>``: the source image's bytes as stored in the image shard (``png``,
  ``jpg``, ...), so that training pairs a splat sample with its image and caption without any
  global index (:func:`decode_paired_sample`);
- ``<key>.json``: ``N`` (splats stored), ``C``, ``H``, ``W``, ``psnr`` (dB of the fit, before fp16;
  null when no image was at hand to measure it), ``bytes`` (the whole record), ``payload_bytes``
  (the paper's ``N * (5 + C) * 2``), ``source_key``, ``source_shard``, ``label``, ``image_size`` and
  ``resize_mode`` (the preprocessing the fit saw); pruned levels add ``pruned_from`` (the count they
  were derived from) and the steps of their refit.

Output shard ``name.tar`` corresponds to input shard ``name.tar`` (or ``.tar.gz``), one for one
(:func:`splat_shard_name`), and is written whole or not at all (:func:`open_splat_shard`), so a
shard exists under its final name only when complete. This module reads and writes; the fit and
prune stages (:mod:`gsclip_lib.stages.fit`, :mod:`gsclip_lib.stages.prune`) decide what goes in.

:func:`splat_dataset` reads splat shards through the same machinery as image shards
(:class:`gsclip_lib.data.tar_shards.ShardDataset`: rank and worker split, skip counts), and
:func:`collate_splats` pads a batch to a common splat count with an invalid mask.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import webdataset as wds
from torch import Tensor

from gsclip_lib.atomic_files import atomic_output
from gsclip_lib.distributed import resolve_rank
from gsclip_lib.data.image_decoding import IMAGE_EXTENSIONS
from gsclip_lib.data.image_text_shards import (
    CAPTION_EXTENSION,
    EncodedImage,
    METADATA_EXTENSION,
    ImageTextSample,
    ImageTextShards,
    decode_caption,
    decode_image,
    decode_metadata,
)
from gsclip_lib.data.skip_counts import SkipCounts, SkipSample
from gsclip_lib.data.tar_shards import (
    RawSample,
    ShardDataset,
    ShardSpec,
    expand_shard_spec,
    iter_tar_samples,
    shards_for_rank,
)
from gsclip_lib.errors import InputError
from gsclip_lib.splats.codec import CodecError, decode_batch, decode_splats
from gsclip_lib.splats.container import Splats

logger = logging.getLogger(__name__)

SPLAT_EXTENSION = "gs"
_REPRODUCIBLE_MTIME = 0  # an int: a float time costs an extra PAX header per member (image_text_shards)

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
    image: EncodedImage | None = None  # the source image's stored bytes, when the shard carries them

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
    skips: SkipCounts  # summed over the batch (see gsclip_lib.data.tar_shards)


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
    image_extension = next((ext for ext in IMAGE_EXTENSIONS if raw.members.get(ext)), None)
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
        image=EncodedImage(raw.members[image_extension], image_extension) if image_extension else None,
    )


class SplatShards(ShardDataset):
    """Splat samples of any shard spec, split by rank and worker like :class:`ImageTextShards`."""

    def decode_sample(self, raw: RawSample) -> SplatSample:
        return decode_splat_sample(raw)


def splat_dataset(spec: ShardSpec, **selection: Any) -> SplatShards:
    """An iterable dataset of :class:`SplatSample`; use ``collate_fn=collate_splats`` to batch it.

    ``selection`` is the keywords of :class:`gsclip_lib.data.tar_shards.ShardSelection`."""
    return SplatShards(spec, **selection)


def collate_splats(samples: Sequence[SplatSample], num_slots: int | None = None) -> SplatBatch:
    """Pad a batch to ``num_slots`` splats (default: the batch's largest count), invalid padding.

    All samples must share height, width and channels (:func:`gsclip_lib.splats.codec.decode_batch`).
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


@dataclass
class PairedSample:
    """A splat sample with its source image decoded: what the alignment trains on."""

    key: str
    record: bytes  # the stored codec record
    image: Tensor | None  # [C, H, W] float32 in [0, 1]; None when the decoder was asked not to decode it
    caption: str
    label: int | None
    skips: SkipCounts = field(default_factory=SkipCounts)


@dataclass(frozen=True)
class PairedDecoder:
    """Decodes one sample of a splat shard into a :class:`PairedSample`: its splat record, and the
    image it was fitted from (carried in the same sample), read as ``data.image_size`` and
    ``data.channels`` say; with ``with_image=False`` (the contrastive stage, which never looks at
    pixels) the image is not decoded. Picklable, for DataLoader workers."""

    image_size: int
    channels: int
    resize_mode: str
    with_image: bool = True

    def __call__(self, raw: RawSample) -> PairedSample:
        sample = decode_splat_sample(raw)
        if not self.with_image:
            return PairedSample(key=sample.key, record=sample.record, image=None, caption=sample.caption,
                                label=sample.label)
        if sample.image is None:
            raise SkipSample("no_image", f"splat sample {raw.key!r} carries no source image (fitted before "
                                         "splat shards carried their images: rerun fit and prune)")
        image = decode_image(sample.image.data, self.channels, self.image_size, self.resize_mode)
        expected = (sample.splats.channels, sample.height, sample.width)
        if tuple(image.shape) != expected:
            raise InputError(
                f"the image of {raw.key!r} reads as {tuple(image.shape)}, its splats describe {expected}: "
                "data.image_size, data.channels and data.resize_mode must be those the splats were fitted with"
            )
        return PairedSample(key=sample.key, record=sample.record, image=image, caption=sample.caption,
                            label=sample.label)


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


def splat_shard_name(source: str) -> str:
    """The output shard name for an input shard: its file name, as a plain ``.tar``."""
    name = os.path.basename(source.rstrip("/"))
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name + ".tar"


def shards_of_this_rank(spec: ShardSpec, rank: int | None = None, world_size: int | None = None) -> list[str]:
    """This rank's input shards (shard ``i`` goes to rank ``i % world_size``); refuses inputs whose
    output names would collide."""
    shards = expand_shard_spec(spec)
    names: dict[str, str] = {}
    for shard in shards:
        other = names.setdefault(splat_shard_name(shard), shard)
        if other != shard:
            raise InputError(f"input shards {other} and {shard} would both write {splat_shard_name(shard)}")
    return shards_for_rank(shards, *resolve_rank(rank, world_size))


def shard_is_complete(final: str, verify: bool = False) -> bool:
    """Whether ``final`` exists (and, with ``verify``, reads through without a fault)."""
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


class SplatShardWriter:
    """Writes splat samples into one open shard (see :func:`open_splat_shard`)."""

    def __init__(self, tar: wds.TarWriter) -> None:
        self._tar = tar
        self.samples = 0
        self.record_bytes = 0

    def write(self, key: str, record: bytes, caption: str, metadata: dict[str, Any],
              image: EncodedImage | None = None) -> None:
        sample = {
            "__key__": key,
            SPLAT_EXTENSION: record,
            CAPTION_EXTENSION: caption.encode("utf-8"),
            METADATA_EXTENSION: json.dumps(metadata, allow_nan=False).encode("utf-8"),
        }
        if image is not None:
            sample[image.extension] = image.data
        self._tar.write(sample)
        self.samples += 1
        self.record_bytes += len(record)


@contextmanager
def open_splat_shard(final: str | os.PathLike) -> Iterator[SplatShardWriter]:
    """A writer whose shard appears at ``final`` only when the ``with`` block completes.

    Leftovers of a killed write of this very shard are removed first: only the rank that owns a
    shard writes it.
    """
    with atomic_output(final, clear_leftovers=True) as stream:
        tar = wds.TarWriter(stream, encoder=False, mtime=_REPRODUCIBLE_MTIME)
        try:
            yield SplatShardWriter(tar)
        finally:
            tar.close()  # also on failure, before the temporary file goes: nothing flushes into it later


# ----------------------------------------------------------------------------------------------
# Examples for figures


@dataclass
class LevelExamples:
    """The same few images at several levels, matched by key."""

    keys: list[str]
    images: Tensor  # [k, C, S, S] the source images
    splats: dict[int, Splats]  # splat count -> the k images' splats, [k, N_max]
    captions: list[str]


def read_level_examples(
    level_dirs: dict[int, str | os.PathLike],  # splat count -> that level's shards of one split
    image_shards: ShardSpec,  # the split's image shards
    *,
    image_size: int,
    channels: int,
    resize_mode: str,
    count: int = 6,
) -> LevelExamples:
    """The first ``count`` images of a split with their splats at every level of ``level_dirs``."""
    by_level: dict[int, dict[str, SplatSample]] = {}
    keys: list[str] = []
    for level, folder in level_dirs.items():
        samples = list(itertools.islice(splat_dataset(folder, rank=0, world_size=1), count))
        if not keys:
            keys = [sample.key for sample in samples]
        by_level[level] = {sample.key: sample for sample in samples}
    reader = ImageTextShards(image_shards, image_size=image_size, resize_mode=resize_mode, channels=channels,
                             rank=0, world_size=1)
    found: dict[str, ImageTextSample] = {}
    for sample in reader:
        if sample.key in keys:
            found[sample.key] = sample
        if len(found) == len(keys):
            break
    keys = [key for key in keys if key in found and all(key in samples for samples in by_level.values())]
    if not keys:
        raise InputError(f"no example of {sorted(level_dirs)} found its image in {image_shards!r}")
    splats = {
        level: collate_splats([samples[key] for key in keys]).splats for level, samples in by_level.items()
    }
    return LevelExamples(
        keys=keys,
        images=torch.stack([found[key].image for key in keys]),
        splats=splats,
        captions=[found[key].caption for key in keys],
    )
