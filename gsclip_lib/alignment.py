"""Aligning the splat image tower with a CLIP model, one compression level at a time (PAPER.md section 3).

Two stages, each run by :func:`gsclip_lib.training.train` (checkpoint every epoch, identical resume,
DDP when the world size is above 1), with its own checkpoint folder
``checkpoint_dir/N<count>/{distill,contrastive}``:

1. **Distillation.** The RGB CLIP image tower (the teacher) sees the image, the splat tower (the
   student, running the teacher's frozen blocks) sees that image's splats; the loss is the squared
   distance between the L2-normalized embeddings, ``|t - s|^2 = 2 - 2 cos(t, s)``, averaged over
   the batch (the paper's MSE between normalized CLS embeddings, summed over the D dimensions
   instead of averaged so its value reads as a cosine). The teacher is frozen, in eval mode and sees
   no augmentation, so its embedding of every training image is computed once before the stage
   (:func:`teacher_embeddings`) instead of once per step: the same targets, without a teacher
   forward per step.
2. **Contrastive alignment.** open_clip's ``ClipLoss`` (the symmetric InfoNCE, gathered over ranks)
   between splat embeddings and text embeddings, with a learnable temperature: a new logit scale
   that starts at the RGB model's and is clamped to ``[0, log 100]`` after every step, as in CLIP. The text tower
   is frozen; ``unfreeze_text_last_block`` trains a *copy* of its last block, final norm and
   projection (the RGB model is never changed, :class:`TextTower`). With a frozen text tower and
   ``cache_text_embeddings``, each distinct caption is encoded once before the stage.

Data. Both stages read the same pairs, held in memory (:func:`load_paired_data`): the level's splat
shards (this rank's share, :func:`gsclip_lib.splat_shards.splat_dataset`), and the image shards they
were fitted from, matched by the splat sample's ``source_shard`` and ``source_key`` metadata (the
sample's own key and any shard when the metadata lacks them). Only the image shards the splats name
are read. An epoch is a seeded permutation (seed and epoch) of the pairs cut into full batches; every
rank takes the same number of steps (the smallest rank's).

The trained splat tower is saved as ``checkpoint_dir/N<count>/splat_encoder.pt``
(:func:`gsclip_lib.splat_encoder.save_splat_encoder`, with the learned logit scale and, when it was
trained, the text tower's copied parts); :func:`load_splat_clip` rebuilds the whole splat CLIP and
:func:`gsclip_lib.splat_encoder.load_splat_encoder` the image tower alone.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from open_clip.transformer import text_global_pool
from torch import Tensor, nn
from tqdm.auto import tqdm

from gsclip_lib import distributed
from gsclip_lib.shards import ImageTextShards, SkipCounts, expand_shard_spec
from gsclip_lib.splat_encoder import (
    SplatEncoderConfig,
    SplatImageEncoder,
    build_splat_encoder,
    fit_feature_statistics,
    load_splat_encoder,
    parameter_shares,
    save_splat_encoder,
)
from gsclip_lib.splat_shards import ShardSpec, collate_splats, splat_dataset
from gsclip_lib.splats import Splats
from gsclip_lib.training import OptimConfig, train

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's clamp of the learned temperature
ENCODE_CHUNK = 256  # images or captions per no-grad forward when precomputing


@dataclass(frozen=True)
class AlignConfig:
    distill: OptimConfig  # stage 1 (paper: 2 epochs)
    contrastive: OptimConfig  # stage 2 (paper: 5 epochs)
    unfreeze_text_last_block: bool = False  # train a copy of the text tower's last block, ln_final, projection
    cache_text_embeddings: bool = True  # frozen text tower: encode each distinct caption once
    checkpoint_dir: str = "data/models/align"  # stages in checkpoint_dir/N<count>/{distill,contrastive}


# ----------------------------------------------------------------------------------------------
# Data


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
    *,
    image_size: int,
    channels: int,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = False,
) -> PairedData:
    """This rank's splat samples of ``level_spec`` with their images from ``image_spec``.

    Images are read with the preprocessing the fit recorded in the splat metadata (``resize_mode``;
    ``center_crop`` when absent) at ``image_size``; the splats must describe images of that size.
    """
    dataset = splat_dataset(level_spec, rank=rank, world_size=world_size, split_by_worker=False)
    samples = list(tqdm(dataset, desc="read splats", disable=not progress))
    splat_skips = dataset.skip_counts
    if not samples:
        raise ValueError(f"no splat samples in {level_spec!r} for this rank")
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
    resize_mode = samples[0].metadata.get("resize_mode") or "center_crop"
    reader = ImageTextShards(
        urls,
        image_size=image_size,
        resize_mode=resize_mode,
        channels=channels,
        rank=0,
        world_size=1,
        split_by_worker=False,
    )
    images: dict[int, Tensor] = {}
    for sample in tqdm(reader, desc="read images", disable=not progress):
        shard = os.path.basename(sample.url)
        index = wanted.get((shard, sample.key), wanted.get((None, sample.key)))
        if index is not None:
            images[index] = sample.image
    paired = sorted(images)
    kept = [samples[i] for i in paired]
    if not kept:
        raise ValueError(f"none of the {len(samples)} splat samples found its image in {image_spec!r}")
    batch = collate_splats(kept)
    stacked = torch.stack([images[i] for i in paired])
    if tuple(stacked.shape[-2:]) != (batch.height, batch.width) or stacked.shape[1] != batch.splats.channels:
        raise ValueError(
            f"the images are {tuple(stacked.shape[1:])}, the splats describe "
            f"{(batch.splats.channels, batch.height, batch.width)}: image_spec, image_size and channels "
            "must be those the splats were fitted from"
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
class AlignBatch:
    """A batch of either stage: splats, plus teacher targets (stage 1) or caption ids (stage 2)."""

    splats: Splats  # [B, N]
    targets: Tensor | None = None  # [B, D] L2-normalized teacher embeddings
    caption_ids: Tensor | None = None  # [B] int64, rows of the objective's caption tables

    def to(self, device: torch.device | str) -> "AlignBatch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return AlignBatch(self.splats.to(device), move(self.targets), move(self.caption_ids))


def epoch_order(num_samples: int, seed: int, epoch: int) -> Tensor:  # [M] int64
    """The seeded permutation of an epoch (the same on a rerun, whatever ran before)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=generator)


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    """Full batches per epoch (one short batch when there are fewer samples than a batch), the
    smallest over the ranks when torch.distributed is initialized."""
    return distributed.all_reduce_min(max(1, num_samples // batch_size))


def make_epoch_batches(
    splats: Splats,
    batch_size: int,
    seed: int,
    *,
    targets: Tensor | None = None,
    caption_ids: Tensor | None = None,
) -> tuple[Callable[[int], Iterable[AlignBatch]], int]:
    """``(batches, steps)``: ``batches(epoch)`` yields ``steps`` seeded batches of the pairs."""
    count = splats.batch_size
    steps = steps_per_epoch(count, batch_size)
    size = min(batch_size, count)

    def batches(epoch: int) -> Iterable[AlignBatch]:
        order = epoch_order(count, seed, epoch)
        for step in range(steps):
            rows = order[step * size : (step + 1) * size]
            yield AlignBatch(
                splats=splats.index(rows),
                targets=None if targets is None else targets[rows],
                caption_ids=None if caption_ids is None else caption_ids[rows],
            )

    return batches, steps


# ----------------------------------------------------------------------------------------------
# Towers and objectives


@torch.no_grad()
def teacher_embeddings(rgb: Any, images: Tensor, chunk: int = ENCODE_CHUNK) -> Tensor:  # [M, D] on the CPU
    """The RGB image tower's L2-normalized embeddings of ``images`` ([M, C, S, S] in [0, 1])."""
    model = rgb.model
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        outputs = [
            F.normalize(model.encode_image(rgb.prepare_images(images[i : i + chunk].to(device))), dim=-1).cpu()
            for i in range(0, images.shape[0], chunk)
        ]
    finally:
        model.train(was_training)
    return torch.cat(outputs)


class TextTower(nn.Module):
    """The RGB CLIP's text tower, frozen and shared; with ``train_last_block`` its last block,
    ``ln_final`` and ``text_projection`` are trainable deep copies (the RGB model stays unchanged).

    ``encode_text`` is open_clip's ``CLIP.encode_text`` on these parts.
    """

    def __init__(self, clip_model: nn.Module, train_last_block: bool = False) -> None:
        super().__init__()
        for name in ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection"):
            if not hasattr(clip_model, name):
                raise ValueError(f"need an open_clip CLIP with a built-in text tower (no {name!r})")
        self.train_last_block = train_last_block
        self.token_embedding = clip_model.token_embedding
        self.positional_embedding = clip_model.positional_embedding
        blocks = list(clip_model.transformer.resblocks)
        ln_final, projection = clip_model.ln_final, clip_model.text_projection
        for part in blocks + [ln_final, self.token_embedding]:
            part.requires_grad_(False)
        self.positional_embedding.requires_grad_(False)
        if isinstance(projection, nn.Module):
            projection.requires_grad_(False)
        elif projection is not None:
            projection.requires_grad_(False)
        if train_last_block:
            blocks[-1] = copy.deepcopy(blocks[-1]).requires_grad_(True)
            ln_final = copy.deepcopy(ln_final).requires_grad_(True)
            if isinstance(projection, nn.Parameter):
                projection = nn.Parameter(projection.detach().clone())
            elif projection is not None:
                projection = copy.deepcopy(projection).requires_grad_(True)
        self.blocks = nn.ModuleList(blocks)
        self.ln_final = ln_final
        self.text_projection = projection
        self.register_buffer("attn_mask", clip_model.attn_mask, persistent=False)
        self.pool_type = clip_model.text_pool_type
        self.eos_id = getattr(clip_model, "text_eos_id", None)
        self.batch_first = getattr(clip_model.transformer, "batch_first", True)

    def trained_state(self) -> dict[str, Tensor] | None:
        """The state of the trainable copies (None when the tower is all frozen)."""
        if not self.train_last_block:
            return None
        prefixes = (f"blocks.{len(self.blocks) - 1}.", "ln_final.", "text_projection")
        return {k: v.detach().cpu() for k, v in self.state_dict().items() if k.startswith(prefixes)}

    def encode_text(self, tokens: Tensor, normalize: bool = False) -> Tensor:  # [T, L] -> [T, D]
        x = self.token_embedding(tokens) + self.positional_embedding
        if not self.batch_first:
            x = x.transpose(0, 1)
        for block in self.blocks:
            x = block(x, attn_mask=self.attn_mask)
        if not self.batch_first:
            x = x.transpose(0, 1)
        x = self.ln_final(x)
        x = text_global_pool(x, tokens, self.pool_type, eos_token_id=self.eos_id)
        if isinstance(self.text_projection, nn.Module):
            x = self.text_projection(x)
        elif self.text_projection is not None:
            x = x @ self.text_projection
        return F.normalize(x, dim=-1) if normalize else x

    forward = encode_text


class SplatClip(nn.Module):
    """The splat CLIP: the splat image tower, a text tower and a learned logit scale.

    ``encode_image`` takes a :class:`Splats` batch and ``encode_text`` tokens, as open_clip's CLIP
    does for pixels, so the zero-shot evaluator reads it like an RGB CLIP.
    """

    def __init__(self, image: SplatImageEncoder, text: TextTower, logit_scale: float) -> None:
        super().__init__()
        self.image = image
        self.text = text
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale)))

    def encode_image(self, splats: Splats, normalize: bool = False) -> Tensor:  # [B, D]
        embeddings = self.image(splats)
        return F.normalize(embeddings, dim=-1) if normalize else embeddings

    def encode_text(self, tokens: Tensor, normalize: bool = False) -> Tensor:  # [T, D]
        return self.text.encode_text(tokens, normalize=normalize)

    def temperature_scale(self) -> Tensor:
        return self.logit_scale.clamp(0.0, MAX_LOGIT_SCALE).exp()


class DistillationObjective(nn.Module):
    """Stage 1: ``forward(batch) -> (loss, metrics)``, the student against precomputed targets."""

    def __init__(self, student: SplatImageEncoder) -> None:
        super().__init__()
        self.student = student

    def forward(self, batch: AlignBatch) -> tuple[Tensor, dict[str, float]]:
        device = self.student.class_embedding.device
        batch = batch.to(device)
        embeddings = F.normalize(self.student(batch.splats), dim=-1)
        squared = (embeddings - batch.targets).pow(2).sum(-1)  # [B] = 2 - 2 cos
        loss = squared.mean()
        return loss, {"cosine": float(1.0 - loss.detach() / 2.0)}


class ContrastiveObjective(nn.Module):
    """Stage 2: ``forward(batch) -> (loss, metrics)``, ClipLoss between splats and captions.

    The caption tables (tokens, and embeddings when cached) are plain tensors, not buffers: they
    are this rank's own, and DDP would otherwise overwrite them with rank 0's.
    """

    def __init__(
        self,
        clip: SplatClip,
        caption_tokens: Tensor,  # [U, L] int64, one row per distinct caption
        cache_text_embeddings: bool = True,
    ) -> None:
        super().__init__()
        self.clip = clip
        rank, world_size = distributed.rank_and_world_size()
        self.loss = ClipLoss(gather_with_grad=True, rank=rank, world_size=world_size)
        self.text_frozen = not any(p.requires_grad for p in clip.text.parameters())
        self.caption_tokens = caption_tokens
        self.caption_embeddings: Tensor | None = None
        if cache_text_embeddings and self.text_frozen:
            self.caption_embeddings = self._encode_captions(caption_tokens)

    @torch.no_grad()
    def _encode_captions(self, tokens: Tensor) -> Tensor:  # [U, D] normalized, on the CPU
        device = self.clip.logit_scale.device
        was_training = self.clip.text.training
        self.clip.text.eval()
        try:
            chunks = [
                self.clip.encode_text(tokens[i : i + ENCODE_CHUNK].to(device), normalize=True).cpu()
                for i in range(0, tokens.shape[0], ENCODE_CHUNK)
            ]
        finally:
            self.clip.text.train(was_training)
        return torch.cat(chunks)

    def text_features(self, caption_ids: Tensor) -> Tensor:  # [B, D] normalized
        device = self.clip.logit_scale.device
        if self.caption_embeddings is not None:
            return self.caption_embeddings[caption_ids.cpu()].to(device)
        tokens = self.caption_tokens[caption_ids.cpu()].to(device)
        if self.text_frozen:
            with torch.no_grad():
                return self.clip.encode_text(tokens, normalize=True)
        return self.clip.encode_text(tokens, normalize=True)

    def forward(self, batch: AlignBatch) -> tuple[Tensor, dict[str, float]]:
        batch = batch.to(self.clip.logit_scale.device)
        image = self.clip.encode_image(batch.splats, normalize=True)
        text = self.text_features(batch.caption_ids)
        scale = self.clip.temperature_scale()
        loss = self.loss(image, text, scale)
        with torch.no_grad():
            logits = image @ text.T
            accuracy = (logits.argmax(-1) == torch.arange(len(logits), device=logits.device)).float().mean()
        return loss, {"logit_scale": float(scale.detach()), "batch_accuracy": float(accuracy)}


def clamp_logit_scale(objective: nn.Module) -> None:
    """After every step, as open_clip does: keep the learned temperature in ``[0, log 100]``."""
    with torch.no_grad():
        objective.clip.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)


def _call_objective(model: nn.Module, batch: AlignBatch) -> tuple[Tensor, dict[str, float]]:
    # Through the module's __call__, so a DDP wrapper sees the forward and syncs the gradients.
    return model(batch)


def caption_table(captions: Sequence[str]) -> tuple[list[str], Tensor]:
    """Distinct captions in order of first appearance, and each caption's row ``[M]``."""
    rows: dict[str, int] = {}
    ids = [rows.setdefault(caption, len(rows)) for caption in captions]
    return list(rows), torch.tensor(ids, dtype=torch.int64)


# ----------------------------------------------------------------------------------------------
# One level


@dataclass
class AlignResult:
    encoder: SplatImageEncoder
    clip: SplatClip
    metrics: dict[str, Any]
    path: str  # the saved splat_encoder.pt


def level_dir(checkpoint_dir: str | os.PathLike, count: int) -> str:
    return os.path.join(os.fspath(checkpoint_dir), f"N{count}")


def align_level(
    rgb: Any,
    level_spec: ShardSpec,
    image_spec: ShardSpec,
    encoder_config: SplatEncoderConfig,
    align_config: AlignConfig,
    *,
    image_size: int,
    channels: int,
    progress: bool = False,
    level: int | None = None,
    device: torch.device | str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> AlignResult:
    """Distil, then contrastively align, a splat tower for one level; save it; return its metrics.

    ``rgb`` is a :class:`gsclip_lib.clip_models.RgbClip` (``model``, ``tokenizer``,
    ``prepare_images``); its weights are not changed (trained blocks are copies), but its vision
    blocks and text tower are set to ``requires_grad=False``: it is the frozen teacher.
    ``level`` names the checkpoint folder ``N<level>`` (default: the largest splat count read).
    """
    start = time.perf_counter()
    device = torch.device(device) if device is not None else next(rgb.model.parameters()).device
    data = load_paired_data(
        level_spec, image_spec, image_size=image_size, channels=channels, rank=rank, world_size=world_size,
        progress=progress,
    )
    count = level if level is not None else _largest_over_ranks(data.level)
    folder = level_dir(align_config.checkpoint_dir, count)
    stats = fit_feature_statistics(
        [data.splats.index(slice(i, i + 4096)) for i in range(0, len(data), 4096)],
        height=data.height,
        width=data.width,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(align_config.distill.seed)
        encoder = build_splat_encoder(rgb, encoder_config, stats, (data.height, data.width)).to(device)

    # Stage 1: distillation against the teacher's embeddings of the same images.
    targets = teacher_embeddings(rgb, data.images)
    distill = DistillationObjective(encoder)
    batches, steps = make_epoch_batches(
        data.splats, align_config.distill.batch_size, align_config.distill.seed, targets=targets
    )
    distill_result = train(
        distill,
        _call_objective,
        batches,
        steps,
        align_config.distill,
        os.path.join(folder, "distill"),
        description=f"distill N{count}",
        progress=progress,
        device=device,
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
        _call_objective,
        batches,
        steps,
        align_config.contrastive,
        os.path.join(folder, "contrastive"),
        description=f"align N{count}",
        progress=progress,
        device=device,
        after_step=clamp_logit_scale,
    )

    shares = parameter_shares(encoder, rgb, text_trainable=align_config.unfreeze_text_last_block, verbose=progress)
    path = os.path.join(folder, "splat_encoder.pt")
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
        "encoder_config": asdict(encoder_config),
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


def load_splat_clip(path: str | os.PathLike, rgb: Any) -> SplatClip:
    """The splat CLIP saved by :func:`align_level`: splat tower, text tower and logit scale."""
    encoder = load_splat_encoder(path, rgb)
    payload = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    text_state = payload.get("text_state")
    text = TextTower(rgb.model, train_last_block=text_state is not None)
    if text_state is not None:
        missing, unexpected = text.load_state_dict(text_state, strict=False)
        if unexpected:
            raise ValueError(f"{path}: text state does not fit this RGB model: unexpected {unexpected}")
    device = encoder.class_embedding.device
    return SplatClip(encoder, text.to(device), payload.get("logit_scale", MAX_LOGIT_SCALE)).to(device)
