"""Batched 2D Gaussian splats (METHOD.md section 1).

A splat has a centre ``mu`` (2 numbers), a lower-triangular Cholesky factor ``L`` of its covariance
``Sigma = L L^T`` (3 numbers: l11, l21, l22) and a colour (C numbers): 5 + C numbers, no opacity.

Conventions used everywhere in gsclip:

- positions are in pixel units, ``x`` along the width and ``y`` along the height; the centre of pixel
  ``(row i, column j)`` sits at ``(x, y) = (j + 0.5, i + 0.5)``;
- the Cholesky factor is in pixel units too, so an isotropic splat of standard deviation ``s`` pixels
  has ``(l11, l21, l22) = (s, 0, s)``;
- colours are in the image's units (images are floats in ``[0, 1]``) and may be negative: the render
  is an order-free sum, not an alpha blend;
- a boolean ``valid`` mask marks splats that exist; pruned or padded splats are ``False`` and must not
  contribute to anything (render, bytes, encoder input).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from gsclip_lib.errors import InputError
from kernels.arguments import check_rasterizer_inputs


@dataclass(frozen=True)
class Splats:
    """A batch of B images' splats, N slots per image (some slots may be invalid)."""

    positions: Tensor  # [B, N, 2] float, (x, y) in pixels
    cholesky: Tensor  # [B, N, 3] float, (l11, l21, l22) in pixels
    colours: Tensor  # [B, N, C] float
    valid: Tensor  # [B, N] bool

    def __post_init__(self) -> None:
        check_splat_tensors(self.positions, self.cholesky, self.colours, self.valid)

    @classmethod
    def from_tensors(
        cls,
        positions: Tensor,  # [B, N, 2]
        cholesky: Tensor,  # [B, N, 3]
        colours: Tensor,  # [B, N, C]
        valid: Tensor | None = None,  # [B, N] bool; all True when omitted
    ) -> "Splats":
        if valid is None:
            valid = torch.ones(positions.shape[:2], dtype=torch.bool, device=positions.device)
        return cls(positions, cholesky, colours, valid)

    @property
    def batch_size(self) -> int:
        return self.positions.shape[0]

    @property
    def num_slots(self) -> int:
        """N, the number of splat slots per image (valid or not)."""
        return self.positions.shape[1]

    @property
    def channels(self) -> int:
        return self.colours.shape[2]

    @property
    def device(self) -> torch.device:
        return self.positions.device

    def counts(self) -> Tensor:  # [B] int64
        """Number of valid splats per image."""
        return self.valid.sum(dim=1)

    def detach(self) -> "Splats":
        return Splats(
            self.positions.detach(), self.cholesky.detach(), self.colours.detach(), self.valid
        )

    def to(self, *args, **kwargs) -> "Splats":
        return Splats(
            self.positions.to(*args, **kwargs),
            self.cholesky.to(*args, **kwargs),
            self.colours.to(*args, **kwargs),
            self.valid.to(device=self.positions.to(*args, **kwargs).device),
        )

    def index(self, images: Tensor | slice | list[int]) -> "Splats":
        """The splats of a subset of the images (first dimension)."""
        return Splats(
            self.positions[images], self.cholesky[images], self.colours[images], self.valid[images]
        )

    def with_valid(self, valid: Tensor) -> "Splats":
        return replace(self, valid=valid)

    def covariance(self) -> Tensor:  # [B, N, 2, 2]
        """Sigma = L L^T for every slot."""
        l11, l21, l22 = self.cholesky.unbind(-1)
        sxx = l11 * l11
        sxy = l11 * l21
        syy = l21 * l21 + l22 * l22
        return torch.stack([torch.stack([sxx, sxy], -1), torch.stack([sxy, syy], -1)], -2)


PIXEL_TOLERANCE = 1e-4  # images a resampler overshot by a rounding error are still accepted
# Beyond 2^24 pixels a float32 coordinate cannot tell neighbouring pixels apart: no render is right.
MAX_COORDINATE = float(2**24)


def check_splat_tensors(positions: Tensor, cholesky: Tensor, colours: Tensor, valid: Tensor) -> None:
    """Raise InputError (a ValueError) naming the problem when the four splat tensors do not fit
    together: the rasterizers' own check (:func:`kernels.arguments.check_rasterizer_inputs`)."""
    try:
        check_rasterizer_inputs(positions, cholesky, colours, valid)
    except ValueError as error:
        raise InputError(f"splat {error}") from None


def check_images(images: Tensor) -> None:
    """Raise ValueError naming the problem unless ``images`` is a usable ``[B, C, H, W]`` float batch."""
    if not isinstance(images, Tensor):
        raise InputError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4:
        raise InputError(
            f"images must have rank 4, [B, C, H, W]; got rank {images.dim()} with shape "
            f"{tuple(images.shape)}"
        )
    if not images.is_floating_point():
        raise InputError(
            f"images must be floating point in [0, 1], got {images.dtype} "
            "(convert uint8 with images.float() / 255)"
        )
    batch, channels, height, width = images.shape
    if batch == 0:
        raise InputError("images is an empty batch (B = 0)")
    if height == 0 or width == 0:
        raise InputError(f"images are empty: height {height} x width {width}")
    if channels < 1:
        raise InputError(f"images need at least one channel, got C = {channels}")
    if channels > 4 and images.shape[-1] in (1, 3, 4):
        raise InputError(
            f"images look channels-last {tuple(images.shape)}; pass [B, C, H, W] "
            "(images.permute(0, 3, 1, 2))"
        )
    if channels > 4:
        raise InputError(f"images have {channels} channels; expected 1 (gray) or 3 (RGB)")
    finite = torch.isfinite(images)
    if not bool(finite.all()):
        bad = (~finite).flatten(1).any(1).nonzero().flatten().tolist()
        raise InputError(f"images contain NaN or inf pixels (images at batch index {bad[:10]})")
    low, high = float(images.min()), float(images.max())
    if low < -PIXEL_TOLERANCE or high > 1 + PIXEL_TOLERANCE:
        hint = " (0-255 data: divide by 255)" if high > 1.5 else ""
        raise InputError(f"images must lie in [0, 1]; these hold values from {low:.4g} to {high:.4g}{hint}")


def check_splat_count(num_splats: int, height: int, width: int) -> None:
    """Raise ValueError unless 0 < N <= H * W."""
    if not isinstance(num_splats, int) or isinstance(num_splats, bool):
        raise InputError(f"the splat count must be an int, got {num_splats!r}")
    if num_splats <= 0:
        raise InputError(f"the splat count must be positive, got N = {num_splats}")
    if num_splats > height * width:
        raise InputError(
            f"more splats than pixels: N = {num_splats} for a {height}x{width} image "
            f"({height * width} pixels)"
        )


def check_same_batch(splats: Splats, images: Tensor) -> None:
    """Raise ValueError unless the splats and the images describe the same batch and channels."""
    if splats.batch_size != images.shape[0]:
        raise InputError(
            f"mismatched batch: {splats.batch_size} splat sets for {images.shape[0]} images"
        )
    if splats.channels != images.shape[1]:
        raise InputError(
            f"wrong channel count: splats have C = {splats.channels}, images have C = {images.shape[1]}"
        )


def check_renderable(splats: "Splats") -> None:
    """Raise InputError unless every valid splat can be rendered: one floating dtype for the three
    tensors, finite geometry and colour, centres within +-2^24 pixels, a non-zero Cholesky diagonal.

    An invalid slot may hold anything; a valid splat with such values would otherwise vanish from
    the render (or poison it) without a word.
    """
    dtypes = {splats.positions.dtype, splats.cholesky.dtype, splats.colours.dtype}
    if len(dtypes) != 1:
        raise InputError(
            f"splat tensors must share one dtype: positions {splats.positions.dtype}, cholesky "
            f"{splats.cholesky.dtype}, colours {splats.colours.dtype}"
        )
    valid = splats.valid
    problems = {
        "non-finite centre": ~torch.isfinite(splats.positions).all(-1),
        "centre beyond 2^24 pixels": splats.positions.abs().amax(-1) > MAX_COORDINATE,
        "non-finite Cholesky factor": ~torch.isfinite(splats.cholesky).all(-1),
        "zero Cholesky diagonal": (splats.cholesky[..., 0] == 0) | (splats.cholesky[..., 2] == 0),
        "non-finite colour": ~torch.isfinite(splats.colours).all(-1),
    }
    if not bool(torch.stack(list(problems.values())).logical_and(valid).any()):  # one host sync when all is well
        return
    for problem, bad in problems.items():
        bad = bad & valid
        if bool(bad.any()):
            image, slot = (int(i) for i in bad.nonzero()[0])
            raise InputError(
                f"{int(bad.sum())} valid splat(s) with a {problem} (first: image {image}, slot {slot}); "
                "mark unusable slots invalid, or fix the values"
            )
