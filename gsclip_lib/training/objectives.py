"""What contrastive training minimizes, for the RGB CLIP and the splat CLIP alike (METHOD.md section 3).

- :func:`clip_loss_fn`: CLIP's symmetric InfoNCE (open_clip's ``ClipLoss``) between the RGB model's
  image and text embeddings, for pretraining the RGB teacher;
- :func:`caption_table`: each distinct caption once, so a frozen text tower encodes it once.

The learned temperature of every CLIP here is clamped to ``[0, log 100]`` after each optimizer step,
as open_clip does (:func:`clamp_logit_scale`). The alignment's own objectives are in
:mod:`gsclip_lib.training.alignment`.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from open_clip.loss import ClipLoss
from torch import Tensor, nn

from gsclip_lib.models.rgb_clip import MAX_LOGIT_SCALE, RgbClip


def clamp_logit_scale(holder: nn.Module) -> None:
    """Keep ``holder.logit_scale`` (an open_clip CLIP, a SplatClip, or an objective holding
    ``clip``) in ``[0, log 100]``; run after every optimizer step."""
    model = getattr(holder, "clip", holder)
    with torch.no_grad():
        model.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)


def clip_loss_fn(clip: RgbClip, loss: ClipLoss):
    """``loss_fn`` for :func:`train`: CLIP's InfoNCE on an image-text batch (``images [B, C, S, S]``,
    ``captions``), each distinct caption of the batch tokenized and encoded once."""

    def loss_fn(model: torch.nn.Module, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        device = clip.device
        distinct, rows = caption_table(batch.captions)
        output = model(clip.prepare_images(batch.images.to(device)), clip.tokenize(distinct).to(device))
        if isinstance(output, dict):
            image_features, text_features, logit_scale = (
                output["image_features"], output["text_features"], output["logit_scale"]
            )
        else:
            image_features, text_features, logit_scale = output[:3]
        value = loss(image_features, text_features[rows.to(device)], logit_scale)
        return value, {"logit_scale": logit_scale.detach()}

    return loss_fn


def caption_table(captions: Sequence[str]) -> tuple[list[str], Tensor]:
    """Distinct captions in order of first appearance, and each caption's row ``[M]``."""
    rows: dict[str, int] = {}
    ids = [rows.setdefault(caption, len(rows)) for caption in captions]
    return list(rows), torch.tensor(ids, dtype=torch.int64)
