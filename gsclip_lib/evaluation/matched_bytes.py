"""Pixel baselines at the splats' byte budget: what a sender would do instead of fitting splats.

METHOD.md section 1 counts a splat image as ``N * (5 + C) * 2`` bytes (the payload; the stored
record adds an 18-byte header, :func:`gsclip_lib.splats.codec.record_bytes`). The fair question for the
zero-shot numbers of METHOD.md section 4 is what an RGB encoder reads when the sender spends the same bytes on
pixels. Two answers, both decoded back to the original size so the same RGB tower reads them:

- ``"jpeg"``: :func:`gsclip_lib.evaluation.jpeg_baseline.jpeg_at_budget`, the highest quality whose complete
  file (JFIF header, quantization and Huffman tables counted) is <= the budget. Headers and tables
  dominate small images: a blank 28x28 gray JPEG takes 164 bytes, and Fashion-MNIST test images take
  168-234 bytes at quality 1 (median 200), so of the 28x28 gray levels (264, 132, 72, 36 payload
  bytes) only 264 can be met (at quality 14 on average). When no quality fits, the image is still
  sent at quality 1, its real size is reported and ``fits_budget`` is False: nothing is ever
  rounded into the budget, and a report should show such rows as over budget, not as matched.
- ``"thumbnail"``: the image downsampled to the largest size ``h x w`` with ``h * w * C <= budget``
  that keeps the aspect ratio (``w = round(h * W / H)``; square images get the largest ``s`` with
  ``s * s * C <= budget``), stored as raw uint8 with no header (the receiver is assumed to know
  ``h``, ``w`` and ``C``, as the payload accounting assumes the receiver knows ``N`` and ``C``), and
  upsampled back to ``H x W``. Both resizes use Pillow's bicubic filter by default (``"bilinear"``
  on request); Pillow widens the filter when it shrinks, so the downsampling is antialiased. A
  budget of at least ``H * W * C`` bytes sends the image itself, losslessly. A budget below ``C``
  bytes (not even one pixel) is reported as a 1x1 thumbnail with ``fits_budget`` False.

Images here are uint8 ``[B, H, W, C]`` (channels last, C = 1 or 3); :func:`images_to_uint8` and
:func:`uint8_to_images` convert from and to the ``[B, C, H, W]`` floats in [0, 1] that the shard
readers yield. :func:`evaluate_matched_bytes` runs the zero-shot evaluator over every budget and
method and reports accuracy beside the bytes actually spent.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from gsclip_lib.data.image_decoding import images_to_uint8, uint8_to_images
from gsclip_lib.params import level_name
from gsclip_lib.splats.codec import payload_bytes, record_bytes
from gsclip_lib.evaluation.jpeg_baseline import MAX_QUALITY, jpeg_at_budget
from gsclip_lib.evaluation.zero_shot import EvalBatch, evaluate_zero_shot, unpack_batch
from gsclip_lib.errors import positive_int

METHODS = ("jpeg", "thumbnail")
ACCOUNTINGS = ("payload", "record")  # the paper's N * (5 + C) * 2, or the whole stored record
RESAMPLERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def splat_budget_bytes(num_splats: int, channels: int, accounting: str = "payload") -> int:
    """The bytes one image's splats take: the paper's payload, or the whole codec record."""
    if accounting == "payload":
        return payload_bytes(num_splats, channels)
    if accounting == "record":
        return record_bytes(num_splats, channels)
    raise ValueError(f"unknown accounting {accounting!r}; choose one of {ACCOUNTINGS}")


def splat_level_budgets(
    levels: Sequence[int], channels: int, accounting: str = "payload"
) -> dict[str, int]:
    """``{"N<count>": bytes}`` for each splat level, e.g. 28x28 gray: N22 -> 264, N3 -> 36 (payload)."""
    return {level_name(count): splat_budget_bytes(count, channels, accounting) for count in levels}


# ----------------------------------------------------------------------------------------------
# Thumbnails


@dataclass(frozen=True)
class ThumbnailResult:
    """A thumbnail chosen for a budget, upsampled back to the original size."""

    decoded: np.ndarray  # uint8, same shape as the input image
    num_bytes: int  # h * w * C, the raw thumbnail
    size: tuple[int, int]  # (h, w) of the stored thumbnail
    fits_budget: bool
    budget_bytes: int


def thumbnail_size(height: int, width: int, channels: int, budget_bytes: int) -> tuple[int, int]:
    """The largest aspect-preserving ``(h, w)``, ``h <= H``, ``w <= W``, with ``h * w * C <= budget``.

    ``(H, W)`` when the budget holds the whole image; ``(1, 1)`` when it cannot hold one pixel (the
    caller reports that as not fitting).
    """
    for name, value in (("height", height), ("width", width), ("channels", channels), ("budget", budget_bytes)):
        positive_int(value, name)
    if height * width * channels <= budget_bytes:
        return height, width
    best = (1, 1)
    for h in range(1, height + 1):
        w = min(width, max(1, math.floor(h * width / height + 0.5)))
        if h * w * channels > budget_bytes:
            break  # h * w never shrinks as h grows
        best = (h, w)
    return best


def thumbnail_at_budget(
    image: np.ndarray,  # uint8 [H, W], [H, W, 1] or [H, W, 3]
    budget_bytes: int,
    resample: str = "bicubic",
) -> ThumbnailResult:
    """Downsample ``image`` to the byte budget as raw uint8, then upsample it back to ``H x W``."""
    _check_uint8_image(image)
    if resample not in RESAMPLERS:
        raise ValueError(f"unknown resample {resample!r}; choose one of {tuple(RESAMPLERS)}")
    height, width = image.shape[:2]
    channels = 1 if image.ndim == 2 else image.shape[2]
    h, w = thumbnail_size(height, width, channels, budget_bytes)
    num_bytes = h * w * channels
    if (h, w) == (height, width):
        decoded = image.copy()
    else:
        filter_ = RESAMPLERS[resample]
        plane = image[:, :, 0] if image.ndim == 3 and channels == 1 else image  # Pillow wants [H, W] gray
        picture = Image.fromarray(np.ascontiguousarray(plane))
        small = picture.resize((w, h), resample=filter_)  # stored: np.asarray(small), h * w * C bytes
        decoded = np.asarray(small.resize((width, height), resample=filter_), dtype=np.uint8).reshape(image.shape)
    return ThumbnailResult(
        decoded=decoded,
        num_bytes=num_bytes,
        size=(h, w),
        fits_budget=num_bytes <= budget_bytes,
        budget_bytes=budget_bytes,
    )


# ----------------------------------------------------------------------------------------------
# Batches at a budget


def matched_bytes_images(
    images: np.ndarray,  # uint8 [B, H, W, C], C = 1 or 3
    budget_bytes: int,
    method: str,
    *,
    resample: str = "bicubic",
    max_quality: int = MAX_QUALITY,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Re-encode every image at ``budget_bytes`` with ``method`` and decode it back.

    Returns ``(decoded, actual_bytes, info)``: ``decoded`` uint8 ``[B, H, W, C]``; ``actual_bytes``
    int64 ``[B]``, the bytes each image really takes (above the budget where it cannot be met);
    ``info`` with ``method``, ``budget_bytes``, ``fits_budget`` (bool ``[B]``) and, for JPEG,
    ``quality`` (a list, ``None`` where no quality fits) or, for thumbnails, ``size`` (``(h, w)``,
    the same for every image of a batch) and ``resample``.
    """
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(
            "images must be a uint8 numpy array [B, H, W, C] (see images_to_uint8), got "
            f"{getattr(images, 'dtype', type(images).__name__)} of shape {getattr(images, 'shape', None)}"
        )
    if images.shape[3] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels (last axis), got shape {images.shape}")
    budget_bytes = positive_int(budget_bytes, "budget_bytes")
    decoded = np.empty_like(images)
    actual = np.zeros(images.shape[0], dtype=np.int64)
    fits = np.zeros(images.shape[0], dtype=bool)
    info: dict[str, Any] = {"method": method, "budget_bytes": budget_bytes}
    if method == "jpeg":
        qualities: list[int | None] = []
        for index, image in enumerate(images):
            result = jpeg_at_budget(image, budget_bytes, max_quality=max_quality)
            decoded[index], actual[index], fits[index] = result.decoded, result.num_bytes, result.fits_budget
            qualities.append(result.quality)
        info["quality"] = qualities
    elif method == "thumbnail":
        size = None
        for index, image in enumerate(images):
            result = thumbnail_at_budget(image, budget_bytes, resample=resample)
            decoded[index], actual[index], fits[index] = result.decoded, result.num_bytes, result.fits_budget
            size = result.size
        info["size"] = size
        info["resample"] = resample
    else:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    info["fits_budget"] = fits
    return decoded, actual, info


@dataclass
class ByteTally:
    """Bytes actually spent over a pass of matched-bytes batches."""

    budget_bytes: int
    method: str
    images: int = 0
    total_bytes: int = 0
    max_bytes: int = 0
    over_budget: int = 0  # images whose budget could not be met (sent at their real, larger size)
    qualities: list[int] = field(default_factory=list)  # JPEG qualities of the images that fit
    size: tuple[int, int] | None = None  # thumbnail (h, w)

    def add(self, actual_bytes: np.ndarray, info: dict[str, Any]) -> None:
        self.images += int(actual_bytes.size)
        self.total_bytes += int(actual_bytes.sum())
        if actual_bytes.size:
            self.max_bytes = max(self.max_bytes, int(actual_bytes.max()))
        self.over_budget += int((~info["fits_budget"]).sum())
        self.qualities.extend(q for q in info.get("quality", ()) if q is not None)
        if info.get("size") is not None:
            self.size = tuple(info["size"])

    def as_dict(self) -> dict[str, Any]:
        summary: dict[str, Any] = {
            "budget_bytes": self.budget_bytes,
            "mean_bytes": self.total_bytes / self.images if self.images else None,
            "max_bytes": self.max_bytes if self.images else None,
            "over_budget_images": self.over_budget,
            "fits_budget_fraction": (self.images - self.over_budget) / self.images if self.images else None,
        }
        if self.method == "jpeg":
            summary["mean_quality"] = float(np.mean(self.qualities)) if self.qualities else None
        else:
            summary["thumbnail_size"] = list(self.size) if self.size is not None else None
        return summary


def matched_bytes_batches(
    batches: Iterable[EvalBatch | tuple[Tensor, Tensor]],
    budget_bytes: int,
    method: str,
    tally: ByteTally | None = None,
    **options: Any,
) -> Iterator[EvalBatch]:
    """The batches' float images re-encoded at the budget and decoded; bytes added to ``tally``."""
    for batch in batches:
        inputs, labels, skipped = unpack_batch(batch)
        keys = getattr(batch, "keys", None)
        if inputs.shape[0] == 0:
            yield EvalBatch(inputs, labels, skipped, keys)
            continue
        decoded, actual, info = matched_bytes_images(images_to_uint8(inputs), budget_bytes, method, **options)
        if tally is not None:
            tally.add(actual, info)
        yield EvalBatch(uint8_to_images(decoded).to(inputs.device), labels, skipped, keys)


def evaluate_matched_bytes(
    encode_images: Callable[[Tensor], Tensor],
    batches: Callable[[], Iterable[EvalBatch]] | Iterable[EvalBatch],
    classifier: Tensor,  # [D, K]
    budgets: Mapping[str, int],
    methods: Sequence[str] = METHODS,
    logit_scale: float = 100.0,
    device: torch.device | str | None = None,
    **options: Any,
) -> list[dict[str, Any]]:
    """Zero-shot accuracy of an RGB tower on images re-encoded at every budget by every method.

    ``batches`` yields float image batches (``image_shard_batches``); it is
    read once per (budget, method), so pass a callable that makes a fresh iterable, or a re-iterable
    such as a list (a one-shot generator is refused). ``budgets`` names each level
    (``splat_level_budgets``). One row per (level, method): the zero-shot metrics of
    :func:`gsclip_lib.evaluation.zero_shot.evaluate_zero_shot` plus the tally of bytes actually spent.
    """
    unknown = [method for method in methods if method not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {METHODS}")
    if not callable(batches) and iter(batches) is batches:
        raise ValueError(
            "batches is a one-shot iterator but is read once per budget and method; pass a function "
            "that returns a fresh iterable (e.g. lambda: image_shard_batches(...)) or a list"
        )
    rows = []
    for level, budget in budgets.items():
        for method in methods:
            tally = ByteTally(budget_bytes=int(budget), method=method)
            source = batches() if callable(batches) else batches
            metrics = evaluate_zero_shot(
                encode_images,
                matched_bytes_batches(source, budget, method, tally, **options),
                classifier,
                logit_scale=logit_scale,
                device=device,
            )
            rows.append({"level": level, "method": method, **tally.as_dict(), **metrics})
    return rows


def _check_uint8_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise ValueError(f"image must be a uint8 numpy array, got {getattr(image, 'dtype', type(image).__name__)}")
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3))) or 0 in image.shape:
        raise ValueError(f"image must be [H, W], [H, W, 1] or [H, W, 3], got shape {image.shape}")
