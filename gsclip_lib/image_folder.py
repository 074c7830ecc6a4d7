"""An ImageNet-style evaluation folder, ``root/<class_dir>/<image>``, read as a torch ``Dataset``.

This is the layout of ImageNet-1K's validation set once sorted into one folder per WordNet id (the
set behind the paper's zero-shot top-1 numbers, PAPER.md section 4), and of most small evaluation
sets. Labels are the positions of the class folders in sorted order. The class names used for the
zero-shot prompts come from, in turn:

1. ``class_names_file``: a text file with one name per line, in sorted-folder order (for ImageNet,
   the standard wnid order); its line count must equal the number of class folders;
2. open_clip's ``IMAGENET_CLASSNAMES`` when the root holds exactly 1000 folders named like WordNet ids
   (``n01440764``), which open_clip lists in that same sorted order;
3. otherwise the folder names, with underscores read as spaces. Folders that look like WordNet ids
   but are not 1000 are an error rather than names, since "n01440764" makes a useless prompt and a
   missing folder would shift every label after it.

Images are found by extension (case-insensitive, ``IMAGE_EXTENSIONS``) anywhere under a class folder;
hidden files and folders are ignored. They are decoded lazily: a file that fails to decode is not
an error but yields a ``SkippedImage`` record, which ``collate_skipping_bad`` drops from the batch and
reports (``ImageBatch.skipped``), so one broken JPEG in 50,000 neither stops an evaluation nor goes
unnoticed, and nothing is decoded twice. The skipped paths travel inside the batches because
``DataLoader`` workers are separate processes whose counters the main process cannot see.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import NamedTuple

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from gsclip_lib import captions
from gsclip_lib.image_decoding import image_to_tensor, resize_and_center_crop, to_rgb_or_gray

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
_WNID = re.compile(r"^n\d{8}$")
# What PIL raises for files it cannot read: unidentified or truncated files (OSError), broken
# headers (SyntaxError, ValueError, EOFError) and images over its pixel limit.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class SkippedImage(NamedTuple):
    """What ``ImageFolderDataset`` yields in place of an image it could not decode."""

    path: str
    reason: str
    shape: tuple[int, int, int]  # (C, S, S) of the images it stands in for


class ImageBatch(NamedTuple):
    images: Tensor  # [B, C, S, S] float32 in [0, 1]
    labels: Tensor  # [B] int64
    skipped: tuple[str, ...]  # paths of the undecodable images dropped from this batch


def find_class_dirs(root: str | Path) -> list[str]:
    """The class folder names under ``root``, sorted (their positions are the labels)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    class_dirs = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    if not class_dirs:
        raise ValueError(f"{root} has no class folders; expected the layout {root}/<class>/<image files>")
    return class_dirs


def read_class_names(class_dirs: list[str], class_names_file: str | Path | None) -> tuple[str, ...]:
    """The class name of each folder in ``class_dirs`` (see the module docstring for the sources)."""
    if class_names_file is not None:
        path = Path(class_names_file)
        if not path.is_file():
            raise FileNotFoundError(f"class names file not found: {path}")
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        while names and not names[-1]:  # a trailing blank line is not a class
            names.pop()
        if len(names) != len(class_dirs):
            raise ValueError(
                f"{path} has {len(names)} class names but there are {len(class_dirs)} class folders; "
                "it needs one name per line, in the sorted order of the folders"
            )
        if not all(names):
            raise ValueError(f"{path} has a blank line at line {names.index('') + 1}; every class needs a name")
        return tuple(names)
    wnids = [name for name in class_dirs if _WNID.match(name)]
    imagenet_size = 1000  # ImageNet-1K
    if wnids and len(class_dirs) == imagenet_size and len(wnids) == len(class_dirs):
        return captions.IMAGENET_CLASSNAMES
    if wnids:
        raise ValueError(
            f"{len(wnids)} of the {len(class_dirs)} class folders are named like WordNet ids ({wnids[0]}, ...) "
            f"but ImageNet-1K has {imagenet_size}; pass a class names file with one name per folder"
        )
    return tuple(name.replace("_", " ") for name in class_dirs)


def find_images(class_dir: Path) -> list[Path]:
    """Image files under ``class_dir`` at any depth, by extension, in sorted order."""
    found = []
    for folder, subfolders, files in os.walk(class_dir):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        found.extend(
            Path(folder) / name
            for name in sorted(files)
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS
        )
    return found


class ImageFolderDataset(Dataset):
    """``root/<class_dir>/<image>`` as (image ``[C, S, S]`` float in [0, 1], label) pairs.

    Each image is converted by ``to_rgb_or_gray``, its shorter side resized to ``image_size`` and its
    centre cropped. An image that fails to decode comes back as a ``SkippedImage``; load with
    ``DataLoader(dataset, collate_fn=collate_skipping_bad)``.
    """

    def __init__(
        self,
        root: str | Path,
        class_names_file: str | Path | None = None,
        *,
        image_size: int,
        channels: int = 3,
    ) -> None:
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
        self.root = Path(root)
        self.image_size = image_size
        self.channels = channels
        self.class_dirs = find_class_dirs(self.root)
        self.class_names = read_class_names(self.class_dirs, class_names_file)
        self.samples: list[tuple[str, int]] = [
            (str(path), label) for label, name in enumerate(self.class_dirs) for path in find_images(self.root / name)
        ]
        if not self.samples:
            raise ValueError(
                f"{self.root} has {len(self.class_dirs)} class folders but no image files in them "
                f"(looked for {', '.join(sorted(IMAGE_EXTENSIONS))}, any case)"
            )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int] | SkippedImage:  # image: [C, S, S]
        path, label = self.samples[index]
        try:
            image = Image.open(path)
        except _DECODE_ERRORS as error:
            return self._skipped(path, error)
        # Closing a PIL image frees its pixels, so everything that reads them happens inside the block.
        with image:
            try:
                image.load()  # Image.open only reads the header; the pixels are decoded here
                converted = to_rgb_or_gray(image, self.channels)
            except _DECODE_ERRORS as error:
                return self._skipped(path, error)
            return image_to_tensor(resize_and_center_crop(converted, self.image_size)), label

    def _skipped(self, path: str, error: Exception) -> SkippedImage:
        shape = (self.channels, self.image_size, self.image_size)
        return SkippedImage(path, f"{type(error).__name__}: {error}", shape)


def collate_skipping_bad(batch: list[tuple[Tensor, int] | SkippedImage]) -> ImageBatch:
    """Stack the decoded images of ``batch``, drop the ``SkippedImage`` records and name them.

    A batch in which every image failed comes out with zero images (``images`` of shape [0, C, S, S]).
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    good = [item for item in batch if not isinstance(item, SkippedImage)]
    skipped = tuple(item.path for item in batch if isinstance(item, SkippedImage))
    if good:
        images = torch.stack([image for image, _ in good])
    else:
        images = torch.zeros((0, *batch[0].shape))
    labels = torch.tensor([label for _, label in good], dtype=torch.int64)
    return ImageBatch(images, labels, skipped)
