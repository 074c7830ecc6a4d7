"""The splat image tower: a CLIP image encoder that reads 2D Gaussian splats (METHOD.md section 2).

In order, as the paper describes it:

1. **Per-splat features** (:mod:`gsclip_lib.models.splat_features`): ``F = 5 + C`` numbers per splat
   (centre, log-scaled Cholesky factor, colour), standardized with the mean and standard deviation
   of the *training* splats (:func:`~gsclip_lib.models.splat_features.fit_feature_statistics`; both
   are buffers of the module, so they travel in its state dict and checkpoints), concatenated with
   their Fourier features, and mapped to the width by a linear layer.
2. **Perceiver resampler** (:mod:`gsclip_lib.models.perceiver_resampler`): ``num_latents`` latents
   read the splat embeddings through ``resampler_layers`` layers of masked cross-attention. The
   latents are either free learned queries (``latents: learned``) or tied to the RGB ViT's patch
   grid (``latents: teacher_grid``): ``K = s^2`` latents, one per cell of an ``s x s`` grid laid over
   the patches (one per patch when ``s`` is the grid's side), each starting at its cell's positional
   embedding and sitting at its cell's centre (:func:`latent_positions`). Tied latents can carry a
   **locality bias** (``locality_width > 0``), so a latent reads the splats of its own part of the
   image first.
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
an RGB model and refuses a file whose weights do not fit that model.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gsclip_lib.atomic_files import save_torch
from gsclip_lib.models.perceiver_resampler import PerceiverResampler
from gsclip_lib.models.splat_features import FeatureStats, fourier_features, splat_features
from gsclip_lib.params import SplatEncoderConfig
from gsclip_lib.splats.container import Splats


# ----------------------------------------------------------------------------------------------
# The RGB ViT's patch grid, and latents tied to it


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


# ----------------------------------------------------------------------------------------------
# The module


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


def visual_of(rgb_model: Any) -> nn.Module:
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
    visual = visual_of(rgb_model)
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
