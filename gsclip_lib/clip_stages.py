"""The model stages of the pipeline: pretrain the RGB CLIP, align a splat tower per level, evaluate.

- ``pretrain`` trains the RGB CLIP (teacher and baseline) on the image-text shards, or exports the
  weights a user named (an open_clip pretrained tag or a local checkpoint) with ``epochs: 0``.
- ``align@N`` distils, then contrastively aligns, a splat image tower for one compression level
  (PAPER.md sections 2 and 3).
- ``evaluate`` scores zero-shot top-1 / top-5 for the RGB model, every splat level and the
  matched-bytes baselines (JPEG and thumbnail at each level's byte budget) on every evaluation set:
  the labelled evaluation shards (Fashion-MNIST's test split by default) and, when configured, an
  ImageNet-style folder, whose images the fit and prune stages turned into splats like any split. It
  also reports tokens and attention FLOPs (PAPER.md section 4).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from gsclip_lib.alignment import AlignConfig, align_level, load_splat_clip
from gsclip_lib.byte_baselines import evaluate_matched_bytes, splat_level_budgets
from gsclip_lib.captions import FASHION_MNIST_EVAL_TEMPLATES, IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
from gsclip_lib.clip_models import RgbModelConfig, create_rgb_clip, save_rgb_clip
from gsclip_lib.codec import compression_ratio, payload_bytes, record_bytes, source_bytes
from gsclip_lib.data_stages import IMAGENET_SPLIT, DataConfig, FitStageConfig, PruneStageConfig, imagenet_class_names
from gsclip_lib.fashion_mnist import FASHION_MNIST_CLASSES
from gsclip_lib.progress import progress_bar
from gsclip_lib.rgb_pretrain import PretrainConfig, pretrain_rgb
from gsclip_lib.splat_encoder import SplatEncoderConfig
from gsclip_lib.token_budget import token_report
from gsclip_lib.training import OptimConfig
from gsclip_lib.zero_shot import (
    build_classifier,
    evaluate_zero_shot,
    image_shard_batches,
    splat_shard_batches,
)


def _distill_default() -> OptimConfig:
    return OptimConfig(epochs=2, batch_size=256, lr=1e-3, weight_decay=0.05, warmup_steps=20)


def _contrastive_default() -> OptimConfig:
    return OptimConfig(epochs=5, batch_size=256, lr=5e-4, weight_decay=0.05, warmup_steps=20)


@dataclass(frozen=True)
class AlignStageConfig:
    """The ``align`` group of params.yaml: the splat tower and its two training stages."""

    encoder: SplatEncoderConfig = field(default_factory=SplatEncoderConfig)
    distill: OptimConfig = field(default_factory=_distill_default)  # stage 1 (paper: 2 epochs)
    contrastive: OptimConfig = field(default_factory=_contrastive_default)  # stage 2 (paper: 5)
    unfreeze_text_last_block: bool = False
    cache_text_embeddings: bool = True
    checkpoint_dir: str = "data/models/align"

    def training(self) -> AlignConfig:
        return AlignConfig(
            distill=self.distill,
            contrastive=self.contrastive,
            unfreeze_text_last_block=self.unfreeze_text_last_block,
            cache_text_embeddings=self.cache_text_embeddings,
            checkpoint_dir=self.checkpoint_dir,
        )

    def tower_path(self, level: int) -> Path:
        return Path(self.checkpoint_dir) / f"N{level}" / "splat_encoder.pt"


EVAL_CLASS_SOURCES = ("fashion_mnist", "imagenet")


@dataclass(frozen=True)
class EvaluateConfig:
    """The ``evaluate`` group of params.yaml.

    The evaluation sets are the splits the fit stage fitted: ``fit.eval_shards`` (labelled image
    shards; their class names come from ``eval_classes``) and, when ``data.imagenet_dir`` is set, the
    ImageNet-style folder (its names from the prepare stage, with open_clip's OpenAI templates).
    """

    eval_classes: str = "fashion_mnist"  # names of fit.eval_shards' labels: fashion_mnist | imagenet | a text file
    batch_size: int = 256
    accounting: str = "payload"  # byte budget per level: payload (the paper's) | record (with header)
    baselines: tuple[str, ...] = ("jpeg", "thumbnail")  # matched-bytes baselines on the RGB model

    def __post_init__(self) -> None:
        if self.accounting not in ("payload", "record"):
            raise ValueError(f"evaluate.accounting must be payload or record, got {self.accounting!r}")
        unknown = set(self.baselines) - {"jpeg", "thumbnail"}
        if unknown:
            raise ValueError(f"unknown evaluate.baselines {sorted(unknown)}; use jpeg and thumbnail")
        if self.batch_size <= 0:
            raise ValueError(f"evaluate.batch_size must be positive, got {self.batch_size}")


@dataclass(frozen=True)
class EvalSet:
    """One evaluation set: a split of the fit stage, its image shards and its zero-shot prompts."""

    split: str  # the split name under fit.level_dir(level, split): eval | imagenet
    image_shards: str
    class_names: tuple[str, ...]
    templates: tuple[Any, ...]


def class_names_and_templates(source: str) -> tuple[tuple[str, ...], tuple[Any, ...]]:
    """Class names and prompt templates for ``evaluate.eval_classes``.

    ``fashion_mnist``: its ten names with this project's CLIP-style evaluation prompts; ``imagenet``:
    open_clip's ImageNet-1K names and OpenAI templates; otherwise a text file with one name per line
    (label order), used with the OpenAI templates.
    """
    if source == "fashion_mnist":
        return tuple(FASHION_MNIST_CLASSES), tuple(FASHION_MNIST_EVAL_TEMPLATES)
    if source == "imagenet":
        return tuple(IMAGENET_CLASSNAMES), tuple(OPENAI_IMAGENET_TEMPLATES)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(
            f"evaluate.eval_classes is {source!r}: neither {' nor '.join(EVAL_CLASS_SOURCES)} nor an existing file"
        )
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    while names and not names[-1]:
        names.pop()
    if not names or not all(names):
        raise ValueError(f"{path} must hold one class name per line, without blank lines")
    return tuple(names), tuple(OPENAI_IMAGENET_TEMPLATES)


def evaluation_sets(data: DataConfig, fit: FitStageConfig, evaluate: EvaluateConfig) -> list[EvalSet]:
    """The evaluation sets of a run, in report order (see :class:`EvaluateConfig`)."""
    sets = []
    if fit.eval_shards:
        names, templates = class_names_and_templates(evaluate.eval_classes)
        sets.append(EvalSet("eval", fit.eval_shards, names, templates))
    if data.imagenet_dir:
        sets.append(
            EvalSet(IMAGENET_SPLIT, data.imagenet_shards(), imagenet_class_names(data), tuple(OPENAI_IMAGENET_TEMPLATES))
        )
    if not sets:
        raise ValueError("nothing to evaluate: fit.eval_shards and data.imagenet_dir are both empty")
    return sets


def trained_rgb_config(model: RgbModelConfig, pretrain: PretrainConfig) -> RgbModelConfig:
    """The RGB model the later stages use: the one the pretrain stage saved."""
    return replace(model, checkpoint=str(Path(pretrain.checkpoint_dir) / "model.pt"), pretrained="")


def all_levels(fit: FitStageConfig, prune: PruneStageConfig) -> list[int]:
    return [fit.num_splats, *sorted(prune.levels, reverse=True)]


def run_pretrain(model: RgbModelConfig, pretrain: PretrainConfig, *, progress: bool = True) -> dict:
    """Train the RGB CLIP from scratch, or export the weights the user named as the teacher.

    A model given by a pretrained tag or a checkpoint is used as it is (the paper's teacher is a
    finished CLIP); it is saved where the later stages look for it.
    """
    if model.pretrained or model.checkpoint:
        rgb = create_rgb_clip(model)
        path = save_rgb_clip(rgb, Path(pretrain.checkpoint_dir) / "model.pt")
        return {"exported": True, "source": model.pretrained or model.checkpoint, "model": str(path), "history": []}
    return pretrain_rgb(model, pretrain, progress=progress)


def run_align_level(
    model: RgbModelConfig,
    pretrain: PretrainConfig,
    fit: FitStageConfig,
    align: AlignStageConfig,
    level: int,
    *,
    progress: bool = True,
) -> dict:
    rgb = create_rgb_clip(trained_rgb_config(model, pretrain))
    result = align_level(
        rgb,
        str(fit.level_dir(level, "train")),
        fit.train_shards,
        align.encoder,
        align.training(),
        image_size=fit.image_size,
        channels=fit.channels,
        progress=progress,
        level=level,
    )
    return result.metrics


def _level_row(level: int, fit: FitStageConfig) -> dict[str, Any]:
    source = source_bytes(fit.image_size, fit.image_size, fit.channels)
    payload = payload_bytes(level, fit.channels)
    record = record_bytes(level, fit.channels)
    return {
        "splats": level,
        "payload_bytes": payload,
        "record_bytes": record,
        "ratio_payload": round(compression_ratio(source, payload), 4),
        "ratio_record": round(compression_ratio(source, record), 4),
    }


def run_evaluation(
    model: RgbModelConfig,
    pretrain: PretrainConfig,
    data: DataConfig,
    fit: FitStageConfig,
    prune: PruneStageConfig,
    align: AlignStageConfig,
    evaluate: EvaluateConfig,
    *,
    progress: bool = True,
) -> dict:
    """Zero-shot top-1/top-5 of the RGB model, every splat level and the baselines, plus tokens.

    Every evaluation set (:func:`evaluation_sets`) is scored the same way and reported under
    ``sets[<split>]``: the RGB model on the images (read as the fit stage read them), each level's
    splat tower on the same images' splats, and the RGB model on the images re-encoded at each
    level's byte budget.
    """
    started = time.perf_counter()
    rgb = create_rgb_clip(trained_rgb_config(model, pretrain))
    rgb.model.eval()
    levels = all_levels(fit, prune)
    sets = evaluation_sets(data, fit, evaluate)
    towers = {level: load_splat_clip(align.tower_path(level), rgb).eval() for level in levels}

    def encode_rgb(images: torch.Tensor) -> torch.Tensor:
        return rgb.model.encode_image(rgb.prepare_images(images))

    results: dict[str, Any] = {"sets": {}}
    with torch.no_grad():
        for eval_set in sets:
            def rgb_batches(spec: str = eval_set.image_shards):
                return image_shard_batches(
                    spec, evaluate.batch_size, image_size=fit.image_size,
                    resize_mode=fit.resize_mode, channels=fit.channels,
                )

            classifier = build_classifier(rgb.model, rgb.tokenizer, eval_set.class_names, eval_set.templates)
            scores: dict[str, Any] = {"classes": len(eval_set.class_names), "image_shards": eval_set.image_shards}
            scores["rgb"] = evaluate_zero_shot(encode_rgb, rgb_batches(), classifier)
            scores["rgb"]["source_bytes"] = source_bytes(fit.image_size, fit.image_size, fit.channels)
            scores["levels"] = {}
            for level in progress_bar(levels, desc=f"{eval_set.split}: splat levels", disable=not progress):
                tower = towers[level]
                tower_classifier = build_classifier(tower, rgb.tokenizer, eval_set.class_names, eval_set.templates)
                level_scores = evaluate_zero_shot(
                    tower.encode_image,
                    splat_shard_batches(str(fit.level_dir(level, eval_set.split)), evaluate.batch_size),
                    tower_classifier,
                )
                scores["levels"][f"N{level}"] = {**_level_row(level, fit), **level_scores}
            budgets = splat_level_budgets(levels, fit.channels, evaluate.accounting)
            scores["baselines"] = evaluate_matched_bytes(
                encode_rgb, rgb_batches, classifier, budgets, list(evaluate.baselines)
            )
            results["sets"][eval_set.split] = scores
    visual = rgb.model.visual
    results["tokens"] = {
        f"N{level}": token_report(
            rgb_image_size=rgb.image_size,
            patch_size=visual.patch_size[0] if isinstance(visual.patch_size, tuple) else visual.patch_size,
            width=visual.transformer.width,
            layers=visual.transformer.layers,
            num_latents=align.encoder.num_latents,
            num_splats=level,
            resampler_layers=align.encoder.resampler_layers,
        )
        for level in levels
    }
    results["seconds"] = round(time.perf_counter() - started, 1)
    return results

