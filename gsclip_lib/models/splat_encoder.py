"""The splat image tower: a CLIP image encoder that reads 2D Gaussian splats (METHOD.md section 2).

In order, as the paper describes it:

1. **Per-splat features** (:func:`splat_features`), ``F = 5 + C`` numbers per splat:

   - the centre, divided by the image size and mapped to ``[-1, 1]`` (``2 x / W - 1``, ``2 y / H - 1``);
   - the covariance through its Cholesky factor, on a log scale: ``log |l11|``, ``log |l22|`` (the
     diagonal is a scale in pixels; its sign does not change ``Sigma = L L^T``, so the absolute value
     is taken, floored at ``1e-4`` pixels) and ``sign(l21) log(1 + |l21|)`` for the off-diagonal term,
     which can be negative or zero (a sign-preserving log; it is the identity near 0 and grows like
     ``log`` for large shears);
   - the colour as stored.

   Each feature is then standardized with the mean and standard deviation of the *training* splats
   (:func:`fit_feature_statistics`); both are buffers of the module, so they travel in its state
   dict and checkpoints. Fourier features (*open* in the paper; ``fourier_frequencies`` octaves,
   ``sin`` and ``cos`` of ``2^k pi f`` for ``k = 0 .. L - 1``, the NeRF encoding) are concatenated with
   the standardized features and a linear layer maps the ``F (1 + 2 L)`` numbers to the width.
   Invalid (padded or pruned) slots are zeroed before anything is computed on them, so garbage there
   can never reach an attention sum as NaN.
2. **Perceiver resampler** (:class:`PerceiverResampler`): ``resampler_layers`` pre-norm layers of
   cross-attention (``num_latents`` latents query the splat embeddings) and an MLP. Invalid splats
   are masked out of the keys. Every cross-attention also sees one all-zero key and value: an image
   with no valid splat then attends to that zero slot only, so it gets a finite output without a
   special case, and a masked slot never changes anything. The latents are either free learned
   queries (``latents: learned``) or tied to the RGB ViT's patch grid (``latents: teacher_grid``):
   ``K = s^2`` latents, one per cell of an ``s x s`` grid laid over the patches (one per patch when
   ``s`` is the grid's side), each starting at its cell's positional embedding and sitting at its
   cell's centre. Tied latents can carry a **locality bias** (``locality_width > 0``): the attention
   logit of latent ``k`` to splat ``i`` gets ``-|c_i - p_k|^2 / (2 s_h^2)``, with ``c_i`` the splat's
   centre, ``p_k`` the cell's centre (both in ``[-1, 1]``) and one learned width ``s_h`` per head and
   layer, so a latent reads the splats of its own part of the image first.
3. A learned **CLS token** is prepended to the ``K`` latents, then a norm in place of the RGB ViT's
   ``ln_pre``: an RMSNorm (``norm_pre: rms``) or a trainable copy of ``ln_pre`` itself
   (``norm_pre: teacher_ln``). The CLS token starts as the RGB ViT's class embedding plus its first
   positional embedding, the token the RGB blocks are used to seeing first. With tied latents these
   ``1 + K`` tokens (:meth:`SplatImageEncoder.block_inputs`) line up with the RGB ViT's own block
   inputs for the image (:func:`teacher_block_inputs`), which token distillation matches.
4. The RGB CLIP ViT's **transformer blocks**, frozen and *shared* with the RGB model (the same module
   objects, not copies: the student and the teacher run the same weights, and only one copy exists in
   memory). ``unfreeze_first_blocks = k`` (v2 of the paper unfreezes two) deep-copies the first ``k``
   blocks and trains the copies, so the teacher is never changed; the other blocks stay shared and
   frozen (this sets ``requires_grad = False`` on the RGB model's blocks, which belong to a frozen
   teacher anyway).
5. A trainable **RMSNorm + linear projection** (no bias, as CLIP's ``proj``) to the joint space of
   ``rgb.visual.output_dim`` numbers, applied to the CLS token. Both start from the RGB ViT's
   ``ln_post`` scale and ``proj``, so distillation starts in the teacher's output space.

``K`` (``num_latents``) is the number of tokens the blocks see. The paper uses 196 or 98 at 224x224
(all or half of the RGB ViT-B/16's patches); the default RGB model here reads 28x28 images as 16
patches of 7x7 pixels, and the default ``K = 16`` gives one latent per patch (22 splats at most per
image).

:func:`save_splat_encoder` stores only the splat tower's own weights (the shared blocks belong to the
RGB model), its config, image size and feature statistics; :func:`load_splat_encoder` rebuilds it on
an RGB model and checks the file's statistics came back.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gsclip_lib import distributed
from gsclip_lib.atomic_files import save_torch
from gsclip_lib.params import SplatEncoderConfig
from gsclip_lib.splats.container import Splats

NUM_GEOMETRY_FEATURES = 5  # x, y, log|l11|, slog1p(l21), log|l22|
MIN_SCALE = 1e-4  # pixels: floor of |l11|, |l22| before the log
FEATURE_NAMES = ("x", "y", "log_l11", "slog1p_l21", "log_l22")


# ----------------------------------------------------------------------------------------------
# Features and their statistics


def splat_features(splats: Splats, height: int, width: int) -> Tensor:  # [B, N, 5 + C]
    """The raw (unstandardized) per-splat features; invalid slots are all zero.

    See the module docstring for the choice of features.
    """
    valid = splats.valid.unsqueeze(-1)
    # Zero the invalid slots first: garbage (inf, NaN, 0 under a log) must not leak anywhere.
    positions = torch.where(valid, splats.positions, 0.0)
    cholesky = torch.where(valid, splats.cholesky, 1.0)
    colours = torch.where(valid, splats.colours, 0.0)
    size = positions.new_tensor([width, height])
    centre = 2.0 * positions / size - 1.0
    l11, l21, l22 = cholesky.unbind(-1)
    log_l11 = l11.abs().clamp_min(MIN_SCALE).log()
    log_l22 = l22.abs().clamp_min(MIN_SCALE).log()
    slog_l21 = torch.sign(l21) * torch.log1p(l21.abs())
    features = torch.cat([centre, torch.stack([log_l11, slog_l21, log_l22], -1), colours], -1)
    return torch.where(valid, features, 0.0)


@dataclass
class FeatureStats:
    """Per-feature mean and standard deviation of the training splats (``F = 5 + C`` each)."""

    mean: Tensor  # [F] float32
    std: Tensor  # [F] float32, floored at min_std
    count: int  # valid splats they were computed from

    @property
    def num_features(self) -> int:
        return int(self.mean.numel())

    @property
    def channels(self) -> int:
        return self.num_features - NUM_GEOMETRY_FEATURES

    def as_dict(self) -> dict[str, Any]:
        names = list(FEATURE_NAMES) + [f"colour_{c}" for c in range(self.channels)]
        return {
            "count": self.count,
            "mean": dict(zip(names, self.mean.tolist())),
            "std": dict(zip(names, self.std.tolist())),
        }


def fit_feature_statistics(
    batches: Iterable[Any],
    *,
    height: int | None = None,
    width: int | None = None,
    min_std: float = 1e-3,
) -> FeatureStats:
    """Mean and standard deviation of every feature over the valid splats of ``batches``.

    Each item is a :class:`gsclip_lib.data.splat_shards.SplatBatch` (anything with ``splats``, ``height``
    and ``width``) or a :class:`Splats` (then ``height`` and ``width`` must be given). Sums are kept
    in float64. When ``torch.distributed`` is initialized the sums are added over all ranks, so every
    rank gets the same statistics. A standard deviation below ``min_std`` (a feature that is constant
    in training) is raised to it.
    """
    total = None
    total_sq = None
    count = 0
    for item in batches:
        if isinstance(item, Splats):
            if height is None or width is None:
                raise ValueError("pass height= and width= to fit statistics on bare Splats")
            splats, h, w = item, height, width
        else:
            splats, h, w = item.splats, item.height, item.width
        features = splat_features(splats, h, w)[splats.valid].double().cpu()  # [M, F]
        if total is None:
            total = torch.zeros(features.shape[-1], dtype=torch.float64)
            total_sq = torch.zeros_like(total)
        if features.shape[-1] != total.numel():
            raise ValueError(f"batches disagree on the feature count: {features.shape[-1]} vs {total.numel()}")
        total += features.sum(0)
        total_sq += (features * features).sum(0)
        count += features.shape[0]
    if total is None:
        raise ValueError("no batches to fit feature statistics on")
    _, world_size = distributed.rank_and_world_size()
    if world_size > 1:
        packed = torch.cat([total, total_sq, torch.tensor([float(count)], dtype=torch.float64)])
        packed = (distributed.all_reduce_mean(packed.to(distributed.collective_device())) * world_size).cpu()
        size = total.numel()
        total, total_sq, count = packed[:size], packed[size : 2 * size], int(round(float(packed[-1])))
    if count == 0:
        raise ValueError("no valid splats to fit feature statistics on")
    mean = total / count
    variance = (total_sq / count - mean * mean).clamp_min(0.0)
    std = variance.sqrt().clamp_min(min_std)
    return FeatureStats(mean=mean.float(), std=std.float(), count=count)


def fourier_features(features: Tensor, frequencies: Tensor) -> Tensor:  # [..., F (1 + 2L)]
    """``[f, sin(w_k f), cos(w_k f)]`` for every feature ``f`` and frequency ``w_k``."""
    angles = features.unsqueeze(-1) * frequencies  # [..., F, L]
    encoded = torch.cat([angles.sin(), angles.cos()], -1).flatten(-2)  # [..., 2 F L]
    return torch.cat([features, encoded], -1)


# ----------------------------------------------------------------------------------------------
# The module


def patch_grid_size(visual: nn.Module) -> tuple[int, int]:
    """``(rows, columns)`` of the RGB ViT's patch grid."""
    grid = getattr(visual, "grid_size", None)
    if grid is None:
        side = int(round((visual.positional_embedding.shape[0] - 1) ** 0.5))
        grid = (side, side)
    rows, columns = (grid, grid) if isinstance(grid, int) else tuple(grid)
    if rows * columns + 1 != visual.positional_embedding.shape[0]:
        raise ValueError(f"the RGB ViT's grid {rows}x{columns} disagrees with its positional embedding")
    return int(rows), int(columns)


def latent_grid_side(num_latents: int, grid: tuple[int, int]) -> int:
    """The side ``s`` of the ``s x s`` latent grid ``latents: teacher_grid`` lays over the patch grid."""
    side = int(round(num_latents**0.5))
    if side * side != num_latents or side > min(grid):
        raise ValueError(
            f"latents: teacher_grid needs num_latents = s^2 with s <= {min(grid)} (the RGB ViT's patch grid is "
            f"{grid[0]}x{grid[1]}), got num_latents={num_latents}"
        )
    return side


def _bin_centres(cells: int, side: int) -> Tensor:  # [side] in [-1, 1]
    """Centres of adaptive average pooling's ``side`` bins over ``cells`` cells, image-normalized."""
    starts = torch.tensor([(i * cells) // side for i in range(side)], dtype=torch.float32)
    ends = torch.tensor([-((-(i + 1) * cells) // side) for i in range(side)], dtype=torch.float32)
    return (starts + ends) / cells - 1.0


def latent_positions(side: int, grid: tuple[int, int]) -> Tensor:  # [side^2, 2] as (x, y) in [-1, 1]
    """Where each latent of the ``side x side`` grid sits, in the coordinates of the splat centres
    (``2 x / W - 1``), row-major like the ViT's patch tokens."""
    ys, xs = _bin_centres(grid[0], side), _bin_centres(grid[1], side)
    return torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(-1, 2)


def pool_patch_grid(tokens: Tensor, grid: tuple[int, int], side: int) -> Tensor:  # [B, G, W] -> [B, side^2, W]
    """Patch tokens (row-major over ``grid``) averaged into the ``side x side`` latent cells."""
    if (side, side) == tuple(grid):
        return tokens
    batch, _, width = tokens.shape
    image = tokens.transpose(1, 2).reshape(batch, width, *grid)
    return F.adaptive_avg_pool2d(image, side).flatten(2).transpose(1, 2)


def teacher_block_inputs(visual: nn.Module, images: Tensor, side: int | None = None) -> Tensor:
    """What the RGB ViT's first block reads for ``images`` (already prepared for the model):
    ``ln_pre`` of the class token and the patch tokens with their positional embeddings, ``[B, 1 + G, W]``.

    With ``side`` below the grid, the patch tokens (positional embedding included) are averaged into
    the ``side x side`` latent cells before ``ln_pre``: ``[B, 1 + side^2, W]``. These are the targets of
    token distillation (``align.distill_target: tokens``).
    """
    grid = patch_grid_size(visual)
    patches = visual.conv1(images).flatten(2).transpose(1, 2)  # [B, G, W]
    position = visual.positional_embedding.to(patches.dtype)
    patches = patches + position[1:]
    if side is not None:
        patches = pool_patch_grid(patches, grid, side)
    cls = (visual.class_embedding.to(patches.dtype) + position[0]).expand(patches.shape[0], 1, -1)
    return visual.ln_pre(torch.cat([cls, patches], 1))


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


class SplatImageEncoder(nn.Module):
    """Splats in, one joint-space embedding per image out (see the module docstring)."""

    def __init__(
        self,
        visual: nn.Module,
        config: SplatEncoderConfig,
        stats: FeatureStats,
        image_size: int | tuple[int, int],
    ) -> None:
        super().__init__()
        blocks = list(visual.transformer.resblocks)
        if config.unfreeze_first_blocks > len(blocks):
            raise ValueError(
                f"unfreeze_first_blocks={config.unfreeze_first_blocks}, but the RGB ViT has {len(blocks)} blocks"
            )
        width = int(visual.class_embedding.shape[-1])
        self.config = config
        self.height, self.width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.embed_dim = int(visual.output_dim)
        self.channels = stats.channels
        self.num_shared_blocks = len(blocks) - config.unfreeze_first_blocks
        self.batch_first = getattr(visual.transformer, "batch_first", True)
        num_features = stats.num_features
        self.register_buffer("feature_mean", stats.mean.detach().clone().float())
        self.register_buffer("feature_std", stats.std.detach().clone().float())
        self.register_buffer("feature_count", torch.tensor(stats.count, dtype=torch.int64))
        octaves = torch.pi * 2.0 ** torch.arange(config.fourier_frequencies, dtype=torch.float32)
        self.register_buffer("frequencies", octaves, persistent=False)

        self.embed = nn.Linear(num_features * (1 + 2 * config.fourier_frequencies), width)
        initial_latents = positions = None
        if config.latents == "teacher_grid":
            grid = patch_grid_size(visual)
            side = latent_grid_side(config.num_latents, grid)
            positions = latent_positions(side, grid)
            patch_positions = visual.positional_embedding.detach()[1:].float().unsqueeze(0)  # [1, G, W]
            initial_latents = pool_patch_grid(patch_positions, grid, side)[0]
        self.resampler = PerceiverResampler(
            width, config.num_latents, config.resampler_layers, config.resampler_heads, config.mlp_ratio,
            initial_latents=initial_latents, positions=positions, locality_width=config.locality_width,
        )
        first = visual.class_embedding.detach() + visual.positional_embedding.detach()[0]
        self.class_embedding = nn.Parameter(first.clone())
        if config.norm_pre == "teacher_ln":
            self.norm_pre = copy.deepcopy(visual.ln_pre).requires_grad_(True)
        else:
            self.norm_pre = nn.RMSNorm(width)
        for block in blocks[config.unfreeze_first_blocks :]:
            block.requires_grad_(False)
        trained = [copy.deepcopy(block).requires_grad_(True) for block in blocks[: config.unfreeze_first_blocks]]
        self.blocks = nn.ModuleList(trained + blocks[config.unfreeze_first_blocks :])
        self.norm_post = nn.RMSNorm(width)
        self.proj = nn.Linear(width, self.embed_dim, bias=False)
        with torch.no_grad():
            ln_post_weight = getattr(visual.ln_post, "weight", None)
            if ln_post_weight is not None and ln_post_weight.shape == self.norm_post.weight.shape:
                self.norm_post.weight.copy_(ln_post_weight)
            if getattr(visual, "proj", None) is not None and tuple(visual.proj.shape) == (width, self.embed_dim):
                self.proj.weight.copy_(visual.proj.detach().T)

    @property
    def shared_block_names(self) -> list[str]:
        """State-dict prefixes of the blocks shared with the RGB model (not stored by save)."""
        first = self.config.unfreeze_first_blocks
        return [f"blocks.{i}." for i in range(first, first + self.num_shared_blocks)]

    def feature_stats(self) -> FeatureStats:
        return FeatureStats(self.feature_mean.clone(), self.feature_std.clone(), int(self.feature_count))

    def embed_splats(
        self, splats: Splats, height: int | None = None, width: int | None = None
    ) -> tuple[Tensor, Tensor]:  # [B, N, width], [B, N, 2]
        """Step 1: standardized, Fourier-encoded and projected splats, and their centres in ``[-1, 1]``."""
        if splats.channels != self.channels:
            raise ValueError(f"the encoder reads {self.channels}-channel splats, got {splats.channels}")
        dtype = self.embed.weight.dtype
        features = splat_features(splats, height or self.height, width or self.width).to(dtype)
        standardized = (features - self.feature_mean) / self.feature_std
        standardized = torch.where(splats.valid.unsqueeze(-1), standardized, 0.0)
        return self.embed(fourier_features(standardized, self.frequencies.to(dtype))), features[..., :2]

    def block_inputs(self, splats: Splats, height: int | None = None, width: int | None = None) -> Tensor:
        """Steps 1-3: the tokens the RGB blocks read, ``[B, 1 + K, width]`` (CLS first), after ``norm_pre``.

        With ``latents: teacher_grid`` they line up with the RGB ViT's own block inputs
        (:func:`teacher_block_inputs`), which token distillation matches.
        """
        context, centres = self.embed_splats(splats, height, width)
        latents = self.resampler(context, splats.valid, centres)
        cls = self.class_embedding.to(latents.dtype).view(1, 1, -1).expand(latents.shape[0], -1, -1)
        return self.norm_pre(torch.cat([cls, latents], 1))

    def forward(
        self,
        splats: Splats,
        height: int | None = None,
        width: int | None = None,
        *,
        return_tokens: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Embeddings ``[B, D]`` (not normalized); with ``return_tokens`` also the tokens
        ``[B, 1 + K, width]`` after the final RMSNorm (CLS first).

        ``height`` and ``width`` default to the image size the encoder was built for.
        """
        tokens = self.block_inputs(splats, height, width)
        if not self.batch_first:
            tokens = tokens.transpose(0, 1)
        for block in self.blocks:
            tokens = block(tokens)
        if not self.batch_first:
            tokens = tokens.transpose(0, 1)
        tokens = self.norm_post(tokens)
        embeddings = self.proj(tokens[:, 0])
        return (embeddings, tokens) if return_tokens else embeddings


def _visual_of(rgb_model: Any) -> nn.Module:
    """The open_clip VisionTransformer of an RgbClip, an open_clip CLIP or the tower itself."""
    model = getattr(rgb_model, "model", rgb_model)
    visual = getattr(model, "visual", model)
    if not hasattr(visual, "transformer") or not hasattr(visual, "class_embedding"):
        raise ValueError(
            f"need an open_clip VisionTransformer (with transformer.resblocks and class_embedding), "
            f"got {type(visual).__name__}"
        )
    return visual


def build_splat_encoder(
    rgb_model: Any,
    config: SplatEncoderConfig,
    stats: FeatureStats,
    image_size: int | tuple[int, int],
) -> SplatImageEncoder:
    """A splat tower on the blocks of ``rgb_model`` (an RgbClip, an open_clip CLIP or its ``visual``),
    on the RGB model's device."""
    visual = _visual_of(rgb_model)
    encoder = SplatImageEncoder(visual, config, stats, image_size)
    return encoder.to(visual.class_embedding.device)


# ----------------------------------------------------------------------------------------------
# Saving and loading


def splat_encoder_state(encoder: SplatImageEncoder) -> dict[str, Tensor]:
    """The encoder's state dict without the blocks it shares with the RGB model."""
    shared = tuple(encoder.shared_block_names)
    return {name: value for name, value in encoder.state_dict().items() if not name.startswith(shared)}


def save_splat_encoder(encoder: SplatImageEncoder, path: str | os.PathLike, **extra: Any) -> None:
    """Write the splat tower's own weights, config, image size and statistics (atomically)."""
    payload = {
        "config": encoder.config.model_dump(),
        "image_size": [encoder.height, encoder.width],
        "state_dict": {k: v.detach().cpu() for k, v in splat_encoder_state(encoder).items()},
        **extra,
    }
    save_torch(payload, path)


def load_splat_encoder(path: str | os.PathLike, rgb_model: Any) -> SplatImageEncoder:
    """Rebuild a saved splat tower on ``rgb_model``'s blocks (the model it was trained on)."""
    payload = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    state = payload["state_dict"]
    stats = FeatureStats(state["feature_mean"], state["feature_std"], int(state["feature_count"]))
    config = SplatEncoderConfig.model_validate(payload["config"])
    encoder = build_splat_encoder(rgb_model, config, stats, tuple(payload["image_size"]))
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    shared = tuple(encoder.shared_block_names)
    missing = [name for name in missing if not name.startswith(shared)]
    if missing or unexpected:
        raise ValueError(f"{path} does not fit this RGB model: missing {missing}, unexpected {unexpected}")
    return encoder


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
    reused = _count(_visual_of(rgb_model).transformer.parameters())
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
