"""The model stages of the pipeline: pretrain the RGB CLIP, align a splat tower per level, evaluate.

- ``pretrain`` trains the RGB CLIP (teacher and baseline) on the image-text shards, or exports the
  weights a user named (an open_clip pretrained tag or a local checkpoint) with ``epochs: 0``.
- ``align@N`` distils, then contrastively aligns, a splat image tower for one compression level
  (PAPER.md sections 2 and 3).
- ``evaluate`` scores zero-shot top-1 / top-5 for the RGB model, every splat level and the
  matched-bytes baselines (JPEG and thumbnail at each level's byte budget), on the Fashion-MNIST
  evaluation split and, when configured, an ImageNet-style folder; it also reports tokens and
  attention FLOPs (PAPER.md section 4).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from gsclip_lib.alignment import AlignConfig, align_level, load_splat_clip
from gsclip_lib.byte_baselines import evaluate_matched_bytes, splat_level_budgets
from gsclip_lib.captions import FASHION_MNIST_EVAL_TEMPLATES, OPENAI_IMAGENET_TEMPLATES
from gsclip_lib.clip_models import RgbModelConfig, create_rgb_clip, save_rgb_clip
from gsclip_lib.codec import compression_ratio, payload_bytes, record_bytes, source_bytes
from gsclip_lib.data_stages import FitStageConfig, PruneStageConfig
from gsclip_lib.fashion_mnist import FASHION_MNIST_CLASSES
from gsclip_lib.image_folder import ImageFolderDataset
from gsclip_lib.rgb_pretrain import PretrainConfig, pretrain_rgb
from gsclip_lib.splat_encoder import SplatEncoderConfig
from gsclip_lib.token_budget import token_report
from gsclip_lib.training import OptimConfig
from gsclip_lib.zero_shot import (
    build_classifier,
    evaluate_zero_shot,
    image_folder_batches,
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


@dataclass(frozen=True)
class EvaluateConfig:
    """The ``evaluate`` group of params.yaml."""

    eval_shards: str = "data/shards/eval-*.tar"  # labelled evaluation images (Fashion-MNIST test)
    batch_size: int = 256
    accounting: str = "payload"  # byte budget per level: payload (the paper's) | record (with header)
    baselines: tuple[str, ...] = ("jpeg", "thumbnail")  # matched-bytes baselines on the RGB model
    imagenet_dir: str = ""  # an ImageNet-style folder root/<class>/*.JPEG; empty skips it
    imagenet_class_names: str = ""  # one name per class folder; empty: open_clip's names for wnids

    def __post_init__(self) -> None:
        if self.accounting not in ("payload", "record"):
            raise ValueError(f"evaluate.accounting must be payload or record, got {self.accounting!r}")
        unknown = set(self.baselines) - {"jpeg", "thumbnail"}
        if unknown:
            raise ValueError(f"unknown evaluate.baselines {sorted(unknown)}; use jpeg and thumbnail")


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
    fit: FitStageConfig,
    prune: PruneStageConfig,
    align: AlignStageConfig,
    evaluate: EvaluateConfig,
    *,
    progress: bool = True,
) -> dict:
    """Zero-shot top-1/top-5 of the RGB model, every splat level and the baselines, plus tokens."""
    started = time.perf_counter()
    rgb = create_rgb_clip(trained_rgb_config(model, pretrain))
    rgb.model.eval()
    levels = all_levels(fit, prune)
    classifier = build_classifier(rgb.model, rgb.tokenizer, list(FASHION_MNIST_CLASSES), FASHION_MNIST_EVAL_TEMPLATES)

    def rgb_batches():
        return image_shard_batches(
            evaluate.eval_shards, evaluate.batch_size, image_size=fit.image_size,
            resize_mode=fit.resize_mode, channels=fit.channels,
        )

    def encode_rgb(images: torch.Tensor) -> torch.Tensor:
        return rgb.model.encode_image(rgb.prepare_images(images))

    with torch.no_grad():
        results: dict[str, Any] = {"rgb": evaluate_zero_shot(encode_rgb, rgb_batches(), classifier)}
        results["rgb"]["source_bytes"] = source_bytes(fit.image_size, fit.image_size, fit.channels)
        results["levels"] = {}
        for level in levels:
            splat_clip = load_splat_clip(align.tower_path(level), rgb)
            splat_clip.eval()
            splat_classifier = build_classifier(
                splat_clip, rgb.tokenizer, list(FASHION_MNIST_CLASSES), FASHION_MNIST_EVAL_TEMPLATES
            )
            scores = evaluate_zero_shot(
                splat_clip.encode_image,
                splat_shard_batches(str(fit.level_dir(level, "eval")), evaluate.batch_size),
                splat_classifier,
            )
            results["levels"][f"N{level}"] = {**_level_row(level, fit), **scores}
        budgets = splat_level_budgets(levels, fit.channels, evaluate.accounting)
        baseline_rows = evaluate_matched_bytes(
            encode_rgb, rgb_batches, classifier, budgets, list(evaluate.baselines)
        )
        results["baselines"] = baseline_rows
        if evaluate.imagenet_dir:
            dataset = ImageFolderDataset(
                evaluate.imagenet_dir, evaluate.imagenet_class_names or None,
                image_size=rgb.image_size, channels=3,
            )
            imagenet_classifier = build_classifier(
                rgb.model, rgb.tokenizer, list(dataset.class_names), OPENAI_IMAGENET_TEMPLATES
            )
            results["imagenet_rgb"] = evaluate_zero_shot(
                encode_rgb, image_folder_batches(dataset, evaluate.batch_size), imagenet_classifier
            )
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

