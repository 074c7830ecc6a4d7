"""Stage ``align@N``: a splat image tower aligned to the RGB CLIP, one level at a time (METHOD.md 2-3).

Two training stages, each run by :func:`gsclip_lib.training.loop.train` (checkpoint every epoch,
identical resume, DDP when the world size is above 1), with its own checkpoint folder
``align.checkpoint_dir/N<count>/{distill,contrastive}``:

1. **Distillation**: the RGB image tower (the teacher) sees the image, the splat tower (the
   student, running the teacher's frozen blocks) sees that image's splats. With
   ``align.distill_target: tokens`` (the default) the student's block inputs are matched to the
   teacher's (:class:`gsclip_lib.training.alignment.TokenDistillationObjective`); with ``embedding``
   the final embeddings are (:class:`gsclip_lib.training.alignment.DistillationObjective`). The
   teacher is frozen, in eval mode and sees no augmentation, so its targets for every training image
   are computed once before the stage.
2. **Contrastive alignment** (:class:`gsclip_lib.training.alignment.ContrastiveObjective`): CLIP's
   loss between splat embeddings and the frozen text tower's caption embeddings, with a learnable
   temperature that starts at the RGB model's.

Data. Both stages read the same pairs, held in memory (:func:`load_paired_data`): the level's splat
shards (this rank's share) and the image shards they were fitted from, matched by the splat sample's
``source_shard`` and ``source_key`` metadata. The trained tower is saved as
``align.checkpoint_dir/N<count>/splat_encoder.pt``; :func:`gsclip_lib.models.splat_clip.load_splat_clip`
rebuilds the whole splat CLIP from it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from gsclip_lib import distributed
from gsclip_lib.data.image_text_shards import ImageTextShards, ShardSpec, SkipCounts, expand_shard_spec
from gsclip_lib.data.splat_shards import collate_splats, splat_dataset
from gsclip_lib.errors import InputError
from gsclip_lib.models.rgb_clip import create_rgb_clip
from gsclip_lib.models.splat_clip import SplatClip, TextTower
from gsclip_lib.models.splat_encoder import (
    SplatImageEncoder,
    build_splat_encoder,
    fit_feature_statistics,
    parameter_shares,
    save_splat_encoder,
)
from gsclip_lib.params import AlignConfig, DataConfig, Params, level_name
from gsclip_lib.progress import progress_bar
from gsclip_lib.reporting import figures, paper
from gsclip_lib.splats.container import Splats
from gsclip_lib.stages.runner import StageResult
from gsclip_lib.training.alignment import (
    ContrastiveObjective,
    DistillationObjective,
    TokenDistillationObjective,
    call_objective,
    make_epoch_batches,
    teacher_embeddings,
    teacher_tokens,
)
from gsclip_lib.training.loop import train
from gsclip_lib.training.objectives import caption_table, clamp_logit_scale


@dataclass
class PairedData:
    """One rank's splat/image/caption triples, in memory, in splat-shard order."""

    splats: Splats  # [M, N_max] on the CPU, padding slots invalid
    images: Tensor  # [M, C, S, S] float in [0, 1]
    captions: list[str]
    labels: Tensor  # [M] int64, -1 without a label
    keys: list[str]
    height: int
    width: int
    unpaired: int = 0  # splat samples whose image was not found (left out)
    splat_skips: SkipCounts = field(default_factory=SkipCounts)
    image_skips: SkipCounts = field(default_factory=SkipCounts)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def level(self) -> int:
        """The largest splat count of an image: the level's N."""
        return int(self.splats.counts().max()) if len(self) else 0


def load_paired_data(
    level_spec: ShardSpec,
    image_spec: ShardSpec,
    data_config: DataConfig,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = False,
) -> PairedData:
    """This rank's splat samples of ``level_spec`` with their images from ``image_spec``.

    Images are read as ``data_config`` says; the splats must describe images of that size.
    """
    dataset = splat_dataset(level_spec, rank=rank, world_size=world_size, split_by_worker=False)
    samples = list(progress_bar(dataset, desc="read splats", disable=not progress))
    splat_skips = dataset.skip_counts
    if not samples:
        raise InputError(f"no splat samples in {level_spec!r} for this rank")
    wanted: dict[tuple[str | None, str], int] = {}
    shard_names: set[str] = set()
    for index, sample in enumerate(samples):
        shard = sample.metadata.get("source_shard")
        if shard is not None:
            shard_names.add(str(shard))
        wanted[(shard, str(sample.metadata.get("source_key", sample.key)))] = index
    any_shard = any(shard is None for shard, _ in wanted)
    urls = [
        url for url in expand_shard_spec(image_spec) if any_shard or os.path.basename(url) in shard_names
    ]
    reader = ImageTextShards(
        urls,
        image_size=data_config.image_size,
        resize_mode=data_config.resize_mode,
        channels=data_config.channels,
        rank=0,
        world_size=1,
        split_by_worker=False,
    )
    images: dict[int, Tensor] = {}
    for sample in progress_bar(reader, desc="read images", disable=not progress):
        shard = os.path.basename(sample.url)
        index = wanted.get((shard, sample.key), wanted.get((None, sample.key)))
        if index is not None:
            images[index] = sample.image
    paired = sorted(images)
    kept = [samples[i] for i in paired]
    if not kept:
        raise InputError(f"none of the {len(samples)} splat samples found its image in {image_spec!r}")
    batch = collate_splats(kept)
    stacked = torch.stack([images[i] for i in paired])
    if tuple(stacked.shape[-2:]) != (batch.height, batch.width) or stacked.shape[1] != batch.splats.channels:
        raise InputError(
            f"the images are {tuple(stacked.shape[1:])}, the splats describe "
            f"{(batch.splats.channels, batch.height, batch.width)}: the image shards and data.image_size, "
            "data.channels must be those the splats were fitted from"
        )
    return PairedData(
        splats=batch.splats,
        images=stacked,
        captions=batch.captions,
        labels=batch.labels,
        keys=batch.keys,
        height=batch.height,
        width=batch.width,
        unpaired=len(samples) - len(kept),
        splat_skips=splat_skips,
        image_skips=reader.skip_counts,
    )


@dataclass
class AlignResult:
    encoder: SplatImageEncoder
    clip: SplatClip
    metrics: dict[str, Any]
    path: Path  # the saved splat_encoder.pt


def align_level(
    rgb: Any,
    level_spec: ShardSpec,
    image_spec: ShardSpec,
    align_config: AlignConfig,
    data_config: DataConfig,
    *,
    progress: bool = False,
    level: int | None = None,
    device: torch.device | str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> AlignResult:
    """Distil, then contrastively align, a splat tower for one level; save it; return its metrics.

    ``rgb`` is a :class:`gsclip_lib.models.rgb_clip.RgbClip` (``model``, ``tokenizer``,
    ``prepare_images``); its weights are not changed (trained blocks are copies), but its vision
    blocks and text tower are set to ``requires_grad=False``: it is the frozen teacher.
    ``level`` names the checkpoint folder ``N<level>`` (default: the largest splat count read).
    """
    start = time.perf_counter()
    device = torch.device(device) if device is not None else next(rgb.model.parameters()).device
    encoder_config = align_config.encoder
    data = load_paired_data(level_spec, image_spec, data_config, rank=rank, world_size=world_size, progress=progress)
    count = level if level is not None else _largest_over_ranks(data.level)
    folder = align_config.level_dir(count)
    stats = fit_feature_statistics(
        [data.splats.index(slice(i, i + 4096)) for i in range(0, len(data), 4096)],
        height=data.height,
        width=data.width,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(align_config.distill.seed)
        encoder = build_splat_encoder(rgb, encoder_config, stats, (data.height, data.width)).to(device)

    # Stage 1: distillation against the teacher's view of the same images: its block inputs
    # (tokens) or its embedding. Token distillation leaves the blocks, norm_post and proj unused.
    if align_config.distill_target == "tokens":
        side = int(round(encoder_config.num_latents**0.5))
        targets = teacher_tokens(rgb, data.images, side)
        distill = TokenDistillationObjective(encoder)
    else:
        targets = teacher_embeddings(rgb, data.images)
        distill = DistillationObjective(encoder)
    batches, steps = make_epoch_batches(
        data.splats, align_config.distill.batch_size, align_config.distill.seed, targets=targets
    )
    distill_result = train(
        distill,
        call_objective,
        batches,
        steps,
        align_config.distill,
        folder / "distill",
        description=f"distill {level_name(count)}",
        progress=progress,
        device=device,
        find_unused_parameters=align_config.distill_target == "tokens",
    )

    # Stage 2: contrastive alignment with the captions.
    distinct, caption_ids = caption_table(data.captions)
    text = TextTower(rgb.model, train_last_block=align_config.unfreeze_text_last_block).to(device)
    clip = SplatClip(encoder, text, float(rgb.model.logit_scale.detach().reshape(-1)[0])).to(device)
    contrastive = ContrastiveObjective(
        clip, rgb.tokenizer(distinct), cache_text_embeddings=align_config.cache_text_embeddings
    )
    batches, steps = make_epoch_batches(
        data.splats, align_config.contrastive.batch_size, align_config.contrastive.seed, caption_ids=caption_ids
    )
    contrastive_result = train(
        contrastive,
        call_objective,
        batches,
        steps,
        align_config.contrastive,
        folder / "contrastive",
        description=f"align {level_name(count)}",
        progress=progress,
        device=device,
        after_step=clamp_logit_scale,
    )

    shares = parameter_shares(encoder, rgb, text_trainable=align_config.unfreeze_text_last_block, verbose=progress)
    path = align_config.tower_path(count)
    if distributed.is_main():
        save_splat_encoder(
            encoder,
            path,
            logit_scale=float(clip.logit_scale.detach()),
            text_state=text.trained_state(),
        )
    distributed.barrier()
    metrics = {
        "level": count,
        "pairs": len(data),
        "unpaired": data.unpaired,
        "splat_skips": data.splat_skips.as_dict(),
        "image_skips": data.image_skips.as_dict(),
        "feature_stats": stats.as_dict(),
        "encoder_config": encoder_config.model_dump(),
        "distill_target": align_config.distill_target,
        "unfreeze_text_last_block": align_config.unfreeze_text_last_block,
        "cache_text_embeddings": contrastive.caption_embeddings is not None,
        "distinct_captions": len(distinct),
        "distill": _stage_metrics(distill_result),
        "contrastive": _stage_metrics(contrastive_result),
        "logit_scale": float(clip.temperature_scale().detach()),
        "parameter_shares": shares,
        "seconds": time.perf_counter() - start,
    }
    return AlignResult(encoder=encoder, clip=clip, metrics=metrics, path=path)


def _stage_metrics(result: Any) -> dict[str, Any]:
    history = list(result.history)
    final = {k: v for k, v in history[-1].items()} if history else {}
    return {
        "history": history,
        "final_loss": final.get("loss"),
        "final": final,
        "steps": result.steps,
        "seconds": result.seconds,
        "resumed_from_step": result.resumed_from_step,
    }


def _largest_over_ranks(value: int) -> int:
    return -distributed.all_reduce_min(-value)


def teacher_model_config(params: Params):
    """The RGB model the later stages use: the one the pretrain stage saved."""
    return params.model.replace(checkpoint=str(params.pretrain.model_path()), pretrained="")


def run(params: Params, *, level: int, progress: bool = True) -> StageResult:
    """The ``align@N`` stage: the splat tower of one level, trained and saved, with its curves."""
    if level not in params.levels():
        raise InputError(f"level {level} is none of the pipeline's levels {params.levels()}")
    rgb = create_rgb_clip(teacher_model_config(params))
    result = align_level(
        rgb, str(params.splat_dir(level, "train")), params.data.train_spec(), params.align, params.data,
        progress=progress, level=level,
    )
    metrics = result.metrics
    curves = {"distill": metrics["distill"]["history"], "contrastive": metrics["contrastive"]["history"]}
    shares = metrics["parameter_shares"]
    summary = pd.Series({
        "pairs": metrics["pairs"],
        "distill: final cosine to the teacher": metrics["distill"]["final"].get("cosine"),
        "contrastive: final loss": metrics["contrastive"]["final_loss"],
        "contrastive: final batch accuracy": metrics["contrastive"]["final"].get("batch_accuracy"),
        "trainable share of the splat CLIP": round(shares["trainable_share"], 4),
        "seconds": round(metrics["seconds"], 1),
    }, name=level_name(level)).to_frame()
    comparison = paper.comparison([{
        "what": "trainable share of the splat CLIP",
        "ours": round(shares["trainable_share"], 3),
        "paper": paper.TRAINABLE_SHARE["v2"] if params.align.encoder.unfreeze_first_blocks else paper.TRAINABLE_SHARE["v1"],
        "note": "paper: ViT-B/16 (v1 stem only 7 %, v2 with two blocks 9.7 %); ours: the tiny ViT",
    }])
    return StageResult(metrics=metrics, figures={"loss": figures.plot_training_curves(curves)}, summary=summary,
                       comparison=comparison)
