"""Contrastive pretraining of the RGB CLIP: the pixel baseline and the teacher of stage 1.

The paper trains its RGB ViT CLIP "with standard OpenCLIP settings" on the same data as the splat
encoder (PAPER.md sections 2 and 4): the symmetric InfoNCE loss of CLIP with a learnable temperature
(open_clip's ``ClipLoss``; the temperature is the model's ``logit_scale``, clamped to at most 100 as
open_clip does), AdamW, linear warm-up and cosine decay, here through :func:`gsclip_lib.training.train`.
Under torchrun each rank reads its own shards and the loss is computed over the global batch
(``ClipLoss(local_loss=False, gather_with_grad=True)``, open_clip's gather).

The shard reader (:class:`gsclip_lib.shards.ImageTextShards`) is the source of the data; the
default set (6,000 images of 28x28) is read once into memory and reshuffled every epoch from the
seed and the epoch, which is what makes a resumed run equal an uninterrupted one. Captions are
tokenized once; a batch encodes each distinct caption once and indexes the features (exactly the
same loss and gradient as encoding every row; Fashion-MNIST's captions come from 80 sentences, so a
batch of 64 holds about 44 distinct ones and a batch of 128 about 64; web captions lose nothing).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from open_clip import ClipLoss
from torch import Tensor

from gsclip_lib import distributed
from gsclip_lib.clip_models import RgbClip, RgbModelConfig, create_rgb_clip, save_rgb_clip
from gsclip_lib.shards import ImageTextShards, SkipCounts
from gsclip_lib.training import OptimConfig, train

MAX_LOGIT_SCALE = math.log(100.0)  # open_clip clamps the learned temperature at 1/100
MODEL_FILE = "model.pt"


def _default_optim() -> OptimConfig:
    # Tuned on the default shards (6,000 Fashion-MNIST images) with gsclip-vit-tiny-28: 5 epochs of
    # batch 64 reach 83 % zero-shot top-1 on the eval split (3 epochs: 77 %). Batch 128 at lr 2e-3
    # needs more epochs (79 % after 5); lr 5e-3 is worse (70 % after 3).
    return OptimConfig(
        epochs=5, batch_size=64, lr=1e-3, weight_decay=0.1, warmup_steps=50, grad_clip=1.0, seed=0, log_every=10
    )


@dataclass(frozen=True)
class PretrainConfig:
    train_shards: str = "data/shards/train-*.tar"  # any shard spec (a glob, a brace pattern, a folder)
    image_size: int = 28  # images are read at this size (center crop); the model resizes if it differs
    channels: int = 1  # 1 gray, 3 RGB
    optim: OptimConfig = field(default_factory=_default_optim)
    checkpoint_dir: str = "data/models/rgb"  # last.pt (resumable state) and model.pt (the result)

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels!r}")
        if self.image_size <= 0:
            raise ValueError(f"image_size must be positive, got {self.image_size!r}")


@dataclass
class ImageTextSet:
    """One rank's image-text pairs in memory, captions as indices into distinct token rows."""

    images: Tensor  # [N, C, S, S] float32 in [0, 1]
    caption_ids: Tensor  # [N] int64, rows of tokens
    tokens: Tensor  # [U, context_length] int64, one row per distinct caption
    keys: list[str]  # [N]
    skips: SkipCounts

    def __len__(self) -> int:
        return len(self.keys)


def load_image_text_set(
    spec: str, clip: RgbClip, *, image_size: int, channels: int, rank: int = 0, world_size: int = 1
) -> ImageTextSet:
    """This rank's share of the shards at ``spec``, decoded once, captions tokenized once."""
    dataset = ImageTextShards(spec, image_size=image_size, channels=channels, rank=rank, world_size=world_size)
    images, captions, keys = [], [], []
    for sample in dataset:
        images.append(sample.image)
        captions.append(sample.caption)
        keys.append(sample.key)
    if not images:
        raise ValueError(f"rank {rank} of {world_size} found no readable sample in {spec!r}")
    distinct = sorted(set(captions))
    index = {caption: i for i, caption in enumerate(distinct)}
    return ImageTextSet(
        images=torch.stack(images),
        caption_ids=torch.tensor([index[c] for c in captions], dtype=torch.int64),
        tokens=clip.tokenize(distinct),
        keys=keys,
        skips=dataset.skip_counts.copy(),
    )


def epoch_batches(
    data: ImageTextSet, batch_size: int, epoch: int, seed: int, rank: int = 0
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Shuffled full batches ``(images [B, C, S, S], caption_ids [B], tokens [U, L])`` of one epoch;
    the order depends only on ``(seed, epoch, rank)``."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 1_009 + rank)
    order = torch.randperm(len(data), generator=generator)
    for start in range(0, len(order) - batch_size + 1, batch_size):
        rows = order[start : start + batch_size]
        yield data.images[rows], data.caption_ids[rows], data.tokens


def clip_loss_fn(clip: RgbClip, loss: ClipLoss):
    """``loss_fn`` for :func:`train`: CLIP's InfoNCE on a batch of ``epoch_batches``."""

    def loss_fn(model: torch.nn.Module, batch: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, dict[str, float]]:
        device = clip.device
        images, caption_ids, tokens = batch
        distinct, rows = torch.unique(caption_ids, return_inverse=True)
        output = model(clip.prepare_images(images.to(device)), tokens[distinct].to(device))
        if isinstance(output, dict):
            image_features, text_features, logit_scale = (
                output["image_features"], output["text_features"], output["logit_scale"]
            )
        else:
            image_features, text_features, logit_scale = output[:3]
        value = loss(image_features, text_features[rows.to(device)], logit_scale)
        return value, {"logit_scale": float(logit_scale.detach())}

    return loss_fn


def clamp_logit_scale(model: torch.nn.Module) -> None:
    with torch.no_grad():
        model.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)


def pretrain_rgb(model_config: RgbModelConfig, config: PretrainConfig, *, progress: bool = True) -> dict[str, Any]:
    """Train the RGB CLIP ``model_config`` names on ``config.train_shards``; save ``model.pt``.

    Starts from the model's weights as ``model_config`` gives them (random by default; a pretrained
    tag or checkpoint fine-tunes). Resumes from ``checkpoint_dir/last.pt`` when it is there.
    Returns the metrics: final loss, steps, seconds, images per second, the history and the counts
    of skipped samples.
    """
    rank, world_size = distributed.rank_and_world_size()
    optim = config.optim
    torch.manual_seed(optim.seed)  # the same initial weights on every rank and every run
    clip = create_rgb_clip(model_config)
    data = load_image_text_set(
        config.train_shards, clip, image_size=config.image_size, channels=config.channels, rank=rank,
        world_size=world_size,
    )
    steps_per_epoch = distributed.all_reduce_min(len(data) // optim.batch_size)
    if steps_per_epoch < 1:
        raise ValueError(
            f"a rank holds {len(data)} images, fewer than one batch of {optim.batch_size}; "
            "lower optim.batch_size or use more data"
        )
    loss = ClipLoss(local_loss=False, gather_with_grad=True, cache_labels=True, rank=rank, world_size=world_size)
    started = time.perf_counter()
    result = train(
        clip.model,
        clip_loss_fn(clip, loss),
        lambda epoch: epoch_batches(data, optim.batch_size, epoch, optim.seed, rank),
        steps_per_epoch,
        optim,
        config.checkpoint_dir,
        description="rgb pretrain",
        progress=progress,
        after_step=clamp_logit_scale,
    )
    seconds = time.perf_counter() - started
    clip.model.eval()
    model_path = Path(config.checkpoint_dir) / MODEL_FILE
    if distributed.is_main():
        save_rgb_clip(clip, model_path)
    distributed.barrier()
    steps_run = result.steps - result.resumed_from_step
    images_seen = steps_run * optim.batch_size * world_size
    skips = SkipCounts.total(distributed.all_gather_objects(data.skips))
    return {
        "model": clip.name,
        "parameters": sum(p.numel() for p in clip.model.parameters()),
        "train_images": skips.good,
        "skipped": skips.as_dict(),
        "world_size": world_size,
        "global_batch_size": optim.batch_size * world_size,
        "steps": result.steps,
        "resumed_from_step": result.resumed_from_step,
        "final_loss": result.history[-1]["loss"] if result.history else None,
        "final_logit_scale": float(clip.model.logit_scale.detach().exp()),
        "seconds": round(seconds, 2),
        "images_per_second": round(images_seen / seconds, 1) if steps_run else None,
        "model_path": str(model_path),
        "history": result.history,
    }
