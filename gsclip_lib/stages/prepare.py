"""Stage ``prepare``: the image-text shards every later stage reads (METHOD.md section 3, "Data").

- Fashion-MNIST (Debian's ``dataset-fashion-mnist``) as webdataset shards in DataComp's layout
  (``key.png``, ``key.txt``, ``key.json``): a seeded, class-balanced subset per split, each image
  with a caption drawn from several templates of its class. Written only for the splits that read
  the prepared shards (``data.train_shards`` / ``data.eval_shards`` empty); a researcher points them
  at DataComp shards instead.
- When ``data.imagenet_dir`` names an ImageNet-style folder, its images become ``imagenet-*.tar``
  shards too (file bytes kept as they are, bad files skipped and counted), with its class names
  beside them, so that the evaluation folder is fitted, pruned and scored exactly like the other
  splits.

The metrics count every split's images per class and every sample skipped, by reason.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import numpy as np

from gsclip_lib.data.captions import captions_for_labels
from gsclip_lib.data.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist, subset_indices
from gsclip_lib.data.image_folder import find_class_dirs, find_images, read_class_names
from gsclip_lib.data.image_text_shards import (
    EncodedImage,
    ImageTextShards,
    decode_image,
    write_image_text_shards,
)
from gsclip_lib.data.skip_counts import SkipCounts, SkipSample
from gsclip_lib.errors import InputError
from gsclip_lib.evaluation.class_prompts import save_folder_class_names
from gsclip_lib.params import IMAGENET_SPLIT, DataConfig, Params
from gsclip_lib.pipeline.runner import StageResult
from gsclip_lib.progress import progress_bar

logger = logging.getLogger(__name__)

# Fashion-MNIST's source split behind each of our splits.
FASHION_MNIST_SPLITS = {"train": "train", "eval": "test"}


def run(params: Params, *, progress: bool = True) -> StageResult:
    """The ``prepare`` stage: Fashion-MNIST's shards, then the ImageNet-style folder's if configured."""
    data = params.data
    metrics: dict = {"splits": {}}
    wanted = [split for split, spec in (("train", data.train_shards), ("eval", data.eval_shards)) if spec == ""]
    for split in FASHION_MNIST_SPLITS:
        for old in Path(data.shards_dir).glob(f"{split}-*.tar"):
            old.unlink()  # a smaller subset, or a split no longer prepared, must not leave stale shards
    for split in wanted:
        metrics["splits"][split] = prepare_fashion_mnist_split(data, split)
    classes_file = data.imagenet_classes_file()
    for old in [*Path(data.shards_dir).glob(f"{IMAGENET_SPLIT}-*.tar"), classes_file]:
        old.unlink(missing_ok=True)  # a folder no longer configured must not linger as a split
    if data.imagenet_dir:
        metrics["splits"][IMAGENET_SPLIT] = prepare_image_folder(data, progress=progress)
    return StageResult(metrics=metrics)


def prepare_fashion_mnist_split(data: DataConfig, split: str) -> dict:
    """Write one split's class-balanced subset as image-text shards; read it back; its metrics."""
    source_split = FASHION_MNIST_SPLITS[split]
    size = data.train_size if split == "train" else data.eval_size
    images, labels = load_fashion_mnist(data.fashion_mnist_dir, source_split)
    chosen = subset_indices(len(labels), size, data.seed, labels=labels)
    captions = captions_for_labels(labels[chosen], FASHION_MNIST_CLASSES, data.seed)
    samples = (
        (
            f"{split}{int(index):06d}",
            images[index],
            caption,
            {
                "label": int(labels[index]),
                "class_name": FASHION_MNIST_CLASSES[int(labels[index])],
                "source": f"fashion-mnist/{source_split}/{int(index)}",
            },
        )
        for index, caption in zip(chosen, captions)
    )
    shards = write_image_text_shards(samples, data.shard_pattern(split), data.images_per_shard)
    # Read everything back: the counts prove the shards decode, and reach the metrics.
    reader = ImageTextShards(shards, rank=0, world_size=1)
    read_labels = [sample.label for sample in reader]
    return {
        "images": len(read_labels),
        "shards": len(shards),
        "per_class": np.bincount(read_labels, minlength=len(FASHION_MNIST_CLASSES)).tolist(),
        "skipped": reader.skip_counts.as_dict(),
    }


class FolderSamples:
    """The image-text samples of an ImageNet-style folder's ``files``, each file decoded once to check
    it (one that does not decode is skipped, counted by reason and logged); the counts fill as the
    samples are read."""

    def __init__(self, root: Path, files: list[tuple[Path, int]], class_names: list[str], *, progress: bool) -> None:
        self.root, self.files, self.class_names, self.progress = root, files, class_names, progress
        self.skips = SkipCounts()
        self.per_class = [0] * len(class_names)

    def __iter__(self) -> Iterator[tuple[str, EncodedImage, str, dict]]:
        for index, (path, label) in enumerate(progress_bar(self.files, desc="imagenet folder",
                                                           disable=not self.progress)):
            encoded = path.read_bytes()
            try:
                decode_image(encoded, channels=3, image_size=None, resize_mode="center_crop")
            except SkipSample as skip:
                self.skips.count(skip.reason)
                logger.warning("skipping %s: %s", path, skip)
                continue
            self.skips.good += 1
            self.per_class[label] += 1
            name = self.class_names[label]
            metadata = {"label": label, "class_name": name, "source": str(path.relative_to(self.root))}
            extension = path.suffix.lower().lstrip(".")
            yield f"{IMAGENET_SPLIT}{index:07d}", EncodedImage(encoded, extension), f"a photo of a {name}.", metadata


def prepare_image_folder(data: DataConfig, *, progress: bool = True) -> dict:
    """Write ``data.imagenet_dir`` as ``imagenet-*.tar`` image-text shards; return its metrics.

    Every file is decoded once to check it; one that does not decode is skipped, counted by reason
    and logged. The file bytes go into the shard unchanged. The caption of an image is
    "a photo of a {class name}." and its ``.json`` holds the label, the class name and the path.
    The class names, in label order, are written to ``imagenet-classes.json``.
    """
    root = Path(data.imagenet_dir)
    class_dirs = find_class_dirs(root)
    class_names = read_class_names(class_dirs, data.imagenet_class_names or None)
    files = [(path, label) for label, name in enumerate(class_dirs) for path in find_images(root / name)]
    if not files:
        raise InputError(f"{root} has {len(class_dirs)} class folders but no image files in them")
    samples = FolderSamples(root, files, list(class_names), progress=progress)
    shards = write_image_text_shards(iter(samples), data.shard_pattern(IMAGENET_SPLIT), data.images_per_shard)
    skips, per_class = samples.skips, samples.per_class
    if not shards:
        raise InputError(f"no image under {root} could be decoded ({skips.skipped} skipped)")
    save_folder_class_names(data.imagenet_classes_file(), root, class_names)
    return {
        "images": skips.good,
        "shards": len(shards),
        "classes": len(class_names),
        "per_class": per_class,
        "skipped": skips.as_dict(),
    }
