"""Captions for training on labelled images, and zero-shot prompt templates for evaluation.

The paper trains on DataComp's web captions (METHOD.md section 3); this project's small offline runs
train on Fashion-MNIST, which has labels but no captions, so each training image gets a caption made
from its class name and one of ``TRAINING_CAPTION_TEMPLATES``, drawn from a seed.

Zero-shot evaluation follows CLIP (Radford et al. 2021, section 3.1.4): a classifier is built from
the mean text embedding of several prompts per class, through ``open_clip.build_zero_shot_classifier``,
which takes format strings (``template.format(class_name)``) or callables. For Fashion-MNIST the
prompts here are written for it and are kept apart from the training captions, so a model is never
scored on sentences it was trained on. For ImageNet-1K the class names and the 80 prompts are
open_clip's own (the ones from OpenAI's CLIP notebook), re-exported rather than copied.
"""

from __future__ import annotations

from collections.abc import Sequence

from typing import Any

import numpy as np


def __getattr__(name: str) -> Any:
    """open_clip's ImageNet lists, imported on first use: importing open_clip costs seconds, which
    every data stage would otherwise pay at start-up for lists only the ImageNet paths read.

    ``IMAGENET_CLASSNAMES``: ImageNet-1K in the standard (sorted WordNet id) label order, a tuple.
    ``OPENAI_IMAGENET_TEMPLATES``: OpenAI's 80 prompt callables.
    """
    if name == "IMAGENET_CLASSNAMES":
        import open_clip

        return tuple(open_clip.IMAGENET_CLASSNAMES)
    if name == "OPENAI_IMAGENET_TEMPLATES":
        import open_clip

        return open_clip.OPENAI_IMAGENET_TEMPLATES
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

# Training captions. "{}" stands for the class name with its indefinite article ("a t-shirt",
# "an ankle boot"), so every caption is grammatical; fill them through caption_for.
TRAINING_CAPTION_TEMPLATES = (
    "a photo of {}.",
    "a black and white photo of {}.",
    "a low resolution photo of {}.",
    "a product photo of {}.",
    "a centered photo of {}.",
    "a small grayscale picture of {}.",
    "a catalogue image of {}.",
    "{} on a plain dark background.",
)

# Zero-shot prompts for Fashion-MNIST, format strings for open_clip.build_zero_shot_classifier. They
# use "the"/"my" where the training captions use "a"/"an", and other wordings, so that no prompt equals
# a training caption (tests/data/test_captions.py checks this for every class).
FASHION_MNIST_EVAL_TEMPLATES = (
    "a photo of the {}.",
    "a bad photo of the {}.",
    "a grayscale photo of the {}.",
    "a close-up photo of the {}.",
    "a cropped photo of the {}.",
    "a pixelated photo of the {}.",
    "a photo of my {}.",
    "itap of the {}.",
    "a photo of the {}, a fashion product.",
    "a blurry photo of the {}.",
)


def with_article(class_name: str) -> str:
    """``class_name`` behind "a" or "an" by its first letter ("an ankle boot", "a t-shirt")."""
    if not class_name or not class_name.strip():
        raise ValueError("class name must be a non-empty string")
    return f"{'an' if class_name.lstrip()[0].lower() in 'aeiou' else 'a'} {class_name}"


def caption_for(class_name: str, choice: int | np.random.Generator) -> str:
    """A training caption for ``class_name``.

    ``choice`` is either a template index (taken modulo the number of templates, so a sample's index
    works) or a numpy ``Generator``, from which one template is drawn; a generator seeded the same way
    gives the same sequence of captions.
    """
    if isinstance(choice, np.random.Generator):
        index = int(choice.integers(len(TRAINING_CAPTION_TEMPLATES)))
    elif isinstance(choice, (int, np.integer)) and not isinstance(choice, bool):
        index = int(choice) % len(TRAINING_CAPTION_TEMPLATES)
    else:
        raise ValueError(f"choice must be a template index or a numpy Generator, got {choice!r}")
    return TRAINING_CAPTION_TEMPLATES[index].format(with_article(class_name))


def captions_for_labels(
    labels: Sequence[int] | np.ndarray, class_names: Sequence[str], seed: int  # labels: [N]
) -> list[str]:  # [N]
    """One training caption per label, templates drawn from ``seed``: the same seed, the same captions."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise ValueError(f"labels must lie in 0..{len(class_names) - 1}, got {labels.min()}..{labels.max()}")
    rng = np.random.default_rng(seed)
    choices = rng.integers(len(TRAINING_CAPTION_TEMPLATES), size=len(labels))
    return [caption_for(class_names[label], int(index)) for label, index in zip(labels, choices)]
