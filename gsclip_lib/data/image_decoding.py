"""Decoded images of any PIL mode turned into the 8-bit RGB or grayscale images the models read.

Web-scale image collections (DataComp, ImageNet's validation set) hold a few images in odd modes:
grayscale, palettes, alpha channels, 16-bit PNGs, CMYK JPEGs. Every reader of the project (the
ImageNet-style folder reader, the webdataset shards) passes decoded images through ``to_rgb_or_gray``
so they all convert the same way, then through ``resize_and_center_crop`` (CLIP's evaluation
geometry: shorter side to the target size with bicubic resampling, then the central square) and
``image_to_tensor``. Normalization by a model's mean and std is left to the model's own code.

Choices made here:
- transparency is composited on white (product photos and icons are drawn for a white page);
- 16-bit and 32-bit integer grayscale ("I;16*", "I") is read as 16-bit and scaled by 255/65535;
- CMYK goes through Pillow's profile-free conversion (embedded ICC profiles are not applied);
- EXIF orientation is not applied, as in CLIP's and torchvision's evaluation readers.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from gsclip_lib.errors import positive_int

# Image file extensions read here, in the order a sample's members are searched for an image (DataComp
# stores jpg; img2dataset may also write png or webp). Lower case, without the dot.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm")

# Modes with an alpha channel; P, L and RGB images may also carry transparency in their info dict.
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_WIDE_GRAY_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}


def to_rgb_or_gray(image: Image.Image, channels: int) -> Image.Image:
    """``image`` as an 8-bit "RGB" image (``channels == 3``) or "L" image (``channels == 1``)."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    mode = image.mode
    # "transparency" in info: a transparent palette index (P) or colour key (L, RGB), as PNG's tRNS.
    palette_alpha = mode == "P" and image.palette is not None and image.palette.mode == "RGBA"
    if mode in _WIDE_GRAY_MODES:
        # Pillow's own convert("L") clips these at 255 instead of scaling; a 16-bit colour key, if
        # any, is dropped.
        wide = np.asarray(image).astype(np.float64)
        eight_bit = np.clip(np.rint(wide * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        image = Image.fromarray(eight_bit)  # a 2-D uint8 array becomes an "L" image
    elif mode in _ALPHA_MODES or "transparency" in image.info or palette_alpha:
        image = _composite_on_white(image)
    target = "RGB" if channels == 3 else "L"
    return image if image.mode == target else image.convert(target)


def _composite_on_white(image: Image.Image) -> Image.Image:  # "RGB"
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def resize_and_center_crop(image: Image.Image, size: int) -> Image.Image:  # size x size
    """The shorter side resized to ``size`` (bicubic), then the central ``size`` x ``size`` square.

    The rounding follows torchvision's ``Resize(size)`` + ``CenterCrop(size)``, the CLIP evaluation
    transform, so images come out as they would from open_clip's own preprocessing.
    """
    positive_int(size, "image size")
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ValueError(f"cannot resize an empty image of size {width}x{height}")
    if width <= height:
        new_size = (size, int(size * height / width))
    else:
        new_size = (int(size * width / height), size)
    if new_size != image.size:
        image = image.resize(new_size, Image.Resampling.BICUBIC)
    width, height = image.size
    left = int(round((width - size) / 2.0))
    top = int(round((height - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def image_to_tensor(image: Image.Image) -> Tensor:  # [C, H, W] float32 in [0, 1]
    """An 8-bit "RGB" or "L" image as a float tensor in [0, 1], channels first."""
    if image.mode not in ("RGB", "L"):
        raise ValueError(f"expected an RGB or L image, got mode {image.mode!r}; convert with to_rgb_or_gray first")
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def images_to_uint8(images: Tensor) -> np.ndarray:  # [B, C, H, W] float in [0, 1] -> uint8 [B, H, W, C]
    """Float images as the uint8 pixels a sender holds (rounded; exact for images read from PNG)."""
    if images.ndim != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def uint8_to_images(pixels: np.ndarray) -> Tensor:  # uint8 [B, H, W, C] -> [B, C, H, W] float in [0, 1]
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float() / 255.0
