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

Both read :class:`AlignBatch` batches streamed from the level's splat shards (:func:`collate_pairs`);
the teacher's targets are computed per batch.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from torch import Tensor, nn

from gsclip_lib import distributed
from gsclip_lib.data.skip_counts import SkipCounts
from gsclip_lib.data.splat_shards import PairedSample
from gsclip_lib.models.splat_clip import SplatClip
from gsclip_lib.models.splat_encoder import SplatImageEncoder, teacher_block_inputs
from gsclip_lib.splats.codec import decode_batch
from gsclip_lib.splats.container import Splats
from gsclip_lib.training.objectives import caption_table

ENCODE_CHUNK = 256  # images per no-grad forward of the teacher


@dataclass
class AlignBatch:
    """A batch of either stage: splats with their images and captions; stage 1 adds the teacher's targets."""

    splats: Splats  # [B, N]
    images: Tensor | None = None  # [B, C, H, W] float in [0, 1], what the splats were fitted to
    captions: list[str] = field(default_factory=list)  # [B]
    targets: Tensor | None = None  # [B, D] L2-normalized teacher embeddings, or [B, 1 + K, W] its block inputs
    skips: SkipCounts = field(default_factory=SkipCounts)  # bad samples met since the previous batch

    def to(self, device: torch.device | str) -> "AlignBatch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return AlignBatch(self.splats.to(device), move(self.images), self.captions, move(self.targets), self.skips)


def collate_pairs(samples: Sequence[PairedSample], num_slots: int | None = None) -> AlignBatch:
    """Stack a list of :class:`PairedSample` into an :class:`AlignBatch`, splats padded to ``num_slots``."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    splats, _, _ = decode_batch([sample.record for sample in samples], num_slots=num_slots)
    return AlignBatch(
        splats=splats,
        images=None if samples[0].image is None else torch.stack([sample.image for sample in samples]),
        captions=[sample.caption for sample in samples],
        skips=SkipCounts.total(sample.skips for sample in samples),
    )


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


class _Distillation(nn.Module):
    """Stage 1's frame: ``forward(batch) -> (loss, metrics)`` with the batch on the student's device;
    a subclass says what the student is matched to in ``distillation_loss``."""

    def __init__(self, student: SplatImageEncoder) -> None:
        super().__init__()
        self.student = student

    def forward(self, batch: AlignBatch) -> tuple[Tensor, dict[str, Tensor]]:
        return self.distillation_loss(batch.to(self.student.class_embedding.device))

    def distillation_loss(self, batch: AlignBatch) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError


class TokenDistillationObjective(_Distillation):
    """Stage 1 with ``align.distill_target: tokens``: the student's block inputs (CLS and K latents,
    after ``norm_pre``) against the teacher's (:func:`teacher_tokens`, computed for each batch),
    mean relative squared error.

    The frozen blocks are not run: the student learns to write what they are used to reading, and
    the blocks then carry it to the embedding as they do for the teacher.
    """

    def distillation_loss(self, batch: AlignBatch) -> tuple[Tensor, dict[str, Tensor]]:
        tokens = self.student.block_inputs(batch.splats)
        if tokens.shape != batch.targets.shape:
            raise ValueError(f"the student writes {tuple(tokens.shape)} tokens, the targets are {tuple(batch.targets.shape)}")
        loss = relative_token_error(tokens, batch.targets).mean()
        return loss, {"relative_error": loss.detach()}


class DistillationObjective(_Distillation):
    """Stage 1 with ``align.distill_target: embedding``: the student's normalized embedding against
    the teacher's (:func:`teacher_embeddings`, computed for each batch), mean squared distance."""

    def distillation_loss(self, batch: AlignBatch) -> tuple[Tensor, dict[str, Tensor]]:
        embeddings = F.normalize(self.student(batch.splats), dim=-1)
        squared = (embeddings - batch.targets).pow(2).sum(-1)  # [B] = 2 - 2 cos
        loss = squared.mean()
        return loss, {"cosine": 1.0 - loss.detach() / 2.0}


class ContrastiveObjective(nn.Module):
    """Stage 2: ``forward(batch) -> (loss, metrics)``, ClipLoss between splats and the batch's captions.

    With a frozen text tower and ``cache_size > 0`` the embeddings of the ``cache_size`` most
    recently used captions are kept (:class:`CaptionEmbeddingCache`): memory stays bounded however
    many distinct captions the data holds. The cache is a plain attribute, not a buffer: it is this
    rank's own, and DDP would otherwise overwrite it with rank 0's.
    """

    def __init__(self, clip: SplatClip, tokenizer: Callable[[list[str]], Tensor], cache_size: int = 0) -> None:
        super().__init__()
        self.clip = clip
        self.tokenizer = tokenizer
        rank, world_size = distributed.rank_and_world_size()
        self.loss = ClipLoss(gather_with_grad=True, rank=rank, world_size=world_size)
        self.text_frozen = not any(p.requires_grad for p in clip.text.parameters())
        self.cache = CaptionEmbeddingCache(cache_size) if cache_size > 0 and self.text_frozen else None

    @torch.no_grad()
    def _encode_frozen(self, captions: list[str]) -> Tensor:  # [U, D] normalized
        was_training = self.clip.text.training
        self.clip.text.eval()
        try:
            return self.clip.encode_text(self.tokenizer(captions).to(self.clip.logit_scale.device), normalize=True)
        finally:
            self.clip.text.train(was_training)

    def text_features(self, captions: list[str]) -> Tensor:  # [B, D] normalized
        distinct, rows = caption_table(captions)
        device = self.clip.logit_scale.device
        if self.cache is not None:
            return self.cache.lookup(distinct, self._encode_one).to(device)[rows.to(device)]
        if self.text_frozen:
            features = self._encode_frozen(distinct)
        else:
            features = self.clip.encode_text(self.tokenizer(distinct).to(device), normalize=True)
        return features[rows.to(device)]

    def _encode_one(self, caption: str) -> Tensor:  # [D]
        # One caption at a time: a cached embedding must not depend on which batch first met it,
        # or a resumed run (which starts with an empty cache) would differ in the last bits.
        return self._encode_frozen([caption])[0].cpu()

    def cache_info(self) -> dict[str, int] | None:
        return None if self.cache is None else self.cache.info()

    def forward(self, batch: AlignBatch) -> tuple[Tensor, dict[str, Tensor]]:
        batch = batch.to(self.clip.logit_scale.device)
        image = self.clip.encode_image(batch.splats, normalize=True)
        text = self.text_features(batch.captions)
        scale = self.clip.temperature_scale()
        loss = self.loss(image, text, scale)
        with torch.no_grad():
            logits = image @ text.T
            accuracy = (logits.argmax(-1) == torch.arange(len(logits), device=logits.device)).float().mean()
        return loss, {"logit_scale": scale.detach(), "batch_accuracy": accuracy}


class CaptionEmbeddingCache:
    """The embeddings of the ``capacity`` most recently used captions, least recently used evicted first."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.entries: OrderedDict[str, Tensor] = OrderedDict()
        self.hits = self.misses = self.evictions = 0

    def lookup(self, captions: list[str], encode: Callable[[str], Tensor]) -> Tensor:  # [U, D]
        rows = []
        for caption in captions:
            embedding = self.entries.get(caption)
            if embedding is None:
                self.misses += 1
                embedding = encode(caption)
                self.entries[caption] = embedding
                if len(self.entries) > self.capacity:
                    self.entries.popitem(last=False)
                    self.evictions += 1
            else:
                self.hits += 1
                self.entries.move_to_end(caption)
            rows.append(embedding)
        return torch.stack(rows)

    def info(self) -> dict[str, int]:
        return {"capacity": self.capacity, "size": len(self.entries), "hits": self.hits, "misses": self.misses,
                "evictions": self.evictions}


def call_objective(model: nn.Module, batch: AlignBatch) -> tuple[Tensor, dict[str, Tensor]]:
    # Through the module's __call__, so a DDP wrapper sees the forward and syncs the gradients.
    return model(batch)
