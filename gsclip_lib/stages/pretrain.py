"""Stage ``pretrain``: the RGB CLIP, the pixel baseline and the teacher of the alignment's stage 1.

The paper trains its RGB ViT CLIP "with standard OpenCLIP settings" on the same data as the splat
encoder (METHOD.md sections 2 and 4): the symmetric InfoNCE loss of CLIP with a learnable temperature
(open_clip's ``ClipLoss``; the temperature is the model's ``logit_scale``, clamped to at most 100 as
open_clip does), AdamW, linear warm-up and cosine decay, here through :func:`gsclip_lib.training.loop.train`.
Under torchrun each rank reads its own shards and the loss is computed over the global batch
(``ClipLoss(local_loss=False, gather_with_grad=True)``, open_clip's gather).

The shard reader (:class:`gsclip_lib.data.image_text_shards.ImageTextShards`) is the source of the data; the
default set (6,000 images of 28x28) is read once into memory and reshuffled every epoch from the
seed and the epoch, which is what makes a resumed run equal an uninterrupted one. Captions are
tokenized once; a batch encodes each distinct caption once and indexes the features (exactly the
same loss and gradient as encoding every row; Fashion-MNIST's captions come from 80 sentences, so a
batch of 64 holds about 44 distinct ones and a batch of 128 about 64; web captions lose nothing).

With an open_clip pretrained tag or a checkpoint in ``model``, the stage trains nothing: it exports
those weights where the later stages look for the teacher (the paper's teacher is a finished CLIP).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterator

import pandas as pd
import torch
from open_clip import ClipLoss
from torch import Tensor

from gsclip_lib import distributed
from gsclip_lib.data.image_text_shards import ImageTextShards, SkipCounts
from gsclip_lib.errors import InputError
from gsclip_lib.models.rgb_clip import RgbClip, create_rgb_clip, save_rgb_clip
from gsclip_lib.params import DataConfig, Params, PretrainConfig, RgbModelConfig
from gsclip_lib.reporting import figures
from gsclip_lib.stages.runner import StageResult
from gsclip_lib.training.batching import epoch_permutation
from gsclip_lib.training.loop import train
from gsclip_lib.training.objectives import clamp_logit_scale, clip_loss_fn


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


def load_image_text_set(spec: str, clip: RgbClip, data: DataConfig, *, rank: int = 0, world_size: int = 1) -> ImageTextSet:
    """This rank's share of the shards at ``spec``, decoded once, captions tokenized once."""
    dataset = ImageTextShards(spec, image_size=data.image_size, resize_mode=data.resize_mode,
                              channels=data.channels, rank=rank, world_size=world_size)
    images, captions, keys = [], [], []
    for sample in dataset:
        images.append(sample.image)
        captions.append(sample.caption)
        keys.append(sample.key)
    if not images:
        raise InputError(f"rank {rank} of {world_size} found no readable sample in {spec!r}")
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
    order = epoch_permutation(len(data), seed, epoch, rank)
    for start in range(0, len(order) - batch_size + 1, batch_size):
        rows = order[start : start + batch_size]
        yield data.images[rows], data.caption_ids[rows], data.tokens


def pretrain_rgb(model_config: RgbModelConfig, config: PretrainConfig, data: DataConfig, *,
                 progress: bool = True) -> dict[str, Any]:
    """Train the RGB CLIP ``model_config`` names on ``data``'s training shards; save ``model.pt``.

    Starts from the model's weights as ``model_config`` gives them (random by default; a pretrained
    tag or checkpoint fine-tunes). Resumes from ``checkpoint_dir/last.pt`` when it is there.
    Returns the metrics: final loss, steps, seconds, images per second, the history and the counts
    of skipped samples.
    """
    rank, world_size = distributed.rank_and_world_size()
    optim = config.optim
    torch.manual_seed(optim.seed)  # the same initial weights on every rank and every run
    clip = create_rgb_clip(model_config)
    pairs = load_image_text_set(data.train_spec(), clip, data, rank=rank, world_size=world_size)
    steps_per_epoch = distributed.all_reduce_min(len(pairs) // optim.batch_size)
    if steps_per_epoch < 1:
        raise InputError(
            f"a rank holds {len(pairs)} images, fewer than one batch of {optim.batch_size}; "
            "lower pretrain.optim.batch_size or use more data"
        )
    loss = ClipLoss(local_loss=False, gather_with_grad=True, cache_labels=True, rank=rank, world_size=world_size)
    started = time.perf_counter()
    result = train(
        clip.model,
        clip_loss_fn(clip, loss),
        lambda epoch: epoch_batches(pairs, optim.batch_size, epoch, optim.seed, rank),
        steps_per_epoch,
        optim,
        config.checkpoint_dir,
        description="rgb pretrain",
        progress=progress,
        after_step=clamp_logit_scale,
    )
    seconds = time.perf_counter() - started
    clip.model.eval()
    model_path = config.model_path()
    if distributed.is_main():
        save_rgb_clip(clip, model_path)
    distributed.barrier()
    steps_run = result.steps - result.resumed_from_step
    images_seen = steps_run * optim.batch_size * world_size
    skips = SkipCounts.total(distributed.all_gather_objects(pairs.skips))
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


def run(params: Params, *, progress: bool = True) -> StageResult:
    """The ``pretrain`` stage: train the RGB CLIP, or export the weights ``model`` names."""
    model = params.model
    if model.pretrained or model.checkpoint:
        path = save_rgb_clip(create_rgb_clip(model), params.pretrain.model_path())
        metrics = {"exported": True, "source": model.pretrained or model.checkpoint, "model_path": str(path),
                   "history": []}
        return StageResult(metrics=metrics)
    metrics = pretrain_rgb(model, params.pretrain, params.data, progress=progress)
    curves = figures.plot_training_curves({"pretrain RGB CLIP": metrics["history"]})
    shown = ("model", "parameters", "train_images", "steps", "final_loss", "final_logit_scale", "seconds",
             "images_per_second")
    summary = pd.Series({key: metrics[key] for key in shown}, name="pretrain").to_frame()
    return StageResult(metrics=metrics, figures={"loss": curves}, summary=summary)
