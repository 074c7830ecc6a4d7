"""The data stages of the pipeline: prepare image-text shards, fit splats, prune to each level.

- ``prepare`` writes Fashion-MNIST (Debian's ``dataset-fashion-mnist``) as webdataset shards in
  DataComp's layout (``key.png``, ``key.txt``, ``key.json``), a seeded class-balanced subset per
  split, with captions drawn from several templates per class. A researcher points
  ``fit.train_shards`` at DataComp shards instead. When ``data.imagenet_dir`` names an ImageNet-style
  folder, its images are written as ``imagenet-*.tar`` shards too (file bytes kept as they are, bad
  files skipped and counted), with its class names beside them, so that the evaluation folder is
  fitted, pruned and scored exactly like the other splits.
- ``fit`` fits every image of every split once, at the largest splat count (PAPER.md section 1), into
  splat shards (``key.gs``, ``key.txt``, ``key.json``); shards already complete are skipped, so a
  killed fit resumes where it stopped, and ranks under ``torchrun`` take disjoint shards. A split
  folder is emptied first when the fit settings or its input shards changed since it was written.
- ``prune`` derives each smaller level from the largest by luminance pruning, as the paper does.

Each stage returns a plain dict for its metrics JSON, including the counts of skipped samples.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from gsclip_lib import distributed
from gsclip_lib.captions import captions_for_labels
from gsclip_lib.config import config_to_dict
from gsclip_lib.codec import compression_ratio, decode_batch, encode_splats, payload_bytes, source_bytes
from gsclip_lib.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist, subset_indices
from gsclip_lib.fit import FitSettings
from gsclip_lib.image_folder import find_class_dirs, find_images, read_class_names
from gsclip_lib.progress import progress_bar
from gsclip_lib.reporting import write_json, write_text_atomic
from gsclip_lib.shards import (
    EncodedImage,
    ImageTextShards,
    SkipCounts,
    SkipSample,
    decode_image,
    expand_shard_spec,
    write_image_text_shards,
)
from gsclip_lib.splat_shards import fit_shards_to_splats, prune_splat_shards, splat_dataset
from gsclip_lib.splats import Splats

logger = logging.getLogger(__name__)

IMAGENET_SPLIT = "imagenet"  # the split name of the ImageNet-style evaluation folder


@dataclass(frozen=True)
class DataConfig:
    """The ``data`` group of params.yaml: the embedded Fashion-MNIST default."""

    fashion_mnist_dir: str = "/usr/share/datasets/fashion-mnist"  # the four idx .gz files
    shards_dir: str = "data/shards"  # image-text shards written here
    train_size: int = 6000  # training images (class-balanced subset of the 60,000)
    eval_size: int = 1000  # evaluation images (class-balanced subset of the 10,000 test images)
    images_per_shard: int = 1000
    seed: int = 0  # same seed, same subset and captions
    imagenet_dir: str = ""  # an ImageNet-style folder root/<class>/<images>, a second evaluation set
    imagenet_class_names: str = ""  # one name per class folder; empty: open_clip's for 1000 wnid folders

    def __post_init__(self) -> None:
        for name in ("train_size", "eval_size", "images_per_shard"):
            if getattr(self, name) <= 0:
                raise ValueError(f"data.{name} must be positive, got {getattr(self, name)}")
        if self.imagenet_class_names and not self.imagenet_dir:
            raise ValueError("data.imagenet_class_names is set but data.imagenet_dir is empty")

    def shard_pattern(self, split: str) -> str:
        return str(Path(self.shards_dir) / f"{split}-%06d.tar")

    def imagenet_shards(self) -> str:
        """The shard spec of the ImageNet-style folder, once ``prepare`` has written it."""
        return str(Path(self.shards_dir) / f"{IMAGENET_SPLIT}-*.tar")

    def imagenet_classes_file(self) -> Path:
        """Written by ``prepare`` beside the folder's shards: its class names, in label order."""
        return Path(self.shards_dir) / f"{IMAGENET_SPLIT}-classes.json"


@dataclass(frozen=True)
class FitStageConfig:
    """The ``fit`` group of params.yaml: images to splats at the largest level."""

    train_shards: str = "data/shards/train-*.tar"  # any shard spec; DataComp works
    eval_shards: str = "data/shards/eval-*.tar"  # empty: no such split (e.g. only the ImageNet folder)
    out_dir: str = "data/splats"  # level folders N<count>/ are created inside
    num_splats: int = 22  # the largest level; smaller levels come from pruning
    image_size: int = 28  # images are resized / centre-cropped to this square
    channels: int = 1  # 1 for grayscale, 3 for RGB
    resize_mode: str = "center_crop"  # center_crop | resize
    batch_size: int = 1024  # images fitted together, one optimizer
    optimizer: FitSettings = field(default_factory=FitSettings)

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"fit.channels must be 1 or 3, got {self.channels}")
        if self.resize_mode not in ("center_crop", "resize"):
            raise ValueError(f"fit.resize_mode must be center_crop or resize, got {self.resize_mode!r}")
        if self.num_splats <= 0 or self.batch_size <= 0 or self.image_size <= 0:
            raise ValueError("fit.num_splats, fit.batch_size and fit.image_size must be positive")

    def level_dir(self, count: int, split: str) -> Path:
        """Where the splat shards of one level and split live: ``out_dir/N<count>/<split>``."""
        return Path(self.out_dir) / f"N{count}" / split


@dataclass(frozen=True)
class PruneStageConfig:
    """The ``prune`` group of params.yaml: the smaller levels, derived from the fitted one."""

    levels: tuple[int, ...] = (11, 6, 3)  # splat counts below fit.num_splats
    finetune_iterations: int = 0  # fine-tune the survivors against the images (0: none)

    def __post_init__(self) -> None:
        if any(level <= 0 for level in self.levels):
            raise ValueError(f"prune.levels must be positive, got {self.levels}")
        if self.finetune_iterations < 0:
            raise ValueError("prune.finetune_iterations must be >= 0")


def prepare_data(config: DataConfig, *, progress: bool = True) -> dict:
    """The ``prepare`` stage: Fashion-MNIST's shards, then the ImageNet-style folder's if configured."""
    started = time.perf_counter()
    metrics = prepare_fashion_mnist(config, progress=progress)
    classes_file = config.imagenet_classes_file()
    for old in [*Path(config.shards_dir).glob(f"{IMAGENET_SPLIT}-*.tar"), classes_file]:
        old.unlink(missing_ok=True)  # a folder no longer configured must not linger as a split
    if config.imagenet_dir:
        metrics["splits"][IMAGENET_SPLIT] = prepare_image_folder(config, progress=progress)
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    return metrics


def prepare_image_folder(config: DataConfig, *, progress: bool = True) -> dict:
    """Write ``config.imagenet_dir`` as ``imagenet-*.tar`` image-text shards; return its metrics.

    Every file is decoded once to check it; one that does not decode is skipped, counted by reason
    and logged. The file bytes go into the shard unchanged. The caption of an image is
    "a photo of a {class name}." and its ``.json`` holds the label, the class name and the path.
    The class names, in label order, are written to ``imagenet-classes.json``.
    """
    root = Path(config.imagenet_dir)
    class_dirs = find_class_dirs(root)
    class_names = read_class_names(class_dirs, config.imagenet_class_names or None)
    files = [(path, label) for label, name in enumerate(class_dirs) for path in find_images(root / name)]
    if not files:
        raise ValueError(f"{root} has {len(class_dirs)} class folders but no image files in them")
    skips = SkipCounts()
    per_class = [0] * len(class_names)

    def samples():
        for index, (path, label) in enumerate(progress_bar(files, desc="imagenet folder", disable=not progress)):
            data = path.read_bytes()
            try:
                decode_image(data, channels=3, image_size=None, resize_mode="center_crop")
            except SkipSample as skip:
                skips.count(skip.reason)
                logger.warning("skipping %s: %s", path, skip)
                continue
            skips.good += 1
            per_class[label] += 1
            metadata = {"label": label, "class_name": class_names[label], "source": str(path.relative_to(root))}
            extension = path.suffix.lower().lstrip(".")
            yield f"{IMAGENET_SPLIT}{index:07d}", EncodedImage(data, extension), f"a photo of a {class_names[label]}.", metadata

    shards = write_image_text_shards(samples(), config.shard_pattern(IMAGENET_SPLIT), config.images_per_shard)
    if not shards:
        raise ValueError(f"no image under {root} could be decoded ({skips.skipped} skipped)")
    write_json(config.imagenet_classes_file(), {"root": str(root), "class_names": list(class_names)})
    return {
        "images": skips.good,
        "shards": len(shards),
        "classes": len(class_names),
        "per_class": per_class,
        "skipped": skips.as_dict(),
    }


def imagenet_class_names(config: DataConfig) -> tuple[str, ...]:
    """The class names ``prepare`` stored for the ImageNet-style folder, in label order."""
    path = config.imagenet_classes_file()
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the prepare stage with data.imagenet_dir set")
    return tuple(json.loads(path.read_text())["class_names"])


def splat_splits(fit: FitStageConfig, data: DataConfig) -> dict[str, str]:
    """Every split the fit stage fits, by name, with its image shard spec.

    ``train`` (what the splat towers learn from), ``eval`` (the labelled evaluation shards, unless
    ``fit.eval_shards`` is empty) and ``imagenet`` when ``data.imagenet_dir`` is set.
    """
    splits = {"train": fit.train_shards}
    if fit.eval_shards:
        splits["eval"] = fit.eval_shards
    if data.imagenet_dir:
        splits[IMAGENET_SPLIT] = data.imagenet_shards()
    return splits


def prepare_fashion_mnist(config: DataConfig, *, progress: bool = True) -> dict:
    """Write the train and eval subsets as image-text shards; return the stage's metrics."""
    started = time.perf_counter()
    metrics: dict = {"splits": {}}
    sources = {"train": ("train", config.train_size), "eval": ("test", config.eval_size)}
    for split, (source_split, size) in sources.items():
        images, labels = load_fashion_mnist(config.fashion_mnist_dir, source_split)
        chosen = subset_indices(len(labels), size, config.seed, labels=labels)
        captions = captions_for_labels(labels[chosen], FASHION_MNIST_CLASSES, config.seed)
        for old in Path(config.shards_dir).glob(f"{split}-*.tar"):
            old.unlink()  # a smaller subset must not leave stale shards behind
        samples = (
            (
                f"{split}{int(index):06d}",
                images[index],
                caption,
                {"label": int(labels[index]), "class_name": FASHION_MNIST_CLASSES[int(labels[index])],
                 "source": f"fashion-mnist/{source_split}/{int(index)}"},
            )
            for index, caption in zip(chosen, captions)
        )
        shards = write_image_text_shards(samples, config.shard_pattern(split), config.images_per_shard)
        # Read everything back: the counts prove the shards decode, and reach the metrics.
        reader = ImageTextShards(shards)
        read_labels = [sample.label for sample in reader]
        metrics["splits"][split] = {
            "images": len(read_labels),
            "shards": len(shards),
            "per_class": np.bincount(read_labels, minlength=len(FASHION_MNIST_CLASSES)).tolist(),
            "skipped": reader.skip_counts.as_dict(),
        }
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    return metrics


def _level_metrics(stats, count: int, config: FitStageConfig) -> dict:
    payload = payload_bytes(count, config.channels)
    source = source_bytes(config.image_size, config.image_size, config.channels)
    return {
        "splats": count,
        "images": stats.images,
        "mean_psnr": stats.mean_psnr,
        "payload_bytes": payload,
        "ratio_payload": round(compression_ratio(source, payload), 4),
        "record_bytes_mean": stats.record_bytes / max(stats.images, 1),
        "seconds": round(stats.seconds, 2),
        "images_per_second": round(stats.images / stats.fit_seconds, 2) if stats.fit_seconds else None,
        "shards_written": stats.shards_written,
        "shards_skipped": stats.shards_skipped,
        "dropped_fits": stats.dropped_fits,
        "skipped": stats.skip_counts.as_dict(),
    }


def input_signature(spec: str) -> list[list]:
    """What identifies a split's input shards: each path with its size and modification time.

    A shard that is not a local file (a URL, ``pipe:``) is identified by its name alone.
    """
    signature = []
    for url in expand_shard_spec(spec):
        if os.path.isfile(url):
            info = os.stat(url)
            signature.append([url, info.st_size, info.st_mtime_ns])
        else:
            signature.append([url])
    return signature


def reset_if_changed(folder: Path, fingerprint: dict) -> bool:
    """Empty ``folder`` unless it was written under the same ``fingerprint``; return whether it was kept.

    Finished shards are skipped on a rerun so that an interrupted fit resumes, but only shards
    made from the same inputs with the same settings may be kept: a folder records what it was made
    from in ``config.json``. Under ``torchrun`` rank 0 decides and the other ranks wait for it.
    """
    record = folder / "config.json"
    wanted = json.dumps(fingerprint, sort_keys=True)
    kept = record.is_file() and record.read_text() == wanted
    if distributed.is_main() and not kept:
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        write_text_atomic(record, wanted)
    distributed.barrier()
    return kept


def fit_splat_level(config: FitStageConfig, data: DataConfig, *, progress: bool = True) -> dict:
    """Fit every split of :func:`splat_splits` at ``config.num_splats``; return the stage's metrics.

    Resumes an interrupted fit made from the same inputs with the same config; a split whose inputs
    or settings changed starts afresh. A level folder left over from a split no longer fitted is removed.
    """
    level_root = Path(config.out_dir) / f"N{config.num_splats}"
    splits = splat_splits(config, data)
    if distributed.is_main() and level_root.is_dir():
        for entry in level_root.iterdir():
            if entry.name not in splits:  # e.g. the config.json of the whole level, written before
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    metrics: dict = {"resumed": {}}
    for split, spec in splits.items():
        fingerprint = {"fit": config_to_dict(config), "inputs": input_signature(spec)}
        metrics["resumed"][split] = reset_if_changed(config.level_dir(config.num_splats, split), fingerprint)
        stats = fit_shards_to_splats(
            spec,
            config.level_dir(config.num_splats, split),
            config.num_splats,
            config.optimizer,
            config.batch_size,
            image_size=config.image_size,
            resize_mode=config.resize_mode,
            channels=config.channels,
            progress=progress,
        )
        metrics[split] = _level_metrics(stats, config.num_splats, config)
    return metrics



def prune_splat_level(
    fit: FitStageConfig, prune: PruneStageConfig, data: DataConfig, count: int, *, progress: bool = True
) -> dict:
    """Derive the ``count`` level of every split from the fitted level; return the stage's metrics."""
    if count >= fit.num_splats:
        raise ValueError(f"prune level {count} must be below fit.num_splats = {fit.num_splats}")
    metrics = {}
    for split, spec in splat_splits(fit, data).items():
        stats = prune_splat_shards(
            str(fit.level_dir(fit.num_splats, split)),
            fit.level_dir(count, split),
            count,
            finetune_iterations=prune.finetune_iterations,
            fit_settings=fit.optimizer,
            images_for_finetune=spec if prune.finetune_iterations else None,
            batch_size=fit.batch_size,
            progress=progress,
        )
        metrics[split] = _level_metrics(stats, count, fit)
    return metrics


def skipped_total(metrics: dict) -> int:
    """All samples skipped anywhere in a stage's metrics."""
    total = 0
    for value in metrics.values():
        if isinstance(value, dict):
            total += sum(v for k, v in value.get("skipped", {}).items() if k != "good") + skipped_total(value)
    return total



@dataclass
class LevelExamples:
    keys: list[str]
    images: Tensor  # [k, C, S, S] the source images
    splats: dict[int, Splats]  # splat count -> the same k images' splats
    captions: list[str]


def load_level_examples(
    config: FitStageConfig, counts: list[int], split: str = "eval", count: int = 6, image_shards: str | None = None
) -> LevelExamples:
    """The first ``count`` images of a split with their splats at each level, matched by key.

    ``image_shards`` is the split's image shard spec (default: ``fit.train_shards`` or ``fit.eval_shards``).
    """
    wanted: dict[int, dict[str, Splats]] = {}
    keys: list[str] = []
    captions: list[str] = []
    for level in counts:
        samples = list(itertools.islice(splat_dataset(str(config.level_dir(level, split))), count))
        if not keys:
            keys = [sample.key for sample in samples]
            captions = [sample.caption for sample in samples]
        wanted[level] = {sample.key: sample.splats for sample in samples}
    spec = image_shards or (config.train_shards if split == "train" else config.eval_shards)
    reader = ImageTextShards(
        spec, image_size=config.image_size, resize_mode=config.resize_mode, channels=config.channels
    )
    found: dict[str, Tensor] = {}
    for sample in reader:
        if sample.key in keys:
            found[sample.key] = sample.image
        if len(found) == len(keys):
            break
    keys = [key for key in keys if key in found and all(key in wanted[level] for level in counts)]
    images = torch.stack([found[key] for key in keys])
    splats = {}
    for level in counts:
        records = [encode_splats(wanted[level][key], 0, config.image_size, config.image_size) for key in keys]
        splats[level], _, _ = decode_batch(records)
    return LevelExamples(keys=keys, images=images, splats=splats, captions=captions[: len(keys)])
