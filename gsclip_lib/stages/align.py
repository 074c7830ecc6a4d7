"""Stage ``align@N``: a splat image tower aligned to the RGB CLIP, one level at a time (METHOD.md 2-3).

Two training stages, each run by :func:`gsclip_lib.training.loop.train` (checkpoints, identical resume, DDP when the world size is above 1), with its own checkpoint folder
``align.checkpoint_dir/N<count>/{distill,contrastive}``:

1. **Distillation**: the RGB image tower (the teacher) sees the image, the splat tower (the
   student, running the teacher's frozen blocks) sees that image's splats. With
   ``align.distill_target: tokens`` (the default) the student's block inputs are matched to the
   teacher's (:class:`gsclip_lib.training.alignment.TokenDistillationObjective`); with ``embedding``
   the final embeddings are (:class:`gsclip_lib.training.alignment.DistillationObjective`). The
   teacher is frozen and in eval mode; its targets are computed batch by batch as the stream goes
   (token targets need only its patch embedding and ``ln_pre``: cheaper than storing them).
2. **Contrastive alignment** (:class:`gsclip_lib.training.alignment.ContrastiveObjective`): CLIP's
   loss between splat embeddings and the frozen text tower's caption embeddings, with a learnable
   temperature that starts at the RGB model's.

Data. Both stages stream the level's splat shards (:mod:`gsclip_lib.data.streaming`, ``align.loader``):
every splat sample carries the image it was fitted from and its caption
(:class:`gsclip_lib.data.splat_shards.PairedDecoder`), so pairing needs no index and memory does not
grow with the data set. Each stage checkpoints every ``checkpoint_every`` steps and resumes
mid-epoch on the same batches. The feature statistics of the splat encoder's input come from the
first :data:`STATISTICS_SAMPLES` samples of every rank. The trained tower is saved as
``align.checkpoint_dir/N<count>/splat_encoder.pt``; :func:`gsclip_lib.models.splat_clip.load_splat_clip`
rebuilds the whole splat CLIP from it.
"""

from __future__ import annotations

import functools
import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from gsclip_lib import distributed
from gsclip_lib.data.skip_counts import SkipCounts
from gsclip_lib.data.splat_shards import SPLAT_EXTENSION, PairedDecoder, collate_splats, splat_dataset
from gsclip_lib.data.streaming import CountedEpochs, SkipTally, StreamPlan, steps_every_rank_fills, stream_plan
from gsclip_lib.data.tar_shards import ShardSpec, expand_shard_spec
from gsclip_lib.errors import InputError
from gsclip_lib.models.rgb_clip import create_rgb_clip
from gsclip_lib.models.splat_clip import SplatClip, TextTower, parameter_shares
from gsclip_lib.models.splat_encoder import SplatImageEncoder, build_splat_encoder, save_splat_encoder
from gsclip_lib.models.splat_features import FeatureStats, fit_feature_statistics
from gsclip_lib.params import AlignConfig, DataConfig, LoaderConfig, OptimConfig, Params
from gsclip_lib.pipeline.runner import StageResult
from gsclip_lib.training.alignment import (
    AlignBatch,
    ContrastiveObjective,
    DistillationObjective,
    TokenDistillationObjective,
    call_objective,
    collate_pairs,
    teacher_embeddings,
    teacher_tokens,
)
from gsclip_lib.training.loop import TrainResult, train
from gsclip_lib.training.objectives import clamp_logit_scale


STATISTICS_SAMPLES = 8192  # splat samples per rank that the feature statistics are measured on


def measure_feature_statistics(level_spec: ShardSpec, rank: int, world_size: int) -> tuple[FeatureStats, int, int, int]:
    """``(stats, N, H, W)``: the splat feature statistics over the first :data:`STATISTICS_SAMPLES`
    samples of every rank's shards (summed over ranks), the level's splat count and the image size."""
    dataset = splat_dataset(level_spec, rank=rank, world_size=world_size, split_by_worker=False)
    samples = list(itertools.islice(dataset, STATISTICS_SAMPLES))
    if not samples:
        raise InputError(f"rank {rank} of {world_size} found no readable splat sample in {level_spec!r}")
    count = max(sample.num_splats for sample in samples)
    stats = fit_feature_statistics(
        [collate_splats(samples[i : i + 1024]) for i in range(0, len(samples), 1024)]
    )
    return stats, _largest_over_ranks(count), samples[0].height, samples[0].width


@dataclass
class AlignResult:
    encoder: SplatImageEncoder
    clip: SplatClip
    metrics: dict[str, Any]
    path: Path  # the saved splat_encoder.pt


class LevelBatches:
    """One training stage's batches of a level's splat shards, as :func:`gsclip_lib.training.loop.train`
    asks for them: ``batches(epoch, first)``. With ``teacher_targets`` each batch also carries its
    images and the teacher's targets for them, computed per batch (memory does not grow with the data)."""

    def __init__(self, plan: StreamPlan, data: DataConfig, num_slots: int, tally: SkipTally,
                 teacher_targets: Callable[[Tensor], Tensor] | None = None) -> None:
        decode = PairedDecoder(data.image_size, data.channels, data.resize_mode, with_image=teacher_targets is not None)
        self.epochs = CountedEpochs(plan, decode, functools.partial(collate_pairs, num_slots=num_slots), tally)
        self.teacher_targets = teacher_targets

    def __call__(self, epoch: int, first: int) -> Iterator[AlignBatch]:
        for batch in self.epochs(epoch, first):
            if self.teacher_targets is not None:
                batch.targets = self.teacher_targets(batch.images)
            yield batch


@dataclass(frozen=True)
class LevelData:
    """What both training stages of one level read: its splat shards, as this rank streams them."""

    spec: ShardSpec
    data: DataConfig
    loader: LoaderConfig
    num_slots: int  # the level's largest splat count: every batch is padded to it
    rank: int
    world_size: int

    def batches(self, stage: str, optim: OptimConfig, tally: SkipTally,
                teacher_targets: Callable[[Tensor], Tensor] | None = None) -> tuple[LevelBatches, int]:
        """The stage's batches and the steps of an epoch every rank can fill."""
        plan = stream_plan(expand_shard_spec(self.spec), optim, self.loader, rank=self.rank,
                           world_size=self.world_size, what=f"splat shards {self.spec!r}")
        steps = steps_every_rank_fills(plan, (SPLAT_EXTENSION,), self.loader.samples_per_epoch,
                                       what=f"the splat shards {self.spec!r}", batch_setting=f"align.{stage}.batch_size")
        return LevelBatches(plan, self.data, self.num_slots, tally, teacher_targets), steps


def distill(rgb: Any, encoder: SplatImageEncoder, level: LevelData, config: AlignConfig, folder: Path,
            tally: SkipTally, *, device: torch.device, progress: bool) -> TrainResult:
    """Stage 1: the student matched to the teacher's view of the same images, its block inputs
    (``tokens``) or its embedding. Token distillation leaves the blocks, norm_post and proj unused."""
    if config.distill_target == "tokens":
        side = int(round(config.encoder.num_latents**0.5))
        targets = functools.partial(teacher_tokens, rgb, side=side)
        objective = TokenDistillationObjective(encoder)
    else:
        targets = functools.partial(teacher_embeddings, rgb)
        objective = DistillationObjective(encoder)
    batches, steps = level.batches("distill", config.distill, tally, targets)
    return train(objective, call_objective, batches, steps, config.distill, folder / "distill",
                 description=f"distill {folder.name}", progress=progress, device=device,
                 find_unused_parameters=config.distill_target == "tokens")


def contrast(rgb: Any, encoder: SplatImageEncoder, level: LevelData, config: AlignConfig, folder: Path,
             tally: SkipTally, *, device: torch.device, progress: bool) -> tuple[ContrastiveObjective, TrainResult, int]:
    """Stage 2: CLIP's loss between the splat tower and the frozen text tower on the captions;
    the objective (holding the splat CLIP), the training result and the steps of an epoch."""
    text = TextTower(rgb.model, train_last_block=config.unfreeze_text_last_block).to(device)
    clip = SplatClip(encoder, text, float(rgb.model.logit_scale.detach().reshape(-1)[0])).to(device)
    cache_size = config.text_cache_size if config.cache_text_embeddings else 0
    objective = ContrastiveObjective(clip, rgb.tokenizer, cache_size=cache_size)
    batches, steps = level.batches("contrastive", config.contrastive, tally)
    result = train(objective, call_objective, batches, steps, config.contrastive, folder / "contrastive",
                   description=f"align {folder.name}", progress=progress, device=device, after_step=clamp_logit_scale)
    return objective, result, steps


def align_level(
    rgb: Any,
    level_spec: ShardSpec,
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
    rank, world_size = distributed.resolve_rank(rank, world_size)
    stats, largest, height, width = measure_feature_statistics(level_spec, rank, world_size)
    count = level if level is not None else largest
    folder = align_config.level_dir(count)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(align_config.distill.seed)
        encoder = build_splat_encoder(rgb, align_config.encoder, stats, (height, width)).to(device)
    data = LevelData(level_spec, data_config, align_config.loader, largest, rank, world_size)
    tallies = {"distill": SkipTally(), "contrastive": SkipTally()}
    distilled = distill(rgb, encoder, data, align_config, folder, tallies["distill"], device=device, progress=progress)
    contrastive, aligned, steps = contrast(rgb, encoder, data, align_config, folder, tallies["contrastive"],
                                          device=device, progress=progress)
    clip = contrastive.clip
    shares = parameter_shares(encoder, rgb, text_trainable=align_config.unfreeze_text_last_block, verbose=progress)
    path = align_config.tower_path(count)
    if distributed.is_main():
        save_splat_encoder(encoder, path, logit_scale=float(clip.logit_scale.detach()),
                           text_state=clip.text.trained_state())
    distributed.barrier()
    skipped = {stage: SkipCounts.total(distributed.all_gather_objects(tally.first_epoch())).as_dict()
               for stage, tally in tallies.items()}
    metrics = {
        "level": count,
        "pairs": steps * align_config.contrastive.batch_size * world_size,
        "skipped": skipped,
        "feature_stats": stats.as_dict(),
        "encoder_config": align_config.encoder.model_dump(),
        "distill_target": align_config.distill_target,
        "unfreeze_text_last_block": align_config.unfreeze_text_last_block,
        "cache_text_embeddings": contrastive.cache is not None,
        "text_cache": contrastive.cache_info(),
        "distill": _stage_metrics(distilled),
        "contrastive": _stage_metrics(aligned),
        "logit_scale": float(clip.temperature_scale().detach()),
        "parameter_shares": shares,
        "seconds": time.perf_counter() - start,
    }
    return AlignResult(encoder=encoder, clip=clip, metrics=metrics, path=path)


def _stage_metrics(result: TrainResult) -> dict[str, Any]:
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


def run(params: Params, *, level: int, progress: bool = True) -> StageResult:
    """The ``align@N`` stage: the splat tower of one level, trained and saved, with its curves."""
    if level not in params.levels():
        raise InputError(f"level {level} is none of the pipeline's levels {params.levels()}")
    rgb = create_rgb_clip(params.trained_rgb_model())
    result = align_level(
        rgb, str(params.splat_dir(level, "train")), params.align, params.data,
        progress=progress, level=level,
    )
    return StageResult(metrics=result.metrics)
