"""Image-text pairs as webdataset tar shards, in DataComp's layout (METHOD.md section 3, "Data").

DataComp ships its 12.8 M pairs as tar shards in which one sample is a group of consecutive members
sharing a key: ``<key>.jpg`` (or ``.png``, ``.webp``), ``<key>.txt`` (the caption) and ``<key>.json``
(``uid``, ``url``, ``original_width``, ...). This module writes shards of that layout
(:func:`write_image_text_shards`) and reads any such shards, ours or DataComp's as they are
(:class:`ImageTextShards`), as ``[C, S, S]`` float images in ``[0, 1]`` with their caption, label and
key. Finding, splitting and streaming the shards is :mod:`gsclip_lib.data.tar_shards`'s
(:class:`~gsclip_lib.data.tar_shards.ShardDataset`), as it is for :mod:`gsclip_lib.data.splat_shards`;
the caption and metadata decoders here serve both formats.

Reading never stops on bad data. A sample is skipped and counted in
:class:`~gsclip_lib.data.skip_counts.SkipCounts` under one reason: a 0-byte image; bytes no PIL
format recognizes (``undecodable_image``); an image a format recognizes but cannot decode
(``truncated_image``: data cut short or corrupt); no image member at all; no caption or an empty
one; a caption that is not UTF-8; a ``.json`` that is not a JSON object. Broken and unreadable
shards, and the samples a broken tar stream cut, are counted by
:func:`~gsclip_lib.data.tar_shards.iter_tar_samples`. Grayscale, palette, transparent, 16-bit and
CMYK images are converted by :func:`gsclip_lib.data.image_decoding.to_rgb_or_gray` (transparency
composited on white), not dropped.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import webdataset as wds
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from gsclip_lib.atomic_files import atomic_output
from gsclip_lib.data.image_decoding import IMAGE_EXTENSIONS, image_to_tensor, resize_and_center_crop, to_rgb_or_gray
from gsclip_lib.data.skip_counts import SkipCounts, SkipSample
from gsclip_lib.data.tar_shards import RawSample, ShardDataset, ShardSpec
from gsclip_lib.errors import positive_int

CAPTION_EXTENSION = "txt"
METADATA_EXTENSION = "json"
LABEL_EXTENSION = "cls"  # webdataset's convention for a bare class index, used when .json has none
RESIZE_MODES = ("resize", "center_crop")
# PIL's errors for bytes it cannot read: truncated data (OSError), broken headers (SyntaxError,
# ValueError, EOFError), images over its pixel limit.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
# Tar member times: fixed, so the same samples give the same bytes; an int, because Python's tarfile
# writes a float time as an extra PAX header before every member, which halves the reading speed.
_REPRODUCIBLE_MTIME = 0


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
    skips: SkipCounts  # summed over the batch's samples (see gsclip_lib.data.tar_shards)


class ImageTextShards(ShardDataset):
    """Image-text samples of any shard spec, ours or DataComp's (see the module docstring), read
    by rank and DataLoader worker as :class:`~gsclip_lib.data.tar_shards.ShardDataset` says
    (``rank``, ``world_size``, ``split_by_worker``).

    ``image_size=None`` keeps each image's own size (batches then need equal sizes); otherwise
    ``resize_mode`` is ``"center_crop"`` (shorter side to ``image_size``, bicubic, then the central
    square: CLIP's geometry) or ``"resize"`` (straight to ``image_size`` x ``image_size``).
    ``channels`` is 3 (RGB) or 1 (gray).
    """

    def __init__(
        self,
        spec: ShardSpec,
        *,
        image_size: int | None = None,
        resize_mode: str = "center_crop",
        channels: int = 3,
        **selection: Any,  # the keywords of gsclip_lib.data.tar_shards.ShardSelection
    ) -> None:
        super().__init__(spec, **selection)
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"unknown resize_mode {resize_mode!r}; choose one of {RESIZE_MODES}")
        if image_size is not None:
            positive_int(image_size, "image_size (or None)")
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
