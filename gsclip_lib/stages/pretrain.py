"""Stage ``pretrain``: the RGB CLIP, the pixel baseline and the teacher of the alignment's stage 1.

The paper trains its RGB ViT CLIP "with standard OpenCLIP settings" on the same data as the splat
encoder (METHOD.md sections 2 and 4): the symmetric InfoNCE loss of CLIP with a learnable temperature
(open_clip's ``ClipLoss``; the temperature is the model's ``logit_scale``, clamped to at most 100 as
open_clip does), AdamW, linear warm-up and cosine decay, here through :func:`gsclip_lib.training.loop.train`.
Under torchrun each rank reads its own shards and the loss is computed over the global batch
(``ClipLoss(local_loss=False, gather_with_grad=True)``, open_clip's gather).

The pairs are streamed from the shards (:mod:`gsclip_lib.data.streaming`, ``pretrain.loader``): an
epoch is a seeded shuffle of this rank's shards and of a bounded buffer of samples, decoded as it
goes, so memory does not grow with the data set, and a run resumed from a mid-epoch checkpoint
(``pretrain.optim.checkpoint_every``) reads the same batches as an uninterrupted one. A batch encodes
each distinct caption once and indexes the features (exactly the same loss and gradient as encoding
every row; Fashion-MNIST's captions come from 80 sentences, so a batch of 64 holds about 44 distinct
ones; web captions lose nothing).

With an open_clip pretrained tag or a checkpoint in ``model``, the stage trains nothing: it exports
those weights where the later stages look for the teacher (the paper's teacher is a finished CLIP).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from open_clip import ClipLoss

from gsclip_lib import distributed
from gsclip_lib.data.image_decoding import IMAGE_EXTENSIONS
from gsclip_lib.data.image_text_shards import ImageTextShards, collate_image_text
from gsclip_lib.data.skip_counts import SkipCounts
from gsclip_lib.data.streaming import CountedEpochs, SkipTally, steps_every_rank_fills, stream_plan
from gsclip_lib.models.rgb_clip import create_rgb_clip, save_rgb_clip
from gsclip_lib.params import DataConfig, Params, PretrainConfig, RgbModelConfig
from gsclip_lib.pipeline.runner import StageResult
from gsclip_lib.training.loop import train
from gsclip_lib.training.objectives import clamp_logit_scale, clip_loss_fn


def pretrain_rgb(model_config: RgbModelConfig, config: PretrainConfig, data: DataConfig, *,
                 progress: bool = True) -> dict[str, Any]:
    """Train the RGB CLIP ``model_config`` names on ``data``'s training shards; save ``model.pt``.

    Starts from the model's weights as ``model_config`` gives them (random by default; a pretrained
    tag or checkpoint fine-tunes). Resumes from ``checkpoint_dir/last.pt`` when it is there.
    Returns the metrics: final loss, steps, seconds, images per second, the history and the counts
    of samples skipped in the first epoch this call ran.
    """
    rank, world_size = distributed.rank_and_world_size()
    optim = config.optim
    with torch.random.fork_rng(devices=[]):  # the same initial weights on every rank and every run
        torch.manual_seed(optim.seed)
        clip = create_rgb_clip(model_config)
    spec = data.train_spec()
    reader = ImageTextShards(spec, image_size=data.image_size, resize_mode=data.resize_mode, channels=data.channels,
                             rank=rank, world_size=world_size)
    plan = stream_plan(reader.shards, optim, config.loader, rank=rank, world_size=world_size,
                       what=f"pretrain shards {spec!r}")
    steps_per_epoch = steps_every_rank_fills(plan, IMAGE_EXTENSIONS, config.loader.samples_per_epoch,
                                             what=repr(spec), batch_setting="pretrain.optim.batch_size")
    skips = SkipTally()
    loss = ClipLoss(local_loss=False, gather_with_grad=True, cache_labels=True, rank=rank, world_size=world_size)
    started = time.perf_counter()
    result = train(
        clip.model,
        clip_loss_fn(clip, loss),
        CountedEpochs(plan, reader.decode_sample, collate_image_text, skips),
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
    skipped = SkipCounts.total(distributed.all_gather_objects(skips.first_epoch()))
    return {
        "model": clip.name,
        "parameters": sum(p.numel() for p in clip.model.parameters()),
        "train_images": steps_per_epoch * optim.batch_size * world_size,
        "skipped": skipped.as_dict(),
        "world_size": world_size,
        "global_batch_size": optim.batch_size * world_size,
        "steps_per_epoch": steps_per_epoch,
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
    return StageResult(metrics=metrics)
