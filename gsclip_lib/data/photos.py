"""Real photographs for fitting tests and the photo stage: scikit-image's bundled pictures.

scikit-image ships them inside the package, so they load with no network. Each is centre-cropped to a
square and resized with anti-aliasing to ``size`` x ``size``.
"""

from __future__ import annotations

import numpy as np
import skimage.data
import torch
from skimage.transform import resize
from torch import Tensor

# Photographs bundled with scikit-image (no download needed); the gray ones (camera, coins) are
# repeated to three channels.
PHOTO_NAMES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "camera", "coins")


def load_photo(name: str, size: int) -> np.ndarray:  # [size, size, 3] uint8
    if name not in PHOTO_NAMES:
        raise ValueError(f"unknown photo {name!r}; scikit-image ships {PHOTO_NAMES}")
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"photo size must be a positive int, got {size!r}")
    image = getattr(skimage.data, name)()
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    image = image[..., :3]
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = image[top : top + side, left : left + side]
    resized = resize(square, (size, size), anti_aliasing=True, preserve_range=True)
    return np.clip(np.rint(resized), 0, 255).astype(np.uint8)


def load_photos(names: list[str] | tuple[str, ...], size: int) -> Tensor:  # [B, 3, size, size]
    """The named photos as a float batch in [0, 1]."""
    arrays = [load_photo(name, size) for name in names]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
