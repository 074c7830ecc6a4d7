"""JPEG at the same bytes: the pixel codec the splat representation is compared against.

METHOD.md section 1 counts a splat image as ``N * (5 + C) * 2`` bytes (3.00x to 23.52x smaller than
the 224x224x3 uint8 source). The natural question is what a standard codec gives at the same byte
budget. :func:`jpeg_at_budget` answers it: the highest JPEG quality whose whole file fits the
budget.

Choices, fixed here so that every comparison uses the same JPEG:

- Pillow's libjpeg encoder, baseline (not progressive), ``optimize=True``: optimized Huffman tables
  cost one extra pass and make every file smaller at the same quality (about 5-40 % on 224x224
  photos, most at low quality), so JPEG gets its best standard shot at the budget.
- Chroma subsampling is Pillow's default (4:2:0 for RGB); grayscale images are encoded as mode
  ``"L"``.
- The size is the complete file, JFIF header, quantization and Huffman tables included, just as the
  splat record's header is counted in :func:`gsclip_lib.splats.codec.record_bytes`. No EXIF or ICC data.
- Quality runs from 1 to ``max_quality`` = 100 by default, the whole libjpeg range: the comparison
  asks what JPEG does with the same bytes, so it may spend all of them. (Pillow advises staying at or
  below 95, where the file grows with little gain; at 95 a 224x224 photo takes about 20-24 kB, less
  than the 3.00x and 5.88x budgets of 50176 and 25600 bytes.) A budget above the quality-100 size is
  not fully used, and the result's ``num_bytes`` says so.
- If even quality 1 exceeds the budget, the result says so (``fits_budget=False``,
  ``quality=None``) and carries the quality-1 file, rather than pretending the budget was met.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from gsclip_lib.errors import positive_int
from gsclip_lib.splats.quality import psnr_uint8

MIN_QUALITY = 1
MAX_QUALITY = 100
# File size is monotone in quality on the photos we tried, but libjpeg does not promise it; after
# the binary search, this many qualities above the answer are checked directly.
_NEIGHBOURS_CHECKED = 4


@dataclass(frozen=True)
class JpegResult:
    """The JPEG chosen for a budget and its decoded pixels."""

    decoded: np.ndarray  # uint8, same shape as the input image
    num_bytes: int  # size of the complete JPEG file
    quality: int | None  # None when no quality fits the budget
    fits_budget: bool
    budget_bytes: int


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """The complete JPEG file of ``image`` (uint8 ``[H, W]``, ``[H, W, 1]`` or ``[H, W, 3]``)."""
    buffer = io.BytesIO()
    _to_pil(image).save(buffer, format="JPEG", quality=quality, optimize=True)
    return buffer.getvalue()


def decode_jpeg(encoded: bytes, like: np.ndarray) -> np.ndarray:  # uint8, shaped like ``like``
    with Image.open(io.BytesIO(encoded)) as picture:
        decoded = np.asarray(picture, dtype=np.uint8)
    return decoded.reshape(like.shape)


class _JpegEncodings:
    """An image's JPEG files by quality, each encoded once."""

    def __init__(self, image: np.ndarray) -> None:
        self.image = image
        self.files: dict[int, bytes] = {}

    def __call__(self, quality: int) -> bytes:
        if quality not in self.files:
            self.files[quality] = encode_jpeg(self.image, quality)
        return self.files[quality]

    def result(self, quality: int, budget_bytes: int) -> JpegResult:
        encoded = self(quality)
        fits = len(encoded) <= budget_bytes
        return JpegResult(decoded=decode_jpeg(encoded, self.image), num_bytes=len(encoded),
                          quality=quality if fits else None, fits_budget=fits, budget_bytes=budget_bytes)


def jpeg_at_budget(
    image: np.ndarray,  # uint8 [H, W], [H, W, 1] or [H, W, 3]
    budget_bytes: int,
    max_quality: int = MAX_QUALITY,
) -> JpegResult:
    """Encode ``image`` at the highest quality in ``1..max_quality`` whose file is <= the budget
    (the lowest quality, marked as not fitting, when none does)."""
    _check_image(image)
    if not MIN_QUALITY <= max_quality <= 100:
        raise ValueError(f"max_quality must be in 1..100, got {max_quality}")
    positive_int(budget_bytes, "the byte budget")
    encoded = _JpegEncodings(image)
    if len(encoded(MIN_QUALITY)) > budget_bytes:
        return encoded.result(MIN_QUALITY, budget_bytes)
    # Binary search for the largest quality that fits, with low always fitting.
    low, high = MIN_QUALITY, max_quality
    while low < high:
        middle = (low + high + 1) // 2
        if len(encoded(middle)) <= budget_bytes:
            low = middle
        else:
            high = middle - 1
    for quality in range(min(max_quality, low + _NEIGHBOURS_CHECKED), low, -1):
        if len(encoded(quality)) <= budget_bytes:
            low = quality
            break
    return encoded.result(low, budget_bytes)


def jpeg_psnr_at_budget(
    image: np.ndarray,  # uint8 [H, W], [H, W, 1] or [H, W, 3]
    budget_bytes: int,
    max_quality: int = MAX_QUALITY,
) -> tuple[float, JpegResult]:
    """PSNR in dB (pixels scaled to [0, 1]) of the JPEG chosen by :func:`jpeg_at_budget`."""
    result = jpeg_at_budget(image, budget_bytes, max_quality=max_quality)
    return psnr_uint8(image, result.decoded), result


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(
            f"image must be uint8, got {image.dtype} (convert floats in [0, 1] with "
            "(image * 255).round().astype(np.uint8))"
        )
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3)):
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise ValueError(f"image is empty: shape {image.shape}")
        return
    raise ValueError(
        f"image must be [H, W], [H, W, 1] or [H, W, 3] (channels last), got shape {image.shape}"
    )


def _to_pil(image: np.ndarray) -> Image.Image:
    _check_image(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    # uint8 [H, W] becomes mode "L" and [H, W, 3] mode "RGB" (fromarray's ``mode`` is deprecated).
    return Image.fromarray(np.ascontiguousarray(image))
