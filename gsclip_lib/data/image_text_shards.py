"""Image-text pairs as webdataset tar shards, in DataComp's layout (METHOD.md section 3, "Data").

DataComp ships its 12.8 M pairs as tar shards in which one sample is a group of consecutive members
sharing a key: ``<key>.jpg`` (or ``.png``, ``.webp``), ``<key>.txt`` (the caption) and ``<key>.json``
(``uid``, ``url``, ``original_width``, ...). This module writes shards of that layout
(:func:`write_image_text_shards`) and reads any such shards, ours or DataComp's as they are
(:class:`ImageTextShards`), as ``[C, S, S]`` float images in ``[0, 1]`` with their caption, label and
key. :mod:`gsclip_lib.data.splat_shards` reads splat shards through the same machinery (:class:`ShardDataset`).

Reading never stops on bad data. A sample is skipped and counted in :class:`SkipCounts` under one
reason: a 0-byte image; bytes no PIL format recognizes (``undecodable_image``); an image a format
recognizes but cannot decode (``truncated_image``: data cut short or corrupt); no image member at
all; no caption or an empty one; a caption that is not UTF-8; a ``.json`` that is not a JSON
object; a sample whose member a broken tar stream cut off (``cut_samples``). A shard whose tar
stream breaks (truncated file, garbage header, missing end-of-archive marker) counts once in
``corrupt_shards``: the samples completed before the break are kept, the sample the break cut is
counted in ``cut_samples``, the rest of the shard is skipped (:func:`iter_tar_samples`). A local
path that does not exist is an error when the spec is read (:func:`expand_shard_spec`); a shard
that exists, or a URL, that cannot be opened counts in ``unreadable_shards``. Grayscale, palette, transparent, 16-bit and CMYK images are
converted by :func:`gsclip_lib.data.image_decoding.to_rgb_or_gray` (transparency composited on white),
not dropped.

Splitting: the shard list is (optionally) shuffled with the same seed on every rank, then rank ``r``
of ``world_size`` takes shards ``r, r + world_size, ...`` and each DataLoader worker takes every
``num_workers``-th of those (``webdataset.split_by_worker``). Ranks therefore see disjoint samples
whose union is the whole set, as ``torchrun`` needs; a rank or worker left without a shard yields
nothing, so use at least ``world_size * num_workers`` shards.

How the counts travel. With ``DataLoader(num_workers=0)`` (the default CPU path) the dataset's
``skip_counts`` attribute is exact: it is reset when an iteration starts and updated live.
DataLoader workers are separate processes whose attributes the main process never sees, so each
sample also carries ``skips``: the counts its worker accumulated since the sample before it
(``good = 1`` for itself, plus the bad samples and shards met in between). A worker holds one
sample back, so the last sample it yields also carries its trailing skips. :func:`collate_image_text`
sums the ``skips`` of a batch, and summing the batches of a whole pass gives exactly the totals,
for any number of workers, as long as the pass runs to its end and every worker yields at least one
good sample (a worker whose shards hold no good sample at all has nothing to carry its counts).
"""

from __future__ import annotations

import dataclasses
import glob
import io
import json
import logging
import os
import random
import tarfile
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import webdataset as wds
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import IterableDataset
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext

from gsclip_lib.atomic_files import atomic_output
from gsclip_lib.distributed import resolve_rank
from gsclip_lib.errors import InputError
from gsclip_lib.data.image_decoding import IMAGE_EXTENSIONS, image_to_tensor, resize_and_center_crop, to_rgb_or_gray

logger = logging.getLogger(__name__)

CAPTION_EXTENSION = "txt"
METADATA_EXTENSION = "json"
LABEL_EXTENSION = "cls"  # webdataset's convention for a bare class index, used when .json has none
RESIZE_MODES = ("resize", "center_crop")
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# PIL's errors for bytes it cannot read: truncated data (OSError), broken headers (SyntaxError,
# ValueError, EOFError), images over its pixel limit.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
# Tar member times: fixed, so the same samples give the same bytes; an int, because Python's tarfile
# writes a float time as an extra PAX header before every member, which halves the reading speed.
_REPRODUCIBLE_MTIME = 0

# A shard spec: a glob, a brace pattern, a folder, one path or URL, or a list of any of these.
ShardSpec = str | os.PathLike | Sequence[str | os.PathLike]


# ----------------------------------------------------------------------------------------------
# Skip counts


@dataclass
class SkipCounts:
    """Samples read (``good``) and skipped, by reason; shard-level failures in the last two fields."""

    good: int = 0
    empty_image: int = 0  # the image member is 0 bytes
    undecodable_image: int = 0  # PIL cannot identify the bytes as an image
    truncated_image: int = 0  # a format recognizes it, but it does not decode (truncated, corrupt)
    no_image: int = 0  # no image (or splat record) member at all
    bad_splats: int = 0  # a splat record that the codec refuses (splat shards only)
    missing_caption: int = 0  # no .txt member, or only whitespace in it
    bad_text: int = 0  # the caption is not UTF-8
    bad_metadata: int = 0  # .json is not a JSON object (or .cls not an integer)
    cut_samples: int = 0  # a member of the sample was cut off by a broken tar stream
    corrupt_shards: int = 0  # shards whose tar stream broke; the rest of such a shard is skipped
    unreadable_shards: int = 0  # shards that could not be opened at all

    SHARD_FIELDS = ("corrupt_shards", "unreadable_shards")

    @property
    def skipped(self) -> int:
        """Samples skipped, all reasons (shard-level counts are not samples and are left out)."""
        counts = self.as_dict()
        return sum(value for name, value in counts.items() if name != "good" and name not in self.SHARD_FIELDS)

    def count(self, reason: str) -> None:
        setattr(self, reason, getattr(self, reason) + 1)

    def copy(self) -> "SkipCounts":
        return dataclasses.replace(self)

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    # Plain attribute arithmetic: these run once per sample read, where dataclasses.asdict's deep copy shows.
    def __add__(self, other: "SkipCounts") -> "SkipCounts":
        return SkipCounts(*(getattr(self, name) + getattr(other, name) for name in _COUNT_FIELDS))

    def __sub__(self, other: "SkipCounts") -> "SkipCounts":
        return SkipCounts(*(getattr(self, name) - getattr(other, name) for name in _COUNT_FIELDS))

    @classmethod
    def total(cls, counts: Iterable["SkipCounts"]) -> "SkipCounts":
        result = cls()
        for item in counts:
            result = result + item
        return result


_COUNT_FIELDS = tuple(f.name for f in dataclasses.fields(SkipCounts))
REASONS = tuple(name for name in _COUNT_FIELDS if name != "good")


class SkipSample(Exception):
    """Raised by a sample decoder: the sample is skipped and counted under ``reason``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; choose one of {REASONS}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# ----------------------------------------------------------------------------------------------
# Shard lists and splitting


def expand_shard_spec(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """The shard paths or URLs a spec names, in order.

    ``spec`` is a brace pattern (``data/train-{000000..000009}.tar``; several joined by ``::``), a
    local glob (``data/train-*.tar``), one path, a folder (its ``*.tar``, ``*.tar.gz``, ``*.tgz`` files, sorted, hidden ones left out) or a
    list of any of these. Anything webdataset can open works (``pipe:...``, ``https://...``).
    """
    if isinstance(spec, (str, os.PathLike)):
        text = os.fspath(spec)
        if not text.strip():
            raise InputError("the shard spec is empty")
        if os.path.isdir(text):
            shards = list_shards(text)
            if not shards:
                raise InputError(f"the shard folder {text!r} holds no .tar, .tar.gz or .tgz file")
            return shards
        local = "://" not in text and not text.startswith("pipe:")
        if local and any(ch in text for ch in "*?["):
            matches = sorted(glob.glob(text))
            if not matches:
                raise InputError(f"no shard matches {text!r}")
            return matches
        urls = list(expand_urls(text))
        missing = [url for url in urls if local and not os.path.isfile(url)]
        if missing:
            raise InputError(
                f"the shard spec {text!r} names {len(missing)} file(s) that do not exist (first: {missing[0]}); "
                "give a folder, a glob, a brace pattern of existing files, or a URL"
            )
        return urls
    if isinstance(spec, Sequence):
        shards: list[str] = []
        for item in spec:
            shards.extend(expand_shard_spec(item))
        return shards
    raise InputError(f"cannot read a shard spec of type {type(spec).__name__}: {spec!r}")


def list_shards(folder: str | os.PathLike) -> list[str]:
    """The complete shards in ``folder``, sorted; hidden files (unfinished writes) are left out."""
    names = sorted(
        name for name in os.listdir(folder) if not name.startswith(".") and name.endswith(SHARD_SUFFIXES)
    )
    return [os.path.join(os.fspath(folder), name) for name in names]


def shards_for_rank(shards: Sequence[str], rank: int, world_size: int) -> list[str]:
    """Rank ``rank``'s share: every ``world_size``-th shard from position ``rank``."""
    return list(shards[rank::world_size])


# ----------------------------------------------------------------------------------------------
# Tar streams into raw samples


@dataclass
class RawSample:
    """One sample as stored: its key, its members' bytes by lower-case extension, its shard."""

    key: str
    members: dict[str, bytes]
    url: str


class _WatchedTarInfo(tarfile.TarInfo):
    """Records how a stream ended: tarfile reads a truncated or garbled header as a quiet end.

    For a header cut short by the end of the stream it also keeps the member's name when the name
    field (the header's first 100 bytes) arrived whole: that tells whether the cut member belonged
    to the sample being read or began a new one. The body is ``TarInfo.fromtarfile`` with the header
    block kept in hand.
    """

    @classmethod
    def fromtarfile(cls, tarfile_):
        block = tarfile_.fileobj.read(tarfile.BLOCKSIZE)
        try:
            info = cls.frombuf(block, tarfile_.encoding, tarfile_.errors)
        except tarfile.EOFHeaderError:  # a zero block: the proper end-of-archive marker
            tarfile_.gsclip_end = None
            raise
        except tarfile.HeaderError as error:  # empty, truncated or invalid header
            tarfile_.gsclip_end = error
            truncated = isinstance(error, tarfile.TruncatedHeaderError) and len(block) >= _NAME_FIELD
            tarfile_.gsclip_cut_name = block[:_NAME_FIELD].split(b"\0", 1)[0].decode("utf-8", "replace") if truncated else None
            raise
        info.offset = tarfile_.fileobj.tell() - tarfile.BLOCKSIZE
        return info._proc_member(tarfile_)


_NAME_FIELD = 100  # bytes of a tar header's name field


def iter_tar_samples(url: str, counts: SkipCounts) -> Iterator[RawSample]:
    """The samples of one shard; a broken stream ends the shard and is counted, never raised.

    Members are grouped into samples by key, as webdataset does (``base_plus_ext``: the key is the
    name up to the first dot of its file name). When the stream breaks, the sample it breaks is
    counted in ``cut_samples`` and dropped, never passed on with members missing: the sample whose
    member was being read, or, when a header was cut, the sample that header's name belongs to.
    Where nothing tells (a header cut inside its name, a garbled header), the sample being collected
    is taken as cut, since more of its members may have followed. Samples that ended before the
    break are yielded as usual. Checking for the end-of-archive marker catches truncation at a
    header, which Python's tarfile otherwise takes for the end of the archive.
    """
    try:
        stream = gopen(url, "rb")
    except Exception as error:  # noqa: BLE001 - any failure to open is a bad shard, not a crash
        counts.count("unreadable_shards")
        logger.warning("skipping shard %s: cannot open it (%s)", url, error)
        return
    pending: RawSample | None = None
    reading: str | None = None  # key of the member whose data is being read
    archive = None
    try:
        archive = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_WatchedTarInfo)
        for info in archive:
            if not info.isreg():
                continue
            name = info.name
            key, extension = base_plus_ext(name)
            if key is None or os.path.basename(name).startswith("__"):  # webdataset's metadata members
                continue
            extension = extension.lower()
            reading = key
            data = archive.extractfile(info).read()
            reading = None
            if pending is not None and key != pending.key:
                yield pending
                pending = None
            if pending is None:
                pending = RawSample(key=key, members={}, url=url)
            # A repeated member name keeps the first copy, as a reader of the first sample would.
            pending.members.setdefault(extension, data)
        ended = getattr(archive, "gsclip_end", None)  # set only when the stream ended on a header
        if ended is not None:
            raise tarfile.ReadError(f"no end-of-archive marker: {ended}")
    except Exception as error:  # noqa: BLE001 - tarfile, gzip and zlib errors all mean a broken shard
        counts.count("corrupt_shards")
        where = pending.key if pending else "its start"
        logger.warning("shard %s is corrupt after %s: %s; skipping the rest of it", url, where, error)
        # Which sample the break fell in: the member being read, or the one whose header was cut
        # (when its name arrived whole); unknown otherwise.
        cut_name = getattr(archive, "gsclip_cut_name", None) if archive is not None else None
        cut_key = reading if reading is not None else (base_plus_ext(cut_name)[0] if cut_name else None)
        if pending is not None and cut_key is not None and cut_key != pending.key:
            counts.count("cut_samples")  # a new sample began and was cut; the pending one had ended
        elif pending is not None or cut_key is not None:
            # The break fell inside the pending sample, or nothing says whether more of its members
            # were to follow: it is cut, never passed on.
            counts.count("cut_samples")
            pending = None
    finally:
        stream.close()
    if pending is not None:
        yield pending


# ----------------------------------------------------------------------------------------------
# Shared member decoding


def decode_caption(members: dict[str, bytes]) -> str:
    data = members.get(CAPTION_EXTENSION)
    if data is None:
        raise SkipSample("missing_caption", "no .txt member")
    try:
        caption = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise SkipSample("bad_text", str(error)) from None
    if not caption.strip():
        raise SkipSample("missing_caption", "empty .txt member")
    return caption


def decode_metadata(members: dict[str, bytes]) -> tuple[dict[str, Any], int | None]:
    """The ``.json`` object (``{}`` when absent) and the integer label, from ``json["label"]`` or ``.cls``."""
    metadata: dict[str, Any] = {}
    if METADATA_EXTENSION in members:
        try:
            metadata = json.loads(members[METADATA_EXTENSION].decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as error:
            raise SkipSample("bad_metadata", str(error)) from None
        if not isinstance(metadata, dict):
            raise SkipSample("bad_metadata", f".json holds a {type(metadata).__name__}, not an object")
    label = _as_label(metadata.get("label"))
    if label is None and LABEL_EXTENSION in members:
        try:
            label = int(members[LABEL_EXTENSION].decode("ascii").strip())
        except (UnicodeDecodeError, ValueError) as error:
            raise SkipSample("bad_metadata", f".cls is not an integer: {error}") from None
    return metadata, label


def _as_label(value: Any) -> int | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def decode_image(
    data: bytes, channels: int, image_size: int | None, resize_mode: str
) -> Tensor:  # [C, S, S] float32 in [0, 1]
    """Decode, convert to RGB or gray, resize; raise :class:`SkipSample` for bytes that are no image."""
    if len(data) == 0:
        raise SkipSample("empty_image", "0-byte image member")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
        image = to_rgb_or_gray(image, channels)
    except UnidentifiedImageError as error:  # no format recognizes the bytes
        raise SkipSample("undecodable_image", str(error)) from None
    except (*_DECODE_ERRORS, Image.DecompressionBombWarning) as error:
        # A format recognized the bytes but could not read them: a header or pixel data cut short
        # (JPEG's "Truncated File Read", "image file is truncated") or corrupt; or a bomb.
        raise SkipSample("truncated_image", f"{type(error).__name__}: {error}") from None
    if image_size is not None:
        if resize_mode == "center_crop":
            image = resize_and_center_crop(image, image_size)
        elif image.size != (image_size, image_size):
            image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return image_to_tensor(image)


# ----------------------------------------------------------------------------------------------
# The reader


class ShardDataset(IterableDataset):
    """Samples of tar shards split by rank and DataLoader worker, with skips counted, not raised.

    Subclasses turn a :class:`RawSample` into their sample type in :meth:`decode_sample` (raising
    :class:`SkipSample` to skip it); the sample type needs a ``skips`` attribute (see the module
    docstring for what it carries). ``skip_counts`` holds the counts of the latest iteration run in
    this process.
    """

    def __init__(
        self,
        spec: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        rank: int | None = None,
        world_size: int | None = None,
        shuffle_shards: bool = False,
        shuffle_buffer: int = 0,
        seed: int = 0,
        split_by_worker: bool = True,
    ) -> None:
        super().__init__()
        self.shards = expand_shard_spec(spec)
        if not self.shards:
            raise InputError(f"the shard spec {spec!r} names no shard")
        self.rank, self.world_size = resolve_rank(rank, world_size)
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        self.shuffle_shards = shuffle_shards
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.split_by_worker = split_by_worker
        self.epoch = 0
        self.skip_counts = SkipCounts()

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle shards and samples differently each epoch (same order on every rank)."""
        self.epoch = epoch

    def rank_shards(self) -> list[str]:
        """This rank's shards for the current epoch (before the split among DataLoader workers)."""
        shards = list(self.shards)
        if self.shuffle_shards:
            # The same seed on every rank: one global permutation, so the rank split stays disjoint.
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(shards)
        return shards_for_rank(shards, self.rank, self.world_size)

    def decode_sample(self, raw: RawSample) -> Any:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Any]:
        counts = SkipCounts()
        self.skip_counts = counts
        shards = self.rank_shards()
        if self.split_by_worker:
            shards = list(wds.split_by_worker(shards))
        samples = self._decoded(shards, counts)
        if self.shuffle_buffer > 1:
            info = torch.utils.data.get_worker_info()
            worker = info.id if info is not None else 0
            rng = random.Random(hash((self.seed, self.epoch, self.rank, worker)))
            samples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples)
        return iter(samples)

    def _decoded(self, shards: list[str], counts: SkipCounts) -> Iterator[Any]:
        reported = SkipCounts()
        held = None  # one sample held back so the last one can carry the trailing skips
        for url in shards:
            for raw in iter_tar_samples(url, counts):
                try:
                    sample = self.decode_sample(raw)
                except SkipSample as skip:
                    counts.count(skip.reason)
                    logger.debug("skipping sample %s of %s: %s", raw.key, raw.url, skip)
                    continue
                if held is not None:
                    held.skips, reported = counts - reported, counts.copy()
                    yield held
                counts.good += 1
                held = sample
        if held is not None:
            held.skips = counts - reported
            yield held


@dataclass
class ImageTextSample:
    key: str
    image: Tensor  # [C, S, S] float32 in [0, 1]
    caption: str
    label: int | None  # json "label" (or .cls); None when the sample has none (DataComp)
    metadata: dict[str, Any]  # the sample's .json, as stored
    url: str  # the shard it came from
    skips: SkipCounts = field(default_factory=SkipCounts)
    encoded: "EncodedImage | None" = None  # the image member's bytes as stored (splat shards carry them on)


@dataclass
class ImageTextBatch:
    images: Tensor  # [B, C, S, S]
    captions: list[str]
    labels: Tensor  # [B] int64, -1 where a sample has no label
    keys: list[str]
    skips: SkipCounts  # summed over the batch's samples (see the module docstring)


class ImageTextShards(ShardDataset):
    """Image-text samples of any shard spec, ours or DataComp's (see the module docstring).

    ``image_size=None`` keeps each image's own size (batches then need equal sizes); otherwise
    ``resize_mode`` is ``"center_crop"`` (shorter side to ``image_size``, bicubic, then the central
    square: CLIP's geometry) or ``"resize"`` (straight to ``image_size`` x ``image_size``).
    ``channels`` is 3 (RGB) or 1 (gray).
    """

    def __init__(
        self,
        spec: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        image_size: int | None = None,
        resize_mode: str = "center_crop",
        channels: int = 3,
        rank: int | None = None,
        world_size: int | None = None,
        shuffle_shards: bool = False,
        shuffle_buffer: int = 0,
        seed: int = 0,
        split_by_worker: bool = True,
    ) -> None:
        super().__init__(
            spec,
            rank=rank,
            world_size=world_size,
            shuffle_shards=shuffle_shards,
            shuffle_buffer=shuffle_buffer,
            seed=seed,
            split_by_worker=split_by_worker,
        )
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"unknown resize_mode {resize_mode!r}; choose one of {RESIZE_MODES}")
        if image_size is not None and (
            isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0
        ):
            raise ValueError(f"image_size must be a positive int or None, got {image_size!r}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels!r}")
        self.image_size = image_size
        self.resize_mode = resize_mode
        self.channels = channels

    def decode_sample(self, raw: RawSample) -> ImageTextSample:
        members = raw.members
        extension = next((ext for ext in IMAGE_EXTENSIONS if ext in members), None)
        if extension is None:
            raise SkipSample("no_image", f"members {sorted(members)}")
        # Cheap checks first: a sample without a usable caption is not worth decoding.
        caption = decode_caption(members)
        metadata, label = decode_metadata(members)
        image = decode_image(members[extension], self.channels, self.image_size, self.resize_mode)
        return ImageTextSample(
            key=raw.key, image=image, caption=caption, label=label, metadata=metadata, url=raw.url,
            encoded=EncodedImage(members[extension], extension),
        )


def collate_image_text(samples: Sequence[ImageTextSample]) -> ImageTextBatch:
    """A DataLoader ``collate_fn``: stacked images, captions, labels (-1 for none) and summed skips."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    return ImageTextBatch(
        images=torch.stack([sample.image for sample in samples]),
        captions=[sample.caption for sample in samples],
        labels=torch.tensor([-1 if s.label is None else s.label for s in samples], dtype=torch.int64),
        keys=[sample.key for sample in samples],
        skips=SkipCounts.total(sample.skips for sample in samples),
    )


# ----------------------------------------------------------------------------------------------
# The writer


def check_sample_key(key: str) -> None:
    """Raise unless ``key`` reads back as one sample key (webdataset splits names at the first dot)."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"a sample key must be a non-empty str, got {key!r}")
    base = key.rsplit("/", 1)[-1]
    if "." in base or not base or base.startswith("__"):
        raise ValueError(
            f"sample key {key!r} would not read back: no dot, no leading '__', no trailing '/' allowed"
        )


def encode_image(image: np.ndarray, image_format: str, jpeg_quality: int = 95) -> bytes:
    """uint8 ``[H, W]`` or ``[H, W, 3]`` as PNG (lossless) or JPEG bytes."""
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)) or 0 in array.shape:
        raise ValueError(f"images must be [H, W] or [H, W, 3], got shape {array.shape}")
    buffer = io.BytesIO()
    if image_format == "png":
        Image.fromarray(array).save(buffer, format="PNG")
    elif image_format == "jpg":
        Image.fromarray(array).save(buffer, format="JPEG", quality=jpeg_quality)
    else:
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    return buffer.getvalue()


@dataclass(frozen=True)
class EncodedImage:
    """An image file's bytes, written to a shard as they are (``key.<extension>``), not re-encoded."""

    data: bytes
    extension: str  # one of IMAGE_EXTENSIONS, lower case: the member name the reader looks for

    def __post_init__(self) -> None:
        if self.extension not in IMAGE_EXTENSIONS:
            raise ValueError(f"image extension must be one of {IMAGE_EXTENSIONS}, got {self.extension!r}")
        if not self.data:
            raise ValueError("an encoded image needs bytes, got none")


def write_image_text_shards(
    samples: Iterable[tuple[str, np.ndarray | EncodedImage, str, dict[str, Any]]],
    pattern: str | os.PathLike,
    max_count_per_shard: int,
    *,
    image_format: str = "png",
    jpeg_quality: int = 95,
    max_bytes_per_shard: float = 3e9,
) -> list[str]:
    """Write ``(key, image, caption, metadata)`` samples as shards; return the shard paths written.

    ``pattern`` is a printf pattern (``data/train-%06d.tar``) numbered from 0. Per sample the shard
    holds ``key.png`` (or ``key.jpg`` with ``image_format="jpg"``), ``key.txt`` (the caption, UTF-8)
    and ``key.json`` (``metadata``, e.g. ``{"label": 3}``); an :class:`EncodedImage` is stored as
    it is, under its own extension (an ImageNet JPEG keeps its bytes). A shard closes after
    ``max_count_per_shard`` samples or ``max_bytes_per_shard`` bytes. Each shard is written through
    :func:`gsclip_lib.atomic_files.atomic_output`, so an interrupted run leaves no partial shard under
    a final name. No empty shard is written.
    """
    if not isinstance(max_count_per_shard, int) or max_count_per_shard <= 0:
        raise ValueError(f"max_count_per_shard must be a positive int, got {max_count_per_shard!r}")
    pattern = os.fspath(pattern)
    written: list[str] = []
    seen: set[str] = set()
    with ExitStack() as open_shard:
        writer: wds.TarWriter | None = None
        count = size = 0
        for key, image, caption, metadata in samples:
            check_sample_key(key)
            if key in seen:
                raise ValueError(f"duplicate sample key {key!r}")
            seen.add(key)
            if not isinstance(caption, str):
                raise ValueError(f"caption of {key!r} must be a str, got {type(caption).__name__}")
            if isinstance(image, EncodedImage):
                extension, payload = image.extension, image.data
            else:
                extension, payload = image_format, encode_image(image, image_format, jpeg_quality)
            sample = {
                "__key__": key,
                extension: payload,
                CAPTION_EXTENSION: caption.encode("utf-8"),
                METADATA_EXTENSION: json.dumps(dict(metadata), default=_json_default).encode("utf-8"),
            }
            sample_bytes = sum(len(value) for name, value in sample.items() if name != "__key__")
            if writer is not None and (count >= max_count_per_shard or size + sample_bytes > max_bytes_per_shard):
                open_shard.close()  # closes the tar, then publishes the finished shard under its final name
                writer = None
            if writer is None:
                final = pattern % len(written)
                stream = open_shard.enter_context(atomic_output(final))
                writer = wds.TarWriter(stream, encoder=False, mtime=_REPRODUCIBLE_MTIME)
                open_shard.callback(writer.close)  # unwound first: the tar ends before its file is kept or removed
                written.append(final)
                count = size = 0
            writer.write(sample)
            count += 1
            size += sample_bytes
    return written


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in a sample's .json")
