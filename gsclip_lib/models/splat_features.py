"""Step 1 of the splat image tower (:mod:`gsclip_lib.models.splat_encoder`, METHOD.md section 2):
what the tower reads of each splat, and the statistics that standardize it.

:func:`splat_features` gives ``F = 5 + C`` numbers per splat:

- the centre, divided by the image size and mapped to ``[-1, 1]`` (``2 x / W - 1``, ``2 y / H - 1``);
- the covariance through its Cholesky factor, on a log scale: ``log |l11|``, ``log |l22|`` (the
  diagonal is a scale in pixels; its sign does not change ``Sigma = L L^T``, so the absolute value
  is taken, floored at ``1e-4`` pixels) and ``sign(l21) log(1 + |l21|)`` for the off-diagonal term,
  which can be negative or zero (a sign-preserving log; it is the identity near 0 and grows like
  ``log`` for large shears);
- the colour as stored.

Invalid (padded or pruned) slots are zeroed before anything is computed on them, so garbage there
can never reach an attention sum as NaN. :func:`fit_feature_statistics` gives the mean and standard
deviation of every feature over the *training* splats (:class:`FeatureStats`), which the encoder
standardizes with. :func:`fourier_features` is the encoding the encoder concatenates with the
standardized features (*open* in the paper; ``fourier_frequencies`` octaves, ``sin`` and ``cos`` of
``2^k pi f`` for ``k = 0 .. L - 1``, the NeRF encoding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import Tensor

from gsclip_lib import distributed
from gsclip_lib.splats.container import Splats

NUM_GEOMETRY_FEATURES = 5  # x, y, log|l11|, slog1p(l21), log|l22|
MIN_SCALE = 1e-4  # pixels: floor of |l11|, |l22| before the log
FEATURE_NAMES = ("x", "y", "log_l11", "slog1p_l21", "log_l22")


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
    world_size = distributed.process_group_size()
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

