"""The splat CLIP: the splat image tower beside the RGB CLIP's text tower (METHOD.md sections 2 and 3).

:class:`SplatClip` reads like an open_clip CLIP (``encode_image`` takes a :class:`Splats` batch,
``encode_text`` takes tokens), so the zero-shot evaluator scores it like the RGB model.
:class:`TextTower` is the RGB CLIP's text tower, frozen and shared; with ``train_last_block`` its last
block, final norm and projection become trainable *copies*, so the RGB model is never changed.
:func:`load_splat_clip` rebuilds a trained splat CLIP from the file the align stage saves, and
:func:`parameter_shares` counts what of it is trained, frozen and reused from the RGB model.
"""

from __future__ import annotations

import copy
import os
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from torch import Tensor, nn

from gsclip_lib.models.rgb_clip import MAX_LOGIT_SCALE
from gsclip_lib.models.splat_encoder import SplatImageEncoder, load_splat_encoder, visual_of
from gsclip_lib.splats.container import Splats


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


# ----------------------------------------------------------------------------------------------
# Parameter accounting


def _count(parameters: Iterable[nn.Parameter]) -> int:
    seen: dict[int, int] = {}
    for parameter in parameters:
        seen[id(parameter)] = parameter.numel()
    return sum(seen.values())


def text_tower_parameters(rgb_model: Any) -> list[nn.Parameter]:
    """The parameters of the RGB CLIP's text tower (everything but ``visual`` and the logit scale)."""
    model = getattr(rgb_model, "model", rgb_model)
    return [
        p for name, p in model.named_parameters() if not name.startswith("visual.") and not name.startswith("logit_")
    ]


def text_last_block_parameters(rgb_model: Any) -> list[nn.Parameter]:
    """What ``unfreeze_text_last_block`` trains: the last text block, the final norm and projection."""
    model = getattr(rgb_model, "model", rgb_model)
    parts: list[nn.Parameter] = list(model.transformer.resblocks[-1].parameters())
    parts += list(model.ln_final.parameters())
    projection = model.text_projection
    if isinstance(projection, nn.Parameter):
        parts.append(projection)
    elif isinstance(projection, nn.Module):
        parts += list(projection.parameters())
    return parts


def parameter_shares(
    splat_encoder: SplatImageEncoder,
    rgb_model: Any,
    text_trainable: bool = False,
    *,
    verbose: bool = True,
) -> dict[str, float | int]:
    """Trainable and reused parameters of the splat CLIP (splat image tower + text tower).

    - the image tower's trainable parameters are the ones with ``requires_grad`` (everything but
      the shared, frozen RGB blocks);
    - the text tower is frozen, or, with ``text_trainable``, its last block, final norm and
      projection are trained (the paper's 13.8 % setting);
    - ``reused_from_rgb`` counts the RGB ViT's transformer blocks the splat tower runs (shared or
      copied); the text tower, which is the RGB CLIP's own, is reported on its own line;
    - the learned temperature (one number) is left out.

    Shares are fractions of ``total_parameters``. Printed when ``verbose``.
    """
    image_params = list(splat_encoder.parameters())
    image_total = _count(image_params)
    image_trainable = _count(p for p in image_params if p.requires_grad)
    text_params = text_tower_parameters(rgb_model)
    text_total = _count(text_params)
    text_train = _count(text_last_block_parameters(rgb_model)) if text_trainable else 0
    reused = _count(visual_of(rgb_model).transformer.parameters())
    total = image_total + text_total
    trainable = image_trainable + text_train
    shares: dict[str, float | int] = {
        "image_tower_parameters": image_total,
        "image_tower_trainable": image_trainable,
        "text_tower_parameters": text_total,
        "text_tower_trainable": text_train,
        "total_parameters": total,
        "trainable_parameters": trainable,
        "frozen_parameters": total - trainable,
        "reused_from_rgb": reused,
        "trainable_share": trainable / total,
        "frozen_share": (total - trainable) / total,
        "reused_share": reused / total,
        "image_tower_trainable_share": image_trainable / image_total,
    }
    if verbose:
        print(format_parameter_shares(shares))
    return shares


def format_parameter_shares(shares: dict[str, float | int]) -> str:
    return (
        f"splat CLIP: {shares['total_parameters']:,} parameters "
        f"(image tower {shares['image_tower_parameters']:,}, text tower {shares['text_tower_parameters']:,}); "
        f"trainable {shares['trainable_parameters']:,} = {100 * shares['trainable_share']:.2f} %, "
        f"reused RGB blocks {shares['reused_from_rgb']:,} = {100 * shares['reused_share']:.2f} %"
    )
