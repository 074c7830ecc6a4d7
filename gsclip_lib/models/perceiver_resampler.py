"""Step 2 of the splat image tower (:mod:`gsclip_lib.models.splat_encoder`, METHOD.md section 2):
the Perceiver resampler, a variable number of splat embeddings in, a fixed number of tokens out.

:class:`PerceiverResampler` runs ``resampler_layers`` pre-norm layers (:class:`ResamplerLayer`) of
cross-attention, in which ``num_latents`` latents query the splat embeddings
(:class:`CrossAttention`), and an MLP. Invalid splats are masked out of the keys. Every
cross-attention also sees one all-zero key and value: an image with no valid splat then attends to
that zero slot only, so it gets a finite output without a special case, and a masked slot never
changes anything. With a **locality bias** (``locality_width > 0``, latents that have a place in
the image) the attention logit of latent ``k`` to splat ``i`` gets ``-|c_i - p_k|^2 / (2 s_h^2)``,
with ``c_i`` the splat's centre, ``p_k`` the latent's place (both in ``[-1, 1]``) and one learned
width ``s_h`` per head and layer, so a latent reads the splats of its own part of the image first.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class CrossAttention(nn.Module):
    """Latents attend to splats: multi-head attention with an all-zero key/value slot every query can
    fall back on, masked invalid splats, and, when ``locality_width > 0``, a Gaussian bias
    ``-|c_splat - p_latent|^2 / (2 s_h^2)`` on the logits with one learned width ``s_h`` per head."""

    def __init__(self, width: int, heads: int, locality_width: float = 0.0) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"the width {width} is not divisible by resampler_heads={heads}")
        self.heads = heads
        self.query = nn.Linear(width, width)
        self.key_value = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)
        self.log_locality_width = (
            nn.Parameter(torch.full((heads,), math.log(locality_width))) if locality_width > 0 else None
        )

    def forward(
        self,
        latents: Tensor,  # [B, K, W]
        context: Tensor,  # [B, N, W]
        ignore: Tensor,  # [B, N] bool, True for slots to mask out
        squared_distances: Tensor | None = None,  # [B, K, N] from each latent's place to each splat centre
    ) -> Tensor:  # [B, K, W]
        batch, count, width = latents.shape
        heads, head_width = self.heads, width // self.heads
        query = self.query(latents).view(batch, count, heads, head_width).transpose(1, 2)  # [B, H, K, d]
        key, value = self.key_value(context).view(batch, -1, 2, heads, head_width).permute(2, 0, 3, 1, 4)
        zero = key.new_zeros(batch, heads, 1, head_width)
        key, value = torch.cat([key, zero], 2), torch.cat([value, zero], 2)  # [B, H, N + 1, d]
        logits = query @ key.transpose(-1, -2) * head_width**-0.5  # [B, H, K, N + 1]
        if self.log_locality_width is not None:
            if squared_distances is None:
                raise ValueError("a locality bias needs the squared distances of latents to splats")
            spread = self.log_locality_width.exp().view(1, heads, 1, 1)
            bias = -squared_distances.unsqueeze(1) / (2.0 * spread * spread)  # [B, H, K, N]
            logits = logits + F.pad(bias, (0, 1))  # the zero slot has no place: no bias
        masked = F.pad(ignore, (0, 1), value=False).view(batch, 1, 1, -1)
        weights = logits.masked_fill(masked, float("-inf")).softmax(-1)
        attended = (weights @ value).transpose(1, 2).reshape(batch, count, width)
        return self.out(attended)


class ResamplerLayer(nn.Module):
    """Pre-norm cross-attention of the latents to the splats, then an MLP, both residual."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, locality_width: float = 0.0) -> None:
        super().__init__()
        self.norm_latents = nn.LayerNorm(width)
        self.norm_context = nn.LayerNorm(width)
        self.attn = CrossAttention(width, heads, locality_width)
        self.norm_mlp = nn.LayerNorm(width)
        hidden = int(round(width * mlp_ratio))
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(
        self,
        latents: Tensor,  # [B, K, W]
        context: Tensor,  # [B, N, W]
        ignore: Tensor,  # [B, N] bool, True for slots to mask out
        squared_distances: Tensor | None = None,  # [B, K, N]
    ) -> Tensor:  # [B, K, W]
        latents = latents + self.attn(self.norm_latents(latents), self.norm_context(context), ignore, squared_distances)
        return latents + self.mlp(self.norm_mlp(latents))


class PerceiverResampler(nn.Module):
    """A variable number of splat embeddings in, ``num_latents`` tokens out.

    ``initial_latents`` (``[K, W]``) starts the latent queries (default: small random vectors);
    ``positions`` (``[K, 2]``, where each latent sits in the image) feed the locality bias.
    """

    def __init__(
        self,
        width: int,
        num_latents: int,
        layers: int,
        heads: int,
        mlp_ratio: float,
        *,
        initial_latents: Tensor | None = None,
        positions: Tensor | None = None,
        locality_width: float = 0.0,
    ) -> None:
        super().__init__()
        if initial_latents is None:
            initial_latents = torch.randn(num_latents, width) * width**-0.5
        if tuple(initial_latents.shape) != (num_latents, width):
            raise ValueError(f"initial_latents must be [{num_latents}, {width}], got {tuple(initial_latents.shape)}")
        if locality_width > 0 and positions is None:
            raise ValueError("a locality bias needs the latents' positions")
        # "embedding" in the name keeps it out of weight decay (gsclip_lib.training.loop, open_clip's rule).
        self.latent_embedding = nn.Parameter(initial_latents.detach().clone().float())
        self.register_buffer("positions", None if positions is None else positions.float(), persistent=False)
        self.uses_locality = locality_width > 0
        self.layers = nn.ModuleList(ResamplerLayer(width, heads, mlp_ratio, locality_width) for _ in range(layers))

    def forward(
        self,
        context: Tensor,  # [B, N, W]
        valid: Tensor,  # [B, N] bool
        centres: Tensor | None = None,  # [B, N, 2] splat centres in [-1, 1], needed by the locality bias
    ) -> Tensor:  # [B, K, W]
        latents = self.latent_embedding.to(context.dtype).unsqueeze(0).expand(context.shape[0], -1, -1)
        squared_distances = None
        if self.uses_locality:
            if centres is None:
                raise ValueError("the locality bias needs the splat centres")
            offsets = self.positions.to(centres.dtype)[None, :, None, :] - centres[:, None, :, :]  # [B, K, N, 2]
            squared_distances = offsets.pow(2).sum(-1)
        ignore = ~valid
        for layer in self.layers:
            latents = layer(latents, context, ignore, squared_distances)
        return latents
