"""An ImageNet-style folder, ``root/<class_dir>/<image>``: its classes, their names and its images.

This is the layout of ImageNet-1K's validation set once sorted into one folder per WordNet id (the
set behind the paper's zero-shot top-1 numbers, METHOD.md section 4), and of most small evaluation
sets. Labels are the positions of the class folders in sorted order. The class names used for the
zero-shot prompts come from, in turn:

1. ``class_names_file``: a text file with one name per line, in sorted-folder order (for ImageNet,
   the standard wnid order); its line count must equal the number of class folders;
2. open_clip's ``IMAGENET_CLASSNAMES`` when the root holds exactly 1000 folders named like WordNet ids
   (``n01440764``), which open_clip lists in that same sorted order;
3. otherwise the folder names, with underscores read as spaces. Folders that look like WordNet ids
   but are not 1000 are an error rather than names, since "n01440764" makes a useless prompt and a
   missing folder would shift every label after it.

Images are found by extension (case-insensitive) anywhere under a class folder; hidden files and
folders are ignored. The prepare stage (:mod:`gsclip_lib.stages.prepare`) writes the folder as
image-text shards, checking that every file decodes, so that it is fitted and scored like any split.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from gsclip_lib.data import captions
from gsclip_lib.data.image_decoding import IMAGE_EXTENSIONS
from gsclip_lib.errors import InputError

_WNID = re.compile(r"^n\d{8}$")
_FILE_SUFFIXES = frozenset(f".{extension}" for extension in IMAGE_EXTENSIONS)


def find_class_dirs(root: str | Path) -> list[str]:
    """The class folder names under ``root``, sorted (their positions are the labels)."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"image folder not found: {root}")
    class_dirs = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    if not class_dirs:
        raise InputError(f"{root} has no class folders; expected the layout {root}/<class>/<image files>")
    return class_dirs


def read_class_names(class_dirs: list[str], class_names_file: str | Path | None) -> tuple[str, ...]:
    """The class name of each folder in ``class_dirs`` (see the module docstring for the sources)."""
    if class_names_file is not None:
        path = Path(class_names_file)
        if not path.is_file():
            raise InputError(f"class names file not found: {path}")
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
            if not name.startswith(".") and Path(name).suffix.lower() in _FILE_SUFFIXES
        )
    return found
