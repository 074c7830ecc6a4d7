"""The classes a zero-shot classifier chooses among, and the prompts that name them.

``evaluate.eval_classes`` (and any caller that classifies) names a source: ``fashion_mnist`` (its
ten names with this project's CLIP-style evaluation prompts), ``imagenet`` (open_clip's ImageNet-1K
names and OpenAI's templates) or a text file with one name per line, in label order. An
ImageNet-style folder's names are those the prepare stage stored beside its shards, in label order
(:func:`save_folder_class_names`, :func:`folder_class_names`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from gsclip_lib.atomic_files import write_json
from gsclip_lib.data.captions import FASHION_MNIST_EVAL_TEMPLATES, IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
from gsclip_lib.data.fashion_mnist import FASHION_MNIST_CLASSES
from gsclip_lib.errors import InputError

CLASS_SOURCES = ("fashion_mnist", "imagenet")  # the named sources; anything else is a file


def class_names_and_templates(source: str) -> tuple[tuple[str, ...], tuple[Any, ...]]:
    """Class names (label order) and prompt templates for ``source`` (see the module docstring)."""
    if source == "fashion_mnist":
        return tuple(FASHION_MNIST_CLASSES), tuple(FASHION_MNIST_EVAL_TEMPLATES)
    if source == "imagenet":
        return tuple(IMAGENET_CLASSNAMES), tuple(OPENAI_IMAGENET_TEMPLATES)
    path = Path(source)
    if not path.is_file():
        raise InputError(f"the classes {source!r} are neither {' nor '.join(CLASS_SOURCES)} nor an existing file")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    while names and not names[-1]:
        names.pop()
    if not names or not all(names):
        raise InputError(f"{path} must hold one class name per line, without blank lines")
    return tuple(names), tuple(OPENAI_IMAGENET_TEMPLATES)


def save_folder_class_names(path: Path, root: Path, class_names: Sequence[str]) -> None:
    """Record an image folder's class names, in label order (the prepare stage)."""
    write_json(path, {"root": str(root), "class_names": list(class_names)})


def folder_class_names(path: Path) -> tuple[str, ...]:
    """The class names :func:`save_folder_class_names` stored, in label order."""
    if not path.is_file():
        raise InputError(f"{path} is missing: run the prepare stage with data.imagenet_dir set")
    return tuple(json.loads(path.read_text())["class_names"])
