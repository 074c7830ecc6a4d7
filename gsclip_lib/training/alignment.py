"""The two training stages of the alignment, per level (METHOD.md section 3).

1. Distillation, one of two targets (``align.distill_target``):

   - ``embedding``, :class:`DistillationObjective`: the splat student's L2-normalized embedding
     against the RGB teacher's embedding of the same image, ``|t - s|^2 = 2 - 2 cos(t, s)`` averaged
     over the batch (the paper's MSE between normalized CLS embeddings, summed over the D dimensions
     instead of averaged, so its value reads as a cosine); targets from :func:`teacher_embeddings`;
   - ``tokens``, :class:`TokenDistillationObjective`: the K + 1 tokens the student hands the frozen
     blocks against the teacher's own block inputs for the image (:func:`teacher_tokens`), each
     latent matched to its cell of the patch grid; the relative squared error per token.
2. :class:`ContrastiveObjective`: CLIP's loss between splat embeddings and the frozen text tower's
   caption embeddings, with the splat CLIP's own learnable temperature.

Both read :class:`AlignBatch` batches cut from an epoch's seeded order (:func:`make_epoch_batches`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from torch import Tensor, nn

from gsclip_lib import distributed
from gsclip_lib.models.splat_clip import SplatClip
from gsclip_lib.models.splat_encoder import SplatImageEncoder, teacher_block_inputs
from gsclip_lib.splats.container import Splats
from gsclip_lib.training.batching import epoch_permutation, steps_per_epoch

ENCODE_CHUNK = 256  # images or captions per no-grad forward when precomputing


@dataclass
class AlignBatch:
    """A batch of either stage: splats, plus teacher targets (stage 1) or caption ids (stage 2)."""

    splats: Splats  # [B, N]
    targets: Tensor | None = None  # [B, D] L2-normalized teacher embeddings, or [B, 1 + K, W] its block inputs
    caption_ids: Tensor | None = None  # [B] int64, rows of the objective's caption tables

    def to(self, device: torch.device | str) -> "AlignBatch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return AlignBatch(self.splats.to(device), move(self.targets), move(self.caption_ids))


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
        order = epoch_permutation(count, seed, epoch)
        for step in range(steps):
            rows = order[step * size : (step + 1) * size]
            yield AlignBatch(
                splats=splats.index(rows),
                targets=None if targets is None else targets[rows],
                caption_ids=None if caption_ids is None else caption_ids[rows],
            )

    return batches, steps


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


@torch.no_grad()
def teacher_tokens(rgb: Any, images: Tensor, side: int, chunk: int = ENCODE_CHUNK) -> Tensor:  # [M, 1 + side^2, W]
    """The RGB ViT's block inputs for ``images`` ([M, C, S, S] in [0, 1]), patch tokens averaged into
    the ``side x side`` latent cells (:func:`gsclip_lib.models.splat_encoder.teacher_block_inputs`);
    on the CPU. They need only the patch embedding and ``ln_pre``, none of the blocks."""
    visual = rgb.model.visual
    device = next(rgb.model.parameters()).device
    was_training = visual.training
    visual.eval()
    try:
        outputs = [
            teacher_block_inputs(visual, rgb.prepare_images(images[i : i + chunk].to(device)), side).cpu()
            for i in range(0, images.shape[0], chunk)
        ]
    finally:
        visual.train(was_training)
    return torch.cat(outputs)


def relative_token_error(tokens: Tensor, targets: Tensor) -> Tensor:  # [B, T, W] twice -> [B, T]
    """``|s - t|^2 / |t|^2`` per token: the squared error relative to the target's own size."""
    return (tokens - targets).pow(2).sum(-1) / targets.pow(2).sum(-1).clamp_min(1e-12)


class TokenDistillationObjective(nn.Module):
    """Stage 1 with ``align.distill_target: tokens``: the student's block inputs (CLS and K latents,
    after ``norm_pre``) against the teacher's (:func:`teacher_tokens`), mean relative squared error.

    The frozen blocks are not run: the student learns to write what they are used to reading, and
    the blocks then carry it to the embedding as they do for the teacher.
    """

    def __init__(self, student: SplatImageEncoder) -> None:
        super().__init__()
        self.student = student

    def forward(self, batch: AlignBatch) -> tuple[Tensor, dict[str, float]]:
        device = self.student.class_embedding.device
        batch = batch.to(device)
        tokens = self.student.block_inputs(batch.splats)
        if tokens.shape != batch.targets.shape:
            raise ValueError(f"the student writes {tuple(tokens.shape)} tokens, the targets are {tuple(batch.targets.shape)}")
        loss = relative_token_error(tokens, batch.targets).mean()
        return loss, {"relative_error": float(loss.detach())}


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


def call_objective(model: nn.Module, batch: AlignBatch) -> tuple[Tensor, dict[str, float]]:
    # Through the module's __call__, so a DDP wrapper sees the forward and syncs the gradients.
    return model(batch)
